"""Run vLLM's offline engine on checkpoints in a fresh process and print the results as one JSON line.

Used by the tests through a subprocess. It imports nothing of lape_awq: the `lape_awq` method must arrive
through vLLM's plugin entry point, as it does for users. Several jobs run one after another in the same
process (each its own engine), which saves the import of vLLM per job.

    python tests/vllm_runner.py '{"jobs": [{"model": DIR, "dtype": "float32", "prompts": [[2, 651]]}]}'
"""

from __future__ import annotations

import gc
import json
import os
import sys

RESULT_MARK = "VLLM_RUNNER_RESULT "


def run_job(job: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=job["model"],
        dtype=job.get("dtype", "float32"),
        tensor_parallel_size=job.get("tp", 1),
        quantization=job.get("quantization"),
        max_model_len=job.get("max_model_len", 256),
        enforce_eager=job.get("enforce_eager", True),
        seed=0,
    )
    params = SamplingParams(
        temperature=0.0, max_tokens=job.get("max_tokens", 8), prompt_logprobs=0, logprobs=0
    )
    outputs = []
    for out in llm.generate(
        [TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]], params, use_tqdm=False
    ):
        completion = out.outputs[0]
        outputs.append(
            {
                "tokens": list(completion.token_ids),
                "text": completion.text,
                "logprobs": [
                    step[t].logprob for t, step in zip(completion.token_ids, completion.logprobs, strict=True)
                ],
                "prompt_logprobs": [
                    None if step is None else step[t].logprob
                    for t, step in zip(out.prompt_token_ids, out.prompt_logprobs, strict=True)
                ],
            }
        )
    quantization = llm.llm_engine.vllm_config.model_config.quantization
    del llm
    gc.collect()
    return {"outputs": outputs, "quantization": quantization}


def main() -> None:
    args = json.loads(sys.argv[1])
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default reserves most of RAM
    results = []
    for job in args["jobs"]:
        try:
            results.append(run_job(job))
        except Exception as exc:  # reported per job: the tests check refusals by their message
            results.append({"error": f"{type(exc).__name__}: {exc}"})
    print(RESULT_MARK + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
