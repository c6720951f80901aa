"""Benchmarks, each a `lape-awq bench NAME` subcommand (commands.py): LAPE throughput (lape), the offline
pipeline (pipeline), vLLM engine speed (engine), the W4 kernels on a GPU (kernels), streaming load on an
endpoint (load), the serving matrix with memory (serve), and the report that builds the README's Results
from the result files in results/ (report)."""
