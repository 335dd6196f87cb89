"""The GGUF export: llama.cpp's converter, quantizer and LoRA converter, and the llama.cpp
model lm-eval scores them with, each checked against an independent load of the same
weights in transformers / peft (the ground truth), plus the parity rule on known numbers."""

from __future__ import annotations

import json
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


def every_kind(export):
    """The workspace's export settings with the shipped params.yaml's kinds of artifact (the
    tiny params build fewer, to keep the DAG runs short)."""
    import yaml

    from helpers.repo import REPO

    shipped = yaml.safe_load((REPO / "params.yaml").read_text())["export"]
    return export.model_copy(update={k: shipped[k] for k in ("gguf_types", "lora")})


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


@pytest.mark.parametrize("amx", [True, False])
def test_on_an_amx_build_llama_cpp_loads_without_its_extra_buffer_types(gguf_files, amx):
    """ggml's AMX kernels crash on the 8-bit tiny model (a segmentation fault on a Xeon
    with AMX): an AMX build loads with the extra buffer types off, any other keeps them."""
    import llama_cpp

    from qlora.export import llama_open

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(llama_open, "amx_build", lambda: amx)
        llm = llama_open.open_llama(gguf_files["f32"], n_ctx=64, verbose=False)
    try:
        assert llm.model_params.use_extra_bufts is (not amx)
    finally:
        llm.close()
    # Only that load: the library's defaults are its own again.
    assert llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts is True


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
    from qlora.export.build import build_gguf, gguf_folder

    p = every_kind(load_params().export)
    with gguf_folder(paths.GGUF_DIR, replace=False) as tmp:
        manifest = build_gguf(p, tiny_adapter, paths.BASE_MODEL_DIR, tmp)
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
        with gguf_folder(paths.GGUF_DIR, replace=True) as tmp:
            build_gguf(p.model_copy(update={"pre_tokenizer": None}), tiny_adapter,
                       paths.BASE_MODEL_DIR, tmp)  # fmt: skip
    # The good files are untouched and no temporary folder is left beside them.
    assert {f.name: sha256_of(f) for f in paths.GGUF_DIR.iterdir()} == before
    assert [f.name for f in paths.GGUF_DIR.parent.iterdir() if f.name.startswith(".gguf")] == []
    # A folder holding anything but a previous export's unchanged files is not replaced.
    (paths.GGUF_DIR / "notes.txt").write_text("mine")
    with pytest.raises(StageError, match="notes.txt"):
        with gguf_folder(paths.GGUF_DIR, replace=True):
            pass
    assert (paths.GGUF_DIR / "notes.txt").read_text() == "mine"


def test_a_merge_its_check_refuses_is_reported_unbuilt_and_the_lora_route_still_built(
    workspace, tiny_model_dir, tmp_path
):
    """An adapter a learning rate barely moved: float16 rounding of the merged weights
    swamps its effect, so the merge check cannot confirm it. The export stage must still
    succeed (the gate rejects such an adapter; the run goes on to its report), with the
    merged artifacts failed for that reason and never deployable."""
    from qlora.core import paths
    from qlora.core.params import load_params
    from qlora.export.build import build_gguf, gguf_folder
    from qlora.export.parity import parity_report
    from qlora.report.deploy import deploy_section
    from qlora.schemas.base import validated
    from qlora.schemas.export import GgufEval, GgufManifest, ParityReport

    weak = make_adapter(tiny_model_dir, tmp_path / "weak", scale=1e-9)
    params = load_params()
    with gguf_folder(paths.GGUF_DIR, replace=False) as tmp:
        manifest = build_gguf(every_kind(params.export), weak, paths.BASE_MODEL_DIR, tmp)
    validated(GgufManifest, manifest, paths.GGUF_MANIFEST)
    merged = {"merged-f16", "merged-q8_0", "merged-q4_k_m"}
    assert set(manifest["failed"]) == merged
    assert all("failed its check" in why for why in manifest["failed"].values())
    assert manifest["merge_check"]["passed"] is False
    assert set(manifest["artifacts"]) == {"base-f16+lora"}
    assert sorted(f.name for f in paths.GGUF_DIR.iterdir()) == [
        "adapter-f16.gguf", "base-f16.gguf", "manifest.json",
    ]  # fmt: skip

    # Bad input is still an error, not a failed artifact: an adapter of another base.
    (weak / "base_identity.json").write_text('{"weights_sha256": "%s"}' % ("0" * 64))
    with pytest.raises(StageError, match="trained on a base with weights 0000"):
        with gguf_folder(paths.GGUF_DIR, replace=True) as tmp:
            build_gguf(every_kind(params.export), weak, paths.BASE_MODEL_DIR, tmp)
    assert json.loads(paths.GGUF_MANIFEST.read_text()) == manifest  # the last good one

    primary = {"value": 1.2, "stderr": 0.01, "higher_is_better": False}
    metrics = {"variants": {paths.CANDIDATE: {"metrics": {"docstring_loss": {
        "bits_per_byte": primary}}}}}  # fmt: skip
    gguf_eval = {"settings": {}, "artifacts": {}, "failed": manifest["failed"]}
    report = parity_report(gguf_eval, metrics, params)
    validated(ParityReport, report, paths.PARITY_REPORT)
    assert report["deployable"] == [] and report["summary"] == {"passed": 0, "failed": 3}
    for name in merged:
        assert report["artifacts"][name]["passed"] is False
        assert report["artifacts"][name]["reason"].startswith("FAIL: not exported: ")
    section = deploy_section(
        validated(GgufEval, gguf_eval, paths.GGUF_EVAL), validated(ParityReport, report, "p")
    )
    rows = {a["name"]: a for a in section["artifacts"]}
    assert set(rows) == merged
    assert all(r["passed"] is False and r["file_bytes"] is None for r in rows.values())


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


def test_missing_converters_say_how_to_install_them(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("QLORA_LLAMA_CPP_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(StageError, match="make install.*QLORA_LLAMA_CPP_DIR"):
        gguf.convert_model(tiny_model_dir, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_the_installed_converters_are_the_engines_own_release():
    from qlora.core.io import read_json
    from qlora.export import converters

    marker = read_json(converters.converter_dir() / converters.VERSION_FILE)
    assert marker["llama_cpp_python"] == converters.installed_version()
