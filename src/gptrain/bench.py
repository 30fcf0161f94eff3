"""`gptrain bench`: training throughput, MFU and memory of the real training loop, on synthetic tokens.

A benchmark that runs a second, simpler loop measures that loop, not the trainer. So this runs
`Trainer.fit` itself, the code path of `gptrain train`: the same model build, parallel wrapping,
activation checkpointing, compile, optimizer, autocast, prefetcher and logging. Only what is not
training is switched off (evaluation, checkpoints, text samples) and the data are random tokens
in a temporary dataset folder, so no corpus is needed and no tokenizer runs.

How a measurement is made:

- the run is cut into windows of `window_steps` optimizer steps: the trainer's own log intervals,
  timed from one log step to the next after a device synchronisation;
- the first `warmup_windows` are dropped (compilation, allocator growth, first-touch pages);
- right after each window, outside the timed interval, the device's own limit is measured: the
  throughput of a large square matrix product in the training precision (`measure_matmul_flops`).
  Measuring both in turn, in one process, makes MFU a ratio taken under the same conditions: on a
  shared machine, another job slowing the cores slows both;
- tokens/s, step time and the matmul peak are the medians over the kept windows; MFU is the median
  of the per-window ratios. The spread (min–max tokens/s) says how noisy the machine was, and
  "MFU best/best" (fastest window over fastest matrix product) is the steadiest figure on a shared machine.

MFU = (6·N + 12·n_layers·d_model·T) · tokens/s / (peak · processes) — see gptrain.metrics and the
README. On a GPU both MFUs are given: against its spec peak (by exact name; unknown → no figure)
and against the measured matrix product.

Several variants (eager / compiled / activation checkpointing) or process counts (`--nproc`) each
run in a fresh child process (`torchrun` for more than one process), so that compilation caches,
allocator state and peak-memory counters of one do not leak into the next.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptrain.config import Config, TrackingConfig, build_config, check_profiler_fits, flag_of, validate
from gptrain.errors import UserError

# Named configurations: the settings the targets are stated for. Flags given on the
# command line override them.
NAMED_CONFIGS: dict[str, dict[str, Any]] = {
    # The CPU reference: 6 layers, d_model 384, 6 heads, context 256, batch 16, vocab 8192, fp32.
    "cpu-small": {"train.preset": "small-cpu", "model.n_layers": 6, "model.n_heads": 6, "model.d_model": 384,
                  "model.max_position_embeddings": 256, "model.vocab_size": 8192, "train.batch_size": 16,
                  "train.precision": "fp32", "train.device": "cpu"},
    # GPT-2 124M, context 1024, GPT-2's vocabulary (padded to 50304 by the model), bf16 on a GPU.
    # Batch 32: on an H200 it gave 44% MFU compiled against 42% at 16 and 45% at 64 (benchmarks/RESULTS.md).
    "gpt2": {"train.preset": "gpt2", "model.vocab_size": 50257, "train.batch_size": 32,
             "train.precision": "bf16"},
    # A model the size of the tests' models: seconds on any machine (a smoke test of the harness).
    "smoke": {"model.n_layers": 2, "model.n_heads": 2, "model.d_model": 64, "model.max_position_embeddings": 64,
              "model.vocab_size": 512, "train.batch_size": 4, "train.precision": "fp32"},
}

VARIANTS = {  # name → settings on top of the configuration
    "eager": {"train.compile": False},
    "compile": {"train.compile": True},
    "ac": {"train.compile": False, "parallel.ac": "full"},
    "compile+ac": {"train.compile": True, "parallel.ac": "full"},
}


# Settings a benchmark decides itself: the data (random tokens), the step counts (--windows,
# --window-steps), and no evaluation, checkpoints, samples or trackers. Everything else of
# `gptrain train` (model, optimizer, batch, device, precision, compile, attention backend,
# layout, activation checkpointing, profiler) is honoured.
BENCH_OWN_TRAIN = ("train.num_steps", "train.eval_every", "train.eval_tokens", "train.log_every", "train.save_every",
                   "train.keep_last", "train.runs_dir", "train.run_name", "train.checkpoint_dir", "train.resume",
                   "train.sample_prompt", "train.sample_tokens", "train.progress")


def bench_ignores(path: str) -> bool:
    """True for a training setting that `gptrain bench` overrides (so giving it would do nothing)."""
    section = path.split(".", 1)[0]
    return path in BENCH_OWN_TRAIN or section == "tracking" or (section == "data" and path != "data.seq_len")


def refuse_ignored_flags(overrides: dict[str, Any]) -> None:
    given = [flag_of(p) for p in overrides if bench_ignores(p)]
    if given:
        raise UserError(f"gptrain bench runs the training loop on synthetic data, with its own step counts "
                        f"(--windows, --window-steps) and no evaluation, checkpoints or trackers, so "
                        f"{', '.join(given)} would be ignored. Drop {'them' if len(given) > 1 else 'it'}.")


def note_ignored_file_settings(from_file: set[str], toml: str | None) -> None:
    """A --config file may be a training file, given for its model: its other settings are named, not refused."""
    ignored = sorted(p for p in from_file if bench_ignores(p))
    if ignored:
        print(f"note: bench ignores these settings of {toml}: {', '.join(ignored)} (synthetic data, its own "
              "step counts)", file=sys.stderr)


def check_windows(windows: int, warmup_windows: int) -> None:
    if windows < 1 or warmup_windows < 0:
        raise UserError("--windows must be ≥ 1 and --warmup-windows ≥ 0.")


def check_measurement_options(args) -> None:
    """Bench's own flags, checked before anything runs."""
    check_windows(args.windows, args.warmup_windows)
    for name, value in [("window-steps", args.window_steps), ("matmul-size", args.matmul_size),
                        ("nproc", args.nproc)]:
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}.")


def default_window_steps(device: torch.device) -> int:
    return 10 if device.type == "cuda" else 2


def check_profile_fits(cfg: Config, windows: int, window_steps: int, warmup_windows: int) -> None:
    """The profiler's cycle must end within the benchmark's steps (train's own check names --num-steps)."""
    steps = (warmup_windows + windows) * window_steps
    check_profiler_fits(cfg.profile, steps, f"the benchmark runs {steps} ((--warmup-windows {warmup_windows} + "
                        f"--windows {windows}) × --window-steps {window_steps})",
                        "Raise --windows or --window-steps, or lower the profile settings.")


def prepare_json_path(path: str | None) -> None:
    """Create --json's folder now: a missing one would only show after the whole benchmark ran."""
    if not path:
        return
    out = Path(path)
    if out.is_dir():
        raise UserError(f"--json {out} is a folder; give a file path such as {out / 'bench.json'}.")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--json {out}: cannot create its folder ({e.strerror or e}). Choose another path.") from None


# ---------------------------------------------------------------------------------------- data
def write_synthetic_dataset(out_dir: Path, vocab_size: int, seq_len: int, sequences: int, seed: int = 0) -> Path:
    """A prepared-dataset folder of uniformly random token ids (train.bin, val.bin, meta.json).

    The ids cover the model's whole vocabulary; the tokenizer recorded is the byte tokenizer,
    which no benchmark step uses (no evaluation, no samples).
    """
    from gptrain.data.format import dtype_for, write_meta
    from gptrain.data.tokenizer import build_tokenizer, tokenizer_meta

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = dtype_for(vocab_size)
    rng = np.random.default_rng(seed)
    counts = {"train": sequences * seq_len + 1, "val": 4 * seq_len + 1}
    for split, n in counts.items():
        rng.integers(0, vocab_size, size=n, dtype=np.int64).astype(dtype).tofile(out_dir / f"{split}.bin")
    tok = build_tokenizer("byte")
    write_meta(out_dir, {
        "tokenizer": tokenizer_meta(tok), "vocab_size": max(vocab_size, tok.vocab_size), "eot_id": tok.eot_id,
        "dtype": dtype.name, "splits": {s: {"tokens": n, "documents": 1} for s, n in counts.items()},
        "inputs": {"train": ["synthetic"], "val": [], "fingerprint": f"synthetic-{vocab_size}-{seed}"}})
    return out_dir


# ---------------------------------------------------------------------------------------- one run
def bench_config(overrides: dict[str, Any], toml: str | None = None, named: str | None = None) -> tuple[Config, set]:
    """The training config of a benchmark: the named configuration, then the user's settings."""
    settings: dict[str, Any] = dict(NAMED_CONFIGS[named]) if named else {}
    settings.update(overrides)
    cfg, explicit = build_config(settings, toml)
    explicit.add("model.vocab_size")  # the model's, not the synthetic dataset's
    return cfg, explicit


def _peak_recorder(matmul_size: int):
    from gptrain.trainer import TrainerHooks

    class RecordWindows(TrainerHooks):
        """Each timed window's metrics, plus a matrix-product peak measured right after it (outside the
        timed interval: time spent in on_log is not training time)."""

        def __init__(self) -> None:
            self.rows: list[dict[str, Any]] = []

        def on_log(self, trainer, step, row) -> None:
            row["bench/matmul_flops"] = measure_peak(trainer.device, trainer.plan.precision, matmul_size)
            self.rows.append(row)

    return RecordWindows()


def measure_peak(device: torch.device, precision: str, size: int) -> float:
    from gptrain.metrics import measure_matmul_flops

    # Two products on CPU (a 4096² fp32 product is ~1 s on one core); ~0.2 s of them on a GPU.
    return measure_matmul_flops(device, precision, size, min_seconds=0.0 if device.type == "cpu" else 0.2)


def run_benchmark(cfg: Config, explicit: set[str], *, windows: int = 5, window_steps: int | None = None,
                  warmup_windows: int = 1, matmul_size: int | None = None, data_dir: str | None = None,
                  quiet: bool = False, name: str = "") -> dict[str, Any]:
    """Train for (warmup_windows + windows) × window_steps steps through Trainer.fit; return the figures.

    In a torchrun child every rank calls this; every rank returns the result (rank 0's row values,
    which are already global: throughput over the slowest rank).
    """
    from gptrain.console import RunConsole
    from gptrain.distributed import resolve_device

    check_windows(windows, warmup_windows)
    device = resolve_device(cfg.train.device, int(os.environ.get("LOCAL_RANK", "0")))
    if window_steps is None:
        window_steps = default_window_steps(device)
    if matmul_size is None:
        matmul_size = 8192 if device.type == "cuda" else 4096
    check_profile_fits(cfg, windows, window_steps, warmup_windows)
    t = cfg.train
    t.num_steps = (warmup_windows + windows) * window_steps
    t.log_every = window_steps
    t.sample_tokens = 0
    t.progress = "plain"
    t.run_name = "bench"
    t.resume = None
    t.checkpoint_dir = None
    # Every tracking setting back to its default (a --config file's W&B settings included): metrics.jsonl only.
    cfg.tracking = TrackingConfig(sample_every=0)
    if cfg.data.seq_len is None:
        cfg.data.seq_len = cfg.model.max_position_embeddings
    with tempfile.TemporaryDirectory(prefix="gptrain-bench-") as tmp:
        if data_dir is None:
            data_dir = str(write_synthetic_dataset(Path(tmp) / "data", cfg.model.vocab_size, cfg.data.seq_len,
                                                   sequences=256))
        cfg.data.dataset = data_dir
        t.runs_dir = str(Path(tmp) / "runs")
        from gptrain.trainer import Trainer

        recorder = _peak_recorder(matmul_size)
        is_main = int(os.environ.get("RANK", "0")) == 0
        trainer = Trainer.from_config(cfg, explicit, RunConsole("plain", enabled=is_main and not quiet),
                                      hooks=[recorder], evaluate=False, save=False)
        t0 = time.perf_counter()
        trainer.fit()
        wall = time.perf_counter() - t0
    kept = recorder.rows[warmup_windows:]
    if not kept:
        raise UserError("no timed window completed; raise --windows.")
    return summarize(trainer, kept, name=name, wall=wall, window_steps=window_steps, matmul_size=matmul_size)


def summarize(trainer, rows: list[dict[str, Any]], *, name: str, wall: float, window_steps: int,
              matmul_size: int) -> dict[str, Any]:
    cfg, device, plan = trainer.cfg, trainer.device, trainer.plan
    world = trainer.dist.world_size
    tps = [r["global_tokens_per_sec"] for r in rows]
    step = [r["perf/step_time"] for r in rows]
    peak = [r["bench/matmul_flops"] for r in rows]
    fpt = trainer.flops_per_token
    mfu_measured = [fpt * a / (p * world) for a, p in zip(tps, peak, strict=True)]
    spec = None
    if device.type == "cuda":
        from gptrain.metrics import gpu_peak_flops

        spec = gpu_peak_flops(device, plan.precision)
    mem_keys = [k for k in rows[-1] if k.startswith("mem/")]
    median_tps = statistics.median(tps)
    return {
        "name": name,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "precision": plan.precision,
        "compile": bool(cfg.train.compile),
        "ac": cfg.parallel.ac,
        "attention_backend": cfg.train.attention_backend,
        "loss_chunk_size": plan.loss_chunk_size,
        "nproc": world,
        "threads": torch.get_num_threads(),
        "model": {"n_layers": cfg.model.n_layers, "n_heads": cfg.model.n_heads, "d_model": cfg.model.d_model,
                  "context": cfg.model.max_position_embeddings, "vocab": cfg.model.vocab_size,
                  "padded_vocab": cfg.model.padded_vocab_size},
        "seq_len": plan.seq_len,
        "batch_size": cfg.train.batch_size,
        "tokens_per_step": plan.tokens_per_step,
        "n_params": trainer.model_counts["n_params"],
        "flops_per_token": fpt,
        "window_steps": window_steps,
        "windows": len(rows),
        "tokens_per_sec": median_tps,
        "tokens_per_sec_min": min(tps),
        "tokens_per_sec_max": max(tps),
        "tokens_per_sec_windows": tps,
        "step_time": statistics.median(step),
        "model_flops_per_sec": fpt * median_tps,
        "matmul_size": matmul_size,
        "matmul_flops": statistics.median(peak),
        "matmul_flops_windows": peak,
        "mfu_measured": statistics.median(mfu_measured),
        "mfu_measured_windows": mfu_measured,
        # Best window over best matrix product: on a shared machine, both taken at their quietest moments.
        "mfu_best": fpt * max(tps) / (max(peak) * world),
        "spec_peak_flops": spec,
        "mfu_spec": fpt * median_tps / (spec * world) if spec else None,
        "memory": {k: rows[-1][k] for k in mem_keys},
        "wall_seconds": wall,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "versions": {"torch": torch.__version__, "python": platform.python_version(),
                     "cuda": torch.version.cuda},
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


# ---------------------------------------------------------------------------------------- children
def run_child(argv: list[str], nproc: int, env: dict[str, str]) -> dict[str, Any]:
    """`gptrain bench ARGV` in a fresh process (torchrun when nproc > 1); its result JSON."""
    with tempfile.TemporaryDirectory(prefix="gptrain-bench-child-") as tmp:
        out = Path(tmp) / "result.json"
        if nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   "-m", "gptrain", "bench", *argv, "--result-json", str(out)]
        else:
            cmd = [sys.executable, "-m", "gptrain", "bench", *argv, "--result-json", str(out)]
        lines: list[str] = []
        with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
            for line in proc.stdout:  # streamed: a long compile shows progress, a failure shows where
                lines.append(line.rstrip("\n"))
                print(f"    {lines[-1]}", flush=True)
        if proc.returncode != 0 or not out.is_file():
            tail = "\n".join(lines[-15:])
            raise UserError(f"benchmark child `{' '.join(cmd[1:6])} ...` failed (exit {proc.returncode}):\n{tail}")
        result = json.loads(out.read_text())
        print("    => " + format_table([result]).splitlines()[-1], flush=True)
        return result


def child_env(nproc_max: int, device_is_cpu: bool) -> dict[str, str]:
    env = dict(os.environ)
    if device_is_cpu and nproc_max > 1:
        # Same threads per process at every process count: scaling efficiency then compares like with like.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc_max))
    return env


# ---------------------------------------------------------------------------------------- output
def fmt_flops(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x / 1e12:.1f}T" if x >= 1e12 else f"{x / 1e9:.1f}G"


def _fmt_pct(x: float | None) -> str:
    return "unknown" if x is None else f"{100 * x:.1f}%"


def variant_label(r: dict[str, Any]) -> str:
    """What a result measured, in a word or few: eager/compile, +ac, +attention backend, +loss/chunk size."""
    variant = ("compile" if r["compile"] else "eager") + ("+ac" if r.get("ac") not in (None, "none") else "")
    if r.get("attention_backend", "auto") != "auto":
        variant += f"+{r['attention_backend']}"
    if r.get("loss_chunk_size"):
        variant += f"+loss/{r['loss_chunk_size']}"
    return variant


def format_table(results: list[dict[str, Any]], markdown: bool = False) -> str:
    head = ["config", "variant", "procs", "threads", "tokens/s", "spread", "step ms", "model FLOP/s",
            "matmul peak", "MFU (measured)", "MFU best/best", "MFU (spec)", "peak mem"]
    rows = []
    for r in results:
        mem = r.get("memory") or {}
        mem_s = ", ".join(f"{k.split('/', 1)[1].replace('_gb', '')} {v:.2f} GB" for k, v in mem.items()) or "n/a"
        rows.append([r["name"] or "-", variant_label(r), str(r["nproc"]), str(r["threads"]), f"{r['tokens_per_sec']:,.0f}",
                     f"{r['tokens_per_sec_min']:,.0f}–{r['tokens_per_sec_max']:,.0f}", f"{1000 * r['step_time']:.0f}",
                     fmt_flops(r["model_flops_per_sec"]), fmt_flops(r["matmul_flops"]),
                     _fmt_pct(r["mfu_measured"]), _fmt_pct(r.get("mfu_best")), _fmt_pct(r["mfu_spec"]) if r["device"].startswith("cuda") else "-",
                     mem_s])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    else:
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)), "  ".join("-" * w for w in widths)]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    scaling = scaling_lines(results)
    return "\n".join(lines + scaling)


def scaling_lines(results: list[dict[str, Any]]) -> list[str]:
    def setup(r: dict[str, Any]) -> tuple:  # results compared across process counts share all of these
        return r["name"], r["compile"], r.get("ac"), r.get("attention_backend"), r.get("loss_chunk_size")

    base = {}
    for r in results:
        if r["nproc"] == 1:
            base.setdefault(setup(r), r)
    out = []
    for r in results:
        b = base.get(setup(r))
        if r["nproc"] > 1 and b:
            eff = r["tokens_per_sec"] / (r["nproc"] * b["tokens_per_sec"])
            out.append(f"scaling {b['nproc']}→{r['nproc']} processes: {r['tokens_per_sec'] / b['tokens_per_sec']:.2f}× "
                       f"tokens/s, efficiency {100 * eff:.0f}% (tokens/s(N) / (N · tokens/s(1)))")
    return ([""] + out) if out else []


def machine_line(results: list[dict[str, Any]]) -> str:
    r = results[0]
    v = r["versions"]
    load = r.get("load_average")
    load_s = f", load average at the end {load[0]:.2f}" if load else ""
    return (f"{r['device_name']}; torch {v['torch']}" + (f", CUDA {v['cuda']}" if v.get("cuda") else "") +
            f", Python {v['python']}; {r['precision']}, batch {r['batch_size']} × {r['seq_len']} tokens, "
            f"{r['window_steps']} steps per window, median of {r['windows']} windows{load_s}")


# ---------------------------------------------------------------------------------------- command
def cmd_bench(args, overrides: dict[str, Any]) -> int:
    """Entry point of `gptrain bench` (parsing lives in cli.py)."""
    check_measurement_options(args)
    if args.bench_overrides:  # settings handed down by the parent, exactly (e.g. compile off over a TOML's on)
        overrides = {**overrides, **json.loads(args.bench_overrides)}
    if args.result_json:  # a child: one run, result to a file
        cfg, explicit = bench_config(overrides, args.config, args.named)
        result = run_benchmark(cfg, explicit, windows=args.windows, window_steps=args.window_steps,
                               warmup_windows=args.warmup_windows, matmul_size=args.matmul_size,
                               data_dir=args.bench_data, name=args.named or "custom")
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.result_json).write_text(json.dumps(result, indent=2))
        return 0

    variants = args.variants or [None]
    for v in variants:
        if v is not None and v not in VARIANTS:
            raise UserError(f"unknown variant '{v}'. Variants: {', '.join(VARIANTS)}.")
    nprocs = list(range(1, args.nproc + 1)) if args.nproc else [None]
    refuse_ignored_flags(overrides)
    cfg, explicit = bench_config(overrides, args.config, args.named)
    validate(cfg)  # up front: the runs happen in child processes
    note_ignored_file_settings(explicit - set(overrides), args.config)
    from gptrain.distributed import resolve_device

    window_steps = args.window_steps or default_window_steps(resolve_device(cfg.train.device))
    check_profile_fits(cfg, args.windows, window_steps, args.warmup_windows)
    prepare_json_path(args.json)
    results: list[dict[str, Any]] = []
    if variants == [None] and nprocs == [None]:
        results.append(run_benchmark(cfg, explicit, windows=args.windows, window_steps=args.window_steps,
                                     warmup_windows=args.warmup_windows, matmul_size=args.matmul_size,
                                     name=args.named or "custom"))
    else:
        device_is_cpu = cfg.train.device == "cpu" or (cfg.train.device == "auto" and not torch.cuda.is_available())
        env = child_env(args.nproc or 1, device_is_cpu)
        with tempfile.TemporaryDirectory(prefix="gptrain-bench-data-") as tmp:
            seq_len = cfg.data.seq_len or cfg.model.max_position_embeddings
            data = write_synthetic_dataset(Path(tmp), cfg.model.vocab_size, seq_len, sequences=256)
            for v in variants:
                for n in nprocs:
                    settings = dict(overrides)
                    settings.update(VARIANTS[v] if v else {})
                    argv = child_argv(args, settings) + ["--bench-data", str(data)]
                    label = f"{args.named or 'custom'} {v or ''} nproc={n or 1}".replace("  ", " ")
                    print(f"--- {label}", flush=True)
                    results.append(run_child(argv, n or 1, env))
    print()
    print(format_table(results, markdown=args.markdown))
    print(machine_line(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0


def child_argv(args, settings: dict[str, Any]) -> list[str]:
    """The `gptrain bench` flags that reproduce these settings and measurement options in a child."""
    argv: list[str] = []
    if args.named:
        argv += ["--named", args.named]
    if args.config:
        argv += ["--config", args.config]
    for flag, value in [("--windows", args.windows), ("--window-steps", args.window_steps),
                        ("--warmup-windows", args.warmup_windows), ("--matmul-size", args.matmul_size)]:
        if value is not None:
            argv += [flag, str(value)]
    return argv + ["--bench-overrides", json.dumps(settings)]
