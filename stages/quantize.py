"""Stage `quantize`: what 4-bit quantization does to the base model, measured.

qlora/quantization.py loads the base in 16 and in 4 bits through the shared loader and
measures memory, bits per parameter and the weight error of NF4 and FP4.
Output: reports/quantize.json (a DVC metric, checked against artifacts.QuantizeReport)
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
