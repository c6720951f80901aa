"""The `lape_awq` linear: dense W4 (AutoAWQ gemm tensors) plus the kept neurons' FP16 residuals.

Loading: qweight/qzeros/scales are vLLM parameters sharded like stock AWQ. The sparse tensors are loaded
whole on every rank (they are tiny) and cut to the rank's own neurons after loading, so per-rank counts may
differ. gate_up_proj receives gate's and up's `sparse_idx`/`sparse_rows` as shards 0 and 1; down_proj adds
its rank's kept columns inside `apply`, before the all-reduce, so every neuron is counted once.

Running: on CUDA the Triton kernel (kernels/w4_gemm.py); on CPU vLLM's W4A16 GEMM plus the sparse term
(cpu_w4.py, cpu_sparse.py), or, where vLLM's CPU library lacks that GEMM (no AVX-512), a dense fp32
weight with the kept neurons folded in.
"""

from __future__ import annotations

import functools
import logging

import torch
from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method
from vllm.model_executor.parameter import GroupQuantScaleParameter, PackedvLLMParameter
from vllm.model_executor.utils import set_weight_attrs

from lape_awq.kernels.sparse_correction import check_sparse_indices
from lape_awq.vllm_method.config import CheckpointError, LapeAwqConfig
from lape_awq.vllm_method.cpu_sparse import cpu_w4_sparse_linear
from lape_awq.vllm_method.cpu_w4 import cpu_w4_matmul
from lape_awq.vllm_method.sparse_shards import load_whole, local_gate_up_rows, owned

PACK = 8
log = logging.getLogger(__name__)


@functools.cache
def _warn_dense_fallback() -> None:
    log.warning(
        "lape_awq: this vLLM CPU build has no W4A16 GEMM (cpu_gemm_wna16 ships in its AVX-512 library "
        "only); W4 weights run dequantized to fp32: same outputs, not W4's speed or memory"
    )


@register_weight_loader_v2_supported_method
class LapeAwqLinearMethod(LinearMethodBase):
    """One per vLLM linear; `prefix` (e.g. model.layers.3.mlp.gate_up_proj) says whether it keeps neurons."""

    def __init__(self, config: LapeAwqConfig, prefix: str):
        self.config = config
        self.prefix = prefix
        self.kept = config.kept_neurons(prefix)

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        g = self.config.group_size
        n_local = sum(output_partition_sizes)
        if input_size_per_partition % g or any(n % PACK for n in output_partition_sizes):
            raise CheckpointError(
                f"{self.prefix}: a {n_local}x{input_size_per_partition} shard per rank does not fit "
                f"group size {g} and 8-wide packing; use a smaller tensor-parallel size"
            )
        loader = extra_weight_attrs["weight_loader"]
        packed = dict(input_dim=0, output_dim=1, packed_dim=1, packed_factor=PACK, weight_loader=loader)
        layer.register_parameter(
            "qweight",
            PackedvLLMParameter(
                data=torch.empty(input_size_per_partition, n_local // PACK, dtype=torch.int32), **packed
            ),
        )
        layer.register_parameter(
            "qzeros",
            PackedvLLMParameter(
                data=torch.empty(input_size_per_partition // g, n_local // PACK, dtype=torch.int32), **packed
            ),
        )
        layer.register_parameter(
            "scales",
            GroupQuantScaleParameter(
                data=torch.empty(input_size_per_partition // g, n_local, dtype=params_dtype),
                input_dim=0,
                output_dim=1,
                weight_loader=loader,
            ),
        )
        layer.lape_kind = None
        if self.kept is None:
            return
        k = max(self.kept)
        if len(self.kept) == 2:  # merged gate_up: [gate, up] stacked; width = the unsharded input
            layer.lape_kind = "rows"
            idx = torch.zeros(2, k, dtype=torch.int32)
            values = torch.zeros(2, k, input_size, dtype=torch.float16)
        else:  # down_proj: one row per kept input neuron, width = the unsharded output
            layer.lape_kind = "cols"
            idx = torch.zeros(k, dtype=torch.int32)
            values = torch.zeros(k, output_size, dtype=torch.float16)
        for name, tensor in (("sparse_idx", idx), (f"sparse_{layer.lape_kind}", values)):
            param = torch.nn.Parameter(tensor, requires_grad=False)
            set_weight_attrs(param, {"weight_loader": load_whole})
            layer.register_parameter(name, param)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if layer.lape_kind is not None:
            self._shard_sparse(layer)
        if layer.qweight.device.type != "cpu":
            return
        from lape_awq.vllm_method.cpu_w4 import awq_to_cpu_layout, has_w4a16_gemm, kernel_dtype

        if not has_w4a16_gemm():
            self._to_dense(layer)
            return
        q_weight, zeros = awq_to_cpu_layout(layer.qweight.data, layer.qzeros.data)
        layer.lape_qweight = torch.nn.Parameter(q_weight, requires_grad=False)
        layer.lape_qzeros = torch.nn.Parameter(zeros, requires_grad=False)
        layer.lape_scales = torch.nn.Parameter(
            layer.scales.data.to(kernel_dtype(layer.scales.dtype)).contiguous(), requires_grad=False
        )
        del layer.qweight, layer.qzeros, layer.scales

    def _to_dense(self, layer: torch.nn.Module) -> None:
        """vLLM's CPU W4A16 GEMM is in its AVX-512 kernel library only. Elsewhere the checkpoint runs as a
        dense fp32 weight with the kept neurons folded in: W4's numbers, not its speed or memory."""
        from lape_awq.vllm_method.cpu_w4 import dense_weight

        _warn_dense_fallback()
        kind = layer.lape_kind
        sparse = (layer.lape_idx.data, layer.lape_values.data) if kind is not None else (None, None)
        weight = dense_weight(
            layer.qweight.data,
            layer.qzeros.data,
            layer.scales.data,
            self.config.group_size,
            *sparse,
            rows=kind == "rows",
        )
        layer.lape_dense = torch.nn.Parameter(weight, requires_grad=False)
        del layer.qweight, layer.qzeros, layer.scales
        if kind is not None:
            del layer.lape_idx, layer.lape_values
        layer.lape_kind = None

    def _shard_sparse(self, layer: torch.nn.Module) -> None:
        values = getattr(layer, f"sparse_{layer.lape_kind}").data
        idx = layer.sparse_idx.data
        if layer.lape_kind == "rows":
            shard = layer.output_partition_sizes[0]
            kept = [idx[s, :n] for s, n in enumerate(self.kept)]
            local, rows = local_gate_up_rows(
                kept, [values[s, :n] for s, n in enumerate(self.kept)], shard, layer.tp_rank
            )
            full = [layer.output_sizes[s] for s in range(2)]
        else:
            shard = layer.input_size_per_partition
            local, rows = owned(idx, values, shard, layer.tp_rank)
            kept, full = [idx], [layer.input_size]
        for part, size in zip(kept, full, strict=True):
            try:
                check_sparse_indices(part, size, f"{self.prefix}.sparse_idx")
            except ValueError as exc:
                raise CheckpointError(str(exc)) from None
        del layer.sparse_idx
        delattr(layer, f"sparse_{layer.lape_kind}")
        layer.lape_idx = torch.nn.Parameter(local, requires_grad=False)
        if local.device.type == "cuda":  # the Triton kernel's slot map over this rank's channels
            from lape_awq.kernels.sparse_correction import sparse_cols, sparse_rows

            if layer.lape_kind == "rows":
                correction = sparse_rows(local, rows.half(), sum(layer.output_partition_sizes))
            else:
                correction = sparse_cols(local, rows.half(), layer.input_size_per_partition)
            layer.lape_slots = torch.nn.Parameter(correction.slots, requires_grad=False)
            rows = correction.values
        else:  # the CPU path computes the term in fp32 from the checkpoint's exact fp16 values
            rows = rows.half()
        layer.lape_values = torch.nn.Parameter(rows.contiguous(), requires_grad=False)

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if x.device.type == "cpu" and hasattr(layer, "lape_dense"):
            y = torch.nn.functional.linear(x.float(), layer.lape_dense).to(x.dtype)
            return y if bias is None else y + bias
        if x.device.type == "cpu":
            weights = (x, layer.lape_qweight, layer.lape_scales, layer.lape_qzeros)
            if layer.lape_kind is None:
                y = cpu_w4_matmul(*weights)
            else:
                y = cpu_w4_sparse_linear(
                    *weights, layer.lape_idx, layer.lape_values, layer.lape_kind == "rows"
                )
            return y if bias is None else y + bias
        from lape_awq.kernels.sparse_correction import SparseCorrection
        from lape_awq.kernels.w4_gemm import w4_linear

        sparse = (
            None
            if layer.lape_kind is None
            else SparseCorrection(layer.lape_kind, layer.lape_slots, layer.lape_values)
        )
        return w4_linear(
            x.contiguous(), layer.qweight, layer.qzeros, layer.scales, self.config.group_size, bias, sparse
        )
