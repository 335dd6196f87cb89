"""Promotion and rollback: what may be registered (the workspace is exactly what dvc.lock
records, the stages follow from each other), the lineage recorded with it, and the
champion rules."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml

from qlora.core import dvc, paths
from qlora.core.io import (
    StageError,
    read_json,
)
from qlora.core.params import load_params
from qlora.core.sources import settle_always_changed
from qlora.evaluation.gate import decide_vs_champion
from qlora.registry.store import (
    CARD,
    DEPLOY_DIR,
    LINEAGE,
    Registry,
    current_user,
    default_dir,
    dvc_dir_md5,
    dvc_manifest,
    file_md5,
    now_utc,
)


def stale_stages(root: Path, target: str = "gate") -> dict:
    """`dvc status` of `target` and every stage upstream of it: {} when the workspace is
    exactly what dvc.lock records."""
    return settle_always_changed(dvc.status(root, target), root)


# The stage that evaluates the adapter: what it read besides the adapter is what two
# adapters' metrics must share to compare.
ADAPTER_EVAL = paths.variant_stage(paths.CANDIDATE)


def check_lock_chain(stages: dict) -> None:
    """Refuse a dvc.lock whose stages do not follow from each other: the adapter's
    evaluation must have read the adapter finetune wrote, evaluate the results that
    evaluation wrote, and gate the metrics evaluate wrote. Each is checked against
    its own stage's record elsewhere; this ties the records together, so what is registered
    is one run's adapter, metrics and decision, not pieces of two."""
    _check_links(
        stages,
        [
            ("finetune", paths.ADAPTER_DIR, ADAPTER_EVAL),
            (ADAPTER_EVAL, paths.variant_file(paths.CANDIDATE), "evaluate"),
            ("evaluate", paths.EVAL_METRICS, "gate"),
        ],
        "the stages come from different runs; run `qlora run` to bring them together",
    )


def _check_links(stages: dict, links: list[tuple[str, Path, str]], advice: str) -> None:
    """Each (writer, path, reader): the reader's dep on path has the md5 the writer wrote."""
    for writer, path, reader in links:
        wrote = dvc.lock_out(stages, writer, path)["md5"]
        read = (dvc.lock_entry(stages, reader, path, "deps") or {}).get("md5")
        if read != wrote:
            raise StageError(
                f"dvc.lock: {reader} read {path} at md5 {read}, but {writer} wrote {wrote}: "
                + advice
            )


# The deployable files' chain, where the run has the export stages: the export read the
# adapter finetune wrote, eval_gguf the files export wrote, parity the scores eval_gguf wrote.
DEPLOY_LINKS = [
    ("finetune", paths.ADAPTER_DIR, "export"),
    ("export", paths.GGUF_DIR, "eval_gguf"),
    ("eval_gguf", paths.GGUF_EVAL, "parity"),
]


def check_deploy_chain(stages: dict) -> None:
    """As check_lock_chain, for the GGUF artifacts registered beside the adapter."""
    _check_links(
        stages,
        DEPLOY_LINKS,
        "the export comes from another run than the adapter; run `qlora run`",
    )


def deployable(root: Path, stages: dict) -> tuple[dict, dict[str, tuple[Path, str]]]:
    """({artifact: its files and parity verdict} for each artifact parity passed,
    {registry file name: (source, sha256)} of their files). Empty where dvc.lock has no
    parity stage (a run from before the export existed): the adapter alone is registered."""
    if "parity" not in stages:
        return {}, {}
    check_deploy_chain(stages)
    parity = _recorded_json(root, paths.PARITY_REPORT, stages, "parity")
    manifest = read_json(root / paths.GGUF_MANIFEST)
    artifacts, files = {}, {}
    for name in parity["deployable"]:
        entry = manifest["artifacts"][name]
        names = [entry["model"], *([entry["lora"]] if entry.get("lora") else [])]
        artifacts[name] = {
            "files": [f"{DEPLOY_DIR}/{n}" for n in names],
            "gguf_type": entry["gguf_type"],
            "parity": parity["artifacts"][name]["reason"],
        }
        for n in names:
            files[f"{DEPLOY_DIR}/{n}"] = (root / paths.GGUF_DIR / n, manifest["files"][n]["sha256"])
    return artifacts, files


def _lock_stages(root: Path) -> dict:
    stages = dvc.read_lock(root)
    missing = [s for s in ("finetune", ADAPTER_EVAL, "evaluate", "gate") if s not in stages]
    if missing:
        raise StageError(
            f"{root / dvc.LOCK}: no entry for {', '.join(missing)}: run `qlora run` first"
        )
    return stages


def evaluation_inputs(stages: dict) -> dict:
    """What the adapter's evaluation read besides the adapter (code, data, base, eval
    tasks) and its params. Two adapters' metrics compare only when these are equal."""
    trained = {o["path"] for o in stages["finetune"].get("outs") or []}
    deps = {
        d["path"]: d.get("md5") or d.get("hash")
        for d in stages[ADAPTER_EVAL].get("deps") or []
        if d["path"] not in trained
    }
    params = stages[ADAPTER_EVAL].get("params") or {}
    digest = hashlib.sha256(
        json.dumps({"deps": deps, "params": params}, sort_keys=True, default=str).encode()
    ).hexdigest()
    return {"fingerprint": digest, "deps": deps, "params": params}


def build_lineage(root: Path) -> dict:
    """Everything needed to rebuild the adapter: code, data and base hashes, params."""
    from qlora.core.lineage import git_state, package_versions

    stages = _lock_stages(root)
    adapter = dvc.lock_out(stages, "finetune", paths.ADAPTER_DIR)
    identity = root / paths.ADAPTER_DIR / paths.BASE_IDENTITY
    return {
        "git": git_state(root),
        "adapter": {"path": adapter["path"], "dvc_md5": adapter.get("md5")},
        "base_weights_sha256": read_json(identity).get("weights_sha256")
        if identity.exists()
        else None,
        "evaluation": evaluation_inputs(stages),
        "params": yaml.safe_load((root / paths.PARAMS_FILE).read_text(encoding="utf-8")),
        "dvc_lock": stages,
        "packages": dict(package_versions()),
    }


def _recorded_json(root: Path, path: Path, stages: dict, stage: str) -> dict:
    """A stage's JSON output, read once and accepted only with the md5 dvc.lock records for
    it: what is registered is then what dvc.lock describes, whatever ran since `dvc status`."""
    file = root / path
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise StageError(f"{file}: not found (run `qlora run`)") from None
    want = dvc.lock_out(stages, stage, path)["md5"]
    got = hashlib.md5(data, usedforsecurity=False).hexdigest()
    if got != want:
        raise StageError(
            f"{file}: changed since dvc.lock recorded it (md5 {got}, dvc.lock: {want}; is a "
            "run writing it?): nothing registered; run `qlora run` first"
        )
    try:
        return json.loads(data)
    except ValueError as e:
        raise StageError(f"{file}: not valid JSON ({e})") from None


def adapter_manifest(root: Path, stages: dict) -> dict[str, str]:
    """File name -> md5 of the adapter as dvc.lock records it: DVC's list from its cache,
    else one computed from the workspace's files. Either is accepted only when it hashes to
    dvc.lock's directory md5, so the files a promotion copies are always checked."""
    dir_md5 = dvc.lock_out(stages, "finetune", paths.ADAPTER_DIR)["md5"]
    manifest = dvc_manifest(root, dir_md5)
    where = "DVC's cache"
    if manifest is None:  # a clone that pulled other outputs only: hash the files here
        folder = root / paths.ADAPTER_DIR
        files = (p for p in sorted(folder.rglob("*")) if p.is_file())
        manifest = {p.relative_to(folder).as_posix(): file_md5(p) or "" for p in files}
        where = str(folder)
    got = dvc_dir_md5(manifest)
    if got != dir_md5:
        raise StageError(
            f"{root / paths.ADAPTER_DIR}: the files listed by {where} hash to {got}, not to "
            f"dvc.lock's {dir_md5}: nothing registered; run `qlora run` (or `dvc checkout "
            f"{paths.ADAPTER_DIR}`) first"
        )
    return manifest


def _differences(a: dict, b: dict) -> list[str]:
    out = [
        f"{path} ({a['deps'].get(path)} -> {b['deps'].get(path)})"
        for path in sorted(set(a["deps"]) | set(b["deps"]))
        if a["deps"].get(path) != b["deps"].get(path)
    ]
    if a["params"] != b["params"]:
        out.append("evaluate/quantize params")
    return out


def _vs_champion(reg: Registry, metrics: dict, lineage: dict, gate_params, ignore: bool) -> dict:
    champion = reg.champion()
    if champion is None:
        return decide_vs_champion(metrics, None, gate_params)
    if ignore:
        reason = f"SKIPPED: the comparison with champion {champion} (--ignore-champion)"
        return {
            "passed": True,
            "champion": champion,
            "checks": [],
            "reasons": [reason],
            "summary": f"not compared with {champion} (--ignore-champion)",
        }
    recorded = reg.lineage(champion)
    changed = _differences(recorded["evaluation"], lineage["evaluation"])
    if changed:
        reason = (
            f"FAIL: champion {champion} was evaluated on other inputs, so the metrics do not "
            f"compare: {'; '.join(changed)}. Promote with --ignore-champion to decide on the "
            "base gate alone"
        )
        return {
            "passed": False,
            "champion": champion,
            "checks": [],
            "reasons": [reason],
            "summary": f"not comparable with {champion}",
        }
    return decide_vs_champion(metrics, recorded["metrics"], gate_params, champion)


def promote(
    root: Path | str = ".", registry: Registry | None = None, ignore_champion: bool = False
) -> dict:
    """Register the workspace's adapter with its lineage and decision; move the champion
    alias to it when the gate passed and it is not worse than the champion. Returns the
    index event. Refuses (StageError, nothing written) a workspace that differs from
    dvc.lock: the lineage would not describe the files. The adapter, metrics and gate
    files are checked against dvc.lock's md5s as they are read; call it holding the
    workspace lock (flows/dvc_workspace.py), as the flow and `qlora promote` do, so that no
    run rewrites them meanwhile."""
    from qlora.registry.model_card import render_card

    root = Path(root)
    reg = registry or Registry(root / default_dir())
    stale = stale_stages(root)
    if "parity" in dvc.read_lock(root):
        stale |= stale_stages(root, "parity")
    if stale:
        raise StageError(
            "the workspace differs from dvc.lock (stale: "
            f"{', '.join(sorted(stale))}): run `qlora run` first, so that what is registered "
            "is what dvc.lock describes"
        )
    adapter_dir = root / paths.ADAPTER_DIR
    if not (adapter_dir / "adapter_config.json").is_file():
        raise StageError(f"{adapter_dir}: no adapter_config.json (run the finetune stage)")
    params = load_params(root / paths.PARAMS_FILE)
    lineage = build_lineage(root)
    stages = lineage["dvc_lock"]
    check_lock_chain(stages)
    gate = _recorded_json(root, paths.GATE_REPORT, stages, "gate")
    metrics = _recorded_json(root, paths.EVAL_METRICS, stages, "evaluate")
    manifest = adapter_manifest(root, stages)
    artifacts, artifact_files = deployable(root, stages)
    with reg.writing():
        vs = _vs_champion(reg, metrics, lineage, params.gate, ignore_champion)
        before = reg.champion()
        passed = bool(gate["passed"]) and vs["passed"]
        version = reg.next_version()
        failed = [r for r in gate["reasons"] + vs["reasons"] if r.startswith("FAIL")]
        if passed:
            summary = f"PROMOTED {version}: champion {before or 'none'} -> {version}"
        else:
            summary = f"REJECTED {version}: champion stays {before or 'none'}"
        decision = {
            "decision": "promoted" if passed else "rejected",
            "summary": summary,
            "champion_before": before,
            "gate": {k: gate[k] for k in ("decision", "summary", "reasons", "thresholds")},
            "vs_champion": vs,
            "reasons": failed or gate["reasons"] + vs["reasons"],
        }
        record = {
            "version": version,
            "created": now_utc(),
            "by": current_user(),
            **lineage,
            "metrics": metrics,
            "decision": decision,
            # The GGUF files that passed the parity check, copied only for a champion: a
            # rejected version is never served.
            "deployable": artifacts if passed else {},
        }
        texts = {
            LINEAGE: json.dumps(record, indent=2, ensure_ascii=False, default=str) + "\n",
            CARD: render_card(record),
        }
        primary = gate["primary"]
        event = {
            "event": "register",
            "version": version,
            "created": record["created"],
            "by": record["by"],
            "git_commit": lineage["git"].get("commit"),
            "git_dirty": lineage["git"].get("dirty"),
            "decision": decision["decision"],
            "champion": passed,
            "summary": summary,
            "reasons": decision["reasons"],
            "primary": {
                "task": primary["task"],
                "metric": primary["metric"],
                "value": primary["adapter"],
                "base": primary["base"],
                "gain_over_base": primary["relative_change"],
            },
            "adapter_dvc_md5": lineage["adapter"]["dvc_md5"],
            "deployable": sorted(record["deployable"]),
        }
        return reg.add(
            version, adapter_dir, texts, event, manifest, artifact_files if passed else {}
        )


def rollback(reg: Registry, version: str | None = None, reason: str = "") -> dict:
    """Move the champion alias back: to `version`, or to the champion before this one."""
    with reg.writing():
        history = reg.champion_history()
        if not history:
            raise StageError(f"{reg.root}: there is no champion to roll back")
        current = history[-1]
        if version is None:
            if len(history) < 2:
                raise StageError(
                    f"{current} was the first champion: there is none before it to roll back to"
                )
            version = history[-2]
        record = reg.record(version)
        if version == current:
            raise StageError(f"{version} is the champion already")
        if record["decision"] != "promoted":
            raise StageError(
                f"{version} was rejected ({'; '.join(record['reasons'][:2])}): only a "
                "version that passed its gate can serve"
            )
        broken = reg.check_version(version)
        if broken:
            raise StageError(f"cannot serve {version}: {'; '.join(broken)}")
        return reg.move_alias(version, previous=current, action="rollback", reason=reason)
