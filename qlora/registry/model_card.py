"""The model card of a registered adapter: README.md with Hugging Face metadata.

The front matter is written by huggingface_hub's own ModelCardData, so it is the metadata
the hub reads (base_model, library_name: peft, datasets, model-index with the evaluation
results); the body says what the adapter is, how to load it with plain peft, why it was
promoted or not, the training parameters and where every input came from. A version folder
of the registry can be pushed to a hub as it is.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from qlora.core import paths
from qlora.report.text import ARROWS, fmt, md_code, md_fence, md_text
from qlora.schemas.base import validated
from qlora.schemas.metrics import EvalMetrics, VariantResult, higher_is_better

# Embedded bases (stages/base.py) and the hub model each one carries.
EMBEDDED_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def base_model_id(source: str) -> str | None:
    """The hub id of the base, or None for a local directory (the hub cannot link it)."""
    if source.startswith("embedded:"):
        return EMBEDDED_HUB_IDS.get(source.removeprefix("embedded:"))
    if Path(source).exists() or source.startswith((".", "/")):
        return None
    return source


def _variants(record: dict) -> dict[str, VariantResult]:
    """The evaluation recorded with the version, read through metrics.json's schema."""
    return validated(EvalMetrics, record["metrics"], "lineage.json metrics").variants


def _eval_results(record: dict):
    """One result per metric of the 4-bit base + adapter; each lm-eval task is a dataset
    (data/eval_tasks: the test split of the training data, or CPython's prose)."""
    from huggingface_hub import EvalResult

    return [
        EvalResult(
            task_type="text-generation",
            dataset_type=task,
            dataset_name=task,
            dataset_split="test",
            metric_type=name,
            metric_name=f"{task}/{name}",
            metric_value=round(m.value, 6),
        )
        for task, task_metrics in _variants(record)[paths.CANDIDATE].metrics.items()
        for name, m in task_metrics.items()
    ]


def _metric_table(record: dict) -> list[str]:
    """Every metric of the three variants; ↑/↓ is lm-eval's direction, ? where it gave none."""
    variants = _variants(record)
    names = paths.VARIANTS
    rows = ["| task/metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for task, task_metrics in variants[paths.CANDIDATE].metrics.items():
        for name in task_metrics:
            entries = [variants[v].metrics.get(task, {}).get(name) for v in names]
            cells = ["-" if e is None else fmt(e.value) for e in entries]
            arrow = ARROWS[higher_is_better(*entries)]
            rows.append(f"| {md_text(f'{task}/{name}')} {arrow} | " + " | ".join(cells) + " |")
    return rows


def _use_snippet(load_from: str) -> str:
    """Python that loads the adapter on its base; `load_from` as a string literal (repr),
    so no quote in a base's name ends it early."""
    return "\n".join(
        [
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f"base = AutoModelForCausalLM.from_pretrained({load_from!r})",
            'model = PeftModel.from_pretrained(base, "path/to/this/folder")',
            f"tokenizer = AutoTokenizer.from_pretrained({load_from!r})",
        ]
    )


def render_card(record: dict) -> str:
    """README.md for a registry version (`record` is its lineage.json)."""
    from huggingface_hub import ModelCardData

    params = record["params"]
    source = params["base"]["source"]
    base_id = base_model_id(source)
    dataset = str(params["dataset"]["source"])
    decision = record["decision"]
    data = ModelCardData(
        model_name=f"qlora-adapter-{record['version']}",
        base_model=base_id,
        library_name="peft",
        pipeline_tag="text-generation",
        tags=["peft", "lora", "qlora"],
        datasets=[dataset],
        eval_results=_eval_results(record),
    )
    finetune = {k: params[k] for k in ("finetune", "quantize") if k in params}
    git = record["git"]
    load_from = base_id or f"<the base directory with weights {record['base_weights_sha256']}>"
    export = f"qlora export {record['version']} --merged DIR"
    # Names, reasons and paths come from the data and params: escaped, or fenced.
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# QLoRA adapter {md_text(record['version'])}",
        "",
        f"A LoRA adapter trained with QLoRA (4-bit base) on {md_code(dataset)}, base "
        f"{md_code(source)}. Registered {md_text(record['created'])}: "
        f"**{md_text(decision['decision'])}**, {md_text(decision['summary'])}.",
        "",
        "## Use",
        "",
        md_fence(_use_snippet(load_from), "python"),
        "",
        "The adapter was trained on the base weights whose sha256 `base_identity.json` "
        "records; LoRA deltas fit only those weights. "
        f"{md_code(export)} writes a standalone merged model.",
        "",
        "## Evaluation (lm-eval, test split)",
        "",
        *_metric_table(record),
        "",
        "## Decision",
        "",
        *[f"- {md_text(r)}" for r in decision["reasons"]],
        "",
        "## Training parameters",
        "",
        md_fence(yaml.safe_dump(finetune, sort_keys=False).strip(), "yaml"),
        "",
        "## Lineage",
        "",
        f"- git commit: {md_code(git.get('commit'))}"
        + (" (uncommitted changes)" if git.get("dirty") else ""),
        f"- adapter (DVC md5): {md_code(record['adapter']['dvc_md5'])}",
        f"- evaluation inputs fingerprint: {md_code(record['evaluation']['fingerprint'])}",
        "- data and model hashes, every stage's params: `lineage.json` (`dvc_lock`)",
        "",
        md_fence(json.dumps(record["base_weights_sha256"], indent=2), "json"),
        "",
    ]
    return "\n".join(lines)
