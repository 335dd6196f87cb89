"""The 4-bit method's published claims, checked against what this run measured.

Pure functions over the pipeline's own JSON (torch-free): each claim becomes rows of
{"claim", "subject", "measured", "display", "rule", "passed", "why"}, where `passed` is
True, False, or None when the inputs cannot decide it, and `why` is a line built from the
inputs that says what most likely kept a failing (or undecided) claim from holding.

Inputs, as the pipeline writes them:
- quantize_report: reports/quantize.json (qlora/quant/measure.py): "bytes" keyed
  "full" and by "quant_type", "parameters", "quantized_weights", "bits_per_parameter".
- speed: {"device": "cpu" | "cuda" ..., "tokens_per_s": {variant: float}} or, for the same
  work timed on both models, {"device", "seconds": {variant: float}}; variants are
  evaluate's names, paths.REFERENCE ("base_full") and paths.BASELINE ("base_4bit").
  `speed_from_eval` builds it from reports/eval/metrics.json: the generation speed each
  variant was timed at, or lm-eval's seconds where a file has none (older revisions).
- eval_metrics: reports/eval/metrics.json (qlora/evaluation.benchmark): {"settings",
  "variants": {variant: {"metrics": {task: {metric: {value, stderr, higher_is_better}}}}}}.
- gguf_eval: reports/export/gguf_eval.json (qlora/export/measure.py): the deployed GGUF
  artifacts under llama.cpp, each with "weights_bytes", "file_bytes", "speed" and
  "metrics". Their claims compare each 4-bit llama.cpp type with the 16-bit merged model in
  the same engine: where users deploy, the method's promises are checked there too.
"""

from __future__ import annotations

import math

from qlora.core.paths import BASELINE, LEGACY_VARIANTS, MERGED_F16, REFERENCE
from qlora.schemas.metrics import higher_is_better

MEMORY_CLAIM = "4-bit quantization saves 70-80 % of the model's memory"
SPEED_CLAIM = "4-bit inference is up to 2.5x as fast as 16-bit"
ACCURACY_CLAIM = "the 4-bit model keeps 98 % of the 16-bit model's accuracy"
MIN_SAVED = 0.70  # the claim's lower bound: saving more than 80 % is no failure of it
CLAIMED_SPEEDUP = 2.5
MIN_KEPT = 0.98
# The QLoRA paper (Dettmers et al., 2023) shows NF4 matching 16-bit from 7B parameters up.
PAPER_SMALLEST_MODEL = 7e9


def row(
    claim: str,
    subject: str,
    measured: float | None,
    display: str,
    rule: str,
    passed: bool | None,
    why: str | None = None,
) -> dict:
    """One line of the claims table; `why` is kept only where the claim did not pass."""
    return {
        "claim": claim,
        "subject": subject,
        "measured": measured,
        "display": display,
        "rule": rule,
        "passed": passed,
        "why": None if passed else why,
    }


# ---------------------------------------------------------------- memory


def four_bit_footprint(report: dict) -> tuple[str, dict]:
    """(format, {"bytes", "quantized_weights", "linear_bits"}) of the 4-bit format the
    memory claim is about: the configured one, or NF4 from the formats table where the run
    is configured for int8. Keys a report lacks (older revisions) are None."""
    configured = report["quant_type"]
    if configured in ("nf4", "fp4"):
        return configured, {
            "bytes": report["bytes"][configured],
            "quantized_weights": report.get("quantized_weights"),
            "linear_bits": report["bits_per_parameter"].get(f"{configured}_linear_layers"),
        }
    entry = report["formats"]["nf4"]
    return "nf4", {k: entry.get(k) for k in ("bytes", "quantized_weights", "linear_bits")}


def memory_claim(report: dict) -> dict:
    """Saved = 1 - bytes_4bit / bytes_16bit. Passes from 70 % saved up. Why it falls short:
    tensors that stay 16-bit (embeddings, norms, lm_head: 2 bytes a parameter there) cap
    the saving at (quantized share) x (1 - bits per linear weight / 16)."""
    quant_type, four = four_bit_footprint(report)
    saved = 1 - four["bytes"] / report["bytes"]["full"]
    if four["quantized_weights"] is None:
        why = "embeddings and norms stay 16-bit: only the linear layers shrink to 4 bits"
    else:
        share = 1 - four["quantized_weights"] / report["parameters"]
        linear_bits = four["linear_bits"] or 4.0
        ceiling = (1 - share) * (1 - linear_bits / 16)
        why = (
            f"embeddings and norms stay 16-bit and are {share:.0%} of the 16-bit model's "
            f"bytes; at {linear_bits:.2f} bits per linear weight that caps the saving at "
            f"{ceiling:.0%} (a larger model has a smaller share)"
        )
    return row(
        MEMORY_CLAIM,
        f"memory ({quant_type})",
        saved,
        f"{saved:.1%} saved",
        f"passes when at least {MIN_SAVED:.0%} is saved",
        saved >= MIN_SAVED,
        why,
    )


# ---------------------------------------------------------------- speed


def speedup(speed: dict) -> float:
    """4-bit tokens/s over 16-bit tokens/s; from "seconds" (the same work on both models)
    it is the 16-bit time over the 4-bit time."""
    if "tokens_per_s" in speed:
        rates = speed["tokens_per_s"]
        return rates[BASELINE] / rates[REFERENCE]
    seconds = speed["seconds"]
    return seconds[REFERENCE] / seconds[BASELINE]


def slower_why(device: str) -> str:
    """Why 4-bit inference was slower, by device."""
    if device.startswith("cpu"):
        return (
            "on a CPU bitsandbytes has no general 4-bit matmul: each forward unpacks the "
            "weights to the compute dtype first (a fused kernel serves only bf16 inference "
            "on AVX512-BF16 CPUs), so 4 bits save memory, not time"
        )
    return (
        "4-bit kernels gain only where reading weights is the bottleneck (decoding one "
        "sequence at a time); batched or prompt-heavy work pays the dequantization "
        "without that gain"
    )


def speed_subject(speed: dict) -> str:
    what = "generation" if "tokens_per_s" in speed else "lm-eval time"
    return f"inference speed ({what}, {speed.get('device', 'unknown')})"


def speed_claim(speed: dict) -> dict:
    """ "Up to 2.5x" promises a gain that reaches 2.5x at best, so a measurement refutes it
    only by showing no gain: it passes when the 4-bit model is at least as fast as the
    16-bit one (speedup >= 1). The display says how much of the 2.5x was reached."""
    ratio = speedup(speed)
    device = speed.get("device", "unknown")
    return row(
        SPEED_CLAIM,
        speed_subject(speed),
        ratio,
        f"{ratio:.2f}x ({ratio / CLAIMED_SPEEDUP:.0%} of the claimed {CLAIMED_SPEEDUP}x)",
        "passes when the 4-bit model is at least as fast (an 'up to' claim promises a gain)",
        ratio >= 1.0,
        slower_why(device),
    )


def speed_from_eval(eval_metrics: dict) -> dict | None:
    """The speed input from reports/eval/metrics.json: each variant's generation tokens/s
    (evaluation.generation_speed: the same prompts, batch 1, the same number of tokens), or
    for files without it lm-eval's seconds (the same tasks and examples for both: a batched
    log-likelihood workload, not generation). None where a variant has neither."""
    device = eval_metrics.get("settings", {}).get("device", "unknown")
    entries = {n: variant(eval_metrics["variants"], n) for n in (REFERENCE, BASELINE)}
    if all("speed" in e for e in entries.values()):
        return {
            "device": device,
            "tokens_per_s": {n: e["speed"]["tokens_per_s"] for n, e in entries.items()},
        }
    seconds = {n: e.get("seconds") for n, e in entries.items()}
    if None in seconds.values():
        return None
    return {"device": device, "seconds": seconds}


# ---------------------------------------------------------------- accuracy


def variant(variants: dict, name: str) -> dict:
    """A variant's entry by its name, or by the name older revisions gave it (base_nf4)."""
    if name in variants:
        return variants[name]
    legacy = [old for old, new in LEGACY_VARIANTS.items() if new == name and old in variants]
    if not legacy:
        raise KeyError(f"metrics have no {name!r} variant (have {sorted(variants)})")
    return variants[legacy[0]]


def kept_share(full: float, four: float, higher: bool) -> float | None:
    """The 4-bit score as a share of the 16-bit one; for lower-is-better metrics (bits per
    byte, perplexity) 16-bit over 4-bit, so that 1.0 is "as good" either way."""
    numerator, denominator = (four, full) if higher else (full, four)
    return numerator / denominator if denominator > 0 else None


def accuracy_why(metric: str, full: dict, four: dict, parameters: int | None) -> str:
    """What can explain a lost share: noise, the metric's scale, the model's size."""
    reasons = []
    stderrs = [e.get("stderr") for e in (full, four)]
    if all(s is not None for s in stderrs):
        noise = 2 * math.hypot(*stderrs)
        if abs(four["value"] - full["value"]) <= noise:
            reasons.append(
                f"the difference is within two standard errors (±{noise:.3g}): "
                "more examples (evaluate.limit) would tell"
            )
    if "perplexity" in metric:
        reasons.append(
            "a perplexity is exponential in the loss, so its ratio magnifies a small "
            "loss change (bits_per_byte shows it linearly)"
        )
    if parameters is not None and parameters < PAPER_SMALLEST_MODEL:
        reasons.append(
            f"a {parameters / 1e6:.0f} M-parameter model: small models lose more to 4 bits "
            "than the 7B-65B models the QLoRA paper measured"
        )
    return "; ".join(reasons) or "the 4-bit weights' rounding error"


def accuracy_claims(eval_metrics: dict, parameters: int | None = None) -> list[dict]:
    """One row per metric the 16-bit and the 4-bit base both have: passes when the 4-bit
    base keeps at least 98 % (kept_share). Undecided (None) where lm-eval gives no
    direction or the 16-bit score is 0."""
    variants = eval_metrics["variants"]
    full_metrics = variant(variants, REFERENCE)["metrics"]
    four_metrics = variant(variants, BASELINE)["metrics"]
    return kept_rows(full_metrics, four_metrics, "", "the 4-bit base", parameters)


def kept_rows(
    full_metrics: dict, four_metrics: dict, suffix: str, who: str, parameters: int | None
) -> list[dict]:
    """One accuracy row per metric both have: passes when `who` keeps at least 98 %."""
    rows = []
    for task, metrics in full_metrics.items():
        for metric, full in metrics.items():
            four = four_metrics.get(task, {}).get(metric)
            if four is None:
                continue
            higher = higher_is_better(full, four)
            share = None if higher is None else kept_share(full["value"], four["value"], higher)
            rows.append(
                row(
                    ACCURACY_CLAIM,
                    f"{task}/{metric}{suffix}",
                    share,
                    "n/a" if share is None else f"{share:.1%} kept",
                    f"passes when {who} keeps at least {MIN_KEPT:.0%}",
                    None if share is None else share >= MIN_KEPT,
                    "lm-eval gives no direction for this metric, or the 16-bit score is 0"
                    if share is None
                    else accuracy_why(metric, full, four, parameters),
                )
            )
    return rows


# ---------------------------------------------------------------- deployed artifacts


def four_bit_artifacts(gguf_eval: dict) -> dict[str, dict]:
    """The 4-bit llama.cpp artifacts (q4_0, q4_1, q4_k_m, ...) the claims are about."""
    return {
        name: a
        for name, a in gguf_eval["artifacts"].items()
        if a["gguf_type"].startswith("q4") and not a.get("lora")
    }


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def deployed_claims(gguf_eval: dict, eval_metrics: dict | None = None) -> list[dict]:
    """Memory, decode speed and kept score of each 4-bit GGUF artifact against the 16-bit
    merged model under llama.cpp (and its speed against the PyTorch paths' beside)."""
    artifacts = gguf_eval["artifacts"]
    if MERGED_F16 not in artifacts:
        return []
    f16 = artifacts[MERGED_F16]
    torch_speeds = {}
    if eval_metrics is not None:
        for n in (REFERENCE, BASELINE):
            entry = variant(eval_metrics["variants"], n)
            if entry.get("speed"):
                torch_speeds[n] = entry["speed"]["tokens_per_s"]
    rows = []
    for a in four_bit_artifacts(gguf_eval).values():
        saved = 1 - a["weights_bytes"] / f16["weights_bytes"]
        rows.append(
            row(
                MEMORY_CLAIM,
                f"memory (llama.cpp {a['gguf_type']}, loaded weights)",
                saved,
                f"{saved:.1%} saved: {mib(a['weights_bytes'])} against {mib(f16['weights_bytes'])}"
                f" (files {mib(a['file_bytes'])} against {mib(f16['file_bytes'])})",
                f"passes when at least {MIN_SAVED:.0%} is saved",
                saved >= MIN_SAVED,
                "llama.cpp's 4-bit types keep some tensors at 6 or 8 bits (q4_k_m: half the "
                "attention values and feed-forward outputs, and the embeddings and output at "
                "6 bits); in a small model those are a large share of the bytes",
            )
        )
        if a.get("speed") and f16.get("speed"):
            rate, f16_rate = a["speed"]["tokens_per_s"], f16["speed"]["tokens_per_s"]
            ratio = rate / f16_rate
            beside = ", ".join(f"{rate / r:.1f}x the PyTorch {n}" for n, r in torch_speeds.items())
            notes = [x["speed"]["note"] for x in (a, f16) if x["speed"].get("note")]
            rows.append(
                row(
                    SPEED_CLAIM,
                    f"decode speed (llama.cpp {a['gguf_type']} vs f16, {a['threads']} threads)",
                    ratio,
                    f"{ratio:.2f}x: {rate:.1f} against {f16_rate:.1f} tokens/s"
                    + (f"; {beside}" if beside else "")
                    + (f" (note: {'; '.join(notes)})" if notes else ""),
                    "passes when the 4-bit file decodes at least as fast as the 16-bit one",
                    ratio >= 1.0,
                    "decoding is bound by reading the weights only when they do not fit in "
                    "the CPU's caches; a small model's 16-bit weights nearly do",
                )
            )
        rows += kept_rows(
            f16["metrics"],
            a["metrics"],
            f" (llama.cpp {a['gguf_type']} vs f16)",
            "the 4-bit file",
            None,
        )
    return rows


# ---------------------------------------------------------------- all claims


def check_claims(
    quantize_report: dict | None = None,
    speed: dict | None = None,
    eval_metrics: dict | None = None,
) -> list[dict]:
    """Every claim the given inputs can check, in the order memory, speed, accuracy.
    Without `speed`, the evaluate stage's timings (eval_metrics) stand in for it."""
    rows = []
    if quantize_report is not None:
        rows.append(memory_claim(quantize_report))
    if speed is None and eval_metrics is not None:
        speed = speed_from_eval(eval_metrics)
    if speed is not None:
        rows.append(speed_claim(speed))
    if eval_metrics is not None:
        parameters = (quantize_report or {}).get("parameters")
        rows.extend(accuracy_claims(eval_metrics, parameters))
    return rows


def claims_report(quantize_report: dict, eval_metrics: dict, gguf_eval: dict | None = None) -> dict:
    """reports/claims.json: every row, and how many passed, failed and stayed undecided
    (flat numbers: `dvc metrics show` and `dvc exp show` list them as columns)."""
    rows = check_claims(quantize_report, None, eval_metrics)
    if gguf_eval is not None:
        rows += deployed_claims(gguf_eval, eval_metrics)
    outcomes = [r["passed"] for r in rows]
    return {
        "summary": {
            "passed": outcomes.count(True),
            "failed": outcomes.count(False),
            "undecided": outcomes.count(None),
        },
        "rows": rows,
    }
