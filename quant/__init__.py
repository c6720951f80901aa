"""Offline side of lape-awq, one sub-package per stage of the pipeline.

Shared pieces sit at this level (errors, paths, file I/O, the architecture table, model loading, text
and calibration, the default model, the 4-bit group math); then, in pipeline order: `lape/` finds the
language-specific neurons, `awq/` quantizes (RTN / AWQ / AWQ-opt), `checkpoint/` writes, validates and
runs the W4 + sparse FP16 format, `evaluation/` scores checkpoints (with the pairwise judge), and `cli/`
is the `lape-awq` command. Dependencies point down this list, never back up.
"""
