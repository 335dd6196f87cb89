"""The GGUF export: llama.cpp's converter, quantizer and LoRA converter, and the llama.cpp
model lm-eval scores them with, each checked against an independent load of the same
weights in transformers / peft (the ground truth), plus the parity rule on known numbers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from helpers.tiny import make_adapter
from qlora.core.io import StageError
from qlora.export import gguf
from qlora.export.parity import judge

CONTEXT = (
    "<|im_start|>user\nWrite the one-line docstring summary for this Python function.\n\n"
    "def add(a, b):\n    return a + b\n<|im_end|>\n<|im_start|>assistant\n"
)
ANSWERS = ["Return the sum of a and b.<|im_end|>", "Add two numbers.<|im_end|>", " plus"]
PROSE = "Exceptions are raised when an error is detected; the try statement handles them. " * 12


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "adapter")


@pytest.fixture(scope="module")
def gguf_files(tiny_model_dir, tiny_adapter, tmp_path_factory) -> dict[str, Path]:
    """The tiny base in f32 and q8_0, and the adapter as a f32 GGUF LoRA."""
    out = tmp_path_factory.mktemp("gguf")
    f32 = gguf.convert_model(tiny_model_dir, out / "base-f32.gguf", "f32", pre_tokenizer="gpt-2")
    return {
        "f32": f32,
        "q8_0": gguf.quantize(f32, out / "base-q8_0.gguf", "q8_0"),
        "q4_k_m": gguf.quantize(f32, out / "base-q4_k_m.gguf", "q4_k_m"),
        "lora": gguf.convert_lora(tiny_adapter, tiny_model_dir, out / "lora-f32.gguf", "f32"),
    }


def instances(kind: str, args: list[tuple]):
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def hf_lm(model_dir: Path, adapter: Path | None = None):
    """lm-eval's own transformers model on the same weights, in float32."""
    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    return HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(model_dir), batch_size=2)


def llama_lm(model: Path, lora: Path | None = None):
    from qlora.export.llama_lm import LlamaCppLM

    return LlamaCppLM(model, lora, n_ctx=512, threads=2)


def test_llama_cpp_scores_a_gguf_as_lm_eval_scores_the_same_weights_in_transformers(
    tiny_model_dir, gguf_files
):
    ours, reference = llama_lm(gguf_files["f32"]), hf_lm(tiny_model_dir)
    try:
        pairs = instances("loglikelihood", [(CONTEXT, a) for a in ANSWERS])
        got, want = ours.loglikelihood(pairs), reference.loglikelihood(pairs)
        for (g, g_greedy), (w, w_greedy) in zip(got, want, strict=True):
            assert g == pytest.approx(w, abs=2e-3)
            assert g_greedy == w_greedy
        # Both windowed at the tiny model's 512 positions: the same windows, the same sum.
        rolling = instances("loglikelihood_rolling", [(PROSE,)])
        assert ours.loglikelihood_rolling(rolling)[0] == pytest.approx(
            reference.loglikelihood_rolling(rolling)[0], rel=1e-4
        )
        gen = instances(
            "generate_until", [(CONTEXT, {"until": ["<|im_end|>"], "max_gen_toks": 10})]
        )
        assert ours.generate_until(gen) == reference.generate_until(gen)
    finally:
        ours.close()


def test_a_gguf_lora_applied_at_load_time_scores_as_the_peft_adapter(
    tiny_model_dir, tiny_adapter, gguf_files
):
    pairs = instances("loglikelihood", [(CONTEXT, a) for a in ANSWERS])
    with_lora = llama_lm(gguf_files["f32"], gguf_files["lora"])
    try:
        got = [x for x, _ in with_lora.loglikelihood(pairs)]
    finally:
        with_lora.close()
    want = [x for x, _ in hf_lm(tiny_model_dir, tiny_adapter).loglikelihood(pairs)]
    base = [x for x, _ in hf_lm(tiny_model_dir).loglikelihood(pairs)]
    assert got == pytest.approx(want, abs=2e-3)
    # The adapter moves these scores by far more than the tolerance: it was applied.
    assert max(abs(w - b) for w, b in zip(want, base, strict=True)) > 0.1


def test_quantized_files_are_smaller_and_score_close_to_full_precision(gguf_files):
    sizes = {k: gguf_files[k].stat().st_size for k in ("f32", "q8_0", "q4_k_m")}
    assert sizes["f32"] > sizes["q8_0"] > sizes["q4_k_m"]
    pairs = instances("loglikelihood", [(CONTEXT, a) for a in ANSWERS])
    scores = {}
    for kind in ("f32", "q8_0"):
        lm = llama_lm(gguf_files[kind])
        try:
            scores[kind] = [x for x, _ in lm.loglikelihood(pairs)]
        finally:
            lm.close()
    # 8-bit rounding of a random model: close, not equal.
    assert scores["q8_0"] == pytest.approx(scores["f32"], rel=0.05)
    assert scores["q8_0"] != scores["f32"]


def test_unknown_types_and_a_tokenizer_the_converter_does_not_know_are_named(
    tiny_model_dir, tmp_path, gguf_files
):
    with pytest.raises(StageError, match="q3_x"):
        gguf.quantize(gguf_files["f32"], tmp_path / "x.gguf", "q3_x")
    with pytest.raises(StageError, match="export.pre_tokenizer"):
        gguf.convert_model(tiny_model_dir, tmp_path / "y.gguf", "f16")
    # Nothing half-written is left where the outputs were to be.
    assert list(tmp_path.iterdir()) == []


def test_every_artifact_is_built_with_its_manifest_and_a_failure_writes_nothing(
    workspace, tiny_adapter
):
    from qlora.core import paths
    from qlora.core.io import read_json, sha256_of
    from qlora.core.params import load_params
    from qlora.export.build import build_gguf

    p = load_params().export
    manifest = build_gguf(p, tiny_adapter, paths.BASE_MODEL_DIR, paths.GGUF_DIR)
    assert manifest == read_json(paths.GGUF_MANIFEST)
    on_disk = sorted(f.name for f in paths.GGUF_DIR.iterdir())
    assert on_disk == sorted([*manifest["files"], "manifest.json"])
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_of(paths.GGUF_DIR / name)
    assert set(manifest["artifacts"]) == {
        "merged-f16", "merged-q8_0", "merged-q4_k_m", "base-f16+lora",
    }  # fmt: skip
    assert manifest["artifacts"]["base-f16+lora"]["lora"] == "adapter-f16.gguf"
    before = {f.name: sha256_of(f) for f in paths.GGUF_DIR.iterdir()}
    with pytest.raises(StageError, match="export.pre_tokenizer"):
        build_gguf(p.model_copy(update={"pre_tokenizer": None}), tiny_adapter,
                   paths.BASE_MODEL_DIR, paths.GGUF_DIR)  # fmt: skip
    # The good files are untouched and no temporary folder is left beside them.
    assert {f.name: sha256_of(f) for f in paths.GGUF_DIR.iterdir()} == before
    assert [f.name for f in paths.GGUF_DIR.parent.iterdir() if f.name.startswith(".gguf")] == []


@pytest.mark.parametrize(
    ("value", "stderr", "passed", "within_noise"),
    [
        (1.02, 0.01, True, False),  # 2% worse, limit 5%
        (1.20, 0.01, False, False),  # 20% worse, beyond the noise
        (1.20, 0.20, True, True),  # 20% worse, but the interval is ±0.55
        (0.90, 0.01, True, False),  # better
    ],
)
def test_parity_limits_the_relative_loss_of_the_primary_metric_beyond_the_noise(
    value, stderr, passed, within_noise
):
    ref = {"value": 1.0, "stderr": 0.01, "higher_is_better": False}
    got = {"value": value, "stderr": stderr, "higher_is_better": False}
    verdict = judge("merged-q4_k_m", got, ref, max_loss=0.05, significance=True)
    assert verdict["passed"] is passed
    assert verdict["relative_loss"] == pytest.approx(value - 1.0)
    assert verdict["ci95_relative_half_width"] == pytest.approx(1.96 * math.hypot(0.01, stderr))
    assert ("within the noise" in verdict["reason"]) is within_noise
    strict = judge("merged-q4_k_m", got, ref, max_loss=0.05, significance=False)
    assert strict["passed"] is (value - 1.0 <= 0.05)
