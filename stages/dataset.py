"""Stage `dataset`: the configured dataset as train / validation / test in chat format.

qlora/data/splitting.py does the work: whole groups per split, the chat template, rows over
dataset.max_length dropped and counted; plus the data of the local lm-eval tasks.
Outputs: data/prepared/splits/, data/prepared/eval/, reports/dataset.json
"""

from __future__ import annotations

from collections import Counter

from qlora.core import paths
from qlora.core.io import atomic_dir, run_stage, sha256_of, write_json, write_jsonl
from qlora.core.params import load_params
from qlora.core.sources import recorded
from qlora.data.splitting import check_context, choice_rows, prepare, prose_rows
from qlora.models.loading import load_tokenizer


def main() -> None:
    params = load_params()
    p = params.dataset
    check_context(p.max_length, paths.BASE_MODEL_DIR)
    tokenizer = load_tokenizer(paths.BASE_MODEL_DIR, params.base.trust_remote_code)
    source = recorded("dataset")  # what the sources stage fingerprinted for this run
    splits, summary = prepare(p, tokenizer, source.get("resolved_revision"))
    if source["kind"] == "pipeline":  # written by a stage after `sources` ran: hashed here
        source = {**source, "sha256": sha256_of(paths.DEFAULT_CORPUS)}
    summary["source_fingerprint"] = source
    with atomic_dir(paths.SPLITS_DIR) as out:
        for s in paths.SPLITS:
            write_jsonl(out / f"{s}.jsonl", splits[s])
    choices = choice_rows(splits["test"], p.choice_candidates, p.seed)
    prose = prose_rows(p.guard_documents, p.guard_chars, p.seed)
    with atomic_dir(paths.EVAL_DATA_DIR) as out:
        write_jsonl(out / "choice.jsonl", choices)
        write_jsonl(out / "prose.jsonl", prose)
    summary["eval_rows"] = {"choice": len(choices), "prose": len(prose)}
    summary["groups_in_two_splits"] = sorted(
        g
        for g, n in Counter(
            g for s in paths.SPLITS for g in {r["group"] for r in splits[s]}
        ).items()
        if n > 1
    )
    write_json(paths.DATASET_REPORT, summary)
    print(
        f"splits {summary['rows']} from {summary['raw_rows']} {summary['format']} rows "
        f"({summary['dropped_over_max_length']} over {p.max_length} tokens dropped)"
    )


if __name__ == "__main__":
    run_stage("dataset", main)
