"""The quantizer: AWQ's scale and clip searches, layer-by-layer RTN / AWQ / AWQ-opt, and the pipeline from
a float model directory to a checkpoint."""
