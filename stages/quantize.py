"""Stage `quantize`: what quantization does to the base model, measured.

qlora/quant/measure.py analyses the base's weights layer by layer, loads it in NF4, FP4 and
int8 through the shared loader (memory, bits per parameter, weight error) and measures
what LoftQ calibration at the adapter's rank would take back.
Outputs: reports/quantize.json (a DVC metric) and reports/quantize_layers.json (the per-layer
analysis and the histogram the report draws), each checked against its schema
(qlora/schemas/quantize.py)
"""

from __future__ import annotations

from qlora.core import paths
from qlora.core.io import run_stage, write_json
from qlora.core.params import load_params
from qlora.quant.measure import measure
from qlora.schemas.base import validated
from qlora.schemas.quantize import QuantizeLayers, QuantizeReport


def main() -> None:
    params = load_params()
    report, layers = measure(
        params.quantize, params.finetune.lora, paths.BASE_MODEL_DIR, params.base.trust_remote_code
    )
    # Checked against the schemas the claims stage and the report read them with.
    checked = validated(QuantizeReport, report, paths.QUANTIZE_REPORT)
    validated(QuantizeLayers, layers, paths.QUANTIZE_LAYERS)
    # Both at the end: a failure above leaves the last good pair as it was.
    write_json(paths.QUANTIZE_LAYERS, layers)
    write_json(paths.QUANTIZE_REPORT, report)
    qt = checked.quant_type
    print(
        f"{report['parameters'] / 1e6:.1f} M parameters: {report['bytes']['full'] / 1e6:.1f} MB "
        f"in bf16 -> {checked.four_bit_bytes / 1e6:.1f} MB in {qt} "
        f"({report['bits_per_parameter'][f'{qt}_linear_layers']:.2f} bits per linear weight)"
    )
    for fmt, entry in report["formats"].items():
        if entry["supported"]:
            print(
                f"  {fmt:>4}: {entry['bytes'] / 1e6:7.1f} MB ({entry['memory_ratio']:.1%} of "
                f"bf16), {entry['linear_bits']:.2f} bits per linear weight, relative error "
                f"mean {entry['error']['mean_relative_error']:.4f}"
            )
        else:
            print(f"  {fmt:>4}: not supported here: {entry['reason']}")
    analysis, loftq = report["analysis"], report["loftq"]
    print(f"  most sensitive layers: {', '.join(analysis['most_sensitive'])}")
    print(
        f"  LoftQ at rank {loftq['rank']} (every {loftq['every']}th layer): relative error "
        f"{loftq['error_before']:.4f} -> {loftq['error_after']:.4f} "
        f"({loftq['reduction']:.1%} less)"
    )


if __name__ == "__main__":
    run_stage("quantize", main)
