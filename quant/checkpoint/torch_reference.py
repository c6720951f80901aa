"""The torch reference for running a checkpoint: an nn.Linear replacement holding the packed W4 tensors
and the sparse FP16 part, exactly as stored, and a transformers model built from a checkpoint with it (a
quantized vocabulary becomes its dequantized weight plus the kept rows). The numerical reference for the
kernels and the vLLM method."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lape_awq.kernels.awq_packing import dense_with_kept, pack_int4
from lape_awq.kernels.sparse_correction import SparseKind
from lape_awq.kernels.vocab_codes import dense_vocab
from lape_awq.quant.architectures import architecture_of
from lape_awq.quant.checkpoint.layout import config_for_model, quantized_linears, sparse_names, vocab_modules
from lape_awq.quant.checkpoint.reader import read_checkpoint
from lape_awq.quant.errors import UserError
from lape_awq.quant.w4_math import QuantizedLinear


class W4Linear(nn.Module):
    """y = x @ dequant(qweight, qzeros, scales) (+ bias) + sparse term, in x's dtype."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int,
        bias: bool,
        num_sparse: int = 0,
        sparse_kind: SparseKind | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.sparse_kind = sparse_kind
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(in_features, out_features // 8, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(groups, out_features // 8, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16) if bias else None)
        self.register_buffer("sparse_idx", torch.zeros(num_sparse, dtype=torch.int32) if num_sparse else None)
        width = in_features if sparse_kind == "rows" else out_features
        self.register_buffer(
            "sparse", torch.zeros(num_sparse, width, dtype=torch.float16) if num_sparse else None
        )
        self._dense: torch.Tensor | None = None

    @classmethod
    def from_quantized(cls, q: QuantizedLinear, kind: SparseKind | None) -> W4Linear:
        codes = q.quant.codes
        k = 0 if q.sparse_idx is None else q.sparse_idx.numel()
        m = cls(
            codes.shape[1], codes.shape[0], q.quant.group_size, q.bias is not None, k, kind if k else None
        )
        m.qweight.copy_(pack_int4(codes.T))
        m.qzeros.copy_(pack_int4(q.quant.zeros.T))
        m.scales.copy_(q.quant.scales.T.half())
        if q.bias is not None:
            m.bias.copy_(q.bias.half())
        if k:
            m.sparse_idx.copy_(q.sparse_idx.int())
            m.sparse.copy_(q.sparse)
        return m

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The effective weight [in, out]: dequantized W4 plus the sparse part (cached per dtype)."""
        if self._dense is None or self._dense.dtype != dtype:
            self._dense = dense_with_kept(
                self.qweight,
                self.qzeros,
                self.scales.to(dtype),
                self.group_size,
                self.sparse_idx,
                self.sparse,
                rows=self.sparse_kind == "rows",
            )
        return self._dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.dense_weight(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)


def install_quantized(model: nn.Module, quantized: dict[str, QuantizedLinear]) -> None:
    """Replace each named nn.Linear of `model` by its W4Linear."""
    arch = architecture_of(model)
    for name, q in quantized.items():
        parent_name, _, child = name.rpartition(".")
        kind = arch.neuron_dim(name) if q.sparse is not None else None
        setattr(model.get_submodule(parent_name), child, W4Linear.from_quantized(q, kind))


def load_quantized_model(path: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A transformers model running the checkpoint through W4Linear (the torch reference)."""
    from transformers import AutoModelForCausalLM

    config, tensors = read_checkpoint(path)
    qc = config["quantization_config"]
    hf_config = config_for_model(config)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    arch = architecture_of(model)
    sparse = qc.get("sparse") or {}
    kept_linears = {arch.mlp_linear(p) for p in sparse.get("projections", ())}
    per_layer = sparse.get("neurons_per_layer", [])
    for name, lin in quantized_linears(model).items():
        layer, short = int(name.split(".")[2]), name.split(".", 3)[3]
        k = per_layer[layer] if per_layer and short in kept_linears else 0
        kind = arch.neuron_dim(short) if k else None
        w4 = W4Linear(lin.in_features, lin.out_features, qc["group_size"], lin.bias is not None, k, kind)
        w4.qweight.copy_(tensors.pop(f"{name}.qweight"))
        w4.qzeros.copy_(tensors.pop(f"{name}.qzeros"))
        w4.scales.copy_(tensors.pop(f"{name}.scales"))
        if lin.bias is not None:
            w4.bias.copy_(tensors.pop(f"{name}.bias"))
        if k:
            idx_name, values_name = sparse_names(name, arch)
            w4.sparse_idx.copy_(tensors.pop(idx_name))
            w4.sparse.copy_(tensors.pop(values_name))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, w4.to(lin.weight.device))
    filled = {
        f"{name}.{b}"
        for name, m in model.named_modules()
        if isinstance(m, W4Linear)
        for b, _ in m.named_buffers()
    }
    vocab = qc.get("vocab")
    for module in vocab_modules(hf_config) if vocab else ():
        qweight, qzeros, scales = (tensors.pop(f"{module}.{t}") for t in ("qweight", "qzeros", "scales"))
        kept = [tensors.pop(f"{module}.{t}", None) for t in ("sparse_idx", "sparse_rows")]
        tensors[f"{module}.weight"] = dense_vocab(qweight, qzeros, scales.float(), vocab["bits"], *kept)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=False)
    if getattr(hf_config, "tie_word_embeddings", False):
        model.tie_weights()
        filled.add("lm_head.weight")
    missing = sorted(set(missing) - filled)
    if missing or unexpected:
        raise UserError(
            f"{path}: checkpoint does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return model.eval()
