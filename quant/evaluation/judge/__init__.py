"""The pairwise judge: Korean questions, greedy answers of every model, MT-Bench's pairwise verdicts
from any OpenAI-compatible endpoint, and their report."""
