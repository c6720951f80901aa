"""Offline side of lape-awq: default model, LAPE language-neuron finder, (later) AWQ / AWQ-opt quantizer."""
