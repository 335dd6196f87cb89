"""`qlora export VERSION --merged DIR`: a registered adapter merged into its base, saved as a
plain transformers model in 16 bits, and checked before it is handed over.

QLoRA trains against a 4-bit base, but merging into 4-bit weights would round the adapter
away: the base is reloaded in full precision, the adapter merged (W + B·A·alpha/r), and the
result saved in a 16-bit dtype as safetensors. The folder appears only after three checks:
1. merge: the merged model (float32, in memory) gives the logits of base + adapter applied
   unmerged, to float rounding (measured 1e-4 on SmolLM2-135M; limit 1e-3);
2. files: the saved folder, loaded with nothing but `AutoModelForCausalLM.from_pretrained`,
   gives the logits of the in-memory merged model at the saved dtype (the same numbers:
   limit 1e-3), so config, tied weights and tokenizer all made it to disk;
3. end to end: its next-token distributions stay close to base + adapter's, within
   KL_FRACTION of the adapter's own effect (the KL between base and base + adapter on the
   same prompts). The gap is the 16-bit rounding of the merged weights (measured below);
   a lost adapter costs its whole effect (fraction 1), a doubled one more.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from qlora.core.io import StageError, atomic_dir, check_output_dir, sha256_of, write_json
from qlora.core.paths import BASE_MODEL_DIR
from qlora.models.loading import DTYPES, check_adapter_base, load_full, load_tokenizer

# Largest KL(base+adapter || merged export) over every position of the prompts, as a
# fraction of the adapter's own effect, KL(base+adapter || base). An absolute limit in nats
# holds for one model only: a weak adapter moves the distributions less than 16-bit rounding
# of a base does, and an export that rounding has swamped would pass. An export without the
# adapter sits at a fraction of exactly 1, a doubled adapter above it.
# Measured on the default run (SmolLM2-135M, r=16; 4 prompts; the adapter's KL 4.3):
# bfloat16 0.04, a fraction of 0.01 (8 significant bits; max |Δlogit| 2.3 of logits up to
# 41, top-1 agreement 98%); float16 3e-5 (7e-6); float32 1e-15 (reassociation only). On the
# tiny test model bfloat16 measures 1e-5 of its adapter. bfloat16's 0.1 leaves 10x headroom
# for deeper bases, whose rounding adds up over more layers, and is still 10x below a lost
# adapter; float16 rounds 8x finer (KL, second order in the error, ~64x less): 0.01;
# float32 stores the merged weights as computed: 0.001, nothing but a wrong merge reaches it.
KL_FRACTION = {"float32": 1e-3, "float16": 0.01, "bfloat16": 0.1}
MERGE_LIMIT = 1e-3  # float32 merge vs unmerged, max |Δlogit|: reassociation only
RELOAD_LIMIT = 1e-3  # reloaded files vs the in-memory model at the same dtype
CHECK_FILE = "export_check.json"

PROMPTS = [
    [
        {
            "role": "user",
            "content": "Write the one-line docstring summary for this Python "
            "function.\n\ndef add(a, b):\n    return a + b\n",
        }
    ],
    [
        {
            "role": "user",
            "content": "Write the one-line docstring summary for this Python "
            "function.\n\ndef read_lines(path):\n    with open(path) as f:\n"
            "        return f.read().splitlines()\n",
        }
    ],
    "The quick brown fox jumps over the lazy dog. Python is a programming language that",
    "Exceptions are raised when an error is detected; the try statement",
]


class MergeCheckFailed(StageError):
    """The merged model was built but failed a check (a result to report, where a caller
    can go on without it); any other StageError of export_merged is bad input."""


def _encodings(tokenizer) -> list[dict]:
    out = []
    for p in PROMPTS:
        text = (
            tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
            if isinstance(p, list) and tokenizer.chat_template
            else p
            if isinstance(p, str)
            else p[0]["content"]
        )
        out.append(tokenizer(text, return_tensors="pt"))
    return out


@torch.no_grad()
def _logits(model, encodings: list[dict]) -> list[torch.Tensor]:
    dev = next(model.parameters()).device
    return [model(**{k: v.to(dev) for k, v in e.items()}).logits.float().cpu() for e in encodings]


def compare(reference: list[torch.Tensor], other: list[torch.Tensor]) -> dict:
    """Max |Δlogit|, mean |Δlogit|, max KL(reference || other) and top-1 agreement."""
    pairs = list(zip(reference, other, strict=True))
    # In float64: float32 log-probabilities carry ~1e-7 rounding each, which summed over a
    # vocabulary reads as a KL of ~5e-7 between identical distributions, a floor above what
    # float32 or float16 rounding of the weights costs.
    kl = [
        torch.nn.functional.kl_div(
            o.double().log_softmax(-1),
            r.double().log_softmax(-1),
            log_target=True,
            reduction="none",
        )
        .sum(-1)
        .max()
        .item()
        for r, o in pairs
    ]
    positions = sum(r.shape[1] for r in reference)
    return {
        "max_abs_logit_diff": max((r - o).abs().max().item() for r, o in pairs),
        "mean_abs_logit_diff": sum((r - o).abs().mean().item() for r, o in pairs) / len(pairs),
        "max_kl": max(kl),
        "top1_agreement": sum((r.argmax(-1) == o.argmax(-1)).sum().item() for r, o in pairs)
        / positions,
    }


def _card(adapter_dir: Path, dtype: str) -> str:
    card = (
        (adapter_dir / "README.md").read_text(encoding="utf-8")
        if (adapter_dir / "README.md").is_file()
        else ""
    )
    front = card.split("---\n")[1] if card.startswith("---\n") else ""
    base = next((ln for ln in front.splitlines() if ln.startswith("base_model:")), "")
    return (
        "---\n"
        + (base + "\n" if base else "")
        + "library_name: transformers\npipeline_tag: text-generation\n"
        + "tags:\n- merged\n- qlora\n---\n\n"
        + f"# Merged model ({dtype})\n\nThe base with the LoRA adapter from `{adapter_dir}` "
        + "merged into its weights: load it with `AutoModelForCausalLM.from_pretrained` alone. "
        + f"`{CHECK_FILE}` holds the check against base + adapter.\n"
    )


def check_target(
    out_dir: Path | str, replace: bool = False, protected: Sequence[Path | str] = ()
) -> None:
    """Refuse a `--merged` folder that overlaps `protected`, or is not empty (with
    `replace`: anything but the files of a previous merged export, as its CHECK_FILE lists
    them)."""
    check_output_dir(out_dir, replace, previous_merged_files, protected)


def previous_merged_files(out_dir: Path) -> dict[str, str] | None:
    """{name: sha256} of what a previous merged export wrote in out_dir (its CHECK_FILE
    lists the rest), or None when out_dir holds none."""
    check = out_dir / CHECK_FILE
    if not check.is_file():
        return None
    try:
        files = json.loads(check.read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(files, dict):
        return None  # an export from before the list was kept: its files are unknown
    return {**files, CHECK_FILE: sha256_of(check)}


def export_merged(
    adapter_dir: Path | str,
    out_dir: Path | str,
    base_dir: Path | str = BASE_MODEL_DIR,
    dtype: str = "bfloat16",
    trust_remote_code: bool = False,
    replace: bool = False,
    protected: Sequence[Path | str] = (),
) -> dict:
    """Merge, save to out_dir (safetensors + tokenizer + card), check; nothing is left in
    out_dir when a check fails. Returns the check's numbers. A non-empty out_dir is refused
    before any model is loaded, unless `replace` and it holds a previous merged export; it
    may not overlap the adapter, the base or any `protected` folder."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if dtype not in KL_FRACTION:
        raise StageError(f"--dtype {dtype!r}: choose one of {list(KL_FRACTION)}")
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    check_target(out_dir, replace, (adapter_dir, base_dir, *protected))
    check_adapter_base(adapter_dir, base_dir)
    tokenizer = load_tokenizer(base_dir, trust_remote_code)
    encodings = _encodings(tokenizer)
    model = PeftModel.from_pretrained(
        load_full(base_dir, "float32", trust_remote_code), str(adapter_dir), is_trainable=False
    )
    with model.disable_adapter():
        base = _logits(model, encodings)
    reference = _logits(model, encodings)
    merged = model.merge_and_unload()
    merge = compare(reference, _logits(merged, encodings))
    # The weights rounded to the export dtype, computed in float32: what the saved files
    # must give. Parameters only: buffers such as rotary frequencies are not saved but
    # recomputed on load, and rounding them here would be an error the files do not have.
    for param in merged.parameters():
        param.data = param.data.to(DTYPES[dtype]).to(torch.float32)
    at_dtype = _logits(merged, encodings)
    merged.to(DTYPES[dtype])
    with atomic_dir(out_dir, replace=replace) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(_card(adapter_dir, dtype), encoding="utf-8")
        for f in tmp.iterdir():
            f.chmod(0o644)  # some writers make private files; an export is meant to be shared
        # Loaded the way a user would, with nothing from this project, in float32 so the
        # comparison measures the stored weights, not a 16-bit matmul on this machine.
        reloaded = AutoModelForCausalLM.from_pretrained(
            str(tmp), dtype=torch.float32, use_safetensors=True
        )
        reloaded.eval()
        got = _logits(reloaded, encodings)
        end_to_end, adapter_effect = compare(reference, got), compare(reference, base)
        kl_limit = KL_FRACTION[dtype] * adapter_effect["max_kl"]
        result = {
            "dtype": dtype,
            "adapter": str(adapter_dir),
            "prompts": len(encodings),
            "merge": merge,
            "reload": compare(at_dtype, got),
            "end_to_end": end_to_end,
            "adapter_effect": adapter_effect,
            # The two numbers the end-to-end check weighs, side by side.
            "kl": {
                "export": end_to_end["max_kl"],
                "adapter": adapter_effect["max_kl"],
                "fraction_of_adapter": end_to_end["max_kl"] / max(adapter_effect["max_kl"], 1e-30),
            },
            "limits": {
                "merge": MERGE_LIMIT,
                "reload": RELOAD_LIMIT,
                "kl": kl_limit,
                "kl_fraction_of_adapter": KL_FRACTION[dtype],
            },
        }
        failures = []
        if merge["max_abs_logit_diff"] > MERGE_LIMIT:
            failures.append(
                f"the merged model's logits differ from base + adapter by "
                f"{merge['max_abs_logit_diff']:.3g} (limit {MERGE_LIMIT})"
            )
        if result["reload"]["max_abs_logit_diff"] > RELOAD_LIMIT:
            failures.append(
                f"{out_dir} reloaded with transformers differs from the merged model by "
                f"{result['reload']['max_abs_logit_diff']:.3g} (limit {RELOAD_LIMIT})"
            )
        if kl_limit == 0:
            failures.append(
                "the adapter does not change the base's next-token distributions (KL 0), so "
                "no check can tell its merge from none: export it with --adapter instead"
            )
        elif end_to_end["max_kl"] > kl_limit:
            failures.append(
                f"the {dtype} export's next-token distributions are a KL of "
                f"{end_to_end['max_kl']:.3g} from base + adapter; the limit is "
                f"{KL_FRACTION[dtype]:g} of the adapter's own effect, a KL of "
                f"{adapter_effect['max_kl']:.3g} between base and base + adapter"
            )
        if failures:
            raise MergeCheckFailed(
                "merged export failed its check, nothing written: " + "; ".join(failures)
            )
        result["passed"] = True
        # What this export wrote, so that `--replace` later removes these files and no other.
        result["files"] = {f.name: sha256_of(f) for f in sorted(tmp.iterdir())}
        write_json(tmp / CHECK_FILE, result)
    return result
