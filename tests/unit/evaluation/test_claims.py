"""The claims table from hand-made reports: which claims pass, and the 'why' of those that
do not, built from the numbers given."""

from __future__ import annotations

import json

import pytest

from qlora.evaluation import claims

# SmolLM2-135M as the quantize stage measures it: tied 49152 x 576 embeddings stay 16-bit.
SMALL_REPORT = {
    "parameters": 134_515_008,
    "quantized_weights": 106_168_320,
    "quant_type": "nf4",
    "bytes": {"full": 269_030_016, "nf4": 111_466_620},
    "bits_per_parameter": {"full": 16.0, "nf4": 6.63, "nf4_linear_layers": 4.127},
}
# Llama-2-7B's shape: 32 layers of 202 M linear weights, 32000 x 4096 embeddings and
# lm_head (4 % of the parameters), 4.127 bits per linear weight: 71.3 % saved.
LARGE_REPORT = {
    "parameters": 6_738_415_616,
    "quantized_weights": 6_476_005_376,
    "quant_type": "nf4",
    "bytes": {"full": 13_476_831_232, "nf4": 524_820_480 + 3_340_811_273},
    "bits_per_parameter": {"full": 16.0, "nf4": 4.59, "nf4_linear_layers": 4.127},
}


def metric(value: float, higher: bool | None, stderr: float | None = None) -> dict:
    return {"value": value, "stderr": stderr, "higher_is_better": higher}


def eval_metrics(full: dict, four: dict, names=("base_full", "base_4bit")) -> dict:
    return {
        "settings": {"device": "cpu"},
        "variants": {
            names[0]: {"seconds": 30.0, "metrics": full},
            names[1]: {"seconds": 75.0, "metrics": four},
            "adapter_4bit": {"seconds": 80.0, "metrics": four},
        },
    }


FULL = {
    "docstring_loss": {"bits_per_byte": metric(1.00, False, 0.01)},
    "docstring_choice": {"acc": metric(0.60, True, 0.05), "acc_norm": metric(0.60, True, 0.05)},
    "prose_guard": {"word_perplexity": metric(20.0, False)},
    "custom": {"score": metric(3.0, None)},
}
FOUR = {
    "docstring_loss": {"bits_per_byte": metric(1.05, False, 0.01)},
    "docstring_choice": {"acc": metric(0.595, True, 0.05), "acc_norm": metric(0.55, True, 0.05)},
    "prose_guard": {"word_perplexity": metric(21.0, False)},
    "custom": {"score": metric(2.0, None)},
}


def test_memory_fails_on_a_small_model_and_says_the_embeddings_cap_it():
    row = claims.memory_claim(SMALL_REPORT)
    assert row["measured"] == pytest.approx(1 - 111_466_620 / 269_030_016)  # 58.6 %
    assert row["passed"] is False and row["display"] == "58.6% saved"
    # 28.3 M of 134.5 M parameters stay 16-bit; 79 % of the bytes shrink to 4.127/16.
    assert "are 21% of the 16-bit model's bytes" in row["why"]
    assert "caps the saving at 59%" in row["why"]


def test_memory_passes_on_a_large_model():
    row = claims.memory_claim(LARGE_REPORT)
    assert row["passed"] is True and row["why"] is None
    assert row["measured"] == pytest.approx(0.7132, abs=1e-4)


def test_memory_why_without_the_quantized_weight_count():
    report = {k: v for k, v in SMALL_REPORT.items() if k != "quantized_weights"}
    assert claims.memory_claim(report)["why"].startswith("embeddings and norms stay 16-bit")


def test_speed_passes_for_any_gain_and_fails_when_4bit_is_slower():
    cpu = claims.speed_claim({"device": "cpu", "tokens_per_s": {"base_full": 100, "base_4bit": 40}})
    assert cpu["measured"] == pytest.approx(0.4) and cpu["passed"] is False
    assert "on a CPU bitsandbytes has no general 4-bit matmul" in cpu["why"]
    gpu = claims.speed_claim({"device": "cuda", "tokens_per_s": {"base_full": 50, "base_4bit": 90}})
    assert gpu["passed"] is True and gpu["why"] is None
    assert gpu["display"] == "1.80x (72% of the claimed 2.5x)"
    slow_gpu = claims.speed_claim(
        {"device": "cuda:0", "seconds": {"base_full": 8, "base_4bit": 10}}
    )
    assert slow_gpu["measured"] == pytest.approx(0.8) and "decoding" in slow_gpu["why"]


def test_accuracy_rows_per_metric_with_direction_and_why():
    rows = {r["subject"]: r for r in claims.accuracy_claims(eval_metrics(FULL, FOUR), 134_515_008)}
    # Lower is better: kept = 16-bit / 4-bit.
    loss = rows["docstring_loss/bits_per_byte"]
    assert loss["measured"] == pytest.approx(1 / 1.05) and loss["passed"] is False
    assert "135 M-parameter model: small models lose more" in loss["why"]
    assert "within two standard errors" not in loss["why"]  # 0.05 apart, noise ±0.028
    acc = rows["docstring_choice/acc"]
    assert acc["measured"] == pytest.approx(0.595 / 0.6) and acc["passed"] is True
    assert acc["why"] is None
    noisy = rows["docstring_choice/acc_norm"]
    assert noisy["passed"] is False and "within two standard errors (±0.141)" in noisy["why"]
    ppl = rows["prose_guard/word_perplexity"]
    assert ppl["passed"] is False and "perplexity is exponential in the loss" in ppl["why"]
    unknown = rows["custom/score"]
    assert unknown["passed"] is None and unknown["display"] == "n/a"
    assert "no direction" in unknown["why"]


def test_accuracy_reads_the_variant_names_of_older_revisions():
    old = eval_metrics(FULL, FOUR, names=("base_full", "base_nf4"))
    assert len(claims.accuracy_claims(old)) == 5


def test_check_claims_orders_rows_and_times_speed_from_the_evaluation():
    rows = claims.check_claims(SMALL_REPORT, None, eval_metrics(FULL, FOUR))
    assert [r["claim"] for r in rows[:2]] == [claims.MEMORY_CLAIM, claims.SPEED_CLAIM]
    assert rows[1]["measured"] == pytest.approx(30 / 75)  # the same lm-eval work, timed
    assert rows[1]["subject"] == "inference speed (lm-eval time, cpu)"
    assert len(rows) == 2 + 5
    assert claims.check_claims(SMALL_REPORT) == [claims.memory_claim(SMALL_REPORT)]


def with_speed(metrics: dict, full: float, four: float) -> dict:
    """eval metrics with each base variant's generation speed (evaluation.generation_speed)."""
    for name, rate in (("base_full", full), ("base_4bit", four)):
        metrics["variants"][name]["speed"] = {
            "prompts": 4,
            "new_tokens": 32,
            "seconds": 128 / rate,
            "tokens_per_s": rate,
            "seconds_per_prompt": 32 / rate,
        }
    return metrics


def test_generation_speed_is_preferred_to_lm_eval_time():
    metrics = with_speed(eval_metrics(FULL, FOUR), full=40.0, four=20.0)
    speed = claims.speed_from_eval(metrics)
    assert speed == {"device": "cpu", "tokens_per_s": {"base_full": 40.0, "base_4bit": 20.0}}
    row = claims.check_claims(None, None, metrics)[0]
    assert row["subject"] == "inference speed (generation, cpu)"
    assert row["measured"] == 0.5 and row["passed"] is False
    assert row["display"] == "0.50x (20% of the claimed 2.5x)"
    assert "no general 4-bit matmul" in row["why"]


def test_an_int8_run_checks_the_memory_claim_on_nf4():
    report = {
        **SMALL_REPORT,
        "quant_type": "int8",
        "quantized_weights": 106_168_320,
        "bytes": {"full": 269_030_016, "int8": 163_500_000},
        "bits_per_parameter": {"full": 16.0, "int8": 9.7, "int8_linear_layers": 8.05},
        "formats": {
            "nf4": {
                "supported": True,
                "bytes": 111_466_620,
                "quantized_weights": 106_168_320,
                "linear_bits": 4.127,
            }
        },
    }
    row = claims.memory_claim(report)
    assert row["subject"] == "memory (nf4)"
    assert row["measured"] == pytest.approx(1 - 111_466_620 / 269_030_016)
    assert "at 4.13 bits per linear weight" in row["why"]


def test_the_claims_file_counts_each_outcome():
    metrics = with_speed(eval_metrics(FULL, FOUR), full=40.0, four=50.0)
    report = claims.claims_report(SMALL_REPORT, metrics)
    rows = report["rows"]
    assert report["summary"] == {
        "passed": sum(r["passed"] is True for r in rows),
        "failed": sum(r["passed"] is False for r in rows),
        "undecided": sum(r["passed"] is None for r in rows),
    }
    # Memory fails (58.6 %), speed passes (1.25x), acc passes (99.2 %): by hand.
    assert [r["passed"] for r in rows[:2]] == [False, True]
    acc = next(r for r in rows if r["subject"] == "docstring_choice/acc")
    assert acc["passed"] is True and acc["measured"] == pytest.approx(0.595 / 0.60)
    assert report["summary"]["undecided"] == 1  # custom/score: lm-eval gives no direction


def test_the_claims_stage_reads_the_pipelines_files(tmp_path, monkeypatch):
    from qlora.core.io import StageError, write_json
    from stages import claims as stage

    monkeypatch.chdir(tmp_path)
    write_json(tmp_path / "reports/quantize.json", {**SMALL_REPORT, "double_quant": True,
               "full_dtype": "bfloat16", "quant_error": {}})  # fmt: skip
    write_json(tmp_path / "reports/eval/metrics.json", with_speed(eval_metrics(FULL, FOUR), 40, 20))
    write_json(tmp_path / "reports/export/gguf_eval.json", GGUF_EVAL)
    stage.main()
    written = json.loads((tmp_path / "reports/claims.json").read_text())
    assert written["rows"][0]["claim"] == claims.MEMORY_CLAIM
    assert written["rows"][1]["measured"] == 0.5
    assert [r for r in written["rows"] if "llama.cpp" in r["subject"]] == claims.deployed_claims(
        GGUF_EVAL, with_speed(eval_metrics(FULL, FOUR), 40, 20)
    )
    write_json(tmp_path / "reports/eval/metrics.json", {"variants": {"base_full": {}}})
    with pytest.raises(StageError, match=r"reports/eval/metrics.json"):
        stage.main()
    assert json.loads((tmp_path / "reports/claims.json").read_text()) == written


def gguf_artifact(gguf_type: str, weights: int, rate: float, metrics: dict, lora=None) -> dict:
    return {
        "model": f"merged-{gguf_type}.gguf",
        "lora": lora,
        "gguf_type": gguf_type,
        "file_bytes": weights + 1000,
        "weights_bytes": weights,
        "threads": 2,
        "metrics": metrics,
        "speed": {"prompts": 4, "new_tokens": 32, "repeats": 3, "tokens_per_s": rate,
                  "tokens_per_s_each": [rate] * 3, "spread": 1.0, "note": None},
    }  # fmt: skip


GGUF_EVAL = {
    "settings": {"engine": "llama-cpp-python 0.3.36"},
    "artifacts": {
        "merged-f16": gguf_artifact("f16", 270_000_000, 40.0, FULL),
        "merged-q8_0": gguf_artifact("q8_0", 145_000_000, 60.0, FULL),
        "merged-q4_k_m": gguf_artifact("q4_k_m", 81_000_000, 100.0, FOUR),
        "base-f16+lora": gguf_artifact("f16", 270_000_000, 30.0, FULL, lora="adapter-f16.gguf"),
    },
}


def test_deployed_4bit_files_are_held_to_the_claims_against_the_16bit_file_in_the_same_engine():
    rows = claims.deployed_claims(GGUF_EVAL, with_speed(eval_metrics(FULL, FOUR), 40, 20))
    # Only the 4-bit llama.cpp type is judged: q8_0 and the LoRA route are not 4-bit files.
    assert {r["subject"].split("(")[-1] for r in rows} >= {"llama.cpp q4_k_m, loaded weights)"}
    assert all("q4_k_m" in r["subject"] for r in rows)
    memory, speed, *accuracy = rows
    assert memory["measured"] == pytest.approx(1 - 81 / 270)  # 70.0 % saved
    assert memory["passed"] is True
    assert speed["measured"] == pytest.approx(100 / 40) and speed["passed"] is True
    # Beside it, the PyTorch paths' own rates (40 and 20 tokens/s in with_speed).
    assert "2.5x the PyTorch base_full" in speed["display"]
    assert "5.0x the PyTorch base_4bit" in speed["display"]
    by_subject = {r["subject"].split(" (")[0]: r for r in accuracy}
    assert by_subject["docstring_loss/bits_per_byte"]["measured"] == pytest.approx(1.00 / 1.05)
    assert by_subject["docstring_choice/acc"]["measured"] == pytest.approx(0.595 / 0.60)
    assert by_subject["docstring_choice/acc"]["passed"] is True
    assert by_subject["custom/score"]["passed"] is None
