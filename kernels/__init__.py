"""Triton kernels: fused W4 dequant-GEMM with the sparse FP16 neuron correction (pure math on tensors)."""
