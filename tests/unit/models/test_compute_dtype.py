"""quantize.compute_dtype: auto on a CPU: bf16 where the CPU has bf16 units (AVX512-BF16 or
AMX), float32 elsewhere and wherever torch cannot tell; the choice and why in run.json."""

from __future__ import annotations

import json
import shutil
from html import escape as html_escape
from pathlib import Path

import pytest
import torch

from helpers.repo import FIXTURES_DIR, REPO
from qlora.models import loading
from qlora.train import recipe

CHECKS = tuple(loading.CPU_BF16_UNITS.values())  # AVX512-BF16's, then AMX's


@pytest.fixture
def cpu_only(monkeypatch):
    """A CPU-only torch whose bf16 checks say what a test sets: cpu_only(avx512_bf16=...,
    amx=...); None removes that check, as on a torch without it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def set_units(avx512_bf16: bool | None, amx: bool | None) -> None:
        for name, present in zip(CHECKS, (avx512_bf16, amx), strict=True):
            if present is None:
                monkeypatch.delattr(torch.cpu, name, raising=False)
            else:
                monkeypatch.setattr(torch.cpu, name, lambda present=present: present)

    return set_units


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "unit"),
    [(True, False, "AVX512-BF16"), (False, True, "AMX"), (True, True, "AVX512-BF16")],
)
def test_auto_computes_in_bf16_on_a_cpu_with_bf16_units(cpu_only, avx512_bf16, amx, unit):
    cpu_only(avx512_bf16, amx)
    dtype, why = loading.resolve_compute_dtype("auto")
    assert dtype == torch.bfloat16 and why.startswith("auto: ") and unit in why
    assert loading.compute_dtype("auto") == loading.compute_dtype() == torch.bfloat16


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "reason"),
    [
        (False, False, "no bf16 units"),
        (None, None, "cannot tell"),  # a torch without the checks
        (None, False, "cannot tell"),  # one check gone: whether AVX512-BF16 is there is unknown
    ],
)
def test_auto_stays_float32_on_a_cpu_without_bf16_or_unknown(cpu_only, avx512_bf16, amx, reason):
    cpu_only(avx512_bf16, amx)
    dtype, why = loading.resolve_compute_dtype("auto")
    assert dtype == torch.float32 and why.startswith("auto: ") and reason in why
    assert loading.compute_dtype() == torch.float32


@pytest.mark.parametrize("amx", [None, True])
def test_a_check_that_is_missing_still_lets_the_other_choose_bf16(cpu_only, amx):
    cpu_only(None, amx)
    expected = torch.bfloat16 if amx else torch.float32
    assert loading.resolve_compute_dtype("auto")[0] == expected


@pytest.mark.parametrize("name", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("units", [(True, True), (False, False)])
def test_an_explicit_dtype_passes_through_whatever_the_cpu(cpu_only, name, units):
    cpu_only(*units)
    expected = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    assert loading.resolve_compute_dtype(name) == (expected[name], "set in params.yaml")
    assert loading.compute_dtype(name) == expected[name]


def test_gpus_keep_their_choice_whatever_the_cpu(monkeypatch):
    """A GPU machine: bf16 where the GPU supports it, fp16 elsewhere, never asking the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in CHECKS:
        monkeypatch.setattr(torch.cpu, name, lambda: pytest.fail("the CPU was asked"))
    for bf16, expected in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda bf16=bf16: bf16)
        dtype, why = loading.resolve_compute_dtype("auto")
        assert dtype == expected and why.startswith("auto: ") and "GPU" in why


@pytest.mark.parametrize(
    ("units", "dtype", "reason"),
    [((True, False), "bfloat16", "AVX512-BF16"), ((False, False), "float32", "no bf16 units")],
)
def test_finetune_records_the_compute_dtype_and_why(
    workspace, cpu_only, monkeypatch, units, dtype, reason
):
    """run.json says which dtype the run computed in and why, and the model really trained
    in it (its 16-bit tensors, the embeddings among them, carry the compute dtype)."""
    import yaml

    from qlora.train import log_layout
    from stages import finetune

    params_file = workspace / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["quantize"]["compute_dtype"] = "auto"  # as shipped, whatever the test params say
    params_file.write_text(yaml.safe_dump(params))
    cpu_only(*units)
    loaded: list[torch.dtype] = []
    real = recipe.load_quantized

    def spy(*args, **kwargs):
        model = real(*args, **kwargs)
        loaded.append(model.get_input_embeddings().weight.dtype)
        return model

    monkeypatch.setattr(recipe, "load_quantized", spy)
    finetune.main()
    run = json.loads((workspace / "reports/train/run.json").read_text())
    assert run["compute_dtype"] == dtype and loaded == [getattr(torch, dtype)]
    assert run["compute_dtype_why"].startswith("auto: ") and reason in run["compute_dtype_why"]
    # What the report reads: run.json merged with the DVCLive summary.
    view = log_layout.training_view(workspace / "reports/train")
    assert view["compute_dtype_why"] == run["compute_dtype_why"]


FIXTURES = FIXTURES_DIR / "report"


def rendered_report(tmp_path: Path, why: str | None) -> tuple[str, str]:
    """The report of the fixture run, its run.json given a training path and `why` (None:
    a run.json from before the why was recorded)."""
    from qlora.report.build import render_report

    shutil.copytree(FIXTURES / "reports", tmp_path / "reports")
    shutil.copy(FIXTURES / "dvc_lock.yaml", tmp_path / "dvc.lock")
    shutil.copy(FIXTURES / "params.yaml", tmp_path / "params.yaml")
    run_file = tmp_path / "reports/train/run.json"
    run = json.loads(run_file.read_text())
    assert "compute_dtype_why" not in run  # the fixture is an older run's record
    # The training path as finetune records it (the fixture predates it).
    run["batching"] = "group_by_length"
    run["loss"] = {"kind": "chunked", "why": "auto: labelled positions only"}
    run["gradient_checkpointing"] = {"on": False, "why": "auto: within half the memory"}
    if why is not None:
        run["compute_dtype_why"] = why
    run_file.write_text(json.dumps(run))
    html, md = tmp_path / "report.html", tmp_path / "report.md"
    render_report(tmp_path / "reports", html, md, root=tmp_path)
    return html.read_text(encoding="utf-8"), md.read_text(encoding="utf-8")


def test_the_report_shows_the_compute_dtype_and_why_beside_checkpointing(tmp_path):
    from qlora.report.text import md_text

    why = "auto: this CPU has AVX512-BF16 (bf16 matmuls run at <native> speed)"
    html, md = rendered_report(tmp_path, why)
    html_line = next(line for line in html.splitlines() if "gradient checkpointing" in line)
    assert f"float32 compute ({html_escape(why, quote=False)})" in html_line
    md_line = next(line for line in md.splitlines() if line.startswith("Training path:"))
    assert f"float32 compute ({md_text(why)})" in md_line


def test_the_report_of_an_older_run_shows_no_why(tmp_path):
    html, md = rendered_report(tmp_path / "old", None)
    assert " compute (" not in md.split("Training path:")[1].splitlines()[0]
    assert "float32 compute (" not in html


# ---------------------------------------------------------------- the training benchmark


def test_the_benchmark_counts_the_decoder_layers_linear_weights(tiny_model_dir):
    """N of the MFU formula against the weights of a real Llama (conftest's tiny one)."""
    from transformers import AutoModelForCausalLM

    from benchmarks.train import linear_parameters

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    c = model.config
    assert c.num_key_value_heads < c.num_attention_heads  # k and v narrower than q
    weights = sum(
        m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)
    )
    shape = c.to_dict()
    assert linear_parameters(shape, c.num_hidden_layers) == weights
    assert linear_parameters(shape, 1) * c.num_hidden_layers == weights


def test_the_matmul_peak_times_each_layer_shape_in_the_dtype(monkeypatch):
    """Each shape's rate is its 2 x tokens x in x out FLOPs over its best time, the time of a
    product of that shape in the side's dtype; the peak is the best rate."""
    from benchmarks import side

    seconds = [0.5, 0.25, 2.0]  # the three shapes' best times, in the order they are timed
    products = []

    def timed(fn, repeats=5):
        out = fn()
        products.append((tuple(out.shape), out.dtype))
        return seconds[len(products) - 1]

    monkeypatch.setattr(side, "best_seconds", timed)
    got = side.matmul_peak(torch.bfloat16, tokens=7, hidden=6, intermediate=10)
    assert products == [
        ((7, 6), torch.bfloat16),
        ((7, 10), torch.bfloat16),
        ((7, 6), torch.bfloat16),
    ]
    rates = {
        "7x6x6": 2 * 7 * 6 * 6 / 0.5,
        "7x6x10": 2 * 7 * 6 * 10 / 0.25,
        "7x10x6": 2 * 7 * 10 * 6 / 2.0,
    }
    assert got["flops_per_s"] == pytest.approx(rates)
    assert got["peak_flops_per_s"] == pytest.approx(2 * 7 * 6 * 10 / 0.25)
    assert got["dtype"] == "bfloat16" and got["threads"] == torch.get_num_threads()


def test_best_seconds_is_the_fastest_call_after_a_warm_up(monkeypatch):
    from benchmarks import side

    clock = iter([0.0, 3.0, 10.0, 11.0, 20.0, 22.0])  # calls of 3, 1 and 2 s
    monkeypatch.setattr(side.time, "perf_counter", lambda: next(clock))
    calls = []
    assert side.best_seconds(lambda: calls.append(1), repeats=3) == 1.0
    assert len(calls) == 4  # the warm-up is not timed


RECORD = REPO / "benchmarks/results/smollm2-135m-cpu-seq512.json"


def made_before_mfu(record: dict) -> dict:
    """A benchmark record as runs made before MFU and the capability line wrote it."""
    for key in ("capability", "model_flops"):
        record.pop(key, None)
    for side in record["results"].values():
        for key in ("matmul", "model_flops_per_s", "mfu"):
            side.pop(key, None)
    return record


def test_the_benchmark_table_shows_mfu_and_what_it_ran_on(cpu_only, monkeypatch):
    """A run's record gains each side's MFU (its model FLOP/s over its own matmul peak) and
    the machine's bf16 capability; a record made before them still renders, with dashes."""
    from benchmarks import train
    from qlora.core import lineage

    old = made_before_mfu(json.loads(RECORD.read_text()))
    assert "| - | - | - |" in train.table(old).splitlines()[2]
    assert "Capability" not in train.section(old)

    cpu_only(True, False)
    monkeypatch.setattr(lineage, "cpu_info", lambda: ("Some EPYC", ["avx2", "avx512_bf16"]))
    where = train.capability()
    assert where["bf16_flags"] == ["avx512_bf16"] and where["torch_bf16_units"] == ["AVX512-BF16"]
    assert (where["compute_dtype"], where["why"]) == ("bfloat16", loading.cpu_compute_dtype()[1])

    new = made_before_mfu(json.loads(RECORD.read_text()))
    n = train.linear_parameters(train.ARCHS["smollm2-135m"], 30)
    qlora = new["results"]["qlora"]
    qlora["matmul"] = {"dtype": "bfloat16", "peak_flops_per_s": 200e9}
    qlora.update(train.utilisation(qlora, train.FLOPS_PER_WEIGHT * n))
    assert qlora["mfu"] == pytest.approx(qlora["tokens_per_s"] * 4 * n / 200e9)
    new.update(
        capability=where,
        model_flops={"linear_parameters": n, "per_token": 4 * n, "formula": train.MFU_FORMULA},
    )
    row = train.table(new).splitlines()[2]
    cells = [c.strip() for c in row.split("|")]
    model_gflops = qlora["tokens_per_s"] * 4 * n / 1e9
    assert cells[4:7] == [f"{model_gflops:,.0f}", "200 (bfloat16)", f"{qlora['mfu']:.1%}"]
    section = train.section(new)
    assert "Capability: Some EPYC; bf16 flags in /proc/cpuinfo: avx512_bf16" in section
    assert f"here N = {n:,}" in section and "4 x N per trained token" in section
