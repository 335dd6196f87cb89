"""One end-to-end run of the real DAG (`dvc repro`) on a tiny configuration.

The repository is copied to a temporary folder with its own git history, params.yaml is
shrunk (tiny random Llama made in the test, a few rows, a few steps) and every stage runs
for real through DVC. Then: outputs are checked, the adapter loads with plain peft, a second
`dvc repro` runs nothing, and a changed LoRA rank makes only its downstream stages stale.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers.dag import SECRET, dvc, files_under, repro_in_copy
from helpers.repo import REPO, git
from helpers.tiny import alpaca_rows, make_tiny_model_dir, tiny_params
from qlora.core.io import pipeline_env, sha256_of, write_jsonl
from qlora.core.sources import settle_always_changed
from qlora.registry.store import Registry
from qlora.train.log_layout import training_view

pytestmark = pytest.mark.slow

STAGES = [
    "sources",
    "base",
    "extract",
    "dataset",
    "validate",
    "quantize",
    "finetune",
    "eval_base_full",
    "eval_base_4bit",
    "eval_adapter_4bit",
    "evaluate",
    "gate",
    "export",
    "eval_gguf",
    "parity",
    "claims",
    "report",
]


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, tiny_model_dir) -> tuple[Path, subprocess.CompletedProcess]:
    work = tmp_path_factory.mktemp("e2e") / "repo"
    # The real stdlib corpus (extract stage) with the tiny model: every stage as in `make run`.
    params = tiny_params(tiny_model_dir, source="data/raw/stdlib_functions.jsonl")
    params["corpus"]["max_source_chars"] = 400
    # The tiny max_length (256) drops ~11% of the stdlib rows: accepted here, on purpose.
    params["validate"]["max_dropped_fraction"] = 0.5
    # A known outcome: a learning rate that moves a random model in 3 steps, and a gate that
    # asks only for no loss on the primary metric (guards may move freely on 8 rows).
    params["finetune"]["learning_rate"] = 2e-3
    params["gate"].update(
        min_gain=0.0, significance=False, max_regression=10.0, max_regression_per_metric={}
    )
    return work, repro_in_copy(work, params)


def test_every_stage_runs_and_writes_its_outputs(pipeline_run):
    work, done = pipeline_run
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    for stage in STAGES:
        assert f"[{stage}] done in" in done.stdout, f"stage {stage} did not report completion"
    lock = yaml.safe_load((work / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)

    metrics = json.loads((work / "reports/eval/metrics.json").read_text())
    assert set(metrics["variants"]) == {"base_full", "base_4bit", "adapter_4bit"}
    gate = json.loads((work / "reports/gate.json").read_text())
    assert gate["decision"] == "promoted", gate["reasons"]
    assert gate["primary"]["relative_change"] > 0, "training did not lower bits per byte"
    for name in ("metrics.json", "run.json", "plots/metrics/train/loss.tsv"):
        assert (work / "reports/train" / name).stat().st_size > 0
    html = (work / "reports/report.html").read_text()
    assert "<html" in html.lower()

    # The deployable files: every one the manifest lists is there with its recorded hash,
    # every artifact was scored under llama.cpp and judged against the NF4 + adapter.
    manifest = json.loads((work / "data/prepared/gguf/manifest.json").read_text())
    for name, entry in manifest["files"].items():
        assert sha256_of(work / "data/prepared/gguf" / name) == entry["sha256"]
    artifacts = {"merged-f16", "merged-q4_k_m"}  # the tiny params' (the Qwen2 test: all)
    assert set(manifest["artifacts"]) == artifacts
    parity = json.loads((work / "reports/export/parity.json").read_text())
    assert set(parity["artifacts"]) == artifacts
    assert parity["deployable"] == [n for n, v in parity["artifacts"].items() if v["passed"]]
    measured = json.loads((work / "reports/export/gguf_eval.json").read_text())
    for name in artifacts:
        got = measured["artifacts"][name]["metrics"]["docstring_loss"]["bits_per_byte"]
        assert math.isfinite(got["value"]) and got["stderr"] > 0
    assert 'id="deploy"' in html and 'id="parity-table"' in html
    claims = json.loads((work / "reports/claims.json").read_text())
    assert any("llama.cpp q4_k_m" in r["subject"] for r in claims["rows"])


def test_every_test_row_is_answered_scored_gated_and_browsable(pipeline_run):
    """The generation task through the DAG: every evaluated test row answered by each
    variant, scored with intervals, a gate check of its own, a row in the report."""
    work, done = pipeline_run
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    test_rows = [json.loads(line) for line in (work / "data/prepared/splits/test.jsonl").open()]
    rows = json.loads((work / "reports/eval/generations.json").read_text())["tasks"]
    generated = rows["docstring_generate"]
    assert [r["id"] for r in generated] == [r["id"] for r in test_rows[:8]]  # evaluate.limit
    variants = json.loads((work / "reports/eval/metrics.json").read_text())["variants"]
    for name, variant in variants.items():
        assert all(isinstance(r["outputs"][name], str) for r in generated), name
        for metric in ("rouge_l", "chrf"):
            entry = variant["metrics"]["docstring_generate"][metric]
            values = [r["scores"][name][metric] for r in generated]
            assert entry["value"] == pytest.approx(sum(values) / len(values)), (name, metric)
            assert entry["stderr"] is not None and entry["higher_is_better"] is True
        assert variant["generation_task_seconds"] > 0
    gate = json.loads((work / "reports/gate.json").read_text())
    checks = {(c["task"], c["metric"]): c for c in gate["checks"]}
    assert checks["docstring_generate", "rouge_l"]["kind"] == "guard"
    assert checks["docstring_generate", "chrf"]["ci95"] is not None
    html = (work / "reports/report.html").read_text()
    assert html.count('<div class="gen-row ') == len(generated)
    assert "Generated answers" in html.split('id="headline"')[1].split("</section>")[0]
    assert "<script" not in html.lower()


def test_adapter_loads_with_plain_peft(pipeline_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    work, _ = pipeline_run
    adapter = work / "data/prepared/adapter"
    assert (adapter / "adapter_config.json").exists()
    assert (adapter / "adapter_model.safetensors").exists()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter)
    lora_weights = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert lora_weights, "no LoRA weights were loaded"


def test_second_repro_runs_nothing_and_a_param_change_reruns_only_downstream(pipeline_run):
    work, _ = pipeline_run
    again = dvc(work, "repro")
    assert again.returncode == 0, again.stderr
    ran = [s for s in STAGES if f"[{s}] done in" in again.stdout]
    # sources re-fingerprints the inputs on every run (always_changed); nothing else reruns.
    assert ran == ["sources"], f"stages ran again although nothing changed: {ran}"
    status = dvc(work, "status", "--json")
    assert json.loads(status.stdout) == {"sources": ["always changed"]}

    params = yaml.safe_load((work / "params.yaml").read_text())
    params["finetune"]["learning_rate"] = 1e-3
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    status = dvc(work, "status", "--json")
    assert status.returncode == 0, status.stderr
    stale = set(json.loads(status.stdout))
    # gate and report are stale only through outputs finetune has not rewritten yet, so
    # `dvc status` names the first stage that reads the changed param.
    assert "finetune" in stale
    assert stale.isdisjoint({"base", "extract", "dataset", "validate", "quantize"})
    # The adapter's rank also reruns quantize, which measures LoftQ at that rank.
    params["finetune"]["lora"]["r"] = 4
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    stale = set(json.loads(dvc(work, "status", "--json").stdout))
    assert {"quantize", "finetune"} <= stale
    assert stale.isdisjoint({"base", "extract", "dataset", "validate"})


def test_an_experiment_shows_dvclive_columns_and_plots_beside_the_baseline(pipeline_run):
    """`dvc exp run -S ...` then `dvc exp show` and `dvc plots diff`, as a user compares two
    trainings: DVCLive's summary as columns, its per-step curves of both on one chart."""
    work, _ = pipeline_run
    git(work, "add", "-A")
    git(work, "commit", "-qm", "baseline run")
    done = dvc(work, "exp", "run", "-n", "rank8", "-S", "finetune.lora.r=8")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[finetune] done in" in done.stdout

    shown = dvc(work, "exp", "show", "--json")
    assert shown.returncode == 0, shown.stderr
    rows = json.loads(shown.stdout)
    baseline = next(r for r in rows if r["rev"] != "workspace")
    experiment = next(e for e in baseline["experiments"] if e["name"] == "rank8")
    columns = {}
    for name, row in (("baseline", baseline), ("rank8", experiment["revs"][0])):
        data = row["data"]
        summary = data["metrics"]["reports/train/metrics.json"]["data"]
        columns[name] = (
            data["params"]["params.yaml"]["data"]["finetune"]["lora"]["r"],
            summary["train"]["loss"],
            summary["eval"]["loss"],
            summary["train"]["tokens_per_s"],
        )
    assert columns["rank8"][0] == 8 and columns["baseline"][0] != 8
    assert all(math.isfinite(v) for row in columns.values() for v in row[1:])
    assert columns["rank8"][2] != columns["baseline"][2]  # another adapter, another loss

    plots = dvc(work, "plots", "diff", "HEAD", "rank8", "--json")
    assert plots.returncode == 0, plots.stderr
    (chart,) = json.loads(plots.stdout)["data"]["reports/train/plots/metrics/eval/loss.tsv"]
    assert chart["revisions"] == ["HEAD", "rank8"]
    points = chart["content"]["data"]["values"]
    for rev in ("HEAD", "rank8"):
        steps = [int(p["step"]) for p in points if p["rev"] == rev]
        assert steps[0] == 0 and steps[-1] == 3, (rev, steps)  # the whole curve, each run


def test_a_token_in_the_environment_reaches_no_output(pipeline_run):
    work, done = pipeline_run
    assert SECRET not in done.stdout + done.stderr
    for folder in ("reports", "data/prepared"):
        for path in (work / folder).rglob("*"):
            if path.is_file():
                assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in (work / "dvc.lock").read_text()


def chat_rows() -> list[dict]:
    """The Alpaca fixture rows as chat records (the other input format users bring)."""
    return [
        {
            "messages": [
                {"role": "user", "content": f"{r['instruction']}\n\n{r['input']}"},
                {"role": "assistant", "content": r["output"]},
            ],
            "module": r["module"],
        }
        for r in alpaca_rows()
    ]


def test_a_qwen2_model_with_biased_projections_and_untied_embeddings_runs_the_dag(
    tmp_path_factory,
):
    """Beyond Llama: Qwen2's q/k/v carry a bias (the layers that broke training on
    AVX512-BF16 CPUs) and its output embedding is a separate matrix here. Chat-format data.
    The gate's bar is set out of reach (a 60 % gain from 3 steps of a random model), so the
    decision is known: rejected, on the primary metric, with every variant evaluated."""
    root = tmp_path_factory.mktemp("qwen2")
    model_dir = make_tiny_model_dir(root / "model", arch="qwen2", tie_word_embeddings=False)
    work = root / "repo"
    params = tiny_params(model_dir, source="data/user/chat.jsonl")
    params["dataset"]["format"] = "chat"
    params["gate"]["min_gain"] = 0.6
    shipped = yaml.safe_load((REPO / "params.yaml").read_text())["export"]
    params["export"].update(gguf_types=shipped["gguf_types"], lora=shipped["lora"])
    write_jsonl(work / "data/user/chat.jsonl", chat_rows())
    done = repro_in_copy(work, params)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    for stage in STAGES:
        assert f"[{stage}] done in" in done.stdout, f"stage {stage} did not report completion"

    base = json.loads((work / "reports/base.json").read_text())
    assert base["architecture"] == ["Qwen2ForCausalLM"]
    dataset = json.loads((work / "reports/dataset.json").read_text())
    assert dataset["format"] == "chat"
    adapter = work / "data/prepared/adapter"
    targets = json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    assert {"q_proj", "k_proj", "v_proj", "o_proj"} <= {t.rsplit(".", 1)[-1] for t in targets}
    train = training_view(work / "reports/train")
    assert train["steps"] == 3 and math.isfinite(train["final_eval_loss"])
    metrics = json.loads((work / "reports/eval/metrics.json").read_text())
    assert set(metrics["variants"]) == {"base_full", "base_4bit", "adapter_4bit"}
    gate = json.loads((work / "reports/gate.json").read_text())
    assert gate["decision"] == "rejected"
    assert any("docstring_loss/bits_per_byte" in r for r in gate["reasons"]), gate["reasons"]
    assert "Qwen2ForCausalLM" in (work / "reports/report.html").read_text()
    # Every kind of GGUF the shipped params ask for, the LoRA route included (its converter
    # maps Qwen2's biased projections), scored under llama.cpp and judged.
    manifest = json.loads((work / "data/prepared/gguf/manifest.json").read_text())
    kinds = {"merged-f16", *(f"merged-{t}" for t in shipped["gguf_types"]), "base-f16+lora"}
    assert set(manifest["artifacts"]) == kinds and manifest["failed"] == {}
    parity = json.loads((work / "reports/export/parity.json").read_text())
    assert set(parity["artifacts"]) == kinds
    measured = json.loads((work / "reports/export/gguf_eval.json").read_text())
    for name in kinds:
        got = measured["artifacts"][name]["metrics"]["docstring_loss"]["bits_per_byte"]
        assert math.isfinite(got["value"]) and got["stderr"] > 0

    # The user's own data and model are DVC inputs: editing them makes what reads them stale
    # (dvc status, through the fingerprints) and `dvc repro` reruns exactly those stages.
    with (work / "data/user/chat.jsonl").open("a") as f:
        f.write(json.dumps({**chat_rows()[0], "module": "extra"}) + "\n")
    status = json.loads(dvc(work, "status", "--json").stdout)
    assert settle_always_changed(status, work) == {
        "sources": [{"changed sources": "dataset.source"}]
    }
    rerun = dvc(work, "repro", "dataset")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "[dataset] done in" in rerun.stdout and "[base] done in" not in rerun.stdout
    config = model_dir / "config.json"
    config.write_text(config.read_text() + "\n")
    rerun = dvc(work, "repro", "base")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "[base] done in" in rerun.stdout


def set_params(work: Path, edit) -> None:
    params = yaml.safe_load((work / "params.yaml").read_text())
    edit(params)
    (work / "params.yaml").write_text(yaml.safe_dump(params))


def stages_ran(done: subprocess.CompletedProcess) -> set[str]:
    return {s for s in STAGES if f"[{s}] done in" in done.stdout}


# Every output of the DAG but the sources' fingerprints (rewritten on every run).
OUTPUTS = (
    "data/prepared",
    "data/raw",
    "reports/base.json",
    "reports/dataset.json",
    "reports/validation",
    "reports/quantize.json",
    "reports/quantize_layers.json",
    "reports/train",
    "reports/eval",
    "reports/gate.json",
    "reports/claims.json",
    "reports/report.md",
)


def test_a_finetune_change_reruns_only_the_adapter_side_and_going_back_runs_nothing(
    pipeline_run,
):
    """The experiment loop: a finetune-only change retrains and re-evaluates the adapter
    alone (the bases' evaluations stay), and returning to the earlier params restores
    every stage from DVC's run cache without running it."""
    work, _ = pipeline_run
    assert dvc(work, "repro").returncode == 0  # settle whatever an earlier test changed
    before = files_under(work, *OUTPUTS)
    lr = yaml.safe_load((work / "params.yaml").read_text())["finetune"]["learning_rate"]

    set_params(work, lambda p: p["finetune"].update(learning_rate=lr / 2))
    changed = dvc(work, "repro")
    assert changed.returncode == 0, changed.stdout[-3000:] + changed.stderr[-3000:]
    # A new adapter also means new GGUF files, scored and judged again.
    assert stages_ran(changed) == {
        "sources",
        "finetune",
        "eval_adapter_4bit",
        "evaluate",
        "gate",
        "export",
        "eval_gguf",
        "parity",
        "claims",
        "report",
    }
    assert files_under(work, "data/prepared/adapter") != {
        k: v for k, v in before.items() if k.startswith("data/prepared/adapter")
    }

    set_params(work, lambda p: p["finetune"].update(learning_rate=lr))
    back = dvc(work, "repro")
    assert back.returncode == 0, back.stdout[-3000:] + back.stderr[-3000:]
    assert stages_ran(back) == {"sources"}, "stages ran instead of coming from the run cache"
    for stage in ("finetune", "eval_adapter_4bit", "evaluate", "gate", "export", "parity",
                  "claims", "report"):  # fmt: skip
        assert f"Stage '{stage}' is cached - skipping run" in back.stdout, stage
    after = files_under(work, *OUTPUTS)
    differ = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert differ == [], f"not as before the round trip: {differ}"
    assert json.loads(dvc(work, "status", "--json").stdout) == {"sources": ["always changed"]}


def test_a_stage_that_fails_under_qlora_run_leaves_the_last_good_outputs(pipeline_run):
    """A valid value that fails at run time (an lm-eval task that does not exist): DVC
    deletes the evaluations' outputs before running them, and `qlora run` puts them back."""
    work, _ = pipeline_run
    assert dvc(work, "repro").returncode == 0
    kept = ("data/prepared/adapter", "reports/train", "reports/eval", "reports/gate.json")
    before = files_under(work, *kept)
    good = (work / "params.yaml").read_text()
    set_params(work, lambda p: p["evaluate"].update(tasks=["docstring_loss", "no_such_task"]))
    try:
        qlora = Path(sys.executable).with_name("qlora")
        failed = subprocess.run(
            [str(qlora), "run"], cwd=work, capture_output=True, text=True, env=pipeline_env()
        )
        assert failed.returncode != 0
        assert "no_such_task" in failed.stdout + failed.stderr
        assert "restored the last good outputs" in failed.stderr, failed.stderr[-2000:]
        assert files_under(work, *kept) == before, "the failed run lost outputs"
    finally:
        (work / "params.yaml").write_text(good)
    assert json.loads(dvc(work, "status", "--json").stdout) == {"sources": ["always changed"]}


def test_a_sweep_ranks_by_the_gate_applies_the_best_and_promotes_it(pipeline_run, tmp_path):
    """`qlora sweep` on a 2x2 grid: two learning rates, each with a gate that can pass and
    one that cannot (min_gain 100: a 10,000% gain). Every experiment trains and evaluates
    only the adapter side; the leaderboard holds what each experiment's own files say;
    the best promoted one is applied and registered."""
    work, _ = pipeline_run
    git(work, "add", "-A")
    git(work, "commit", "-qm", "before the sweep")
    registry = tmp_path / "registry"
    done = subprocess.run(
        [
            str(Path(sys.executable).with_name("qlora")),
            "sweep",
            "--name",
            "grid",
            "-S",
            "finetune.learning_rate=2e-3,5e-4",
            "-S",
            "gate.min_gain=0.0,100.0",
            "--jobs",
            "2",
            "--promote",
            "--registry",
            str(registry),
        ],
        cwd=work,
        capture_output=True,
        text=True,
        env=pipeline_env(),
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    log = done.stdout + done.stderr
    for untouched in (
        "base",
        "extract",
        "dataset",
        "validate",
        "quantize",
        "eval_base_full",
        "eval_base_4bit",
    ):
        assert f"Running stage '{untouched}'" not in log, f"{untouched} ran in the sweep"

    board = json.loads((work / "reports/sweep/leaderboard.json").read_text())
    shown = json.loads(dvc(work, "exp", "show", "--json", "--all-commits").stdout)
    truth = {}  # each experiment's own files, as DVC holds them
    for baseline in shown:
        for e in baseline.get("experiments") or []:
            data = e["revs"][0]["data"]
            metrics = data["metrics"]
            adapter = metrics["reports/eval/metrics.json"]["data"]["variants"]["adapter_4bit"]
            truth[e["name"]] = (
                metrics["reports/gate.json"]["data"]["decision"],
                adapter["metrics"]["docstring_loss"]["bits_per_byte"]["value"],
                data["params"]["params.yaml"]["data"]["finetune"]["learning_rate"],
            )
    rows = board["rows"]
    assert sorted(r["name"] for r in rows) == ["grid-1", "grid-2", "grid-3", "grid-4"]
    for r in rows:
        decision, value, lr = truth[r["name"]]
        assert (r["decision"], r["primary"]["value"]) == (decision, value), r["name"]
        assert float(r["params"]["finetune.learning_rate"]) == lr
        lo, hi = r["primary"]["interval"]
        assert lo < value < hi
    assert [r["decision"] for r in rows] == ["promoted", "promoted", "rejected", "rejected"]
    assert rows[0]["primary"]["value"] <= rows[1]["primary"]["value"]  # bits/byte: lower wins
    assert board["best"] == rows[0]["name"]

    params = yaml.safe_load((work / "params.yaml").read_text())
    assert params["finetune"]["learning_rate"] == truth[board["best"]][2]
    assert params["gate"]["min_gain"] == 0.0
    assert json.loads(dvc(work, "status", "--json").stdout) == {"sources": ["always changed"]}
    assert f"applied {board['best']} to the workspace" in done.stdout
    reg = Registry(registry)
    assert list(reg.versions()) == ["v1"] and reg.champion() == "v1"
    html = (work / "reports/sweep/leaderboard.html").read_text()
    assert all(r["name"] in html for r in rows)


def test_a_bad_value_fails_clearly_and_loses_no_output(pipeline_run):
    """Runs last in this module: it breaks params.yaml, then puts it back."""
    work, _ = pipeline_run
    kept = ("data/prepared/adapter", "reports/train", "reports/eval", "reports/gate.json")
    before = files_under(work, *kept)
    good = (work / "params.yaml").read_text()
    status_before = dvc(work, "status", "--json").stdout
    params = yaml.safe_load(good)
    params["finetune"]["lora"]["r"] = -3
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    try:
        failed = dvc(work, "repro")
        assert failed.returncode != 0
        assert "finetune.lora.r = -3" in failed.stderr + failed.stdout
        assert files_under(work, *kept) == before, "a failed stage changed or removed outputs"
        status = json.loads(dvc(work, "status", "--json").stdout)
        assert "deleted" not in json.dumps(status), status
    finally:
        (work / "params.yaml").write_text(good)
    assert json.loads(dvc(work, "status", "--json").stdout) == json.loads(status_before)
