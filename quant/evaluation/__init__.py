"""Quality of checkpoints against their float model: per-language perplexity, KL and top-1 agreement
(`scoring`), their reports, and the pairwise Korean judge (`judge/`)."""
