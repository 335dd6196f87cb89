"""Several training processes (data parallel, DDP), launched by accelerate.

`finetune.processes` (1 | N | auto) says how many processes train one adapter; each holds a
copy of the 4-bit base and its LoRA adapters, trains on its share of every batch, and the
gradients are averaged across processes before each optimizer step (DDP: gloo on CPUs, NCCL
on GPUs). The DVC stage stays `python -m stages.finetune`: when more than one process is
asked for, that command relaunches itself through `accelerate launch` (accelerate's
torch.distributed launcher) and waits for the processes to finish. An accelerate config
file (`finetune.accelerate_config`, e.g. FSDP for a model larger than one GPU) is passed to
the same launcher.

The recipe does not change with the number of processes: `finetune.batch_size` is the batch
of one forward pass over all processes together (each process takes batch_size / processes
rows), so the effective batch, batch_size x gradient_accumulation_steps, is what
params.yaml says whatever the process count. Only the main process (rank 0) writes
outputs, checkpoints and logs.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora.core.io import StageError
from qlora.core.params import FinetuneParams, Params
from qlora.models.loading import compute_dtype

# Set by torch.distributed's launcher (accelerate launch runs it) in every process it starts.
WORLD_SIZE_ENV = "WORLD_SIZE"
RANK_ENV = "RANK"


def world_size() -> int:
    """Processes training together: 1 unless this process was started by a launcher."""
    return int(os.environ.get(WORLD_SIZE_ENV, "1"))


def is_main_process() -> bool:
    return int(os.environ.get(RANK_ENV, "0")) == 0


def resolve_processes(choice: int | str) -> int:
    """`auto`: one process per CUDA GPU. On a CPU, one: the processes would share the same
    cores, and each holds its own copy of the model, so DDP only adds work there (it is
    still supported, and tested, with an explicit count)."""
    if choice != "auto":
        return int(choice)
    return max(1, torch.cuda.device_count())


@dataclass(frozen=True)
class Layout:
    """How one optimizer step's batch is spread: the report shows it."""

    processes: int
    per_process_batch: int
    accumulation: int

    @property
    def effective_batch(self) -> int:
        return self.per_process_batch * self.processes * self.accumulation


def layout(p: FinetuneParams, processes: int) -> Layout:
    if p.batch_size % processes:
        raise StageError(
            f"finetune.batch_size={p.batch_size} does not split evenly over {processes} "
            f"processes (finetune.processes={p.processes!r}): make batch_size a multiple of "
            "the process count (it is the batch of all processes together)"
        )
    return Layout(processes, p.batch_size // processes, p.gradient_accumulation_steps)


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG).

    torch.distributed's launcher starts the training processes in sessions of their own, so
    a job killed as a whole (its process group, as a scheduler or Prefect cancels it) would
    leave them training on, and racing the rerun for the checkpoint folder. With this in
    the launcher and in every training process, killing the stage's process ends all of
    them. A no-op where prctl does not exist (not Linux)."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the request took effect
        os._exit(1)


def free_port() -> int:
    """A free TCP port on the loopback address for the processes' rendezvous: the default
    (29500) would collide with a second run on the same machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_command(module: str, processes: int, config_file: Path | None) -> list[str]:
    """`accelerate launch` of `python -m module` in `processes` processes. `--multi_gpu` is
    accelerate's name for its torch.distributed launcher: on a machine without GPUs it starts
    CPU processes joined by gloo (accelerate's `--cpu` would start only one)."""
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file is not None:
        command += ["--config_file", str(config_file)]
    else:
        command += ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += [
        "--num_machines",
        "1",
        "--num_processes",
        str(processes),
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(free_port()),
        "-m",
        module,
    ]
    return command


def needs_launch(p: FinetuneParams) -> bool:
    """True in the stage's first process when the params ask for more than it alone."""
    if world_size() > 1:
        return False  # already one of the launched processes
    return resolve_processes(p.processes) > 1 or p.accelerate_config is not None


def check_accelerate_config(params: Params, config: Path) -> None:
    """Read the file with accelerate's own loader, and refuse FSDP with 4-bit weights stored
    in another dtype than the model's: FSDP flattens each module's tensors into one buffer
    of one float dtype, so uint8-stored weights fail to wrap ("Cannot flatten integer dtype
    tensors", tested on a CPU) and a mismatched float dtype wraps every layer alone."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    if not config.is_file():
        raise StageError(f"finetune.accelerate_config: no file {config}")
    try:
        loaded = load_config_from_file(str(config))
    except (ValueError, TypeError, KeyError) as e:
        raise StageError(f"finetune.accelerate_config {config}: {e}") from None
    if loaded.distributed_type != DistributedType.FSDP:
        return
    model_dtype = str(compute_dtype(params.quantize.compute_dtype)).removeprefix("torch.")
    if params.quantize.quant_storage != model_dtype:
        raise StageError(
            f"finetune.accelerate_config {config} shards the model with FSDP, which needs "
            f"quantize.quant_storage equal to the model's dtype ({model_dtype}, from "
            f"quantize.compute_dtype={params.quantize.compute_dtype!r}); it is "
            f"{params.quantize.quant_storage!r}"
        )


def relaunch(params: Params, module: str) -> None:
    """Run `module` again under accelerate launch and wait; a failed process fails the stage
    (each process prints its own error first)."""
    p = params.finetune
    processes = resolve_processes(p.processes)
    config = Path(p.accelerate_config) if p.accelerate_config else None
    if config is not None:
        check_accelerate_config(params, config)
    layout(p, processes)  # a bad split fails here, before any process starts
    print(f"launching {processes} training processes (accelerate launch)", flush=True)
    # No OpenMP oversubscription: torch.distributed's launcher would set 1 thread per
    # process; each process gets its share of the cores instead.
    threads = max(1, (os.cpu_count() or 1) // processes)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
    done = subprocess.run(
        launch_command(module, processes, config), env=env, preexec_fn=die_with_parent
    )
    if done.returncode != 0:
        raise StageError(
            f"{processes} training processes: one exited with status {done.returncode} (its "
            "message is above)"
        )
