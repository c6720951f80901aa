"""The vLLM quantization method `lape_awq`: loads W4 + sparse FP16 checkpoints into vLLM (Triton on CUDA,
vLLM's CPU W4A16 GEMM on CPU), tensor parallel included. Registered through the `vllm.general_plugins`
entry point, so `vllm serve <checkpoint>` needs no flag once lape-awq is installed."""
