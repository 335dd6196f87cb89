"""Quantization: bitsandbytes' storage formats read and measured (formats.py), the weights
as a 4-bit quantizer sees them (analysis.py), LoftQ's initialisation (calibration.py),
and the quantize stage's measurements (measure.py)."""
