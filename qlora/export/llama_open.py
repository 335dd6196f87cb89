"""Opening a GGUF file with llama-cpp-python: the one place the engine's load options are
set, for the eval_gguf stage's lm-eval model and `qlora serve --engine llama.cpp` alike.

llama-cpp-python compiles llama.cpp for the machine it is installed on. On a CPU with AMX
(Intel Xeon since Sapphire Rapids) that build holds ggml's AMX kernels, which take over the
matrix products of 4- and 8-bit weights (q4_0 ... q8_0, q4_k ...) through an "extra buffer
type". Those kernels crash: on such a Xeon, the first evaluation of a q8_0 or q4_k_m
file ended in a segmentation fault, for the default run's SmolLM2-135M and for the test
suite's tiny Llama alike, while the same files ran with the extra buffer types off (and
llama.cpp's own tracker has reports of AMX segfaults and wrong numbers on other models).
So on an AMX build the extra buffer types are turned off: llama.cpp then computes with its
AVX-512 code, as on any other x86 CPU. Elsewhere they stay on: there they are llama.cpp's
weight repacking, a speed-up that works.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from pathlib import Path

_PATCH = threading.Lock()  # the defaults are module state: one load at a time changes them


@functools.cache
def amx_build() -> bool:
    """Whether this process's llama.cpp was built with its AMX kernels."""
    import llama_cpp

    return b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()


@contextlib.contextmanager
def _without_extra_buffer_types() -> Iterator[None]:
    """llama-cpp-python's Llama takes no option for them: the model defaults it starts from
    are changed for the duration of one load."""
    import llama_cpp.llama_cpp as lib

    with _PATCH:
        default = lib.llama_model_default_params

        def without_extra_buffers():
            params = default()
            params.use_extra_bufts = False
            return params

        lib.llama_model_default_params = without_extra_buffers
        try:
            yield
        finally:
            lib.llama_model_default_params = default


def open_llama(model_path: Path | str, lora_path: Path | str | None = None, **options):
    """`llama_cpp.Llama` on `model_path` (with the GGUF LoRA `lora_path` applied at load
    time), its extra buffer types off on an AMX build; `options` are Llama's own."""
    import llama_cpp

    with _without_extra_buffer_types() if amx_build() else contextlib.nullcontext():
        return llama_cpp.Llama(
            model_path=str(model_path),
            lora_path=None if lora_path is None else str(lora_path),
            **options,
        )
