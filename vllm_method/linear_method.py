"""The `lape_awq` linear: dense W4 (AutoAWQ gemm tensors) plus the kept neurons' FP16 residuals.

Loading: qweight/qzeros/scales are vLLM parameters sharded like stock AWQ. The sparse tensors are loaded
whole on every rank (they are tiny) and cut to the rank's own neurons after loading, so per-rank counts may
differ. gate_up_proj receives gate's and up's `sparse_idx`/`sparse_rows` as shards 0 and 1; down_proj adds
its rank's kept columns inside `apply`, before the all-reduce, so every neuron is counted once.

Running: on CUDA the Triton kernel (kernels/w4_gemm.py); on CPU our code-matrix kernel (kernels/cpu_codes.py,
as the op in cpu_codes_ops.py) in fp32, the kept rows of gate/up inside it and down's kept columns added
after. It replaced vLLM's own CPU W4A16 GEMM (`cpu_gemm_wna16`, which stock vLLM AWQ uses and which runs
fp32 activations in fp16) after measuring it 2-3x slower on Gemma 3 270M's linears at 1, 16 and 2048 tokens
on this project's 2-core Intel CPU; it also needs no AVX-512 (vLLM ships that GEMM in its AVX-512 library
only). The engine benchmark compares both end to end (`stock vllm awq` vs `our awq`).
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method
from vllm.model_executor.parameter import GroupQuantScaleParameter, PackedvLLMParameter
from vllm.model_executor.utils import set_weight_attrs

from lape_awq.kernels.sparse_correction import check_sparse_indices
from lape_awq.vllm_method.config import CheckpointError, LapeAwqConfig
from lape_awq.vllm_method.cpu_holders import hold, warn_if_no_cpu_kernel
from lape_awq.vllm_method.sparse_shards import load_whole, local_gate_up_rows, owned

PACK = 8


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
        if layer.qweight.device.type == "cpu":
            self._to_cpu_codes(layer)

    def _to_cpu_codes(self, layer: torch.nn.Module) -> None:
        """CPU: the W4 tensors as a code matrix for our kernel (row n = output channel n), kept rows (gate/up)
        as its kept rows; kept columns (down) stay an index and value pair for the term added after."""
        from lape_awq.kernels.cpu_codes import CodeMatrix

        warn_if_no_cpu_kernel()
        rows = (layer.lape_idx.data, layer.lape_values.data) if layer.lape_kind == "rows" else (None, None)
        matrix = CodeMatrix.from_awq(layer.qweight.data, layer.qzeros.data, layer.scales.data, *rows)
        del layer.qweight, layer.qzeros, layer.scales
        layer.lape_codes = hold(layer, matrix)
        if layer.lape_kind == "cols":  # the kernel adds their term in fp32
            layer.lape_values.data = layer.lape_values.data.float().contiguous()
        else:
            layer.lape_idx = torch.nn.Parameter(torch.empty(0, dtype=torch.long), requires_grad=False)
            layer.lape_values = torch.nn.Parameter(torch.empty(0, 0), requires_grad=False)

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
        if x.device.type == "cpu":
            from lape_awq.vllm_method.cpu_codes_ops import code_linear

            y = code_linear(x, layer.lape_codes, layer.lape_idx, layer.lape_values).to(x.dtype)
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
