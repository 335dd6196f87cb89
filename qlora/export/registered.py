"""`qlora export VERSION --gguf DIR`: the GGUF artifacts of any registered version, built
and parity-checked as the pipeline's export, eval_gguf and parity stages do, into a folder
of the user's choice.

The version's adapter is merged and converted with this workspace's export.* settings and
scored with its evaluate.* tasks under llama.cpp; each artifact is held to the NF4 +
adapter metrics recorded for the version when it was registered. Those were measured on the
evaluation inputs of that run: when this workspace's differ (another test split, other
tasks), the comparison is said to be across inputs. DIR's manifest.json holds the files,
the scores and the verdicts; nothing is written unless everything succeeded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from qlora.core import dvc
from qlora.core.io import StageError
from qlora.core.params import load_params
from qlora.export.build import build_gguf, gguf_folder, write_manifest
from qlora.export.measure import measure_all
from qlora.export.parity import parity_report


def same_evaluation_inputs(lineage: dict, root: Path = Path(".")) -> bool | None:
    """Whether this workspace evaluates on what the version was evaluated on (None: this
    workspace has not run its evaluation)."""
    from qlora.registry.promotion import ADAPTER_EVAL, evaluation_inputs

    try:
        stages = dvc.read_lock(root)
    except StageError:
        return None
    if ADAPTER_EVAL not in stages or "finetune" not in stages:
        return None
    here = evaluation_inputs(stages)["fingerprint"]
    return here == lineage.get("evaluation", {}).get("fingerprint")


def export_gguf(
    reg,
    version: str,
    out_dir: Path,
    base_dir: Path,
    replace: bool = False,
    other_targets: Sequence[Path | None] = (),
) -> dict:
    """Build, score and judge; returns the manifest and the lines to print."""
    broken = reg.check_version(version)
    if broken:
        raise StageError("; ".join(broken))
    lineage = reg.lineage(version)
    params = load_params()
    trust = bool(lineage["params"].get("base", {}).get("trust_remote_code", False))
    protected = (reg.root, base_dir, *[t for t in other_targets if t is not None])
    same_inputs = same_evaluation_inputs(lineage)
    with gguf_folder(out_dir, replace, protected) as tmp:
        manifest = build_gguf(params.export, reg.path(version), base_dir, tmp, trust)
        gguf_eval = measure_all(params, tmp)
        parity = parity_report(gguf_eval, lineage["metrics"], params)
        manifest.update(
            version=version, gguf_eval=gguf_eval, parity=parity, same_inputs=same_inputs
        )
        write_manifest(tmp, manifest)
    lines = [f"{version}: GGUF files in {out_dir}"]
    for name, entry in manifest["files"].items():
        lines.append(f"  {name}: {entry['bytes'] / 2**20:.1f} MiB ({entry['what']})")
    for name, verdict in parity["artifacts"].items():
        lines.append(f"  {name}: {verdict['reason']}")
    lines.append(f"deployable: {', '.join(parity['deployable']) or 'none'}")
    if same_inputs is not True:
        lines.append(
            f"note: {version}'s recorded metrics come from other evaluation inputs than this "
            "workspace's (or it has not run its evaluation): the parity compares across inputs"
        )
    return {"manifest": manifest, "lines": lines}


# What `qlora serve` picks when no artifact is named: the smallest file that passed.
SERVE_PREFERENCE = ("merged-q4_k_m", "merged-q8_0", "merged-f16", "base-f16+lora")


def _pick(deployable: dict[str, dict], artifact: str | None, where: str) -> str:
    if not deployable:
        raise StageError(f"{where}: no GGUF artifact passed the parity check: none to serve")
    if artifact is not None:
        if artifact not in deployable:
            raise StageError(
                f"{where}: {artifact!r} is not deployable; deployable: {sorted(deployable)}"
            )
        return artifact
    ranked = [a for a in SERVE_PREFERENCE if a in deployable] + sorted(deployable)
    return ranked[0]


def deployable_gguf(
    version: str | None, artifact: str | None = None, registry=None
) -> tuple[str, Path, Path | None]:
    """(artifact name, model file, LoRA file or None) of a deployable GGUF artifact: of a
    registered version (champion, v3: the files registered with it), or with version None
    of this workspace's last run (data/prepared/gguf, judged by reports/export/parity.json)."""
    from qlora.core import paths
    from qlora.core.io import read_json

    if version is None:
        if not paths.PARITY_REPORT.is_file() or not paths.GGUF_MANIFEST.is_file():
            raise StageError(
                f"{paths.PARITY_REPORT}: not found: run the pipeline (`qlora run`) first"
            )
        parity, manifest = read_json(paths.PARITY_REPORT), read_json(paths.GGUF_MANIFEST)
        deployable = {n: manifest["artifacts"][n] for n in parity["deployable"]}
        name = _pick(deployable, artifact, str(paths.PARITY_REPORT))
        entry = deployable[name]
        lora = entry.get("lora")
        return name, paths.GGUF_DIR / entry["model"], paths.GGUF_DIR / lora if lora else None
    resolved = registry.resolve(version)
    broken = registry.check_version(resolved)
    if broken:
        raise StageError("; ".join(broken))
    deployable = registry.lineage(resolved).get("deployable") or {}
    name = _pick(deployable, artifact, f"{resolved} in {registry.root}")
    files = [registry.path(resolved) / f for f in deployable[name]["files"]]
    return name, files[0], files[1] if len(files) > 1 else None
