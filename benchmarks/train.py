"""Training speed and memory, side by side in one run: the finetune stage's QLoRA path as
shipped, LoRA on the 16-bit base with the same settings, the reference QLoRA recipe, and
the project's previous default.

    make bench                                   # the embedded model's shape, this device
    python -m benchmarks.train --arch llama-3-8b --seq 512 --batch 4    # on a GPU

Every side trains the same synthetic rows (random tokens, lengths spread between a fifth of
--seq and --seq, the first half or so of each row a masked prompt, as in the corpus) for
one epoch at the same batch size, so each trains the same tokens. A randomly initialised
model of a real architecture stands in for the real weights: weights do not change speed
or memory, and nothing is downloaded. Each side runs in its own process (benchmarks/side.py)
so its peak memory is its own: resident set size on a CPU, max allocated and max reserved
on a GPU, model loading included.

Each side also reports its model FLOP utilisation (MFU): model FLOPs per second (4 x the
decoder layers' linear weights per trained token: MFU_FORMULA) over the best matmul rate
that side's own process measured in its compute dtype at the model's shapes. The run says
what it ran on: the CPU or GPU, its bf16 units, and the compute dtype auto chose there.

Prints a table with the ratios and writes benchmarks/results/<arch>-<device>-seq<N>.json;
benchmarks/RESULTS.md is rebuilt from every result file there, with device, versions and
the command that produced each.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from qlora.core.lineage import package_versions

HERE = Path(__file__).parent
RESULTS_DIR = HERE / "results"
RESULTS_MD = HERE / "RESULTS.md"
SIDES = ("qlora", "qlora-no-ckpt", "lora16", "reference", "previous")

# Real architectures' shapes (config.json of each model).
ARCHS: dict[str, dict] = {
    "smollm2-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
        rope_theta=100000.0,
    ),
    "llama-3.2-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
        rope_theta=500000.0,
    ),
    "llama-3-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
        rope_theta=500000.0,
    ),
}


def build_model(arch: str, layers: int | None, out: Path) -> None:
    """A randomly initialised Llama of `arch`'s shape, saved as bf16 safetensors with a
    tokenizer (the embedded model's, whose ids fit every vocabulary here)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora.models.loading import load_tokenizer

    shape = dict(ARCHS[arch], max_position_embeddings=8192)
    if layers:
        shape["num_hidden_layers"] = layers
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**shape)).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer_source = embedded_tokenizer_dir()
    if tokenizer_source is not None:
        load_tokenizer(tokenizer_source).save_pretrained(out)
    else:  # a machine without the pipeline's base model (an offline GPU box)
        from tokenizers import Tokenizer, models
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1}, "<unk>")),
            pad_token="<pad>",
            unk_token="<unk>",
        )
        tok.save_pretrained(out)


# Model FLOPs of LoRA training on a frozen base, per trained token: the forward pass, 2N, and
# the activation gradients, 2N; the base's weights get no gradient, so none of full
# training's other 2N (6N in all). N counts the decoder layers' linear weights: the
# embedding lookup computes nothing, and the head is left out with it because the chunked
# loss runs it on labelled positions only (counting it would credit a side for logits it
# need not compute). Left out too: LoRA's own FLOPs (6 per adapter weight: about 7 % more
# at r 16 on every linear layer of SmolLM2-135M) and attention scores (under 10 % more for
# that shape at 512 tokens). So MFU is slightly understated, alike for every side.
MFU_FORMULA = (
    "model FLOPs = 4 x N per trained token (forward 2N + activation gradients 2N; the frozen "
    "base has no weight gradients), N = the decoder layers' linear weights (embeddings and "
    "head excluded); MFU = model FLOP/s over the best matmul rate measured in the side's own "
    "process, compute dtype and threads"
)
FLOPS_PER_WEIGHT = 4  # per trained token: the 4 of MFU_FORMULA
BF16_FLAGS = ("avx512_bf16", "amx_tile", "amx_bf16")  # /proc/cpuinfo's names


def linear_parameters(shape: dict, layers: int) -> int:
    """N of MFU_FORMULA for a Llama of `shape`: per layer the q and o projections (hidden x
    hidden), k and v (hidden x the key-value heads' width) and the MLP's gate, up and down
    (hidden x intermediate each). Llama's linear layers have no bias."""
    hidden, inner = shape["hidden_size"], shape["intermediate_size"]
    kv_width = hidden // shape["num_attention_heads"] * shape["num_key_value_heads"]
    return layers * (2 * hidden * hidden + 2 * hidden * kv_width + 3 * hidden * inner)


def utilisation(result: dict, flops_per_token: int) -> dict:
    """A side's model FLOP/s and its MFU against the matmul peak its process measured."""
    flops = result["tokens_per_s"] * flops_per_token
    return {"model_flops_per_s": flops, "mfu": flops / result["matmul"]["peak_flops_per_s"]}


def capability() -> dict:
    """What the run's speed rests on: the CPU (or GPU), its bf16 units by /proc/cpuinfo and
    by torch's checks, and the compute dtype that params.yaml's quantize.compute_dtype
    resolves to here, with why."""
    from qlora.core.lineage import cpu_info
    from qlora.core.params import shipped_params
    from qlora.models.loading import cpu_bf16_units, resolve_compute_dtype

    cpu_model, flags = cpu_info()
    units, unknown = cpu_bf16_units()
    dtype, why = resolve_compute_dtype(shipped_params().quantize.compute_dtype)
    return {
        "cpu_model": cpu_model,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "bf16_flags": [f for f in BF16_FLAGS if f in flags],
        "torch_bf16_units": units,
        "torch_checks_missing": unknown,
        "compute_dtype": str(dtype).removeprefix("torch."),
        "why": why,
    }


def capability_line(c: dict) -> str:
    units = ", ".join(c["torch_bf16_units"]) or "none"
    return (
        f"{c['gpu'] or c['cpu_model']}; bf16 flags in /proc/cpuinfo: "
        f"{' '.join(c['bf16_flags']) or 'none'}; torch sees bf16 units: {units}; "
        f"compute dtype {c['compute_dtype']} ({c['why']})"
    )


def embedded_tokenizer_dir() -> Path | None:
    from qlora.core.paths import BASE_MODEL_DIR

    return BASE_MODEL_DIR if (BASE_MODEL_DIR / "tokenizer_config.json").exists() else None


def synthetic_rows(count: int, seq: int, vocab: int, seed: int = 0) -> list[dict]:
    """Rows of random tokens, lengths uniform in [seq/5, seq] (the default corpus spans 60 to
    314 tokens under 320), a prompt of 30-70 % of each row masked out of the labels."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        length = rng.randint(max(2, seq // 5), seq)
        ids = [rng.randrange(2, vocab) for _ in range(length)]
        prompt = int(length * rng.uniform(0.3, 0.7))
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    from qlora.core.lineage import cpu_info

    model, flags = cpu_info()
    return f"{model} ({torch.get_num_threads()} threads; {' '.join(flags) or 'no AVX512'})"


def run_side(side: str, model_dir: Path, rows_file: Path, batch: int, scratch: Path) -> dict:
    out = scratch / f"{side}.json"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.side",
        side,
        str(model_dir),
        str(rows_file),
        str(out),
        "--batch",
        str(batch),
    ]
    print(f"  {side} ...", flush=True)
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=HERE.parent, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        print(f"  {side} failed (exit {done.returncode}):\n{tail}", flush=True)
        return {"side": side, "error": tail.splitlines()[-1] if tail else "failed"}
    print(f"  {side} done in {time.perf_counter() - started:.0f} s", flush=True)
    return json.loads(out.read_text())


def memory_of(result: dict) -> int | None:
    """The peak to compare: resident set size on a CPU, max allocated on a GPU."""
    peak = result.get("peak_memory_bytes") or {}
    return peak.get("max_rss", peak.get("max_allocated"))


def ratios(results: dict[str, dict]) -> dict[str, dict[str, float]]:
    """The project's sides against the others: speed (tokens/s) and peak memory ratios."""
    out = {}
    pairs = [
        ("qlora", "lora16"),
        ("qlora", "reference"),
        ("qlora-no-ckpt", "reference"),
        ("qlora", "previous"),
    ]
    for side, other in pairs:
        mine, theirs = results.get(side, {}), results.get(other, {})
        if "tokens_per_s" in mine and "tokens_per_s" in theirs:
            out[f"{side} vs {other}"] = {
                "speed": mine["tokens_per_s"] / theirs["tokens_per_s"],
                "memory": memory_of(mine) / memory_of(theirs),
            }
    return out


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def gflops(x: float) -> str:
    return f"{x / 1e9:,.0f}"


def utilisation_cells(r: dict) -> str:
    """model GFLOP/s | matmul peak GFLOP/s | MFU; dashes for a record made before them."""
    if "mfu" not in r:
        return "- | - | -"
    peak = r["matmul"]
    return (
        f"{gflops(r['model_flops_per_s'])} | {gflops(peak['peak_flops_per_s'])} "
        f"({peak['dtype']}) | {r['mfu']:.1%}"
    )


def table(record: dict) -> str:
    results = record["results"]
    gpu = record["cuda"]
    mem_head = "max allocated GiB | max reserved GiB" if gpu else "peak RSS GiB"
    lines = [
        f"| side | settings | tokens/s | model GFLOP/s | matmul peak GFLOP/s | MFU | {mem_head} "
        "| first step s |",
        "|---|---|---|---|---|---|---|---|" + ("---|" if gpu else ""),
    ]
    for side in record["sides"]:
        r = results[side]
        if "error" in r:
            lines.append(f"| {side} | failed: {r['error']} |")
            continue
        s, peak = r["settings"], r["peak_memory_bytes"]
        lora = s["lora"]
        targets = lora["target_modules"]
        targets = (
            targets if isinstance(targets, str) else "/".join(t.split("_")[0] for t in targets)
        )
        desc = (
            f"r{lora['r']}/α{lora['alpha']:g} {targets}, dropout {lora['dropout']:g}, "
            f"{s['compute_dtype']}, ckpt {'on' if s['gradient_checkpointing'] else 'off'}, "
            f"{s['batching']}, {s['loss']} loss"
        )
        mem = (
            f"{gib(peak['max_allocated'])} | {gib(peak['max_reserved'])}"
            if gpu
            else gib(peak["max_rss"])
        )
        lines.append(
            f"| {side} | {desc} | {r['tokens_per_s']:,.0f} | {utilisation_cells(r)} | {mem} | "
            f"{r['time_to_first_step_s']:.1f} |"
        )
    lines.append("")
    flops = record.get("model_flops")
    if flops:
        lines.append(
            f"- MFU: {flops['formula']}; here N = {flops['linear_parameters']:,}, "
            f"{flops['per_token']:,} FLOPs per token"
        )
    for pair, ratio in record["ratios"].items():
        lines.append(
            f"- {pair}: **{ratio['speed']:.2f}x** the tokens/s at "
            f"**{ratio['memory']:.2f}x** the peak memory"
        )
    return "\n".join(lines)


def section(record: dict) -> str:
    v = ", ".join(f"{k} {val}" for k, val in record["versions"].items())
    return (
        f"## {record['arch']}, {record['device']}, batch {record['batch']} x up to "
        f"{record['seq']} tokens\n\n"
        f"Measured {record['date']} with `{record['command']}`: {record['rows']} rows, "
        f"{record['layers']} layers. Versions: {v}.\n\n{capability_part(record)}"
        f"{table(record)}\n"
    )


def capability_part(record: dict) -> str:
    c = record.get("capability")
    return f"Capability: {capability_line(c)}.\n\n" if c else ""


def write_results_md() -> None:
    records = [json.loads(f.read_text()) for f in sorted(RESULTS_DIR.glob("*.json"))]
    header = (
        "# Training benchmark results\n\n"
        "Written by `python -m benchmarks.train` (`make bench`) from benchmarks/results/*.json;"
        " each section is one run, every side measured in it. tokens/s counts trained, "
        "non-padding tokens after the first step; peak memory includes loading the model.\n\n"
    )
    RESULTS_MD.write_text(header + "\n".join(section(r) for r in records))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--arch", choices=sorted(ARCHS), default="smollm2-135m")
    ap.add_argument("--seq", type=int, default=512, help="longest row, tokens")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per side")
    ap.add_argument("--layers", type=int, help="fewer layers than the architecture (quick runs)")
    ap.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    arch = ARCHS[args.arch]
    rows = synthetic_rows(args.steps * args.batch, args.seq, min(arch["vocab_size"], 49152))
    print(f"{args.arch} on {device_name()}: {len(rows)} rows, batch {args.batch}, seq {args.seq}")
    where = capability()
    print(f"capability: {capability_line(where)}", flush=True)
    layers = args.layers or arch["num_hidden_layers"]
    n = linear_parameters(arch, layers)
    flops_per_token = FLOPS_PER_WEIGHT * n
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        model_dir = scratch / "model"
        build_model(args.arch, args.layers, model_dir)
        rows_file = scratch / "rows.json"
        rows_file.write_text(json.dumps(rows))
        results = {s: run_side(s, model_dir, rows_file, args.batch, scratch) for s in args.sides}
    for result in results.values():
        if "error" not in result:
            result.update(utilisation(result, flops_per_token))
    record = {
        "arch": args.arch,
        "layers": layers,
        "seq": args.seq,
        "batch": args.batch,
        "rows": len(rows),
        "cuda": cuda,
        "device": device_name(),
        "capability": where,
        "model_flops": {
            "linear_parameters": n,
            "per_token": flops_per_token,
            "formula": MFU_FORMULA,
        },
        "versions": dict(package_versions()),
        "command": " ".join(["python -m benchmarks.train", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
        "sides": args.sides,
        "results": results,
        "ratios": ratios(results),
    }
    RESULTS_DIR.mkdir(exist_ok=True)
    kind = "cuda" if cuda else "cpu"
    name = f"{args.arch}{f'-l{args.layers}' if args.layers else ''}-{kind}-seq{args.seq}.json"
    (RESULTS_DIR / name).write_text(json.dumps(record, indent=2))
    write_results_md()
    print()
    print(table(record))
    print(f"\nwritten: {RESULTS_DIR / name}, {RESULTS_MD}")


if __name__ == "__main__":
    main()
