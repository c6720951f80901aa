"""LAPE (Tang et al. 2024): activation counts per language -> language-specific FFN neurons -> a neurons
file, and which of them AWQ-opt keeps."""
