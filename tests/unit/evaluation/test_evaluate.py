"""The evaluation stages (`eval_<variant>` then `evaluate`) on a tiny random Llama with a
random LoRA adapter, through real lm-eval.

Each workspace holds tiny params, the tiny model as the base, the splits + eval files written
by the real dataset stage and a copy of the local task YAMLs (conftest's `workspace`).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from helpers import avx512bf16
from helpers.repo import REPO
from helpers.text_scores import reference_chrf, reference_rouge_l
from helpers.tiny import alpaca_rows, tiny_params
from qlora.core import paths
from qlora.core.io import StageError, read_jsonl, write_jsonl
from qlora.evaluation import benchmark
from stages import eval_variant, evaluate

pytestmark = pytest.mark.cpu_paths

ADAPTER = Path("data/prepared/adapter")


def evaluate_all() -> None:
    """What `dvc repro` runs: each variant's stage, then the merge."""
    for variant in paths.VARIANTS:
        eval_variant.main(variant)
    evaluate.main()


def save_random_adapter(base_dir: Path, out: Path, seed: int = 0) -> None:
    """A LoRA adapter whose B matrices are random, not zero: it really changes the model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules="all-linear",
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    get_peft_model(base, config).save_pretrained(out)


def answer_bits_per_byte(model_dir: Path, rows: list[dict]) -> float:
    """docstring_loss recomputed by hand: -sum log p(completion | prompt) / bytes / ln 2.
    As lm-eval does, the prompt's trailing newline is scored with the answer and the whole
    text is tokenized at once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total_ll, total_bytes = 0.0, 0
    for row in rows:
        whole = tok(row["prompt"] + row["completion"], add_special_tokens=False)["input_ids"]
        prompt = tok(row["prompt"].rstrip(), add_special_tokens=False)["input_ids"]
        answer = whole[len(prompt) :]
        with torch.no_grad():
            logits = model(torch.tensor([whole])).logits[0].float()
        logprobs = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
        total_ll += logprobs[torch.arange(len(answer)), torch.tensor(answer)].sum().item()
        total_bytes += len(row["response"].encode("utf-8"))
    return -total_ll / total_bytes / math.log(2)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_model_dir, bnb_cpu_path) -> Iterator[Path]:
    """One run of the stage shared by the tests that read its outputs (the same set-up as
    conftest's `workspace`, made once for the module)."""
    from stages import dataset, sources

    root = tmp_path_factory.mktemp("evaluate")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(tiny_model_dir)))
        shutil.copytree(tiny_model_dir, root / "data/prepared/base_model")
        shutil.copytree(REPO / "data/eval_tasks", root / "data/eval_tasks")
        write_jsonl(root / "data/raw/train.jsonl", alpaca_rows())
        sources.main()
        dataset.main()
        save_random_adapter(root / "data/prepared/base_model", root / ADAPTER)
        evaluate_all()
        yield root


def test_three_variants_benchmarked_with_the_same_settings(evaluated):
    metrics = json.loads((evaluated / "reports/eval/metrics.json").read_text())
    settings = metrics["settings"]
    assert settings["tasks"] == [
        "docstring_loss",
        "docstring_choice",
        "prose_guard",
        "docstring_generate",
    ]
    assert settings["max_new_tokens"] == 8
    assert settings["limit"] == 8 and settings["batch_size"] == 4
    assert settings["lm_eval_version"] == "0.4.13" and settings["device"] == "cpu"

    variants = metrics["variants"]
    assert list(variants) == ["base_full", "base_4bit", "adapter_4bit"]
    assert variants["base_full"]["label"] == "base (float32)"
    assert variants["base_full"]["quantization"] is None
    assert variants["base_4bit"]["quantization"] == "nf4+double_quant"
    # 4-bit weights take less memory; the adapter adds its LoRA matrices on top.
    assert variants["base_4bit"]["memory_bytes"] < variants["base_full"]["memory_bytes"]
    assert variants["adapter_4bit"]["memory_bytes"] > variants["base_4bit"]["memory_bytes"]
    expected = {
        "docstring_loss": {"bits_per_byte": False, "byte_perplexity": False},
        "docstring_choice": {"acc": True, "acc_norm": True},
        "prose_guard": {"word_perplexity": False, "byte_perplexity": False, "bits_per_byte": False},
        "docstring_generate": {"rouge_l": True, "chrf": True},
    }
    for name, v in variants.items():
        assert v["seconds"] > 0
        got = {
            t: {m: e["higher_is_better"] for m, e in ms.items()} for t, ms in v["metrics"].items()
        }
        assert got == expected, name
        for task, ms in v["metrics"].items():
            for metric, entry in ms.items():
                assert math.isfinite(entry["value"]), (name, task, metric)
                assert entry["stderr"] is None or math.isfinite(entry["stderr"])
        assert 0 <= v["metrics"]["docstring_choice"]["acc"]["value"] <= 1
        assert v["metrics"]["docstring_choice"]["acc"]["stderr"] is not None
        primary = v["metrics"]["docstring_loss"]["bits_per_byte"]
        assert primary["stderr"] > 0 and primary["stderr_method"].startswith("bootstrap")


def test_the_4bit_variants_ran_on_this_cpu_path(evaluated, bnb_cpu_path):
    """On an AVX512-BF16 CPU evaluation infers through bitsandbytes' repacked bf16 kernel:
    every 4-bit layer of both 4-bit variants was repacked (14 of the tiny Llama's, twice)."""
    expected = 2 * 14 if bnb_cpu_path == "avx512bf16" else 0
    assert len(avx512bf16.repacked_layers) >= expected
    if bnb_cpu_path == "plain":
        assert avx512bf16.repacked_layers == []


def test_every_variant_is_timed_generating_the_same_tokens(evaluated):
    metrics = json.loads((evaluated / "reports/eval/metrics.json").read_text())
    for name, variant in metrics["variants"].items():
        speed = variant["speed"]
        assert (speed["prompts"], speed["new_tokens"]) == (2, 6), name
        assert speed["tokens_per_s"] == pytest.approx(2 * 6 / speed["seconds"])
        assert speed["seconds_per_prompt"] == pytest.approx(speed["seconds"] / 2)


def test_generation_speed_makes_exactly_the_tokens_it_counts(tiny_model_dir):
    """Even a model that would stop at once (end-of-sequence the likeliest token) is made
    to generate the full count: the variants must all do the same work."""
    from qlora.evaluation.benchmark import generation_speed
    from qlora.models.loading import load_full, load_tokenizer

    model, tokenizer = load_full(tiny_model_dir, "float32"), load_tokenizer(tiny_model_dir)
    with torch.no_grad():
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.config.vocab_size))
        model.lm_head.bias[tokenizer.eos_token_id] = 1e4  # EOS wins every greedy step
    made = []
    generate = model.generate

    def counting(**kwargs):
        out = generate(**kwargs)
        made.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    model.generate = counting
    speed = generation_speed(model, tokenizer, ["def f(x):", "Sum two numbers."], 5)
    assert made == [2, 5, 5]  # the warm-up, then each timed prompt
    assert speed["prompts"] == 2 and speed["new_tokens"] == 5
    assert generation_speed(model, tokenizer, [], 5) is None


def test_docstring_loss_matches_a_hand_computed_value(evaluated):
    rows = read_jsonl(evaluated / "data/prepared/splits/test.jsonl")[:8]
    expected = answer_bits_per_byte(evaluated / "data/prepared/base_model", rows)
    got = json.loads((evaluated / "reports/eval/metrics.json").read_text())
    value = got["variants"]["base_full"]["metrics"]["docstring_loss"]["bits_per_byte"]["value"]
    assert value == pytest.approx(expected, rel=1e-4)


def test_the_adapter_changes_the_scores_and_the_answers(evaluated):
    variants = json.loads((evaluated / "reports/eval/metrics.json").read_text())["variants"]
    base, adapted = variants["base_4bit"]["metrics"], variants["adapter_4bit"]["metrics"]
    for task, metric in [("docstring_loss", "bits_per_byte"), ("prose_guard", "bits_per_byte")]:
        assert adapted[task][metric]["value"] != base[task][metric]["value"], (task, metric)

    examples = json.loads((evaluated / "reports/eval/examples.json").read_text())
    rows = read_jsonl(evaluated / "data/prepared/splits/test.jsonl")[:2]
    assert [e["id"] for e in examples] == [r["id"] for r in rows]
    for example, row in zip(examples, rows, strict=True):
        assert example["prompt"] == row["prompt"] and example["reference"] == row["response"]
        assert set(example["outputs"]) == {"base_full", "base_4bit", "adapter_4bit"}
        # A random model rarely emits its end-of-turn token: each answer has new text, and
        # the special tokens are dropped.
        assert all(o and "<|im_end|>" not in o for o in example["outputs"].values())
    assert any(e["outputs"]["adapter_4bit"] != e["outputs"]["base_4bit"] for e in examples)


def test_every_test_row_is_answered_by_every_variant_and_scored_independently(evaluated):
    rows = read_jsonl(evaluated / "data/prepared/splits/test.jsonl")[:8]  # evaluate.limit
    merged = json.loads((evaluated / paths.EVAL_GENERATIONS).read_text())["tasks"]
    generated = merged["docstring_generate"]
    assert [g["id"] for g in generated] == [r["id"] for r in rows]
    variants = json.loads((evaluated / paths.EVAL_METRICS).read_text())["variants"]
    for name in paths.VARIANTS:
        answers = [g["outputs"][name] for g in generated]
        # The tiny random model seldom ends its turn: at most 8 new tokens, no markers.
        assert all(a and "<|im_end|>" not in a for a in answers), name
        for g, row in zip(generated, rows, strict=True):
            assert g["prompt"] == row["prompt"] and g["reference"] == row["response"]
            assert g["scores"][name]["rouge_l"] == pytest.approx(
                reference_rouge_l(g["outputs"][name], row["response"]), abs=1e-9
            )
            assert g["scores"][name]["chrf"] == pytest.approx(
                reference_chrf(g["outputs"][name], row["response"]), abs=1e-9
            )
        task = variants[name]["metrics"]["docstring_generate"]
        for metric in ("rouge_l", "chrf"):
            values = [g["scores"][name][metric] for g in generated]
            assert task[metric]["value"] == pytest.approx(sum(values) / len(values))
            assert task[metric]["stderr"] is not None  # lm-eval's, for the gate's interval
        # Timed apart; the examples are its first answers, not a second generation.
        assert variants[name]["generation_task_seconds"] > 0
        assert "generate_seconds" not in variants[name]
    assert any(g["outputs"]["adapter_4bit"] != g["outputs"]["base_4bit"] for g in generated)
    examples = json.loads((evaluated / "reports/eval/examples.json").read_text())
    assert [e["outputs"] for e in examples] == [g["outputs"] for g in generated[:2]]


def test_without_a_generation_task_the_examples_are_generated_apart(workspace):
    params = (workspace / "params.yaml").read_text()
    (workspace / "params.yaml").write_text(params.replace("  - docstring_generate\n", ""))
    save_random_adapter(workspace / "data/prepared/base_model", workspace / ADAPTER)
    eval_variant.main(paths.CANDIDATE)
    written = json.loads((workspace / paths.variant_file(paths.CANDIDATE)).read_text())
    assert (
        written["generations"] == {} and "docstring_generate" not in written["variant"]["metrics"]
    )
    assert len(written["examples"]) == 2 and written["variant"]["generate_seconds"] > 0


def test_unknown_task_is_named_before_any_model_loads(workspace):
    params = (workspace / "params.yaml").read_text()
    (workspace / "params.yaml").write_text(
        params.replace("- prose_guard", "- prose_guard\n  - docstring_lossy")
    )
    for variant in paths.VARIANTS:
        with pytest.raises(StageError, match="docstring_lossy"):
            eval_variant.main(variant)
    assert not (workspace / "reports/eval").exists()


def test_a_failing_variant_leaves_previous_results_untouched(workspace):
    previous = {"settings": {}, "variant": {"kept": True}}
    out = workspace / paths.variant_file(paths.CANDIDATE)
    out.parent.mkdir(parents=True)
    out.write_text(json.dumps(previous))
    save_random_adapter(workspace / "data/prepared/base_model", workspace / ADAPTER)
    weights = workspace / ADAPTER / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a truncated copy
    with pytest.raises(StageError, match="adapter_4bit"):
        eval_variant.main(paths.CANDIDATE)
    assert json.loads(out.read_text()) == previous
    assert not (workspace / paths.EVAL_METRICS).exists()


def test_the_merge_refuses_a_missing_variant_and_names_its_stage(workspace):
    with pytest.raises(StageError, match="eval_base_full"):
        evaluate.main()
    assert not (workspace / paths.EVAL_METRICS).exists()


def variant_result(name: str, **settings) -> dict:
    return {
        "settings": {"tasks": ["t"], "limit": 8, "batch_size": 4, "device": "cpu", **settings},
        "variant": {"label": name, "metrics": {"t": {"m": {"value": 1.0}}}},
        "examples": [{"id": 0, "prompt": "p", "reference": "r", "output": f"{name} says"}],
    }


def test_the_merge_puts_each_variant_under_its_name_with_its_answers():
    from qlora.evaluation.variants import merge_variants

    metrics, examples = merge_variants({n: variant_result(n) for n in paths.VARIANTS})
    assert list(metrics["variants"]) == list(paths.VARIANTS)
    assert all(metrics["variants"][n]["label"] == n for n in paths.VARIANTS)
    assert "devices" not in metrics["settings"]
    assert examples == [
        {
            "id": 0,
            "prompt": "p",
            "reference": "r",
            "outputs": {n: f"{n} says" for n in paths.VARIANTS},
        }
    ]


def test_the_merge_refuses_variants_measured_with_other_settings():
    from qlora.evaluation.variants import merge_variants

    results = {n: variant_result(n) for n in paths.VARIANTS}
    results[paths.REFERENCE] = variant_result(paths.REFERENCE, limit=16)
    with pytest.raises(StageError, match="base_full was evaluated with limit = 16"):
        merge_variants(results)
    results[paths.REFERENCE] = variant_result(paths.REFERENCE)
    results[paths.BASELINE]["examples"][0]["prompt"] = "another"
    with pytest.raises(StageError, match="base_4bit answered other example prompts"):
        merge_variants(results)


def with_rows(result: dict, name: str, ids=(0, 1)) -> dict:
    result["generations"] = {
        "docstring_generate": [
            {
                "id": i,
                "prompt": f"p{i}",
                "reference": f"r{i}",
                "output": f"{name} {i}",
                "scores": {"rouge_l": 0.1 * i, "chrf": 10.0 * i},
            }
            for i in ids
        ]
    }
    return result


def test_the_merge_puts_every_row_with_each_variants_answer_and_scores():
    from qlora.evaluation.variants import merge_generations

    merged = merge_generations({n: with_rows(variant_result(n), n) for n in paths.VARIANTS})
    rows = merged["tasks"]["docstring_generate"]
    assert [r["id"] for r in rows] == [0, 1]
    assert rows[1]["outputs"] == {n: f"{n} 1" for n in paths.VARIANTS}
    assert rows[1]["scores"]["adapter_4bit"] == {"rouge_l": 0.1, "chrf": 10.0}
    assert merge_generations({n: variant_result(n) for n in paths.VARIANTS}) == {"tasks": {}}


def test_the_merge_refuses_variants_that_answered_other_rows():
    from qlora.evaluation.variants import merge_generations

    results = {n: with_rows(variant_result(n), n) for n in paths.VARIANTS}
    results[paths.BASELINE] = with_rows(variant_result(paths.BASELINE), paths.BASELINE, (0, 2))
    with pytest.raises(StageError, match="base_4bit answered other rows of docstring_generate"):
        merge_generations(results)
    del results[paths.REFERENCE]["generations"]
    with pytest.raises(StageError, match="base_full has no answers of generation task"):
        merge_generations(results)


def test_the_merge_records_the_devices_when_a_cached_variant_came_from_another():
    from qlora.evaluation.variants import merge_variants

    results = {n: variant_result(n) for n in paths.VARIANTS}
    results[paths.REFERENCE]["settings"]["device"] = "cuda"
    metrics, _ = merge_variants(results)
    assert metrics["settings"]["devices"] == {
        "base_full": "cuda",
        "base_4bit": "cpu",
        "adapter_4bit": "cpu",
    }


def test_metrics_keep_filters_and_turn_missing_stderr_into_null():
    results = {
        "results": {
            "gsm8k": {
                "alias": "gsm8k",
                "exact_match,strict-match": 0.25,
                "exact_match_stderr,strict-match": 0.05,
            },
            "prose_guard": {
                "alias": "prose_guard",
                "bits_per_byte,none": 1.5,
                "bits_per_byte_stderr,none": "N/A",
            },
        },
        "higher_is_better": {
            "gsm8k": {"exact_match": True},
            "prose_guard": {"bits_per_byte": False},
        },
    }
    assert benchmark.task_metrics(results, "v") == {
        "gsm8k": {
            "exact_match,strict-match": {"value": 0.25, "stderr": 0.05, "higher_is_better": True}
        },
        "prose_guard": {"bits_per_byte": {"value": 1.5, "stderr": None, "higher_is_better": False}},
    }
    results["results"]["prose_guard"]["bits_per_byte,none"] = float("nan")
    with pytest.raises(StageError, match="v: prose_guard/bits_per_byte,none"):
        benchmark.task_metrics(results, "v")


def test_bootstrap_stderr_matches_the_textbook_value_for_a_mean():
    from qlora.evaluation.benchmark import bootstrap_stderr

    def mean(xs):
        return sum(xs) / len(xs)

    coin = [0, 1] * 50  # stderr of the mean: sqrt(0.25 / 100) = 0.05
    assert bootstrap_stderr(mean, coin) == pytest.approx(0.05, rel=0.15)
    assert bootstrap_stderr(mean, [3.0] * 10) == 0
    assert bootstrap_stderr(mean, coin) == bootstrap_stderr(mean, coin)  # seeded
