"""What a run records of the machine it ran on, and what differs between two such records."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from qlora.core.lineage import cpu_info, differences, environment

# The first processor of a Sapphire Rapids /proc/cpuinfo, shortened; the second is ignored.
CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse4_2 avx avx2 fma f16c avx512f avx512bw avx512_bf16 amx_bf16 amx_tile
bugs\t\t: spectre_v1

processor\t: 1
model name\t: something else
flags\t\t: fpu
"""
ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes sve bf16 i8mm
CPU implementer\t: 0x41
"""


def test_cpu_model_and_the_flags_that_choose_kernels(tmp_path: Path):
    (tmp_path / "cpuinfo").write_text(CPUINFO)
    model, flags = cpu_info(tmp_path / "cpuinfo")
    assert model == "Intel(R) Xeon(R) Platinum 8480+"
    assert flags == ["sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw"] + [
        "avx512_bf16",
        "amx_tile",
        "amx_bf16",
    ]
    (tmp_path / "arm").write_text(ARM_CPUINFO)
    assert cpu_info(tmp_path / "arm")[1] == ["asimd", "sve", "bf16", "i8mm"]
    assert cpu_info(tmp_path / "absent")[1] == []  # not Linux: no flags, no error


def test_environment_records_this_machine_as_json():
    env = environment()
    assert list(env) == [
        "cpu_model",
        "isa_flags",
        "torch",
        "torch_cuda",
        "mkldnn",
        "threads",
        "gpu",
        "python",
        "platform",
    ]
    assert env["torch"] == torch.__version__ and env["threads"] == torch.get_num_threads()
    assert env["python"] == platform.python_version()
    assert (env["gpu"] is None) == (not torch.cuda.is_available())
    assert json.loads(json.dumps(env)) == env


def test_differences_name_exactly_the_fields_that_differ():
    before = {"cpu_model": "A", "isa_flags": ["avx2", "avx512_bf16"], "torch": "2.5", "threads": 2}
    after = {"cpu_model": "B", "isa_flags": ["avx2", "amx_bf16"], "torch": "2.5", "threads": 8}
    assert differences(after, before) == [
        "cpu_model (A → B)",
        "isa_flags (amx_bf16, avx512_bf16)",
        "threads (2 → 8)",
    ]
    assert differences(after, dict(after)) == []
    assert differences(None, None) == []
    assert differences(after, None) == ["environment (recorded for this run only)"]
    assert differences(None, before) == ["environment (recorded for the other only)"]
