"""Stage `quantize`: what 4-bit quantization does to the base model, measured.

Loads the base in 16 bits and in 4 bits through qlora/models.py (the very loader
finetune and evaluate use) and reports the parameter count, the memory of each, the bits
per parameter actually achieved (the quantization constants included), and the error of
the dequantized weights for NF4 and FP4 side by side. The 4-bit model is not saved:
quantizing on load takes seconds and keeps one copy of the weights on disk.
Output: reports/quantize.json (a DVC metric)
"""

from __future__ import annotations

from qlora.artifacts import BASE_MODEL_DIR, QuantizeReport, validated
from qlora.io import run_stage, write_json
from qlora.params import load_params
from qlora.quantization import REPORT, measure


def main() -> None:
    params = load_params()
    report = measure(params.quantize, BASE_MODEL_DIR, params.base.trust_remote_code)
    checked = validated(QuantizeReport, report, REPORT)  # the report reads it through this
    write_json(REPORT, report)
    qt = checked.quant_type
    print(
        f"{report['parameters'] / 1e6:.1f} M parameters: {report['bytes']['full'] / 1e6:.1f} MB "
        f"in bf16 -> {checked.four_bit_bytes / 1e6:.1f} MB in {qt} "
        f"({report['bits_per_parameter'][f'{qt}_linear_layers']:.2f} bits per linear weight); "
        f"relative error nf4 {report['quant_error']['nf4']['mean_relative_error']:.4f}, "
        f"fp4 {report['quant_error']['fp4']['mean_relative_error']:.4f}"
    )


if __name__ == "__main__":
    run_stage("quantize", main)
