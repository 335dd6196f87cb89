"""Promotion and the adapter registry, on a toy DVC project with a real tiny adapter.

The toy project has the real pipeline's last stages by name: `finetune` (copies a real
peft adapter made on the tiny Llama, with the scores the test wants), `eval_adapter_4bit`
(writes those scores as the adapter's result), `evaluate` (merges them into
reports/eval/metrics.json) and the real `gate` stage. So promotion
reads a real dvc.lock, runs a real `dvc status`, and copies real adapter files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from helpers.tiny import make_adapter, tiny_params
from qlora.cli import EXIT_REJECTED, app
from qlora.core.io import StageError, pipeline_env, weights_identity, write_json
from qlora.registry import promotion
from qlora.registry.promotion import promote, rollback
from qlora.registry.store import Registry, dvc_manifest

TOY_FINETUNE = """import json, pathlib, shutil
out = pathlib.Path("data/prepared/adapter")
shutil.rmtree(out, ignore_errors=True)
shutil.copytree("adapter_src", out)
shutil.copy("toy_scores.json", out / "scores.json")
"""
TOY_EVAL_ADAPTER = """import json, pathlib
scores = json.loads(pathlib.Path("data/prepared/adapter/scores.json").read_text())
pathlib.Path("reports/eval/variants").mkdir(parents=True, exist_ok=True)
pathlib.Path("reports/eval/variants/adapter_4bit.json").write_text(json.dumps(scores))
"""
TOY_EVALUATE = """import pathlib, shutil
shutil.copy("reports/eval/variants/adapter_4bit.json", "reports/eval/metrics.json")
"""
TOY_DVC_YAML = {
    "stages": {
        "finetune": {
            "cmd": "python toy_finetune.py",
            "deps": ["toy_finetune.py", "adapter_src", "toy_scores.json"],
            "outs": ["data/prepared/adapter"],
        },
        "eval_adapter_4bit": {
            "cmd": "python toy_eval_adapter.py",
            "deps": ["toy_eval_adapter.py", "data/prepared/adapter", "data/prepared/eval"],
            "outs": ["reports/eval/variants/adapter_4bit.json"],
        },
        "evaluate": {
            "cmd": "python toy_evaluate.py",
            "deps": ["toy_evaluate.py", "reports/eval/variants/adapter_4bit.json"],
            "metrics": [{"reports/eval/metrics.json": {"cache": False}}],
        },
        "gate": {
            "cmd": "python -m stages.gate",
            "deps": ["reports/eval/metrics.json"],
            "params": ["gate"],
            "metrics": [{"reports/gate.json": {"cache": False}}],
        },
    }
}


def scores(bpb=0.80, guard=2.00, acc=0.60) -> dict:
    """Eval metrics in stages/evaluate.py's schema; the NF4 base is fixed, the adapter moves."""

    def m(value, higher):
        return {"value": value, "stderr": 0.01, "higher_is_better": higher}

    def variant(bpb, guard, acc):
        return {
            "metrics": {
                "docstring_loss": {"bits_per_byte": m(bpb, False)},
                "docstring_choice": {"acc": m(acc, True)},
                "prose_guard": {"bits_per_byte": m(guard, False)},
            }
        }

    return {
        "variants": {
            "base_full": variant(0.98, 1.98, 0.52),
            "base_4bit": variant(1.00, 2.00, 0.50),
            "adapter_4bit": variant(bpb, guard, acc),
        }
    }


def run(args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, cwd=cwd, env=pipeline_env(), capture_output=True, text=True, check=True, **kw
    )


def repro(repo: Path, **score_args) -> None:
    """New scores -> a new run: finetune, the evaluations and gate rerun, dvc.lock records
    them."""
    write_json(repo / "toy_scores.json", scores(**score_args))
    run([sys.executable, "-m", "dvc", "repro", "-q"], repo)


@pytest.fixture(scope="module")
def template(tmp_path_factory, tiny_model_dir) -> Path:
    repo = tmp_path_factory.mktemp("toy") / "repo"
    repo.mkdir()
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params(tiny_model_dir)))
    (repo / "dvc.yaml").write_text(yaml.safe_dump(TOY_DVC_YAML))
    (repo / "toy_finetune.py").write_text(TOY_FINETUNE)
    (repo / "toy_eval_adapter.py").write_text(TOY_EVAL_ADAPTER)
    (repo / "toy_evaluate.py").write_text(TOY_EVALUATE)
    (repo / "data/prepared/eval").mkdir(parents=True)
    (repo / "data/prepared/eval/prose.jsonl").write_text('{"id": 1, "text": "prose"}\n')
    shutil.copytree(tiny_model_dir, repo / "data/prepared/base_model")
    make_adapter(tiny_model_dir, repo / "adapter_src")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    run(["git", "init", "-q"], repo)
    run([sys.executable, "-m", "dvc", "init", "-q"], repo)
    run([*git, "add", "-A"], repo)
    run([*git, "commit", "-qm", "toy"], repo)
    repro(repo)
    return repo


@pytest.fixture
def repo(template, tmp_path, monkeypatch) -> Path:
    """A copy of the toy project after one run, as the working directory."""
    copy = tmp_path / "repo"
    shutil.copytree(template, copy, symlinks=True)
    monkeypatch.chdir(copy)
    return copy


def assert_valid(reg: Registry) -> None:
    """Every registered file intact, and the champion a version that passed."""
    assert reg.verify() == []
    champion = reg.champion()
    assert champion is None or reg.versions()[champion]["decision"] == "promoted"


# ---- promotion -------------------------------------------------------------------------


def test_promotion_registers_the_adapter_with_its_lineage_card_and_the_champion_alias(repo):
    reg = Registry(repo / "registry")
    event = promote(repo, reg)
    assert event["version"] == "v1" and event["decision"] == "promoted" and event["champion"]
    assert reg.champion() == "v1" and reg.verify() == []
    assert "no champion yet" in event["reasons"][-1]

    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    lineage = reg.lineage("v1")
    adapter_md5 = next(o["md5"] for o in lock["finetune"]["outs"])
    assert event["adapter_dvc_md5"] == adapter_md5 == lineage["adapter"]["dvc_md5"]
    assert lineage["dvc_lock"] == lock  # data, base and code hashes as dvc.lock has them
    head = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    assert event["git_commit"] == head == lineage["git"]["commit"]
    assert lineage["params"] == yaml.safe_load((repo / "params.yaml").read_text())
    assert lineage["metrics"]["variants"]["adapter_4bit"]["metrics"]["docstring_loss"]
    assert lineage["base_weights_sha256"] == weights_identity(repo / "data/prepared/base_model")
    for name in ("adapter_config.json", "adapter_model.safetensors", "base_identity.json"):
        assert (reg.path("v1") / name).read_bytes() == (repo / "adapter_src" / name).read_bytes()

    card = (reg.path("v1") / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "peft" and meta["datasets"] == ["data/raw/train.jsonl"]
    assert "base_model" not in meta  # a local base: the hub could not resolve a path
    results = meta["model-index"][0]["results"]
    assert {m["name"] for r in results for m in r["metrics"]} == {
        "docstring_loss/bits_per_byte",
        "docstring_choice/acc",
        "prose_guard/bits_per_byte",
    }
    assert "## Training parameters" in card and "learning_rate" in card
    assert "PeftModel.from_pretrained" in card


def test_a_card_names_the_hub_base_so_the_folder_can_be_pushed_as_it_is():
    from qlora.registry.model_card import base_model_id

    assert base_model_id("embedded:smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (
        base_model_id("HuggingFaceTB/SmolLM2-360M-Instruct")
        == "HuggingFaceTB/SmolLM2-360M-Instruct"
    )
    assert base_model_id("./models/base") is None


def test_an_adapter_the_gate_rejected_is_recorded_but_does_not_become_champion(repo):
    reg = Registry(repo / "registry")
    promote(repo, reg)
    repro(repo, bpb=0.99)  # 1% gain: below gate.min_gain
    result = CliRunner().invoke(app, ["promote", "--registry", str(reg.root)])
    assert result.exit_code == EXIT_REJECTED, result.output
    assert "REJECTED v2: champion stays v1" in result.output
    assert "FAIL: docstring_loss/bits_per_byte" in result.output
    assert reg.champion() == "v1" and reg.versions()["v2"]["decision"] == "rejected"


def test_a_challenger_worse_than_the_champion_is_rejected_and_a_better_one_promoted(repo):
    reg = Registry(repo / "registry")
    promote(repo, reg)  # champion v1: bits per byte 0.80
    repro(repo, bpb=0.90)  # beats the base by 10%, but is worse than v1
    worse = promote(repo, reg)
    assert worse["decision"] == "rejected" and reg.champion() == "v1"
    assert any(
        "FAIL: docstring_loss/bits_per_byte" in r and "0.8 to 0.9" in r for r in worse["reasons"]
    )
    repro(repo, bpb=0.70, guard=2.30)  # better on the task, but forgets general text
    forgets = promote(repo, reg)
    assert forgets["decision"] == "rejected" and reg.champion() == "v1"
    assert any(r.startswith("FAIL: prose_guard/bits_per_byte") for r in forgets["reasons"])
    repro(repo, bpb=0.70)
    assert promote(repo, reg)["champion"] and reg.champion() == "v4"
    assert reg.lineage("v4")["decision"]["champion_before"] == "v1"


def test_a_champion_evaluated_on_other_data_cannot_be_compared_unless_told(repo):
    reg = Registry(repo / "registry")
    promote(repo, reg)
    (repo / "data/prepared/eval/prose.jsonl").write_text('{"id": 1, "text": "other"}\n')
    run([sys.executable, "-m", "dvc", "repro", "-q"], repo)
    event = promote(repo, reg)
    assert event["decision"] == "rejected"
    assert "evaluated on other inputs" in event["reasons"][-1]
    assert "data/prepared/eval" in event["reasons"][-1]
    forced = promote(repo, reg, ignore_champion=True)
    assert forced["champion"] and "--ignore-champion" in forced["reasons"][-1]


def test_a_workspace_that_differs_from_dvc_lock_is_refused_before_anything_is_written(repo):
    reg = Registry(repo / "registry")
    write_json(repo / "toy_scores.json", scores(bpb=0.5))  # changed, not rerun
    with pytest.raises(StageError, match=r"differs from dvc.lock \(stale: finetune.*qlora run"):
        promote(repo, reg)
    assert not (reg.root / "index.jsonl").exists()


def test_files_that_differ_from_dvcs_record_of_the_adapter_are_not_registered(repo):
    reg = Registry(repo / "registry")
    md5 = next(
        o["md5"]
        for o in yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["finetune"]["outs"]
    )
    manifest = dvc_manifest(repo, md5)
    adapter = repo / "data/prepared/adapter"
    assert set(manifest) == {p.name for p in adapter.iterdir()}
    wrong = {**manifest, "adapter_model.safetensors": "0" * 32}  # as if a run rewrote it
    with reg.writing(), pytest.raises(StageError, match="changed while being registered"):
        reg.add(
            "v1", adapter, {"lineage.json": "{}"}, {"event": "register", "version": "v1"}, wrong
        )
    assert reg.versions() == {}
    assert sorted(p.name for p in reg.root.iterdir()) == [".lock", "index.jsonl"]
    assert (reg.root / "index.jsonl").read_bytes() == b""


# ---- rollback, list, show --------------------------------------------------------------


def test_rollback_moves_the_alias_back_and_the_cli_shows_it(repo):
    reg = Registry(repo / "registry")
    promote(repo, reg)
    repro(repo, bpb=0.70)
    promote(repo, reg)
    repro(repo, bpb=0.99)
    promote(repo, reg)  # v3: rejected by the gate
    assert reg.champion_history() == ["v1", "v2"]
    cli = CliRunner()
    opt = ["--registry", str(reg.root)]

    out = cli.invoke(app, ["registry", "rollback", "--reason", "bad answers", *opt])
    assert out.exit_code == 0 and "champion: v2 -> v1 (rollback)" in out.output
    assert reg.champion() == "v1" and reg.champion_history() == ["v1"]
    listing = cli.invoke(app, ["registry", "list", *opt]).output
    assert "v1 " in listing and "<- champion" in listing.split("v1 ")[1].splitlines()[0]
    assert "rejected" in listing and "champion v2 -> v1 (rollback: bad answers)" in listing

    refused = cli.invoke(app, ["registry", "rollback", *opt])
    assert refused.exit_code == 1 and "first champion" in refused.output
    refused = cli.invoke(app, ["registry", "rollback", "v3", *opt])
    assert refused.exit_code == 1 and "v3 was rejected" in refused.output
    assert cli.invoke(app, ["registry", "rollback", "v2", *opt]).exit_code == 0
    assert reg.champion() == "v2"

    shown = cli.invoke(app, ["registry", "show", "champion", *opt])
    assert shown.exit_code == 0
    assert (
        "version:   v2  (champion)" in shown.output and "data/prepared/adapter md5" in shown.output
    )
    assert (
        json.loads(cli.invoke(app, ["registry", "show", "v3", "--json", *opt]).output)["decision"][
            "decision"
        ]
        == "rejected"
    )
    missing = cli.invoke(app, ["registry", "show", "v9", *opt])
    assert missing.exit_code == 1 and "registered: v1, v2, v3" in missing.output


def test_a_changed_file_in_a_version_is_found_and_it_cannot_serve(repo):
    reg = Registry(repo / "registry")
    promote(repo, reg)
    repro(repo, bpb=0.70)
    promote(repo, reg)
    (reg.path("v1") / "adapter_model.safetensors").write_bytes(b"tampered")
    assert reg.verify() == ["v1: adapter_model.safetensors changed since it was registered"]
    with pytest.raises(StageError, match="cannot serve v1"):
        rollback(reg)
    assert reg.champion() == "v2"


# ---- concurrency and interruption ------------------------------------------------------


# `qlora promote` that stops at a step of Registry.add, so a test can SIGKILL it there. The
# pause is patched in here, in the test's own subprocess: production code has no hook.
# staged: the version's files are complete in .stage-*, not yet renamed into place;
# renamed: the folder is in place (the directory synced), its index line not yet written.
PAUSING_PROMOTE = """import pathlib, sys, time
from qlora.registry import store
from qlora.cli import app

step = sys.argv.pop(1)


def pause():
    print(f"paused at {step}", flush=True)
    time.sleep(3600)


if step == "staged":
    rename = pathlib.Path.rename

    def rename_after_a_pause(self, target):
        if self.name.startswith(".stage-"):
            pause()
        return rename(self, target)

    pathlib.Path.rename = rename_after_a_pause
else:
    fsync_dir = store._fsync_dir

    def pause_after_the_sync(path):
        fsync_dir(path)
        pause()

    store._fsync_dir = pause_after_the_sync
app()
"""


def start_promote(repo: Path, pause_at: str | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "qlora.cli"]
    if pause_at:
        script = repo.parent / "pausing_promote.py"
        script.write_text(PAUSING_PROMOTE)
        command = [sys.executable, str(script), pause_at]
    return subprocess.Popen(
        [*command, "promote", "--registry", "registry"],
        cwd=repo,
        env=pipeline_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_two_promotions_at_once_both_register_one_after_the_other(repo):
    reg = Registry(repo / "registry")
    procs = [start_promote(repo), start_promote(repo)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert sorted(reg.versions()) == ["v1", "v2"] and reg.verify() == []
    # Serialised: the second saw the first as champion and was compared with it.
    assert reg.lineage("v2")["decision"]["champion_before"] == "v1"
    assert reg.lineage("v1")["decision"]["champion_before"] is None
    assert reg.champion_history() == ["v1", "v2"]


@pytest.mark.parametrize("step", ["staged", "renamed"])
def test_a_promotion_killed_mid_write_leaves_the_previous_champion(repo, step):
    reg = Registry(repo / "registry")
    promote(repo, reg)
    repro(repo, bpb=0.70)
    proc = start_promote(repo, pause_at=step)
    line = proc.stdout.readline()
    assert line.strip() == f"paused at {step}", line + proc.stdout.read()
    # Meanwhile nobody else can write: the lock is held, a reader still sees v1.
    assert reg.champion() == "v1"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    leftover = ".stage-v2-" if step == "staged" else "v2"
    assert any(p.name.startswith(leftover) for p in reg.root.iterdir())
    assert list(reg.versions()) == ["v1"] and reg.champion() == "v1" and reg.verify() == []
    # The next promotion sets the leftovers aside (never deleted) and takes the number.
    event = promote(repo, reg)
    assert event["version"] == "v2" and reg.champion() == "v2"
    assert not [p for p in reg.root.iterdir() if p.name.startswith(".stage-")]
    assert [p.name.split("-")[0] for p in (reg.root / ".orphaned").iterdir()] == [
        "stage" if step == "staged" else "v2"
    ]
    assert reg.verify() == []


def test_promotions_killed_at_random_times_never_break_the_registry(repo):
    reg = Registry(repo / "registry")
    promote(repo, reg)
    start = time.monotonic()
    assert start_promote(repo).wait(timeout=120) == 0
    duration = time.monotonic() - start
    rng = random.Random(0)
    for _ in range(4):
        proc = start_promote(repo)
        time.sleep(rng.uniform(0.3, 1.0) * duration)
        proc.kill()
        proc.wait()
        assert_valid(reg)
        assert reg.champion() == list(reg.versions())[-1]  # every finished one is a tie: promoted
    assert promote(repo, reg)["champion"] and reg.verify() == []


def test_a_torn_last_line_of_the_index_is_ignored_then_cut_and_kept_aside(repo):
    reg = Registry(repo / "registry")
    promote(repo, reg)
    torn = b'{"event": "register", "version": "v2", "cha'
    with (reg.root / "index.jsonl").open("ab") as f:
        f.write(torn)
    assert list(reg.versions()) == ["v1"] and reg.champion() == "v1"
    assert promote(repo, reg)["version"] == "v2"
    assert all(json.loads(line) for line in (reg.root / "index.jsonl").read_text().splitlines())
    [kept] = (reg.root / ".orphaned").iterdir()
    assert kept.name.startswith("index.jsonl.torn-") and kept.read_bytes() == torn
    assert any(str(kept) in action for action in reg.recovered)


# ---- recovery deletes nothing it cannot prove torn -------------------------------------


def small_registry(root: Path, tmp_path: Path, versions: int) -> Registry:
    """A registry of `versions` champions, written by Registry.add as a promotion does but
    from a two-file adapter, without a DVC project (fast)."""
    src = tmp_path / "small-adapter"
    src.mkdir(exist_ok=True)
    (src / "adapter_config.json").write_text('{"r": 4}')
    (src / "adapter_model.safetensors").write_bytes(b"weights")
    manifest = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in src.iterdir()}
    reg = Registry(root)
    for _ in range(versions):
        with reg.writing():
            v = reg.next_version()
            event = {"event": "register", "version": v, "decision": "promoted", "champion": True}
            reg.add(v, src, {"lineage.json": json.dumps({"version": v})}, event, manifest)
    return reg


def tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_an_index_whose_last_line_lost_only_its_newline_keeps_the_version(tmp_path):
    reg = small_registry(tmp_path / "reg", tmp_path, versions=2)
    index = reg.root / "index.jsonl"
    lines = index.read_text().splitlines()
    index.write_text("\n".join(lines))  # an editor that drops the final newline
    assert list(reg.versions()) == ["v1", "v2"] and reg.champion() == "v2"
    v2 = tree(reg.path("v2"))
    with reg.writing():
        pass
    assert tree(reg.path("v2")) == v2 and reg.verify() == []
    assert index.read_text() == "\n".join(lines) + "\n"  # repaired by appending, not cutting
    assert [json.loads(line)["version"] for line in index.read_text().splitlines()] == [
        "v1",
        "v2",
    ]
    assert reg.champion() == "v2" and reg.next_version() == "v3"
    assert reg.recovered and "no final newline" in reg.recovered[0]
    assert not (reg.root / ".orphaned").exists()


@pytest.mark.parametrize("how", ["index deleted", "wrong folder"])
def test_a_folder_without_an_index_is_refused_and_nothing_in_it_changes(tmp_path, how):
    if how == "index deleted":
        reg = small_registry(tmp_path / "reg", tmp_path, versions=1)
        (reg.root / "index.jsonl").unlink()
    else:  # --registry pointing at someone's folder that happens to hold a v1/
        reg = Registry(tmp_path / "reg")
        (reg.root / "v1").mkdir(parents=True)
        (reg.root / "v1/notes.txt").write_text("mine")
    before = sorted(p.relative_to(reg.root) for p in reg.root.rglob("*")), tree(reg.root)
    message = rf"{re.escape(str(reg.root))}: not a registry, or its index was lost: it holds .*v1"
    with pytest.raises(StageError, match=message):
        with reg.writing():
            pass
    with pytest.raises(StageError, match=message):
        reg.versions()
    refused = CliRunner().invoke(app, ["registry", "rollback", "--registry", str(reg.root)])
    assert refused.exit_code == 1 and "not a registry" in refused.output
    assert (sorted(p.relative_to(reg.root) for p in reg.root.rglob("*")), tree(reg.root)) == before


def test_unregistered_folders_are_moved_aside_and_verify_lists_them(tmp_path):
    reg = small_registry(tmp_path / "reg", tmp_path, versions=1)
    (reg.root / "v2").mkdir()  # a version whose line never reached the index
    (reg.root / "v2/adapter_model.safetensors").write_bytes(b"unregistered weights")
    (reg.root / ".stage-v3-123").mkdir()
    (reg.root / ".stage-v3-123/part").write_bytes(b"half")
    cli, opt = CliRunner(), ["--registry", str(reg.root)]
    pending = cli.invoke(app, ["registry", "verify", *opt])
    assert pending.exit_code == 0, pending.output
    assert "v2/ is registered by no index line: the next write sets it aside" in pending.output
    with reg.writing():
        pass
    aside = reg.root / ".orphaned"
    assert not (reg.root / "v2").exists() and not (reg.root / ".stage-v3-123").exists()
    moved = {p.name.split("-")[0]: tree(p) for p in aside.iterdir()}
    assert moved == {
        "v2": {"adapter_model.safetensors": b"unregistered weights"},
        "stage": {"part": b"half"},
    }
    assert len(reg.recovered) == 2 and all("moved to" in a for a in reg.recovered)
    assert list(reg.versions()) == ["v1"] and reg.verify() == [] and reg.next_version() == "v2"
    listed = cli.invoke(app, ["registry", "verify", *opt])
    assert listed.exit_code == 0 and "all files intact" in listed.output
    for p in aside.iterdir():
        assert f"{p}: set aside by an earlier recovery" in listed.output


# ---- export targets --------------------------------------------------------------------


def test_export_refuses_a_folder_with_files_and_replace_replaces_only_an_export(tmp_path):
    reg = small_registry(tmp_path / "reg", tmp_path, versions=1)
    cli = CliRunner()

    def export(out: Path, *flags: str):
        return cli.invoke(
            app, ["export", "v1", "--adapter", str(out), "--registry", str(reg.root), *flags]
        )

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    plain = export(mine)
    assert plain.exit_code == 1, plain.output
    assert (
        f"{mine}: folder is not empty (notes.txt)" in plain.output and "--replace" in plain.output
    )
    forced = export(mine, "--replace")  # not an export of ours: --replace does not apply
    assert forced.exit_code == 1 and f"{mine}: not replaced" in forced.output
    assert "no record of a previous export" in forced.output
    assert tree(mine) == {"notes.txt": b"my notes"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "reg", "small-adapter"]

    out = tmp_path / "upload"
    assert export(out).exit_code == 0 and tree(out) == tree(reg.path("v1"))
    assert export(out).exit_code == 1, "a second export replaced the first unasked"
    assert export(out, "--replace").exit_code == 0 and tree(out) == tree(reg.path("v1"))
    # --replace replaces the previous export's files, and nothing a user added or edited
    # since: a `.git` of an upload, notes, an edited file of the export.
    for added in [".git", "notes.txt", "adapter_config.json"]:
        before = tree(out)
        if added == ".git":
            (out / ".git").mkdir()
            (out / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
        else:
            (out / added).write_text("the user's words")
        refused = export(out, "--replace")
        assert refused.exit_code == 1 and f"{added} is not what the previous export wrote" in (
            refused.output
        )
        assert (out / added).exists()
        if added == ".git":
            shutil.rmtree(out / ".git")
        elif added in before:
            (out / added).write_bytes(before[added])
        else:
            (out / added).unlink()
        assert tree(out) == before

    inside = export(reg.root / "copy", "--replace")
    assert inside.exit_code == 1 and "overlaps" in inside.output
    assert not (reg.root / "copy").exists()


def test_a_merged_export_is_refused_before_any_model_is_loaded(tmp_path):
    from qlora.models.merge import export_merged

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    # Neither the adapter nor the base exists: reaching a load would fail otherwise.
    with pytest.raises(
        StageError, match=rf"{re.escape(str(mine))}: folder is not empty \(notes.txt\)"
    ):
        export_merged(tmp_path / "no-adapter", mine, tmp_path / "no-base")
    with pytest.raises(StageError, match="no record of a previous export"):
        export_merged(tmp_path / "no-adapter", mine, tmp_path / "no-base", replace=True)
    assert tree(mine) == {"notes.txt": b"my notes"}


def test_a_folder_filled_while_an_output_is_written_is_not_replaced(tmp_path):
    from qlora.core.io import atomic_dir

    target = tmp_path / "out"
    with pytest.raises(StageError, match=rf"{re.escape(str(target))}: not replaced"):
        with atomic_dir(target, replace=False) as tmp:
            (tmp / "model.safetensors").write_bytes(b"new")
            target.mkdir()  # someone else's files arrive meanwhile
            (target / "theirs.txt").write_text("theirs")
    assert tree(target) == {"theirs.txt": b"theirs"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_dir(target / "empty", replace=False) as tmp:  # a missing target is fine
        (tmp / "a").write_text("a")
    assert tree(target / "empty") == {"a": b"a"}


# ---- promotion under the workspace lock, against dvc.lock's hashes --------------------


@contextlib.contextmanager
def flow_run_holding(repo: Path, seconds: float = 60.0) -> Iterator[list[float]]:
    """What a flow run does from its first stage to its promotion: hold the workspace lock,
    here in a thread, for `seconds`. Yields the list that gets the time it let go."""
    import logging

    from flows.dvc_workspace import workspace_lock

    held, release, released_at = threading.Event(), threading.Event(), []

    def run_holding() -> None:
        with workspace_lock(repo, 0, logging.getLogger("test"), owner="test flow run"):
            held.set()
            release.wait(seconds)
            released_at.append(time.monotonic())

    holder = threading.Thread(target=run_holding)
    holder.start()
    try:
        assert held.wait(30)
        yield released_at
    finally:
        release.set()
        holder.join()


def test_promote_waits_for_a_flow_run_holding_the_workspace_or_gives_up(repo, monkeypatch):

    read_at = []
    real_status = promotion.stale_stages
    monkeypatch.setattr(
        promotion,
        "stale_stages",
        lambda root: read_at.append(time.monotonic()) or real_status(root),
    )
    with flow_run_holding(repo, seconds=1.5) as released_at:
        done = CliRunner().invoke(app, ["promote"])  # waits (up to 600 s by default)
    assert done.exit_code == 0, done.output
    assert read_at[0] > released_at[0]  # the workspace was read only once the run let go
    assert "waiting up to 600 s for the workspace, held by pid" in done.output

    with flow_run_holding(repo) as released_at:
        busy = CliRunner().invoke(app, ["promote", "--wait", "0"])
        assert not released_at  # refused while the run still held it
    assert busy.exit_code == 1, busy.output
    assert "another pipeline run still holds the workspace" in busy.output
    assert "test flow run" in busy.output  # who holds it
    assert list(Registry(repo / "registry").versions()) == ["v1"] and len(read_at) == 1


def cache_elsewhere(repo: Path) -> None:
    """A DVC cache outside the project (`dvc cache dir`, as a team shares one): `dvc status`
    is clean, but DVC's list of the adapter's files is not where dvc_manifest looks."""
    shared = repo.parent / "shared-cache"
    shutil.move(repo / ".dvc/cache", shared)
    run([sys.executable, "-m", "dvc", "cache", "dir", str(shared)], repo)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert dvc_manifest(repo, next(o["md5"] for o in lock["stages"]["finetune"]["outs"])) is None


def test_without_dvcs_list_of_the_adapter_files_its_files_are_checked_all_the_same(repo):
    cache_elsewhere(repo)
    reg = Registry(repo / "registry")
    assert promote(repo, reg)["version"] == "v1"
    adapter = repo / "data/prepared/adapter"
    assert {
        n: b for n, b in tree(reg.path("v1")).items() if n not in ("README.md", "lineage.json")
    } == {n: b for n, b in tree(adapter).items() if n != "README.md"}


# Written after `dvc status` found the workspace clean, before promote read it: a run that
# finished in between (the workspace lock excludes the flow; this is what is left to check).
CHANGED_AFTER_STATUS = {
    "metrics": (
        "reports/eval/metrics.json",
        None,
        r"reports/eval/metrics.json: changed since dvc.lock",
    ),
    "gate": ("reports/gate.json", None, r"reports/gate.json: changed since dvc.lock"),
    "adapter, no DVC list": (
        "data/prepared/adapter/adapter_model.safetensors",
        cache_elsewhere,
        r"data/prepared/adapter: the files listed by .*adapter hash to .*, not to dvc.lock's",
    ),
    "extra adapter file": (
        "data/prepared/adapter/notes.txt",
        None,
        r"notes.txt not in dvc.lock's record of the adapter",
    ),
}


@pytest.mark.parametrize("case", list(CHANGED_AFTER_STATUS))
def test_a_file_changed_after_dvc_lock_was_written_is_not_registered(repo, monkeypatch, case):

    path, prepare, message = CHANGED_AFTER_STATUS[case]
    if prepare:
        prepare(repo)
    real_status = promotion.stale_stages

    def status_then_a_run_writes(root):
        clean = real_status(root)
        target = repo / path
        if target.suffix == ".json":
            data = json.loads(target.read_text())
            target.write_text(json.dumps({**data, "rewritten": True}))
        else:
            target.write_bytes(b"written after dvc status")
        return clean

    monkeypatch.setattr(promotion, "stale_stages", status_then_a_run_writes)
    reg = Registry(repo / "registry")
    with pytest.raises(StageError, match=message):
        promote(repo, reg)
    assert reg.versions() == {}
    assert not [p for p in reg.root.glob("*") if p.name.startswith(("v", ".stage-"))]


@pytest.mark.parametrize(
    ("reader", "path"),
    [
        ("eval_adapter_4bit", "data/prepared/adapter"),
        ("evaluate", "reports/eval/variants/adapter_4bit.json"),
        ("gate", "reports/eval/metrics.json"),
    ],
)
def test_stages_of_two_runs_in_dvc_lock_are_not_registered(repo, monkeypatch, reader, path):
    """Each file matches its own stage's record, but an evaluation (or gate) read another
    adapter (result, metrics) than the one recorded: pieces of two runs."""

    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    dep = next(d for d in lock["stages"][reader]["deps"] if d["path"] == path)
    dep["md5"] = "0" * 32 + (".dir" if dep["md5"].endswith(".dir") else "")
    real_status = promotion.stale_stages

    def status_then_dvc_lock_changes(root):
        clean = real_status(root)
        (repo / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
        return clean

    monkeypatch.setattr(promotion, "stale_stages", status_then_dvc_lock_changes)
    reg = Registry(repo / "registry")
    with pytest.raises(StageError, match=rf"dvc.lock: {reader} read {re.escape(path)} at md5 0+"):
        promote(repo, reg)
    assert reg.versions() == {}


# ---- export ----------------------------------------------------------------------------


def logits(model, tokenizer, text: str):
    import torch

    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits.float()


@pytest.mark.cpu_paths
def test_export_writes_a_merged_model_that_plain_transformers_loads(repo):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    promote(repo, Registry(repo / "registry"))
    out = repo / "merged"
    result = CliRunner().invoke(app, ["export", "champion", "--merged", str(out)])
    assert result.exit_code == 0, result.output
    assert "v1: merged bfloat16 model" in result.output
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    check = json.loads((out / "export_check.json").read_text())
    assert check["passed"] and check["reload"]["max_abs_logit_diff"] <= 1e-3
    # The end-to-end limit is a share of the adapter's own effect; both KLs are recorded.
    kl = check["kl"]
    assert kl["export"] == check["end_to_end"]["max_kl"] > 0
    assert kl["adapter"] == check["adapter_effect"]["max_kl"] > 0
    assert check["limits"]["kl"] == pytest.approx(0.1 * kl["adapter"])
    assert kl["fraction_of_adapter"] == pytest.approx(kl["export"] / kl["adapter"])
    assert kl["fraction_of_adapter"] < 0.1

    # Independently of the export's own check: plain transformers against base + adapter.
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert merged.dtype == torch.float32 and not hasattr(merged, "peft_config")
    tok = AutoTokenizer.from_pretrained(str(out))
    base = AutoModelForCausalLM.from_pretrained(str(repo / "data/prepared/base_model"))
    adapted = PeftModel.from_pretrained(base, str(repo / "registry/v1"))
    text = "Return the header value for this name."
    want = logits(adapted, tok, text)
    with adapted.disable_adapter():
        plain_base = logits(adapted, tok, text)
    got = logits(merged, tok, text)
    effect = (want - plain_base).abs().max().item()
    assert (got - want).abs().max().item() < 0.1 * effect  # rounding, far below the adapter
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"

    # The folder now holds an export: refused again unless told; --replace replaces the
    # files it lists, and refuses while a file it did not write is there.
    check = json.loads((out / "export_check.json").read_text())
    assert set(check["files"]) == {p.name for p in out.iterdir()} - {"export_check.json"}
    again = CliRunner().invoke(app, ["export", "champion", "--merged", str(out)])
    assert again.exit_code == 1 and f"{out}: folder is not empty" in again.output
    (out / "notes.txt").write_text("left by hand")
    kept = CliRunner().invoke(app, ["export", "champion", "--merged", str(out), "--replace"])
    assert kept.exit_code == 1 and "notes.txt is not what the previous export wrote" in kept.output
    (out / "notes.txt").unlink()
    replaced = CliRunner().invoke(app, ["export", "champion", "--merged", str(out), "--replace"])
    assert replaced.exit_code == 0, replaced.output
    assert json.loads((out / "export_check.json").read_text())["passed"]


# A lost adapter fails the float32 merge check and, in every dtype, the end-to-end one.
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_refuses_a_merge_that_lost_the_adapter_and_writes_nothing(repo, monkeypatch, dtype):
    from peft.tuners.lora import LoraModel

    promote(repo, Registry(repo / "registry"))
    # A broken merge: the adapter is dropped instead of folded into the weights.
    monkeypatch.setattr(LoraModel, "merge_and_unload", LoraModel.unload)
    out = repo / "merged"
    result = CliRunner().invoke(app, ["export", "v1", "--merged", str(out), "--dtype", dtype])
    assert result.exit_code == 1
    assert "failed its check, nothing written" in result.output
    assert "of the adapter's own effect" in result.output
    assert not out.exists() and not list(repo.glob(".merged*"))


def test_the_export_limit_is_a_share_of_the_adapters_own_effect(tiny_model_dir, tmp_path):
    """An adapter 10^4 times weaker moves the tiny model's distributions by a KL of ~1e-8,
    less than bfloat16 rounding costs (~2e-7): the bfloat16 export carries mostly noise and
    is refused (an absolute limit of 0.25 nats, once tuned on SmolLM2-135M, passed it);
    float32 keeps it."""
    from qlora.models.merge import export_merged

    weak = make_adapter(tiny_model_dir, tmp_path / "weak", scale=1e-4)
    out = tmp_path / "merged"
    with pytest.raises(StageError, match="0.1 of the adapter's own effect"):
        export_merged(weak, out, tiny_model_dir, "bfloat16")
    assert not out.exists()
    check = export_merged(weak, out, tiny_model_dir, "float32")
    assert check["passed"] and 0 < check["kl"]["adapter"] < 1e-6
    assert check["kl"]["export"] <= 1e-3 * check["kl"]["adapter"]


def test_export_of_the_adapter_copies_the_checked_version(repo):
    promote(repo, Registry(repo / "registry"))
    out = repo / "hub-upload"
    assert CliRunner().invoke(app, ["export", "v1", "--adapter", str(out)]).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        p.name for p in (repo / "registry/v1").iterdir()
    )
    assert os.access(out / "README.md", os.R_OK)


# ---- the Prefect flow ------------------------------------------------------------------


def test_the_flow_promotes_after_a_passing_gate_and_only_then(repo, tmp_path, monkeypatch):
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import qlora_pipeline

    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    reg = Registry(tmp_path / "flow-registry")
    with prefect_test_harness(server_startup_timeout=120):
        first = qlora_pipeline(repo_dir=str(repo), promote=True, registry_dir=str(reg.root))
        assert first["promotion"]["version"] == "v1" and first["promotion"]["champion"]
        write_json(repo / "toy_scores.json", scores(bpb=0.99))  # the gate will reject it
        second = qlora_pipeline(repo_dir=str(repo), promote=True, registry_dir=str(reg.root))
    assert [s["stage"] for s in second["stages"] if s["result"] == "ran"] == [
        "finetune",
        "eval_adapter_4bit",
        "evaluate",
        "gate",
    ]
    assert second["promotion"]["version"] is None and "REJECTED" in second["promotion"]["summary"]
    assert list(reg.versions()) == ["v1"] and reg.champion() == "v1"


# ---- talking to a version: qlora chat / qlora generate ---------------------------------


def independent_answers(base_dir: Path, adapter_dir: Path | None, conversations, tokens: int):
    """Greedy answers from plain transformers + peft, loaded here without qlora's code: NF4
    with double quantization and a float32 compute dtype, as the tiny params ask."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    nf4 = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        str(base_dir), quantization_config=nf4, dtype=torch.float32
    )
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    answers = []
    for messages in conversations:
        enc = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        out = model.generate(
            **enc, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        answers.append(
            tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        )
    return answers


PROMPTS = [
    {"prompt": "def add(a, b):"},
    {"instruction": "Summarise the function.", "input": "def f(x): return x * 2"},
    {"messages": [{"role": "user", "content": "What does os.path.join do?"}]},
]
CONVERSATIONS = [
    [{"role": "user", "content": "def add(a, b):"}],
    [{"role": "user", "content": "Summarise the function.\n\ndef f(x): return x * 2"}],
    [{"role": "user", "content": "What does os.path.join do?"}],
]


@pytest.mark.cpu_paths
def test_generate_answers_as_an_independent_load_of_the_champion_does(repo):
    promote(repo, Registry(repo / "registry"))
    prompts = repo / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    args = ["generate", str(prompts), "champion", "--max-new-tokens", "6", "--batch-size", "1"]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    assert "3 answers from adapter v1 (champion)" in done.output
    rows = [json.loads(line) for line in (repo / "prompts.answers.jsonl").read_text().splitlines()]
    assert [{k: r[k] for k in p} for r, p in zip(rows, PROMPTS, strict=True)] == PROMPTS
    base = repo / "data/prepared/base_model"
    expected = independent_answers(base, repo / "registry/v1", CONVERSATIONS, 6)
    assert [r["answer"] for r in rows] == expected
    # The adapter changes what is said: the base alone answers otherwise.
    assert expected != independent_answers(base, None, CONVERSATIONS, 6)


@pytest.mark.cpu_paths
def test_chat_streams_each_answer_and_starts_over_on_reset(repo):
    promote(repo, Registry(repo / "registry"))
    said = "def add(a, b):\n/reset\nWhat does os.path.join do?\n/exit\nnever read\n"
    done = CliRunner().invoke(app, ["chat", "v1", "--max-new-tokens", "6"], input=said)
    assert done.exit_code == 0, done.output
    assert "Talking to adapter v1. Type a message" in done.output
    turns = done.output.split("assistant> ")[1:]
    assert len(turns) == 2 and "(new conversation)" in turns[0]
    expected = independent_answers(
        repo / "data/prepared/base_model",
        repo / "registry/v1",
        [CONVERSATIONS[0], CONVERSATIONS[2]],
        6,
    )
    for turn, answer in zip(turns, expected, strict=True):
        assert turn.startswith(answer), (turn, answer)


def test_chat_and_generate_name_what_they_cannot_find(repo):
    runner = CliRunner()
    done = runner.invoke(app, ["chat", "v9"], input="hi\n")
    assert done.exit_code == 1 and "no version 'v9'" in done.output
    done = runner.invoke(app, ["chat", "champion"], input="hi\n")
    assert done.exit_code == 1 and "no champion yet" in done.output
    bad = repo / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"question": "no known key"}\n')
    done = runner.invoke(app, ["generate", str(bad)])
    assert done.exit_code == 1 and "bad.jsonl, line 2: expected" in done.output
    assert not (repo / "bad.answers.jsonl").exists()


def test_chat_with_the_base_alone_and_the_adapter_just_trained(repo):
    runner = CliRunner()
    for args, label in ((["--base"], "base alone"), ([], "adapter in data/prepared/adapter")):
        done = runner.invoke(app, ["chat", *args, "--max-new-tokens", "4"], input="hello\n")
        assert done.exit_code == 0, done.output
        assert f"Talking to {label}" in done.output and "assistant> " in done.output
