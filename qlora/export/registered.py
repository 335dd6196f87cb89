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
