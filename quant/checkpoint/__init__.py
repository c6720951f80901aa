"""The W4 (+ sparse FP16) checkpoint format: its layout, writer, validating reader and torch reference.

It knows nothing of how the codes were chosen: the quantizer hands it `QuantizedLinear`s."""
