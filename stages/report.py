"""Stage `report`: the run on one page, for a reviewer deciding whether to trust the adapter.

Reads what the other stages wrote under reports/ and renders
- reports/report.html: one self-contained file (inline CSS and SVG, no scripts, no network)
  that prints well: the gate decision first, then what quantization costs, how training
  went, every metric for the three variants, the gate's checks, example outputs, the data,
  and the lineage (git revision, params, hashes from dvc.lock, package versions);
- reports/report.md: the same story in Markdown (for Prefect artifacts and pull requests).
Model outputs are untrusted text: the template autoescapes everything it is given.

`python -m stages.report --compare REV` adds a column with the adapter's metrics at git
revision REV (read with `git show REV:reports/eval/metrics.json`).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jinja2
import yaml
from markupsafe import Markup

from stages.io import StageError, atomic_write_text, read_json, run_stage
from stages.report_plots import Series, histogram, line_chart

REPORTS_DIR = Path("reports")
HTML_OUT = REPORTS_DIR / "report.html"
MD_OUT = REPORTS_DIR / "report.md"
TEMPLATES = Path(__file__).parent / "templates"

# Every input, where it lives under reports/, and the top-level keys the report reads.
INPUTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "base": ("base.json", ("source", "parameters", "trust_remote_code")),
    "dataset": ("dataset.json", ("rows", "tokens", "max_length")),
    "validation": ("validation/result.json", ("success", "checks")),
    "quantize": ("quantize.json", ("bytes", "quant_error")),
    "train": ("train/metrics.json", ("steps", "train_runtime_s", "tokens_per_s")),
    "train_loss": ("train/train_loss.json", ()),
    "eval_loss": ("train/eval_loss.json", ()),
    "eval": ("eval/metrics.json", ("settings", "variants")),
    "examples": ("eval/examples.json", ()),
    "gate": ("gate.json", ("decision", "passed", "primary", "checks")),
}
LIST_INPUTS = {"train_loss", "eval_loss", "examples"}
VARIANTS = ("base_full", "base_nf4", "adapter_nf4")
BASELINE = "base_nf4"  # the gate judges the adapter against the base it was trained on
PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "lm-eval",
    "dvc",
    "great-expectations",
    "prefect",
)
Z95 = 1.96
# A validation loss this much (relative) above its best is a rise, not logging noise.
OVERFIT_TOLERANCE = 0.005
MINUS = "\u2212"


# ---------------------------------------------------------------- number formatting


def num(x: Any) -> float | None:
    """A finite number, or None for anything else (lm-eval writes stderr as "N/A")."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    return float(x) if math.isfinite(x) else None


def fmt(x: Any, digits: int = 4) -> str:
    """4 significant digits, thousands separators for big numbers, a real minus sign."""
    if isinstance(x, int) and not isinstance(x, bool):
        text = f"{x:,}"
    elif (v := num(x)) is None:
        return "n/a"
    elif abs(v) >= 10**digits:
        text = f"{v:,.0f}"
    else:
        text = f"{v:.{digits}g}"
    return text.replace("-", MINUS)


def fmt_signed(x: Any, digits: int = 4) -> str:
    v = num(x)
    return "n/a" if v is None else ("+" if v > 0 else "") + fmt(v, digits)


def fmt_pct(ratio: Any, signed: bool = False) -> str:
    v = num(ratio)
    if v is None:
        return "n/a"
    text = fmt(v * 100, 3) + "%"
    return "+" + text if signed and v > 0 else text


def fmt_bytes(n: Any) -> str:
    v = num(n)
    if v is None:
        return "n/a"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if v >= size:
            return f"{fmt(v / size)} {unit}"
    return f"{v:.0f} B"


def fmt_duration(seconds: Any) -> str:
    s = num(seconds)
    if s is None:
        return "n/a"
    if s < 60:
        return f"{fmt(s, 3)} s"
    minutes, sec = divmod(round(s), 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


# ---------------------------------------------------------------- inputs


def load_inputs(reports_dir: Path) -> dict[str, Any]:
    """Every input file, checked for the keys the report reads; all missing files named."""
    missing = [reports_dir / rel for rel, _ in INPUTS.values() if not (reports_dir / rel).exists()]
    if missing:
        names = ", ".join(str(p) for p in missing)
        raise StageError(f"missing input(s): {names} (run `dvc repro` for the stages that write them)")
    data = {}
    for key, (rel, required) in INPUTS.items():
        path = reports_dir / rel
        value = read_json(path)
        expected = list if key in LIST_INPUTS else dict
        if not isinstance(value, expected):
            raise StageError(f"{path}: expected a JSON {expected.__name__}")
        absent = [k for k in required if k not in value]
        if absent:
            raise StageError(f"{path}: missing key(s) {absent}")
        data[key] = value
    path = reports_dir / INPUTS["eval"][0]
    absent = [v for v in VARIANTS if v not in data["eval"]["variants"]]
    if absent:
        raise StageError(f"{path}: variants lacks {absent} (expected {list(VARIANTS)})")
    return data


def metric_entry(variant: dict, task: str, metric: str) -> dict:
    entry = (variant.get("metrics") or {}).get(task, {}).get(metric)
    return entry if isinstance(entry, dict) else {}


# ---------------------------------------------------------------- sections


def better(change: float | None, higher_is_better: bool) -> bool | None:
    if change is None or change == 0:
        return None
    return change > 0 if higher_is_better else change < 0


def headline(gate: dict, variants: dict) -> dict:
    """The decision and the primary metric's change with a 95% confidence interval.

    The interval treats base and adapter scores as independent estimates, each with
    lm-eval's standard error: change +- 1.96 * sqrt(se_base^2 + se_adapter^2).
    """
    p = gate["primary"]
    task, metric = p.get("task", "?"), p.get("metric", "?")
    hib = bool(p.get("higher_is_better", True))
    base, adapter = num(p.get("base")), num(p.get("adapter"))
    change = num(p.get("change"))
    if change is None and base is not None and adapter is not None:
        change = adapter - base
    se = [num(metric_entry(variants[v], task, metric).get("stderr")) for v in (BASELINE, "adapter_nf4")]
    half = Z95 * math.hypot(*se) if None not in se and change is not None else None
    improved = better(change, hib)
    if improved is None:
        verdict = "no change"
    else:
        verdict = "better" if improved else "worse"
    if half is not None:
        significant = abs(change) > half
        verdict += " (95% CI excludes 0)" if significant else " (within noise: 95% CI includes 0)"
    return {
        "decision": str(gate["decision"]),
        "passed": bool(gate["passed"]),
        "task": task,
        "metric": metric,
        "arrow": "↑" if hib else "↓",
        "base": fmt(base),
        "adapter": fmt(adapter),
        "change": fmt_signed(change),
        "relative": fmt_pct(p.get("relative_change"), signed=True),
        "ci": "n/a" if half is None else f"[{fmt(change - half)}, {fmt(change + half)}]",
        "ci_half": "n/a" if half is None else f"± {fmt(half, 3)}",
        "improved": improved,
        "verdict": verdict,
        "baseline_label": variants[BASELINE].get("label", BASELINE),
        "adapter_label": variants["adapter_nf4"].get("label", "adapter_nf4"),
    }


def metric_keys(eval_metrics: dict) -> list[tuple[str, str]]:
    """(task, metric) pairs in the order of the evaluated tasks, then as first seen."""
    keys: list[tuple[str, str]] = []
    for name in VARIANTS:
        for task, metrics in (eval_metrics["variants"][name].get("metrics") or {}).items():
            keys.extend((task, m) for m in metrics if (task, m) not in keys)
    order = list(eval_metrics["settings"].get("tasks") or [])
    return sorted(keys, key=lambda k: order.index(k[0]) if k[0] in order else len(order))


def higher_is_better(variants: dict, task: str, metric: str) -> bool:
    for name in VARIANTS:
        flag = metric_entry(variants[name], task, metric).get("higher_is_better")
        if flag is not None:
            return bool(flag)
    return True


def cell(entry: dict) -> dict:
    return {"value": fmt(entry.get("value")), "stderr": fmt(entry.get("stderr"), 2)
            if num(entry.get("stderr")) is not None else ""}


def metric_table(eval_metrics: dict, compare: dict | None) -> dict:
    """Every metric for the three variants, the best value in each row marked."""
    variants = eval_metrics["variants"]
    rows = []
    for task, metric in metric_keys(eval_metrics):
        hib = higher_is_better(variants, task, metric)
        entries = [metric_entry(variants[v], task, metric) for v in VARIANTS]
        values = [num(e.get("value")) for e in entries]
        present = [v for v in values if v is not None]
        best = (max if hib else min)(present) if present else None
        cells = [cell(e) | {"best": v is not None and v == best} for e, v in zip(entries, values)]
        row = {"task": task, "metric": metric, "arrow": "↑" if hib else "↓", "cells": cells}
        if compare is not None:
            row["previous"] = cell(((compare.get("metrics") or {}).get(task) or {}).get(metric) or {})
        rows.append(row)
    headers = [variants[v].get("label", v) for v in VARIANTS]
    return {"headers": headers, "rows": rows, "compare_label": compare and compare.get("label")}


def quantization(quantize: dict, eval_metrics: dict) -> dict:
    """What NF4 costs: the share of each full-precision score it keeps, memory, weight error."""
    variants = eval_metrics["variants"]
    full, nf4 = variants["base_full"], variants[BASELINE]
    rows = []
    for task, metric in metric_keys(eval_metrics):
        hib = higher_is_better(variants, task, metric)
        f = num(metric_entry(full, task, metric).get("value"))
        q = num(metric_entry(nf4, task, metric).get("value"))
        # "kept" is direction-aware: for a loss, a higher NF4 value keeps less of the score.
        num_, den = (q, f) if hib else (f, q)
        kept = num_ / den if num_ is not None and den else None
        rows.append({"task": task, "metric": metric, "arrow": "↑" if hib else "↓",
                     "full": fmt(f), "nf4": fmt(q), "kept": fmt_pct(kept),
                     "loss": kept is not None and kept < 0.99})
    sizes = quantize.get("bytes") or {}
    bits = quantize.get("bits_per_parameter") or {}
    ratio = (num(sizes.get("nf4")) or 0) / num(sizes.get("full")) if num(sizes.get("full")) else None
    errors = [{"type": name, "mean": fmt(num(e.get("mean_relative_error"))),
               "max": fmt(num(e.get("max_relative_error")))}
              for name, e in (quantize.get("quant_error") or {}).items() if isinstance(e, dict)]
    memory = [{"label": variants[v].get("label", v), "bytes": fmt_bytes(variants[v].get("memory_bytes")),
               "seconds": fmt_duration(variants[v].get("seconds"))} for v in VARIANTS]
    return {
        "rows": rows,
        "full_dtype": quantize.get("full_dtype", "16-bit"),
        "full_bytes": fmt_bytes(sizes.get("full")),
        "nf4_bytes": fmt_bytes(sizes.get("nf4")),
        "ratio": fmt_pct(ratio),
        "full_bits": fmt(bits.get("full"), 3),
        "nf4_bits": fmt(bits.get("nf4"), 3),
        "double_quant": quantize.get("double_quant"),
        "compute_dtype": quantize.get("compute_dtype", "n/a"),
        "errors": errors,
        "memory": memory,
    }


def overfitting(train_loss: list[dict], eval_loss: list[dict]) -> dict | None:
    """Validation loss rose from its best while training loss kept falling: a warning."""
    evals = [(e["step"], num(e.get("loss"))) for e in eval_loss if num(e.get("loss")) is not None]
    if len(evals) < 2:
        return None
    best_step, best = min(evals, key=lambda e: e[1])
    last_step, last = evals[-1]
    if last <= best * (1 + OVERFIT_TOLERANCE):
        return None
    # Mean of a few logged points smooths per-batch noise in the training loss.
    losses = [(t["step"], num(t.get("loss"))) for t in train_loss if num(t.get("loss")) is not None]
    # Best at step 0 (the untrained model, logged before training) compares with the start.
    before = [loss for step, loss in losses if step <= best_step][-3:] or [
        loss for _, loss in losses
    ][:3]
    after = [loss for _, loss in losses][-3:]
    if not before or not after or sum(after) / len(after) >= sum(before) / len(before):
        return None
    return {
        "best": fmt(best), "best_step": best_step, "last": fmt(last), "last_step": last_step,
        "rise": fmt_pct(last / best - 1),
        "train_before": fmt(sum(before) / len(before)), "train_after": fmt(sum(after) / len(after)),
    }


def training(train: dict, train_loss: list[dict], eval_loss: list[dict]) -> dict:
    def curve(rows: list[dict], key: str) -> list[tuple[float, float]]:
        return [(r["step"], num(r.get(key))) for r in rows if num(r.get(key)) is not None]

    loss_svg = line_chart(
        [Series("train", curve(train_loss, "loss"), "s-train"),
         Series("validation", curve(eval_loss, "loss"), "s-eval", markers=True)],
        title="Training and validation loss by optimizer step", x_label="step", y_label="loss",
    )
    lr_svg = line_chart(
        [Series("learning rate", curve(train_loss, "learning_rate"), "s-lr")],
        title="Learning rate schedule", x_label="step", y_label="learning rate",
        width=360, height=260,
    )
    total, trainable = num(train.get("total_parameters")), num(train.get("trainable_parameters"))
    lora = train.get("lora") or {}
    stats = [
        ("steps", fmt(train.get("steps"))), ("epochs", fmt(train.get("epochs"), 3)),
        ("wall time", fmt_duration(train.get("train_runtime_s"))),
        ("tokens / s", fmt(train.get("tokens_per_s"), 3)),
        ("trained tokens", fmt(train.get("trained_tokens"))),
        ("peak memory", fmt_bytes(train.get("peak_memory_bytes"))),
        ("learning rate", fmt(train.get("learning_rate"), 3)),
        ("final train loss", fmt(train.get("final_train_loss"))),
        ("final validation loss", fmt(train.get("final_eval_loss"))),
        ("best validation loss", fmt(train.get("best_eval_loss"))),
        ("trainable parameters", f"{fmt(train.get('trainable_parameters'))} "
         f"({fmt_pct(trainable / total if trainable and total else None)})"),
        ("LoRA", ", ".join(f"{k} {v}" for k, v in lora.items() if not isinstance(v, list | dict))
         or "n/a"),
        ("device", f"{train.get('device', 'n/a')} ({train.get('compute_dtype', 'n/a')} compute)"),
    ]
    return {"loss_svg": Markup(loss_svg), "lr_svg": Markup(lr_svg), "stats": stats,
            "overfit": overfitting(train_loss, eval_loss), "has_eval": bool(eval_loss)}


def gate_checks(gate: dict) -> dict:
    rows = [{
        "task": c.get("task"), "metric": c.get("metric"), "kind": c.get("kind"),
        "base": fmt(c.get("base")), "adapter": fmt(c.get("adapter")),
        "change": fmt_signed(c.get("change")),
        "relative": fmt_pct(c.get("relative_change"), signed=True),
        "threshold": fmt_pct(c.get("threshold"), signed=True)
        if num(c.get("threshold")) is not None else str(c.get("threshold", "n/a")),
        "passed": bool(c.get("passed")), "reason": str(c.get("reason", "")),
    } for c in gate.get("checks") or []]
    return {"rows": rows, "reasons": [str(r) for r in gate.get("reasons") or []],
            "n_passed": sum(r["passed"] for r in rows)}


def examples(rows: list[dict], variants: dict) -> list[dict]:
    out = []
    for row in rows:
        outputs = row.get("outputs") or {}
        columns = [("reference", str(row.get("reference", "")))]
        columns += [(variants[v].get("label", v), str(outputs[v])) for v in VARIANTS if v in outputs]
        out.append({"id": str(row.get("id", "")), "prompt": str(row.get("prompt", "")),
                    "columns": columns})
    return out


def data_section(dataset: dict, validation: dict, root: Path, out_html: Path) -> dict:
    splits = ("train", "validation", "test")
    rows = dataset.get("rows") or {}
    tokens = dataset.get("tokens") or {}
    upper = num(dataset.get("max_length"))
    classes = {"train": "s-train", "validation": "s-eval", "test": "s-test"}
    split_rows = [{
        "split": s, "rows": fmt(rows.get(s)),
        "before_cap": fmt((dataset.get("rows_before_cap") or {}).get(s)),
        "groups": fmt((dataset.get("groups") or {}).get(s)),
        "median_tokens": fmt(sorted(tokens[s])[len(tokens[s]) // 2]) if tokens.get(s) else "n/a",
        "max_tokens": fmt(max(tokens[s])) if tokens.get(s) else "n/a",
    } for s in splits]
    hists = [{"split": s, "svg": Markup(histogram(
        tokens.get(s) or [], title=f"Token lengths, {s} split", x_label="tokens per row",
        css_class=classes[s], upper=upper))} for s in splits]
    checks = [{
        "name": c.get("name"), "split": c.get("split"), "severity": c.get("severity"),
        "success": bool(c.get("success")), "failed_rows": fmt(c.get("failed_rows")),
        "examples": [f"row {e.get('row')}: {str(e.get('value'))[:80]}" for e in
                     (c.get("examples") or [])[:3]],
        "description": str(c.get("description", "")),
    } for c in validation.get("checks") or []]
    docs = validation.get("data_docs")
    docs_link = docs_found = None
    if docs:
        target = Path(docs) if Path(docs).is_absolute() else root / docs
        docs_link = Path(os.path.relpath(target, out_html.parent)).as_posix()
        docs_found = target.exists()
    facts = [
        ("source", str(dataset.get("source", "n/a"))), ("format", str(dataset.get("format", "n/a"))),
        ("raw rows", fmt(dataset.get("raw_rows"))),
        ("dropped over max_length", fmt(dataset.get("dropped_over_max_length"))),
        ("max_length (tokens)", fmt(dataset.get("max_length"))),
        ("eval rows", ", ".join(f"{k} {fmt(v)}" for k, v in (dataset.get("eval_rows") or {}).items())
         or "n/a"),
    ]
    return {
        "splits": split_rows, "hists": hists, "facts": facts, "checks": checks,
        "valid": bool(validation.get("success")), "docs_link": docs_link, "docs_found": docs_found,
        "leaks": list(dataset.get("groups_in_two_splits") or []),
        "n_failed": sum(not c["success"] for c in checks),
    }


# ---------------------------------------------------------------- lineage


def git_state(root: Path) -> dict:
    """HEAD and whether the work tree has uncommitted changes; a note when there is no git."""
    def git(*args: str) -> subprocess.CompletedProcess | None:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                  timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None

    head = git("rev-parse", "HEAD")
    if head is None:
        return {"commit": None, "note": "git is not available: the code version is unknown"}
    if head.returncode != 0:
        return {"commit": None,
                "note": "not inside a git repository (or no commit yet): the code version is unknown"}
    status = git("status", "--porcelain")
    changed = status.stdout.splitlines() if status and status.returncode == 0 else []
    return {"commit": head.stdout.strip(), "dirty": bool(changed), "changed": changed[:15],
            "n_changed": len(changed), "note": None}


def _nest(flat: dict) -> dict:
    """dvc.lock records params as dotted keys ("base.trust_remote_code"): nest them back."""
    out: dict = {}
    for key, value in flat.items():
        *parents, leaf = str(key).split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            node[leaf].update(value)
        else:
            node[leaf] = value
    return out


def dvc_lineage(root: Path) -> dict:
    """Hashes of data and model outputs and the params each stage ran with, from dvc.lock."""
    lock_path = root / "dvc.lock"
    result: dict[str, Any] = {"artifacts": [], "inputs": [], "params": None, "notes": []}
    if not lock_path.exists():
        result["notes"].append("dvc.lock not found: run the pipeline with `dvc repro` to record "
                               "the hashes of its data and models")
        return result
    try:
        lock = yaml.safe_load(lock_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        result["notes"].append(f"dvc.lock is not valid YAML ({e.__class__.__name__}): no hashes")
        return result
    stages = lock.get("stages") if isinstance(lock, dict) else None
    if not isinstance(stages, dict):
        result["notes"].append("dvc.lock has no stages: no hashes")
        return result
    params: dict = {}
    produced, deps = set(), {}
    for name, stage in stages.items():
        for out in stage.get("outs") or []:
            produced.add(out.get("path"))
            result["artifacts"].append({"stage": name, **_hash_row(out)})
        for dep in stage.get("deps") or []:
            deps.setdefault(dep.get("path"), _hash_row(dep))
        for file_params in (stage.get("params") or {}).values():
            if isinstance(file_params, dict):
                params = _merge(params, _nest(file_params))
    # Inputs from outside the DAG (raw data, eval task definitions), code files left out.
    result["inputs"] = [row for path, row in deps.items()
                        if path not in produced and not str(path).endswith(".py")]
    result["params"] = params or None
    expected = _dag_stages(root)
    absent = [s for s in expected if s not in stages and s != "report"]
    if absent:
        result["notes"].append(f"dvc.lock has no entry for: {', '.join(absent)} "
                               "(not run through DVC yet): their hashes are not shown")
    return result


def _hash_row(entry: dict) -> dict:
    return {"path": str(entry.get("path")), "md5": str(entry.get("md5") or "n/a"),
            "size": fmt_bytes(entry.get("size")), "nfiles": entry.get("nfiles")}


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _dag_stages(root: Path) -> list[str]:
    try:
        dag = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return []
    return list((dag or {}).get("stages") or {}) if isinstance(dag, dict) else []


def package_versions() -> list[tuple[str, str]]:
    versions = [("python", platform.python_version())]
    for name in PACKAGES:
        try:
            versions.append((name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            versions.append((name, "not installed"))
    return versions


def lineage(root: Path, base: dict, train: dict, eval_metrics: dict) -> dict:
    dvc = dvc_lineage(root)
    params, params_source = dvc["params"], "dvc.lock (the values each stage ran with)"
    if params is None:
        try:
            params = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))
            params_source = "params.yaml (no dvc.lock: may differ from the values of the run)"
        except (OSError, yaml.YAMLError):
            params, params_source = None, "no dvc.lock and no readable params.yaml"
    settings = eval_metrics.get("settings") or {}
    return {
        "git": git_state(root), "dvc": dvc,
        "params_yaml": yaml.safe_dump(params, sort_keys=False, allow_unicode=True).strip()
        if params else "", "params_source": params_source,
        "packages": package_versions() + [("lm-eval (in evaluate)",
                                           str(settings.get("lm_eval_version", "n/a")))],
        "base": [("source", str(base.get("source"))), ("revision", str(base.get("revision"))),
                 ("architecture", ", ".join(base.get("architecture") or []) or "n/a"),
                 ("parameters", fmt(base.get("parameters"))),
                 ("saved as", str(base.get("save_dtype", "n/a")))],
        "weights": sorted((base.get("weights_sha256") or {}).items()),
        "trust_remote_code": bool(base.get("trust_remote_code")),
        "devices": [("training", f"{train.get('device', 'n/a')} "
                                 f"({train.get('compute_dtype', 'n/a')} compute)"),
                    ("evaluation", str(settings.get("device", "n/a"))),
                    ("report host", f"{platform.system()} {platform.machine()}")],
    }


# ---------------------------------------------------------------- compare


def load_compare(rev: str, root: Path = Path(".")) -> dict:
    """The adapter's metrics at git revision `rev`, for a "vs previous" column."""
    path = (REPORTS_DIR / INPUTS["eval"][0]).as_posix()
    try:
        shown = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, capture_output=True,
                               text=True, timeout=30)
    except OSError as e:
        raise StageError(f"--compare {rev}: git is not available ({e})") from e
    if shown.returncode != 0:
        raise StageError(f"--compare {rev}: cannot read {path} at that revision: "
                         f"{shown.stderr.strip()}")
    try:
        previous = json.loads(shown.stdout)
        metrics = previous["variants"]["adapter_nf4"]["metrics"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise StageError(f"--compare {rev}: {path} there has no variants.adapter_nf4.metrics "
                         f"({e.__class__.__name__})") from e
    return {"label": f"adapter @ {rev}", "rev": rev, "metrics": metrics}


# ---------------------------------------------------------------- rendering


def build_context(inputs: dict, root: Path, out_html: Path, compare: dict | None) -> dict:
    variants = inputs["eval"]["variants"]
    head = headline(inputs["gate"], variants)
    quant = quantization(inputs["quantize"], inputs["eval"])
    train = training(inputs["train"], inputs["train_loss"], inputs["eval_loss"])
    data = data_section(inputs["dataset"], inputs["validation"], root, out_html)
    checks = gate_checks(inputs["gate"])
    rows = inputs["dataset"].get("rows") or {}
    cards = [
        {"label": "Gate", "value": head["decision"].upper(),
         "note": f"{checks['n_passed']} of {len(checks['rows'])} checks passed",
         "tone": "good" if head["passed"] else "bad"},
        {"label": f"{head['metric']} {head['arrow']}", "value": head["relative"],
         "note": f"{head['task']}: adapter vs NF4 base",
         "tone": {True: "good", False: "bad", None: ""}[head["improved"]]},
        {"label": "NF4 memory", "value": quant["nf4_bytes"],
         "note": f"{quant['ratio']} of {quant['full_bytes']} ({quant['full_dtype']})", "tone": ""},
        {"label": "Training", "value": fmt_duration(inputs["train"].get("train_runtime_s")),
         "note": f"{fmt(inputs['train'].get('steps'))} steps, "
                 f"{fmt(inputs['train'].get('tokens_per_s'), 3)} tokens/s",
         "tone": "warn" if train["overfit"] else ""},
        {"label": "Data", "value": " / ".join(fmt(rows.get(s)) for s in ("train", "validation",
                                                                          "test")),
         "note": "train / val / test rows, validation "
                 + ("passed" if data["valid"] else "FAILED"),
         "tone": "" if data["valid"] else "bad"},
    ]
    return {
        "title": f"QLoRA report: {inputs['base'].get('source', 'model')}",
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "head": head, "cards": cards, "quant": quant, "train": train, "data": data,
        "metrics": metric_table(inputs["eval"], compare), "gate": checks,
        "examples": examples(inputs["examples"], variants),
        "eval_settings": inputs["eval"].get("settings") or {},
        "lineage": lineage(root, inputs["base"], inputs["train"], inputs["eval"]),
    }


def render_html(ctx: dict) -> str:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,  # model outputs and prompts are untrusted: escape all of it
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.get_template("report.html.j2").render(**ctx)


def md_cell(text: Any) -> str:
    """Table cells: no pipes, newlines or raw HTML from model output."""
    return (str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("|", "\\|").replace("\n", " "))


def md_table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(md_cell(h) for h in headers) + " |",
             "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return lines + [""]


def md_block(text: str) -> list[str]:
    """A fenced block longer than any backtick run inside, so output cannot break out."""
    longest = max((len(run) for run in text.split("\n") for run in _backtick_runs(run)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + "text", text, fence]


def _backtick_runs(line: str) -> list[str]:
    runs, current = [], ""
    for ch in line:
        if ch == "`":
            current += ch
        elif current:
            runs.append(current)
            current = ""
    return runs + ([current] if current else [])


def render_markdown(ctx: dict) -> str:
    h, q, t, m, g, d, lin = (ctx[k] for k in ("head", "quant", "train", "metrics", "gate", "data",
                                               "lineage"))
    out = [f"# {ctx['title']}", "", f"_Generated {ctx['generated']}_", "",
           f"## Decision: **{h['decision'].upper()}**", "",
           f"Primary metric `{h['task']} / {h['metric']}` ({h['arrow']} better): "
           f"{h['baseline_label']} {h['base']} → {h['adapter_label']} {h['adapter']}, "
           f"change {h['change']} ({h['relative']}), 95% CI {h['ci']}: {h['verdict']}.", ""]
    out += md_table(["", ""], [[c["label"], f"{c['value']} ({c['note']})"] for c in ctx["cards"]])
    out += ["## Quantization cost", "",
            f"{q['full_dtype']} base {q['full_bytes']} → NF4 {q['nf4_bytes']} ({q['ratio']}); "
            f"bits per parameter {q['full_bits']} → {q['nf4_bits']}.", ""]
    out += md_table(["task", "metric", "", "full", "NF4", "NF4 keeps"],
                    [[r["task"], r["metric"], r["arrow"], r["full"], r["nf4"], r["kept"]]
                     for r in q["rows"]])
    out += md_table(["4-bit type", "mean relative weight error", "max"],
                    [[e["type"], e["mean"], e["max"]] for e in q["errors"]])
    out += ["## Training", ""]
    if t["overfit"]:
        o = t["overfit"]
        out += [f"> **Warning: overfitting.** Validation loss rose from {o['best']} (step "
                f"{o['best_step']}) to {o['last']} (step {o['last_step']}, {o['rise']}) while "
                f"training loss fell from {o['train_before']} to {o['train_after']}.", ""]
    out += md_table(["", ""], t["stats"])
    headers = ["task", "metric", ""] + m["headers"] + ([m["compare_label"]] if m["compare_label"]
                                                       else [])
    out += ["## Metrics (best per row in bold, ± stderr)", ""]
    out += md_table(headers, [
        [r["task"], r["metric"], r["arrow"]]
        + [(f"**{c['value']}**" if c["best"] else c["value"])
           + (f" ± {c['stderr']}" if c["stderr"] else "") for c in r["cells"]]
        + ([r["previous"]["value"]] if "previous" in r else []) for r in m["rows"]])
    out += ["## Gate checks", ""]
    out += md_table(["task", "metric", "kind", "base", "adapter", "relative", "threshold",
                     "passed", "reason"],
                    [[r["task"], r["metric"], r["kind"], r["base"], r["adapter"], r["relative"],
                      r["threshold"], "yes" if r["passed"] else "NO", r["reason"]]
                     for r in g["rows"]])
    out += ["## Examples", ""]
    for ex in ctx["examples"]:
        out += [f"### {md_cell(ex['id'])}", "", "Prompt:", *md_block(ex["prompt"]), ""]
        for label, text in ex["columns"]:
            out += [f"{md_cell(label)}:", *md_block(text), ""]
    out += ["## Data", ""]
    out += md_table(["split", "rows", "before cap", "groups", "median tokens", "max tokens"],
                    [[s["split"], s["rows"], s["before_cap"], s["groups"], s["median_tokens"],
                      s["max_tokens"]] for s in d["splits"]])
    out += [f"Validation: **{'passed' if d['valid'] else 'FAILED'}** "
            f"({len(d['checks']) - d['n_failed']} of {len(d['checks'])} checks passed)"
            + (f", [Data Docs]({d['docs_link']})" if d["docs_link"] else "") + ".", ""]
    git = lin["git"]
    revision = (git["note"] if git["commit"] is None else
                f"`{git['commit']}`" + (f" with uncommitted changes in {git['n_changed']} file(s)"
                                        if git["dirty"] else " (clean)"))
    out += ["## Lineage", "", f"- git: {revision}",
            f"- trust_remote_code: {'on' if lin['trust_remote_code'] else 'off'}"]
    out += [f"- {name}: {value}" for name, value in lin["devices"]]
    out += [f"- note: {n}" for n in lin["dvc"]["notes"]] + [""]
    out += md_table(["stage", "output", "md5", "size"],
                    [[a["stage"], a["path"], a["md5"], a["size"]] for a in lin["dvc"]["artifacts"]])
    out += md_table(["package", "version"], lin["packages"])
    if lin["params_yaml"]:
        out += [f"Params, from {lin['params_source']}:", "", "```yaml", lin["params_yaml"], "```",
                ""]
    return "\n".join(out)


def render_report(
    reports_dir: Path = REPORTS_DIR,
    out_html: Path = HTML_OUT,
    out_md: Path = MD_OUT,
    *,
    root: Path | None = None,
    compare: dict | None = None,
) -> None:
    """Render both files from `reports_dir`. `root` holds dvc.lock, dvc.yaml, params.yaml and
    the git work tree (default: the parent of `reports_dir`); `compare` is load_compare(rev)."""
    reports_dir, out_html, out_md = Path(reports_dir), Path(out_html), Path(out_md)
    root = Path(root) if root is not None else reports_dir.resolve().parent
    ctx = build_context(load_inputs(reports_dir), root, out_html, compare)
    html, md = render_html(ctx), render_markdown(ctx)  # both rendered before either is written
    atomic_write_text(out_html, html)
    atomic_write_text(out_md, md)


def main(compare_rev: str | None = None) -> None:
    compare = load_compare(compare_rev) if compare_rev else None
    render_report(REPORTS_DIR, HTML_OUT, MD_OUT, root=Path("."), compare=compare)
    print(f"wrote {HTML_OUT} and {MD_OUT}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", metavar="REV", help="add the adapter's metrics at git REV")
    args = parser.parse_args()
    run_stage("report", lambda: main(args.compare))
