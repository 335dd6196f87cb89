"""dvc.yaml holds every input that shapes a stage's result, and protects its outputs.

The code lists are checked against the imports (tools/code_deps.py walks them), so an edit
to a shared module always makes the stages that run it stale.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from helpers.repo import REPO
from qlora.core import paths
from tools.code_deps import import_cycles, import_graph, rewrite_dvc_yaml, stage_code_deps

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
# Stages whose results no third-party library shapes beyond the standard library,
# pydantic and jinja2: the sources fingerprints, the stdlib corpus (it depends on the
# Python version, recorded by extract), the merge of the evaluation variants, the gate's
# arithmetic, the parity verdicts and the report's rendering.
NO_LIBRARY_STAGES = {"claims", "sources", "extract", "evaluate", "gate", "parity", "report"}
VARIANT_STAGES = {paths.variant_stage(v): v for v in paths.VARIANTS}


def deps(stage: str) -> set[str]:
    return set(DVC[stage].get("deps", []))


def outputs(stage: str) -> list[tuple[str, dict]]:
    found = []
    for kind in ("outs", "metrics", "plots"):
        for entry in DVC[stage].get(kind, []):
            path, options = next(iter(entry.items())) if isinstance(entry, dict) else (entry, {})
            found.append((path, options or {}))
    return found


def test_every_stage_script_is_a_stage_and_every_stage_a_script():
    """One script per stage, except the evaluation variants' stages, which share one."""
    scripts = {p.stem for p in (REPO / "stages").glob("*.py") if p.stem != "__init__"}
    assert scripts == (set(DVC) - set(VARIANT_STAGES)) | {"eval_variant"}
    for name, stage in DVC.items():
        if name in VARIANT_STAGES:
            assert stage["cmd"] == f"python -m stages.eval_variant {VARIANT_STAGES[name]}"
        else:
            assert stage["cmd"] == f"python -m stages.{name}"


@pytest.mark.parametrize("stage", sorted(DVC))
def test_a_stage_depends_on_every_project_file_it_runs(stage):
    missing = sorted(set(stage_code_deps(stage, REPO)) - deps(stage))
    assert not missing, f"dvc.yaml: stage {stage!r} runs {missing} but does not list them in deps"


@pytest.mark.parametrize("stage", sorted(DVC))
def test_a_stage_depends_on_no_project_file_it_does_not_run(stage):
    """A listed module the stage never imports reruns it for edits that cannot change it."""
    listed = {d for d in deps(stage) if d.startswith(("qlora/", "stages/"))}
    extra = sorted(listed - set(stage_code_deps(stage, REPO)))
    assert not extra, f"dvc.yaml: stage {stage!r} lists {extra}, which it never imports"


def test_dvc_yaml_is_what_the_rewriter_writes():
    """`python -m tools.code_deps --write` leaves dvc.yaml as it is: the code deps are
    exactly the imports, in its order."""
    assert rewrite_dvc_yaml(REPO) == (REPO / "dvc.yaml").read_text()


def test_the_library_imports_in_no_circle():
    """A circle makes every stage that enters it depend on all of it: an edit to analysis
    code once retrained the adapter because the quantize report and LoftQ imported each
    other."""
    assert import_cycles(import_graph(REPO)) == []


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_a_circle_is_found_and_names_its_files(tmp_path):
    root = _tree(
        tmp_path,
        {
            "stages/train.py": "from qlora import recipe\n",
            "qlora/recipe.py": "from qlora.formats import x\n",
            "qlora/formats.py": "from qlora.report import y\nx = 1\n",
            "qlora/report.py": "import qlora.formats\ny = 2\n",
            "qlora/alone.py": "import os\n",
        },
    )
    assert import_cycles(import_graph(root)) == [["qlora/formats.py", "qlora/report.py"]]
    # The stage runs the report module only because formats and report import each other.
    assert "qlora/report.py" in stage_code_deps("train", root)


@pytest.mark.parametrize(
    ("edited", "stale"),
    [
        ("qlora/quant/analysis.py", {"quantize"}),
        ("qlora/report/templates", {"report"}),
        ("qlora/report/quantization.py", {"report"}),
        ("qlora/schemas/claims.py", {"claims", "report"}),
        ("qlora/train/recipe.py", {"finetune"}),
    ],
)
def test_an_edit_makes_stale_only_the_stages_that_show_it(edited, stale):
    """What `dvc status` lists after an edit to one file: the stages that list it."""
    assert {s for s in DVC if edited in deps(s)} == stale


@pytest.mark.parametrize("stage", sorted(set(DVC) - NO_LIBRARY_STAGES))
def test_a_stage_that_runs_the_ml_libraries_depends_on_their_locked_versions(stage):
    assert "requirements.lock" in deps(stage)


@pytest.mark.parametrize("stage", sorted(DVC))
def test_every_listed_dependency_exists_or_is_an_output(stage):
    produced = {path for s in DVC for path, _ in outputs(s)}
    for dep in deps(stage):
        made_by_a_stage = any(dep == p or dep.startswith(p + "/") for p in produced)
        assert made_by_a_stage or (REPO / dep).exists(), f"{stage}: {dep} does not exist"


@pytest.mark.parametrize("stage", sorted(set(DVC) - {"sources"}))
def test_every_stage_but_sources_can_come_from_the_run_cache(stage):
    """DVC keeps no run-cache entry for a stage with a persistent output, nor for one with a
    `cache: false` output other than a metric or plot (dvc/stage/__init__.py, cache.py)."""
    assert not DVC[stage].get("always_changed")
    for path, options in outputs(stage):
        assert not options.get("persist"), f"{stage}: {path} is persist: the run cache is off"
    for entry in DVC[stage].get("outs", []):
        path, options = next(iter(entry.items())) if isinstance(entry, dict) else (entry, {})
        assert (options or {}).get("cache", True), f"{stage}: {path} is an uncached out"


def test_sources_is_persistent_so_its_check_of_params_yaml_deletes_nothing():
    assert all(options.get("persist") for _, options in outputs("sources"))


def dvc_plan(target: str | None) -> list[str]:
    """The order `dvc repro [target]` runs stages in, from DVC's own planner."""
    from dvc.repo import Repo
    from dvc.repo.reproduce import plan_repro

    with Repo(str(REPO)) as repo:
        graph = repo.index.graph
        stages = [s for s in graph if s.name == target] if target else None
        return [s.name for s in plan_repro(graph, stages)]


@pytest.mark.parametrize("target", [None, *sorted(set(DVC) - {"sources"})])
def test_sources_runs_before_any_stage_whose_outputs_dvc_would_delete(target):
    """`sources` checks all of params.yaml; it must come first in every `dvc repro`, so a
    bad value fails before DVC deletes a stale stage's outputs to rerun it."""
    plan = dvc_plan(target)
    assert plan[0] == "sources", plan
    assert plan[-1] == (target or plan[-1])


def test_user_sources_reach_the_stages_that_read_them():
    assert "reports/sources/base.json" in deps("base")
    assert "reports/sources/dataset.json" in deps("dataset")
    assert DVC["sources"].get("always_changed") is True
    assert {"base.source", "base.revision", "dataset.source"} <= set(DVC["sources"]["params"])


def test_the_lock_pins_every_installed_runtime_package():
    """requirements.lock is what `make install` installs: every line an exact pin, and the
    libraries that shape the numbers among them."""
    lines = [
        line
        for line in (REPO / "requirements.lock").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert all("==" in line for line in lines), [x for x in lines if "==" not in x]
    pinned = {line.split("==")[0].lower().replace("_", "-") for line in lines}
    for lib in ("torch", "transformers", "peft", "bitsandbytes", "lm-eval", "accelerate"):
        assert lib in pinned, f"requirements.lock does not pin {lib}"
    assert Path(REPO / "Makefile").read_text().count("-r requirements.lock") == 1
