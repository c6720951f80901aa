"""OpenAI-compatible serving of AWQ / AWQ-opt checkpoints, with hot swap (HTTP, models and engines)."""
