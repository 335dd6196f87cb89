"""Gate decisions: pass, fail on the primary metric, fail on a guard metric, bad config, and
the champion/challenger check that promotion runs."""

from __future__ import annotations

import copy

import pytest

from helpers.tiny import gate_params
from qlora.core.io import StageError
from qlora.evaluation.gate import decide, decide_vs_champion, relative_gain


def metric(value, higher_is_better, stderr=0.01):
    return {"value": value, "stderr": stderr, "higher_is_better": higher_is_better}


def results(adapter_bpb=0.80, adapter_guard=2.00, adapter_acc=0.60) -> dict:
    def variant(bpb, guard, acc):
        return {
            "metrics": {
                "docstring_loss": {"bits_per_byte": metric(bpb, False)},
                "docstring_choice": {"acc": metric(acc, True)},
                "prose_guard": {"bits_per_byte": metric(guard, False)},
            }
        }

    return {
        "variants": {
            "base_full": variant(0.98, 1.98, 0.52),
            "base_4bit": variant(1.00, 2.00, 0.50),
            "adapter_4bit": variant(adapter_bpb, adapter_guard, adapter_acc),
        }
    }


RULES = gate_params(min_gain=0.05, max_regression=0.10)


def test_relative_gain_respects_direction():
    assert relative_gain(1.0, 0.8, higher_is_better=False) == pytest.approx(0.2)
    assert relative_gain(0.5, 0.6, higher_is_better=True) == pytest.approx(0.2)
    assert relative_gain(0.5, 0.4, higher_is_better=True) == pytest.approx(-0.2)


def test_clear_improvement_is_promoted():
    d = decide(results(), RULES)
    assert d["decision"] == "promoted" and d["passed"]
    assert d["primary"]["relative_change"] == pytest.approx(0.2)
    assert all(c["passed"] for c in d["checks"]) and len(d["checks"]) == 3


def test_too_small_a_gain_on_the_primary_metric_is_rejected():
    d = decide(results(adapter_bpb=0.97), RULES)  # 3% < the required 5%
    assert d["decision"] == "rejected"
    assert len(d["reasons"]) == 1
    assert d["reasons"][0].startswith("FAIL: docstring_loss/bits_per_byte")
    assert "+3.0%" in d["reasons"][0] and "5.0%" in d["reasons"][0]


def test_forgetting_on_the_guard_task_is_rejected_even_with_a_primary_gain():
    d = decide(results(adapter_guard=2.5), RULES)  # prose got 25% worse
    assert d["decision"] == "rejected"
    assert [r.split(" ")[1] for r in d["reasons"]] == ["prose_guard/bits_per_byte"]


def test_a_primary_metric_that_was_not_evaluated_is_a_config_error():
    rules = copy.deepcopy(RULES)
    rules.primary.metric = "rouge"
    with pytest.raises(StageError, match=r"docstring_loss/rouge is not in .*available"):
        decide(results(), rules)
    with pytest.raises(StageError, match="adapter_4bit"):
        decide({"variants": {"base_4bit": {}}}, RULES)


def noisy(metrics: dict, stderr: float) -> dict:
    for variant in metrics["variants"].values():
        for task in variant["metrics"].values():
            for m in task.values():
                m["stderr"] = stderr
    return metrics


def test_a_primary_gain_within_the_noise_is_rejected_unless_significance_is_off():
    d = decide(noisy(results(adapter_bpb=0.90), stderr=0.08), RULES)  # 10% gain, CI ±0.22
    assert d["decision"] == "rejected"
    assert "within the noise" in d["reasons"][0]
    loose = RULES.model_copy(update={"significance": False})
    assert decide(noisy(results(adapter_bpb=0.90), stderr=0.08), loose)["passed"]


def test_a_guard_drop_within_the_noise_does_not_reject():
    # accuracy 0.50 -> 0.44 is a 12% drop, but with stderr 0.07 it is one or two questions
    d = decide(
        noisy(results(adapter_acc=0.44), stderr=0.07),
        RULES.model_copy(update={"min_gain": 0.0, "significance": True}),
    )
    guard = next(c for c in d["checks"] if c["metric"] == "acc")
    assert guard["passed"] and guard["beyond_noise"] is False
    assert "exceeded but within the noise" in guard["reason"]
    strict = RULES.model_copy(update={"significance": False})
    assert not decide(noisy(results(adapter_acc=0.44), stderr=0.07), strict)["passed"]


# ---- champion/challenger -----------------------------------------------------------

CHAMPION_RULES = RULES.model_copy(
    update={"champion": RULES.champion.model_copy(update={"min_gain": 0.0, "max_regression": 0.10})}
)


def test_without_a_champion_the_challenger_check_passes_and_says_why():
    d = decide_vs_champion(results(), None, CHAMPION_RULES)
    assert d["passed"] and d["champion"] is None
    assert "no champion yet" in d["reasons"][0]


def test_a_challenger_not_worse_than_the_champion_passes():
    d = decide_vs_champion(
        results(adapter_bpb=0.79), results(adapter_bpb=0.80), CHAMPION_RULES, "v1"
    )
    assert d["passed"] and d["champion"] == "v1"
    primary = next(c for c in d["checks"] if c["kind"] == "primary")
    assert primary["base"] == 0.80 and primary["adapter"] == 0.79  # champion, then challenger


def test_a_challenger_worse_than_the_champion_fails_even_if_it_beats_the_base():
    champion, challenger = results(adapter_bpb=0.80), results(adapter_bpb=0.90)
    assert decide(challenger, RULES)["passed"]  # 10% better than the base
    d = decide_vs_champion(challenger, champion, CHAMPION_RULES, "v1")
    assert not d["passed"]
    assert d["reasons"][0].startswith("FAIL: docstring_loss/bits_per_byte")
    assert "-12.5%" in d["reasons"][0] and "not better than v1" in d["summary"]


def test_a_challenger_that_forgets_more_than_the_champion_fails_on_the_guard():
    d = decide_vs_champion(
        results(adapter_bpb=0.70, adapter_guard=2.3), results(), CHAMPION_RULES, "v1"
    )
    assert not d["passed"]
    assert [r.split(" ")[1] for r in d["reasons"]] == ["prose_guard/bits_per_byte"]


def test_a_minimum_gain_over_the_champion_and_significance_apply():
    rules = CHAMPION_RULES.model_copy(
        update={"champion": CHAMPION_RULES.champion.model_copy(update={"min_gain": 0.05})}
    )
    assert not decide_vs_champion(results(adapter_bpb=0.78), results(), rules, "v1")["passed"]
    assert decide_vs_champion(results(adapter_bpb=0.70), results(), rules, "v1")["passed"]
    noisy_rules = rules.model_copy(
        update={"champion": rules.champion.model_copy(update={"significance": True})}
    )
    d = decide_vs_champion(
        noisy(results(adapter_bpb=0.70), 0.08), noisy(results(), 0.08), noisy_rules, "v1"
    )
    assert not d["passed"] and "within the noise" in d["reasons"][0]


def test_a_metric_can_have_its_own_regression_limit():
    rules = RULES.model_copy(
        update={"max_regression_per_metric": {"prose_guard/bits_per_byte": 0.02}}
    )
    assert decide(results(adapter_guard=2.03), RULES)["passed"]  # 1.5% worse: within 10%
    d = decide(results(adapter_guard=2.06), rules)  # 3% worse: beyond its own 2%
    assert not d["passed"] and "allowed regression 2.0%" in d["reasons"][0]
    typo = RULES.model_copy(update={"max_regression_per_metric": {"prose_guard/bpb": 0.02}})
    with pytest.raises(StageError, match=r"prose_guard/bpb.*available"):
        decide(results(), typo)
    with pytest.raises(ValueError, match="not 'task/metric'"):
        gate_params(primary={"task": "t", "metric": "m"}, max_regression_per_metric={"acc": 0.1})


# ---- clear errors and honest reasons ---------------------------------------------------


def test_a_candidate_without_the_primary_metric_names_the_metric_and_the_file():
    metrics = results()
    del metrics["variants"]["adapter_4bit"]["metrics"]["docstring_loss"]["bits_per_byte"]
    with pytest.raises(StageError, match=r"docstring_loss/bits_per_byte .*reports/eval/metrics"):
        decide(metrics, RULES)


def test_a_missing_stderr_says_the_significance_rule_could_not_be_applied():
    metrics = results()
    metrics["variants"]["base_4bit"]["metrics"]["docstring_loss"]["bits_per_byte"]["stderr"] = None
    d = decide(metrics, RULES)  # significance is on by default
    primary = next(c for c in d["checks"] if c["kind"] == "primary")
    assert primary["beyond_noise"] is None and primary["ci95"] is None
    assert "the significance rule could not be applied (no stderr for base)" in primary["reason"]
    others = [c["reason"] for c in d["checks"] if c["kind"] == "guard"]
    assert not any("could not be applied" in r for r in others)  # they have both stderrs
    off = decide(metrics, RULES.model_copy(update={"significance": False}))
    assert not any("could not be applied" in c["reason"] for c in off["checks"])


def without_direction(metrics: dict, task: str, metric: str) -> dict:
    for variant in metrics["variants"].values():
        variant["metrics"][task][metric]["higher_is_better"] = None
    return metrics


def test_a_primary_metric_without_a_direction_is_refused_by_name():
    metrics = without_direction(results(), "docstring_loss", "bits_per_byte")
    with pytest.raises(StageError, match=r"docstring_loss/bits_per_byte .*no direction.*lm-eval"):
        decide(metrics, RULES)


def test_a_guard_metric_without_a_direction_is_shown_but_not_judged():
    # acc fell by half: with no known direction, that is neither a pass nor a failure
    metrics = without_direction(results(adapter_acc=0.25), "docstring_choice", "acc")
    d = decide(metrics, RULES)
    assert d["passed"]
    guard = next(c for c in d["checks"] if c["metric"] == "acc")
    assert guard["passed"] is None and guard["higher_is_better"] is None
    assert guard["relative_change"] is None and guard["change"] == pytest.approx(-0.25)
    assert guard["reason"].startswith("NOT JUDGED: docstring_choice/acc (direction unknown)")
    assert "lm-eval gave no higher_is_better" in guard["reason"]


def test_the_decision_carries_the_primary_gain_and_interval_the_report_shows():
    d = decide(results(), RULES)
    half = 1.96 * (2 * 0.01**2) ** 0.5
    assert d["primary"]["ci95"] == pytest.approx((-0.2 - half, -0.2 + half))
    assert d["primary"]["beyond_noise"] is True
    assert d["primary"]["relative_change"] == pytest.approx(0.2)


# ---------------------------------------------------------------- generated answers


def with_generation(metrics: dict, base_rouge: float, adapter_rouge: float, stderr: float) -> dict:
    """`metrics` plus the generation task's scores (ROUGE-L 0-1, chrF 0-100, higher better)."""
    out = copy.deepcopy(metrics)
    for name, rouge in (
        ("base_full", base_rouge),
        ("base_4bit", base_rouge),
        ("adapter_4bit", adapter_rouge),
    ):
        out["variants"][name]["metrics"]["docstring_generate"] = {
            "rouge_l": metric(rouge, True, stderr),
            "chrf": metric(100 * rouge, True, 100 * stderr),
        }
    return out


def generation_check(decision: dict, metric_name: str = "rouge_l") -> dict:
    return next(
        c
        for c in decision["checks"]
        if (c["task"], c["metric"]) == ("docstring_generate", metric_name)
    )


def test_the_generation_score_is_a_guard_by_default():
    d = decide(with_generation(results(), 0.30, 0.45, 0.02), RULES)
    assert d["decision"] == "promoted"
    check = generation_check(d)
    assert check["kind"] == "guard" and check["higher_is_better"] is True
    assert check["change"] == pytest.approx(0.15) and check["relative_change"] == pytest.approx(0.5)
    assert check["ci95_half_width"] == pytest.approx(1.96 * (2 * 0.02**2) ** 0.5)
    assert check["passed"] and check["beyond_noise"]


def test_worse_answers_beyond_the_limit_and_the_noise_reject_the_adapter():
    # ROUGE-L 0.40 -> 0.30: -25% (limit 10%), 95% interval ±0.028: beyond the noise.
    d = decide(with_generation(results(), 0.40, 0.30, 0.01), RULES)
    assert d["decision"] == "rejected"
    failed = {(c["task"], c["metric"]) for c in d["checks"] if c["passed"] is False}
    assert failed == {("docstring_generate", "rouge_l"), ("docstring_generate", "chrf")}
    assert any(
        r.startswith("FAIL: docstring_generate/rouge_l (higher is better)") for r in d["reasons"]
    )


def test_worse_answers_within_the_noise_do_not_reject():
    # The same -25% with a standard error of 0.06 (interval ±0.17): could be noise.
    d = decide(with_generation(results(), 0.40, 0.30, 0.06), RULES)
    check = generation_check(d)
    assert d["decision"] == "promoted" and check["passed"] and check["beyond_noise"] is False
    assert "exceeded but within the noise" in check["reason"]


def test_the_generation_score_can_be_the_primary_metric():
    rules = gate_params(primary={"task": "docstring_generate", "metric": "rouge_l"}, min_gain=0.05)
    d = decide(with_generation(results(), 0.30, 0.45, 0.02), rules)
    assert d["decision"] == "promoted"
    assert (d["primary"]["task"], d["primary"]["metric"]) == ("docstring_generate", "rouge_l")
    assert d["primary"]["relative_change"] == pytest.approx(0.5)
    assert generation_check(d)["kind"] == "primary"
    assert next(c for c in d["checks"] if c["task"] == "docstring_loss")["kind"] == "guard"
    # As the primary it must gain, and beyond the noise: +10% but the interval is ±0.055.
    d = decide(with_generation(results(), 0.30, 0.33, 0.02), rules)
    assert d["decision"] == "rejected" and "within the noise" in d["reasons"][0]


def test_the_shipped_params_evaluate_the_generation_task_and_accept_it_as_primary():
    import yaml

    from helpers.repo import REPO
    from qlora.core.params import Params

    shipped = yaml.safe_load((REPO / "params.yaml").read_text())
    assert "docstring_generate" in shipped["evaluate"]["tasks"]
    shipped["gate"]["primary"] = {"task": "docstring_generate", "metric": "rouge_l"}
    assert Params.model_validate(shipped).gate.primary.task == "docstring_generate"
