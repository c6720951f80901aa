// A matrix W [N, K] stored as grouped 4/8-bit codes, one row per output (layout: kernels/vocab_codes.py),
// read straight from its codes on CPU:
//   code_rows:   rows `ids` of W (the embedding lookup), fp32 [T, K]
//   code_matmul: x @ W.T (the LM head's logits, a W4 linear), fp32 [M, N], fp32 accumulation
// Every weight is dequantized as the torch reference does it, (q - z) * s in fp32, plus the kept row's
// residual; only the order of the dot products' sums differs. One exception to "as the reference": with
// AVX2 one activation row (decode at batch 1) uses the group-sum form s * (sum q x - z * sum x), which
// moves the subtract and multiply out of the inner loop (an exact identity; only rounding differs).
// With AVX-512 a 4-bit group's 16 possible weights are one register, and each code picks its weight with one
// permute (no int -> float conversion); with AVX2 (+ FMA, F16C: every AVX2 CPU) 32 codes are widened at a
// time; elsewhere plain loops.
// Up to kDirectRows activation rows (decode) the product streams the codes once, each block of weights
// feeding every activation row from registers; more rows go through tiles of dequantized rows and the BLAS
// GEMM: L2-sized, one per task, up to kTaskTileRows; past that one big tile under the multithreaded GEMM.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LAPE_AWQ_AVX2 1
#endif

namespace {

// Activation rows per pass over a vocabulary row (their accumulators stay in registers).
constexpr int64_t kRowsPerPass = 8;
// More activation rows than this go through the GEMM path (measured on AVX2, 2 cores: the direct path and
// the per-task tiles break even at 16 rows; AVX-512, earlier, against the shared tile: the same).
constexpr int64_t kDirectRows = 16;
// Up to this many activation rows each task of the GEMM path has its own tile of dequantized W, of
// kTileBytes: it stays in the core's L2 while the GEMM reads it. Past it (a long prompt) x no longer fits
// there, and one shared tile of kSharedTileRows rows under the multithreaded GEMM measured faster (AVX2,
// 2 cores: 256 to 2,048 rows 5-15% faster, 64 to 128 rows 5-25% slower).
constexpr int64_t kTaskTileRows = 128;
constexpr int64_t kTileBytes = 256 * 1024;
constexpr int64_t kSharedTileRows = 4096;

struct Codes {
  const uint8_t* codes;
  const float* scales;
  const float* zeros;
  const int32_t* slots;  // null when no row is kept
  const at::Half* residual;  // fp16 [k, H], as stored: converted to fp32 where it is added
  int64_t rows, hidden, groups, group, width, bits;

  const at::Half* kept_residual(int64_t v) const {
    return (slots != nullptr && slots[v] >= 0) ? residual + slots[v] * hidden : nullptr;
  }

  // Code k of row v.
  int32_t code(const uint8_t* q, int64_t k) const {
    if (bits == 8) return q[k];
    const int64_t in_block = k % 32;
    const uint8_t byte = q[(k / 32) * 16 + in_block % 16];
    return in_block < 16 ? (byte & 0x0F) : (byte >> 4);
  }

  // Row v dequantized into out[0 .. hidden), plus its residual when kept.
  void row(int64_t v, float* out) const {
    const uint8_t* q = codes + v * width;
    const float* s = scales + v * groups;
    const float* z = zeros + v * groups;
    const at::Half* res = kept_residual(v);
#if defined(__AVX512F__)
    for (int64_t g = 0; g < groups; ++g) {
      const __m512 sv = _mm512_set1_ps(s[g]), zv = _mm512_set1_ps(z[g]);
      for (int64_t k = g * group; k < (g + 1) * group; k += 16) {
        const __m128i bytes =
            bits == 4 ? nibbles(q, k) : _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k));
        __m512 w = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes)), zv), sv);
        if (res != nullptr) w = _mm512_add_ps(w, load_half(res + k));
        _mm512_storeu_ps(out + k, w);
      }
    }
#elif defined(LAPE_AWQ_AVX2)
    for (int64_t g = 0; g < groups; ++g) {
      const __m256 sv = _mm256_set1_ps(s[g]), zv = _mm256_set1_ps(z[g]);
      for (int64_t k = g * group; k < (g + 1) * group; k += 32) {
        __m256 c[4];
        codes32(q, k, c);
        for (int j = 0; j < 4; ++j) {
          __m256 w = _mm256_mul_ps(_mm256_sub_ps(c[j], zv), sv);
          if (res != nullptr) w = _mm256_add_ps(w, load_half8(res + k + 8 * j));
          _mm256_storeu_ps(out + k + 8 * j, w);
        }
      }
    }
#else
    for (int64_t k = 0; k < hidden; ++k) {
      out[k] = (static_cast<float>(code(q, k)) - z[k / group]) * s[k / group];
      if (res != nullptr) out[k] += static_cast<float>(res[k]);
    }
#endif
  }

#if defined(__AVX512F__)
  static __m512 load_half(const at::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }

  // 4 bits: the 16 codes k .. k + 15 (k a multiple of 16) as bytes.
  static __m128i nibbles(const uint8_t* q, int64_t k) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + (k / 32) * 16));
    const __m128i low = _mm_set1_epi8(0x0F);
    return (k % 32 == 0) ? _mm_and_si128(b, low) : _mm_and_si128(_mm_srli_epi16(b, 4), low);
  }
#elif defined(LAPE_AWQ_AVX2)
  static __m256 load_half8(const at::Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }

  static float sum8(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
  }

  // The 32 codes k .. k + 31 (k a multiple of 32) of a row as four vectors of 8 floats.
  void codes32(const uint8_t* q, int64_t k, __m256 c[4]) const {
    __m128i lo, hi;
    if (bits == 4) {  // 16 bytes: codes 0-15 in the low nibbles, 16-31 in the high ones
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k / 2));
      const __m128i mask = _mm_set1_epi8(0x0F);
      lo = _mm_and_si128(b, mask);
      hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
    } else {
      lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k));
      hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k + 16));
    }
    c[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    c[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    c[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    c[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
  }

  // Row v's logit for one activation row x (decode), in the group-sum form
  //   sum_g s_g * (sum_{k in g} c_k x_k - z_g * xsum_g),   xsum_g = sum_{k in g} x_k (given),
  // which drops the per-weight subtract and multiply: the codes go straight into the FMAs, and four
  // accumulators keep the FMA latency hidden. Only the order of the sums differs from (c - z) * s . x.
  float logit1(int64_t v, const float* x, const float* xsum) const {
    const uint8_t* q = codes + v * width;
    const float* s = scales + v * groups;
    const float* z = zeros + v * groups;
    __m256 total = _mm256_setzero_ps();
    float zero_term = 0.0f;
    for (int64_t g = 0; g < groups; ++g) {
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t k = g * group; k < (g + 1) * group; k += 32) {
        __m256 c[4];
        codes32(q, k, c);
        a0 = _mm256_fmadd_ps(c[0], _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(c[1], _mm256_loadu_ps(x + k + 8), a1);
        a2 = _mm256_fmadd_ps(c[2], _mm256_loadu_ps(x + k + 16), a2);
        a3 = _mm256_fmadd_ps(c[3], _mm256_loadu_ps(x + k + 24), a3);
      }
      const __m256 sum = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
      total = _mm256_fmadd_ps(_mm256_set1_ps(s[g]), sum, total);
      zero_term += s[g] * z[g] * xsum[g];
    }
    if (const at::Half* res = kept_residual(v)) {
      for (int64_t k = 0; k < hidden; k += 8) {
        total = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), load_half8(res + k), total);
      }
    }
    return sum8(total) - zero_term;
  }
#endif

  // Logits of row v (its kept residual included) for MT activation rows x (row stride `hidden`), written
  // to y[m * ystride].
  template <int MT>
  void logits(int64_t v, const float* x, float* y, int64_t ystride) const {
    const uint8_t* q = codes + v * width;
    const float* s = scales + v * groups;
    const float* z = zeros + v * groups;
    const at::Half* res = kept_residual(v);
#if defined(__AVX512F__)
    __m512 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      const __m512 sv = _mm512_set1_ps(s[g]), zv = _mm512_set1_ps(z[g]);
      if (bits == 4) {
        // The group's 16 possible weights (c - z) * s, c = 0 .. 15: each code's weight is one permute away
        // (the permute reads the low 4 bits of each lane: the low nibble needs no mask).
        const __m512 codes16 = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
        const __m512 table = _mm512_mul_ps(_mm512_sub_ps(codes16, zv), sv);
        for (int64_t k = g * group; k < (g + 1) * group; k += 32) {
          const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k / 2));
          const __m512i lanes = _mm512_cvtepu8_epi32(bytes);
          const __m512 lo = _mm512_permutexvar_ps(lanes, table);
          const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(lanes, 4), table);
          for (int m = 0; m < MT; ++m) {
            acc[m] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * hidden + k), lo, acc[m]);
            acc[m] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * hidden + k + 16), hi, acc[m]);
          }
        }
      } else {
        for (int64_t k = g * group; k < (g + 1) * group; k += 16) {
          const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k));
          const __m512 c = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes));
          const __m512 w = _mm512_mul_ps(_mm512_sub_ps(c, zv), sv);
          for (int m = 0; m < MT; ++m) {
            acc[m] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * hidden + k), w, acc[m]);
          }
        }
      }
    }
    if (res != nullptr) {
      for (int64_t k = 0; k < hidden; k += 16) {
        const __m512 r = load_half(res + k);
        for (int m = 0; m < MT; ++m) acc[m] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * hidden + k), r, acc[m]);
      }
    }
    for (int m = 0; m < MT; ++m) y[m * ystride] = _mm512_reduce_add_ps(acc[m]);
#elif defined(LAPE_AWQ_AVX2)
    // Each block of 32 weights is dequantized once and feeds 4 * MT FMAs from registers (4 weight vectors +
    // MT * A accumulators + 1 <= 16 ymm); A accumulators per activation row hide the FMA latency when MT is
    // small.
    constexpr int A = MT <= 2 ? 4 : (MT <= 4 ? 2 : 1);
    __m256 acc[MT][A];
    for (int c = 0; c < MT; ++c)
      for (int a = 0; a < A; ++a) acc[c][a] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      const __m256 sv = _mm256_set1_ps(s[g]), zv = _mm256_set1_ps(z[g]);
      for (int64_t k = g * group; k < (g + 1) * group; k += 32) {
        __m256 w[4];
        codes32(q, k, w);
        for (int j = 0; j < 4; ++j) {
          w[j] = _mm256_mul_ps(_mm256_sub_ps(w[j], zv), sv);
          if (res != nullptr) w[j] = _mm256_add_ps(w[j], load_half8(res + k + 8 * j));
        }
        for (int c = 0; c < MT; ++c) {
          for (int j = 0; j < 4; ++j) {
            acc[c][j % A] = _mm256_fmadd_ps(w[j], _mm256_loadu_ps(x + c * hidden + k + 8 * j), acc[c][j % A]);
          }
        }
      }
    }
    for (int c = 0; c < MT; ++c) {
      __m256 sum = acc[c][0];
      for (int a = 1; a < A; ++a) sum = _mm256_add_ps(sum, acc[c][a]);
      y[c * ystride] = sum8(sum);
    }
#else
    thread_local std::vector<float> w;  // one buffer per thread, not one allocation per row
    w.resize(hidden);
    row(v, w.data());
    for (int m = 0; m < MT; ++m) {
      float sum = 0.0f;
      for (int64_t k = 0; k < hidden; ++k) sum += x[m * hidden + k] * w[k];
      y[m * ystride] = sum;
    }
#endif
  }

  void logits_rows(int64_t v, const float* x, int64_t n, float* y, int64_t ystride) const {
    switch (n) {
      case 8: logits<8>(v, x, y, ystride); break;
      case 7: logits<7>(v, x, y, ystride); break;
      case 6: logits<6>(v, x, y, ystride); break;
      case 5: logits<5>(v, x, y, ystride); break;
      case 4: logits<4>(v, x, y, ystride); break;
      case 3: logits<3>(v, x, y, ystride); break;
      case 2: logits<2>(v, x, y, ystride); break;
      default: logits<1>(v, x, y, ystride); break;
    }
  }
};

Codes check_codes(const torch::Tensor& qweight, const torch::Tensor& scales, const torch::Tensor& zeros,
                  const torch::Tensor& slots, const torch::Tensor& residual, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, "codes are 4 or 8 bits, got ", bits);
  TORCH_CHECK(qweight.dtype() == torch::kUInt8 && qweight.dim() == 2 && qweight.is_contiguous(),
              "qweight must be contiguous uint8 [V, H * bits / 8]");
  const int64_t rows = qweight.size(0), width = qweight.size(1), hidden = width * 8 / bits;
  TORCH_CHECK(hidden % 32 == 0, "hidden size must be a multiple of 32, got ", hidden);
  TORCH_CHECK(scales.dtype() == torch::kFloat32 && scales.dim() == 2 && scales.is_contiguous() &&
                  scales.size(0) == rows && scales.size(1) > 0 && hidden % scales.size(1) == 0,
              "scales must be contiguous float32 [V, H / group]");
  TORCH_CHECK(zeros.dtype() == torch::kFloat32 && zeros.sizes() == scales.sizes() && zeros.is_contiguous(),
              "zeros must be contiguous float32 of the scales' shape");
  const int64_t group = hidden / scales.size(1);
  TORCH_CHECK(group % 32 == 0, "group size must be a multiple of 32, got ", group);
  const bool kept = slots.numel() > 0;
  if (kept) {
    TORCH_CHECK(slots.dtype() == torch::kInt32 && slots.dim() == 1 && slots.size(0) == rows &&
                    slots.is_contiguous(),
                "slots must be contiguous int32 [V]");
    TORCH_CHECK(residual.dtype() == torch::kHalf && residual.dim() == 2 && residual.size(1) == hidden &&
                    residual.is_contiguous(),
                "residual must be contiguous float16 [k, H]");
    // Every slot < k is checked where the slot map is built (CodeMatrix.build), not on every call.
  }
  return Codes{qweight.data_ptr<uint8_t>(),
               scales.data_ptr<float>(),
               zeros.data_ptr<float>(),
               kept ? slots.data_ptr<int32_t>() : nullptr,
               kept ? residual.data_ptr<at::Half>() : nullptr,
               rows,
               hidden,
               scales.size(1),
               group,
               width,
               bits};
}

}  // namespace

torch::Tensor code_rows(const torch::Tensor& ids, const torch::Tensor& qweight,
                              const torch::Tensor& scales, const torch::Tensor& zeros,
                              const torch::Tensor& slots, const torch::Tensor& residual, int64_t bits) {
  const Codes codes = check_codes(qweight, scales, zeros, slots, residual, bits);
  TORCH_CHECK(ids.dtype() == torch::kInt64 && ids.dim() == 1 && ids.is_contiguous(),
              "ids must be contiguous int64 [T]");
  const int64_t tokens = ids.size(0);
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(id[t] >= 0 && id[t] < codes.rows, "token id ", id[t], " is outside [0, ", codes.rows, ")");
  }
  auto out = torch::empty({tokens, codes.hidden}, scales.options());
  float* o = out.data_ptr<float>();
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) codes.row(id[t], o + t * codes.hidden);
  });
  return out;
}

// x @ W.T, plus the kept input channels' term x[:, cols_idx] @ cols_values (cols_idx empty: none).
torch::Tensor code_matmul(const torch::Tensor& x, const torch::Tensor& qweight,
                          const torch::Tensor& scales, const torch::Tensor& zeros,
                          const torch::Tensor& slots, const torch::Tensor& residual, int64_t bits,
                          const torch::Tensor& cols_idx, const torch::Tensor& cols_values) {
  const Codes codes = check_codes(qweight, scales, zeros, slots, residual, bits);
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous() && x.size(1) == codes.hidden,
              "x must be contiguous float32 [M, K]");
  const int64_t m_rows = x.size(0), hidden = codes.hidden, rows = codes.rows, cols = cols_idx.numel();
  if (cols > 0) {
    TORCH_CHECK(cols_idx.dtype() == torch::kInt64 && cols_idx.dim() == 1, "cols_idx must be int64 [c]");
    TORCH_CHECK(cols_values.dtype() == torch::kFloat32 && cols_values.is_contiguous() &&
                    cols_values.dim() == 2 && cols_values.size(0) == cols && cols_values.size(1) == rows,
                "cols_values must be contiguous float32 [c, N]");
  }
  auto out = torch::empty({m_rows, rows}, x.options());
  if (m_rows == 0) return out;
  // The kept input channels' activations, [M, c] (index_select checks the indices).
  const torch::Tensor picked = cols > 0 ? x.index_select(1, cols_idx).contiguous() : torch::Tensor();
  const float* xp = x.data_ptr<float>();
  float* o = out.data_ptr<float>();
  if (m_rows > kTaskTileRows) {
    // A long prompt: dequantize a big tile of W's rows (kept residuals included) with every thread, then let
    // the multithreaded BLAS GEMM block x and the tile as it likes.
    torch::Tensor tile = torch::empty({std::min(kSharedTileRows, rows), hidden}, x.options());
    float* buffer = tile.data_ptr<float>();
    for (int64_t v0 = 0; v0 < rows; v0 += kSharedTileRows) {
      const int64_t n = std::min(kSharedTileRows, rows - v0);
      at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) codes.row(v0 + r, buffer + r * hidden);
      });
      torch::Tensor y = out.narrow(1, v0, n);
      at::mm_out(y, x, tile.narrow(0, 0, n).t());
    }
    if (cols > 0) out.addmm_(picked, cols_values);
    return out;
  }
  if (m_rows > kDirectRows) {
    // A batch of decodes or a short prompt: each task dequantizes a tile of W's rows into its own L2-sized
    // buffer and multiplies it by all of x with the BLAS GEMM (single-threaded inside the task).
    const int64_t tile_rows = std::min(rows, std::max<int64_t>(8, kTileBytes / (hidden * 4)));
    const at::ThreadLocalState caller;  // inference mode etc.: the tasks' torch calls run as the caller's
    at::parallel_for(0, (rows + tile_rows - 1) / tile_rows, 1, [&](int64_t begin, int64_t end) {
      const at::ThreadLocalStateGuard as_caller(caller);
      torch::Tensor tile = torch::empty({tile_rows, hidden}, x.options());
      float* buffer = tile.data_ptr<float>();
      for (int64_t t = begin; t < end; ++t) {
        const int64_t v0 = t * tile_rows, n = std::min(tile_rows, rows - v0);
        for (int64_t r = 0; r < n; ++r) codes.row(v0 + r, buffer + r * hidden);
        torch::Tensor y = out.narrow(1, v0, n);
        at::mm_out(y, x, tile.narrow(0, 0, n).t());
      }
    });
    if (cols > 0) out.addmm_(picked, cols_values);
    return out;
  }
  const float* xc = cols > 0 ? picked.data_ptr<float>() : nullptr;
  const float* cv = cols > 0 ? cols_values.data_ptr<float>() : nullptr;
  auto add_kept_columns = [&](int64_t v) {  // the kept input channels' term of output v
    for (int64_t m = 0; m < m_rows && cols > 0; ++m) {
      float sum = 0.0f;
      for (int64_t j = 0; j < cols; ++j) sum += xc[m * cols + j] * cv[j * rows + v];
      o[m * rows + v] += sum;
    }
  };
#if defined(LAPE_AWQ_AVX2)
  if (m_rows == 1) {
    std::vector<float> xsum(codes.groups, 0.0f);  // each group's sum of x, for the group-sum form
    for (int64_t k = 0; k < hidden; ++k) xsum[k / codes.group] += xp[k];
    at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
      for (int64_t v = begin; v < end; ++v) {
        o[v] = codes.logit1(v, xp, xsum.data());
        add_kept_columns(v);
      }
    });
    return out;
  }
#endif
  // 256 rows per task: enough to hide the parallel overhead, fine enough to balance the cores.
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t v = begin; v < end; ++v) {
      for (int64_t m0 = 0; m0 < m_rows; m0 += kRowsPerPass) {  // the row's codes stay in L1 across passes
        const int64_t n = std::min(kRowsPerPass, m_rows - m0);
        codes.logits_rows(v, xp + m0 * hidden, n, o + m0 * rows + v, rows);
      }
      add_kept_columns(v);
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("code_rows", &code_rows, "rows of a matrix of codes, dequantized (fp32)");
  m.def("code_matmul", &code_matmul, "x @ W.T for a matrix of codes (fp32)");
}
