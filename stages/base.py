"""Stage `base`: the configured base model as a local Hugging Face directory.

`base.source` is the embedded SmolLM2-135M-Instruct, a hub id (loaded at the commit the
sources stage resolved) or a local directory (qlora/models/base.py loads each);
`base.chat_template` gives one to a model that has none.
Outputs: data/prepared/base_model/ (safetensors, tokenizer, chat template) and
reports/base.json (identity: source and its fingerprint, parameters, weights' sha256).
"""

from __future__ import annotations

from qlora.core import paths
from qlora.core.io import StageError, atomic_dir, run_stage, weights_identity, write_json
from qlora.core.params import load_params
from qlora.core.sources import recorded
from qlora.models.base import load_source
from qlora.models.loading import DTYPES


def main() -> None:
    p = load_params().base
    source = recorded("model")  # what the sources stage fingerprinted for this run
    model, tokenizer = load_source(p, source.get("resolved_revision"))
    if p.chat_template is not None:
        tokenizer.chat_template = p.chat_template
    if tokenizer.chat_template is None:
        raise StageError(
            f"base.source: {p.source!r} has no chat template, and the dataset stage needs one "
            "to format prompts: use an instruct/chat model as base.source, or give the "
            "template in base.chat_template (a Jinja string, as in tokenizer_config.json)"
        )
    model = model.to(DTYPES[p.save_dtype])
    with atomic_dir(paths.BASE_MODEL_DIR) as out:
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    write_json(
        paths.BASE_REPORT,
        {
            "source": p.source,
            "revision": p.revision,
            "source_fingerprint": source,
            "architecture": model.config.architectures,
            "parameters": sum(t.numel() for t in model.parameters()),
            "save_dtype": p.save_dtype,
            "weights_sha256": weights_identity(paths.BASE_MODEL_DIR),
            "trust_remote_code": p.trust_remote_code,
        },
    )
    print(f"saved {p.source} to {paths.BASE_MODEL_DIR}")


if __name__ == "__main__":
    run_stage("base", main)
