"""Command line: argument parsing and dispatch only. The work happens in the modules it calls.

Errors a user can fix (`UserError`) print one message and exit with code 2; anything else is
a bug in gptrain and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import typing
from typing import Any

from gptrain import __version__
from gptrain.config import SECTIONS, build_config
from gptrain.errors import PeerFailure, UserError
from gptrain.settings import (
    coerce,
    declaration,
    declared_fields,
    describe_default,
    flags_of,
    suggest,
    value_type,
)

TRAIN_DESCRIPTION = """Train a GPT. With no arguments: trains the `tiny` model on the Python standard library's
source files (tokenized with a freshly trained BPE), on CPU in a few minutes."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error (a bad choice, a missing value) is one line like every other error,
    not the whole usage text first."""

    def error(self, message: str) -> typing.NoReturn:
        raise UserError(f"{message}. See `{self.prog} --help`.")


def _flag_dest(path: str) -> str:
    return "cfg__" + path.replace(".", "__")


def add_config_options(parser: argparse.ArgumentParser, hidden=lambda path: False) -> None:
    """One flag group per settings section, generated from the declarations (gptrain.settings).

    Defaults are SUPPRESS so that only the flags given override; values stay strings here and are
    converted and checked by gptrain.config like those of a TOML file. `hidden(path)`: settings left
    out of --help (still parsed, so that the command can refuse them by name).
    """
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} settings")
        for f in declared_fields(cls):
            add_setting_argument(group, f, _flag_dest(f"{section}.{f.name}"), hidden(f"{section}.{f.name}"), cls)


def add_setting_argument(group, f, dest: str, hide: bool, cls: type) -> None:
    """The command-line face of one declared setting."""
    s = declaration(f)
    if not s.cli:
        return
    t, _ = value_type(cls, f.name)
    help_text = argparse.SUPPRESS if hide else _help_of(f)
    kwargs: dict[str, Any] = dict(dest=dest, default=argparse.SUPPRESS, help=help_text)
    if t is bool:
        group.add_argument(*flags_of(f), action="store_const", const=True, **kwargs)
        if s.negate:  # listed in --help too: for settings that default to on it is the flag that does something
            group.add_argument(s.negate, action="store_const", const=False, dest=dest, default=argparse.SUPPRESS,
                               help=argparse.SUPPRESS if hide else f"turn off {flags_of(f)[0]}")
    elif typing.get_origin(t) is list:
        group.add_argument(*flags_of(f), nargs="+", metavar=s.metavar or f.name.upper(), **kwargs)
    elif s.choices:
        group.add_argument(*flags_of(f), choices=s.choices, **kwargs)
    else:
        group.add_argument(*flags_of(f), metavar=s.metavar or f.name.upper(), **kwargs)


def _help_of(f) -> str:
    default = describe_default(f)
    text = f"{declaration(f).help} (default: {default})" if default else declaration(f).help
    return text.replace("%", "%%")  # argparse formats help strings with %


def collect_overrides(args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for key, value in vars(args).items():
        if key.startswith("cfg__"):
            out[key[5:].replace("__", ".")] = value
    return out


def all_flags(parser: argparse.ArgumentParser) -> list[str]:
    return [s for action in parser._actions for s in action.option_strings]


def parse_strict(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """parse_args, but an unknown flag becomes a UserError that suggests the closest valid one."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        first = unknown[0]
        if first.startswith("-"):
            flag = first.split("=", 1)[0]
            raise UserError(f"unknown option {flag}.{suggest(flag, all_flags(parser))} "
                            f"See `gptrain {parser.prog.split()[-1]} --help`.")
        raise UserError(f"unexpected argument {first!r}. See `{parser.prog} --help`.")
    return args


# ---------------------------------------------------------------------------------------- train
def build_train_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", allow_abbrev=False, help="train a model", description=TRAIN_DESCRIPTION)
    p.add_argument("--config", metavar="TOML", help="settings file; command-line flags override it")
    p.add_argument("--resume", nargs="?", const="latest", default=argparse.SUPPRESS, dest="cfg__train__resume",
                   metavar="PATH", help="continue the newest checkpoint of --run-name (or of the latest run), "
                   "or of PATH (a run folder or checkpoint)")
    p.add_argument("--no-amp", action="store_const", const="fp32", dest="cfg__train__precision",
                   default=argparse.SUPPRESS, help="train in fp32 (same as --precision fp32)")
    p.add_argument("--use-activation-checkpoint", action="store_const", const="full", dest="cfg__parallel__ac",
                   default=argparse.SUPPRESS, help="recompute each block's activations in backward (same as --ac full)")
    add_config_options(p)
    return p


def cmd_train(args: argparse.Namespace, hooks=()) -> int:
    from gptrain.trainer import train

    cfg, explicit = build_config(collect_overrides(args), args.config)
    result = train(cfg, explicit, hooks=hooks)
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun: global rank 0
    if result.status == "diverged":
        if main_rank:
            print(f"error: {result.message}", file=sys.stderr)
        return 1
    if result.status == "finished" and main_rank:
        val = f"{result.final_val_loss:.4f}" if result.final_val_loss is not None else "n/a"
        print(f"done: {result.final_step} steps, val loss {val}, run folder {result.run_dir}")
    return 0


# ---------------------------------------------------------------------------------------- bench
def build_bench_parser(sub) -> argparse.ArgumentParser:
    from gptrain.bench import NAMED_CONFIGS, VARIANTS, bench_ignores

    p = sub.add_parser("bench", allow_abbrev=False, help="training tokens/s, MFU and memory on this machine",
                       description="Time the training loop (gptrain train's own, on random tokens) after a warm-up, "
                       "as the median of several windows, next to the throughput of a large matrix product in the "
                       "training precision; print tokens/s, step time, MFU and peak memory. Takes gptrain train's "
                       "model, optimizer, batch, device, precision, compile, layout and profiler flags.")
    p.add_argument("--named", choices=tuple(NAMED_CONFIGS), default=None,
                   help="a named configuration (flags override it): " + ", ".join(NAMED_CONFIGS))
    p.add_argument("--variants", nargs="+", metavar="VARIANT", default=None,
                   help=f"run each in a fresh process and tabulate: {', '.join(VARIANTS)}")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="measure 1..N processes (torchrun, data parallel) and print the scaling efficiency")
    p.add_argument("--windows", type=int, default=5, help="timed windows (median taken; default 5)")
    p.add_argument("--window-steps", type=int, default=None, help="optimizer steps per window (default: 2 on CPU, "
                   "10 on GPU)")
    p.add_argument("--warmup-windows", type=int, default=1, help="windows run first and dropped (default 1)")
    p.add_argument("--matmul-size", type=int, default=None, help="side of the square matrix product that measures "
                   "the device's peak (default 4096 on CPU, 8192 on GPU)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown (for benchmarks/RESULTS.md)")
    p.add_argument("--config", metavar="TOML", help="settings file; command-line flags override it")
    p.add_argument("--result-json", help=argparse.SUPPRESS)  # child mode: one run, result to this file
    p.add_argument("--bench-data", help=argparse.SUPPRESS)  # child mode: the synthetic dataset to use
    p.add_argument("--bench-overrides", help=argparse.SUPPRESS)  # child mode: settings as JSON
    p.add_argument("--no-amp", action="store_const", const="fp32", dest="cfg__train__precision",
                   default=argparse.SUPPRESS, help="fp32 (same as --precision fp32)")
    add_config_options(p, hidden=bench_ignores)
    return p


def cmd_bench(args: argparse.Namespace) -> int:
    from gptrain.bench import cmd_bench as run

    return run(args, collect_overrides(args))


# ---------------------------------------------------------------------------------------- prepare
def build_prepare_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("prepare", allow_abbrev=False, help="tokenize text into a dataset directory",
                       description="Tokenize .txt/.jsonl/.json/.parquet files or folders into train.bin, val.bin "
                                   "and meta.json.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files or directories (searched recursively)")
    from gptrain.data.prepare import PrepareConfig

    group = p.add_argument_group("prepare settings")
    for f in declared_fields(PrepareConfig):  # the same declarations `gptrain train` uses for raw text
        add_setting_argument(group, f, f"prep__{f.name}", False, PrepareConfig)
    return p


def cmd_prepare(args: argparse.Namespace) -> int:
    from gptrain.data.prepare import PrepareConfig, prepare_dataset

    given = {key[6:]: value for key, value in vars(args).items() if key.startswith("prep__")}
    if "out_dir" not in given:
        raise UserError("the following arguments are required: --out. See `gptrain prepare --help`.")
    values = {name: coerce(PrepareConfig, name, value, f"--{name.replace('_', '-')}") for name, value in given.items()}
    prepare_dataset(PrepareConfig(inputs=args.inputs, **values))  # validate() checks every declared bound
    return 0


# ---------------------------------------------------------------------------------------- generate / eval
def build_generate_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("generate", allow_abbrev=False, help="generate text from a trained model",
                       description="Continue a prompt. Greedy (the most likely token each time) unless --do-sample, "
                       "as the original generate.py and transformers' generate(); --temperature, --top-k or "
                       "--top-p given mean sampling too.")
    p.add_argument("path", nargs="?", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--checkpoint-path", dest="checkpoint_path", metavar="PATH",
                   help="the run folder or checkpoint (same as the positional argument; the original tool's name)")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--do-sample", action="store_true", help="sample the next token instead of taking the likeliest")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default 0.8; 0: greedy)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens (default 50)")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample among the likeliest tokens whose probabilities add up to p (nucleus sampling)")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--tokenizer-name", default=None, metavar="SPEC",
                   help="tokenizer of a model trained on token files that carried none")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole prefix for every token")
    return p


def checkpoint_path_of(args: argparse.Namespace, command: str) -> str:
    """The positional path or --checkpoint-path (the original tool's flag): exactly one of them."""
    if args.path and args.checkpoint_path and args.path != args.checkpoint_path:
        raise UserError(f"two checkpoints given ({args.path} and --checkpoint-path {args.checkpoint_path}). Pass one.")
    path = args.path or args.checkpoint_path
    if not path:
        raise UserError(f"the following arguments are required: RUN_DIR_OR_CHECKPOINT. See `gptrain {command} "
                        "--help`.")
    return path


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from gptrain.generate import check_sampling, generate, load_trained_model, tokens_that_fit

    for name, value in [("max-new-tokens", args.max_new_tokens), ("num-samples", args.num_samples)]:
        if value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}.")
    sample = args.do_sample or any(v is not None for v in (args.temperature, args.top_k, args.top_p))
    temperature = 0.8 if args.temperature is None else args.temperature
    top_k = 50 if args.top_k is None and sample else args.top_k
    check_sampling(temperature, top_k, args.top_p)
    path = checkpoint_path_of(args, "generate")
    model, tokenizer, ckpt = load_trained_model(path, args.device, tokenizer=args.tokenizer_name)
    if tokenizer is None:
        raise UserError(f"{path} was trained on token files without a tokenizer, so the prompt cannot be encoded. "
                        "Pass --tokenizer-name SPEC (the tokenizer that made those files).")
    device = next(model.parameters()).device
    prompt_ids = tokenizer.encode(args.prompt)
    context = model.cfg.max_position_embeddings
    room = tokens_that_fit(context, len(prompt_ids))
    if room < 1:
        raise UserError(f"the prompt is {len(prompt_ids)} tokens, which fills the model's context ({context} "
                        "tokens): no new token fits. Shorten the prompt.")
    if args.max_new_tokens > room:
        print(f"note: the model's context is {context} tokens and the prompt takes {max(1, len(prompt_ids))}, "
              f"so at most {room} new tokens are generated (--max-new-tokens {args.max_new_tokens})", file=sys.stderr)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    for i in range(args.num_samples):
        new = generate(model, prompt_ids, args.max_new_tokens, temperature=temperature, top_k=top_k,
                       top_p=args.top_p, do_sample=sample, use_cache=not args.no_kv_cache, stop_id=tokenizer.eot_id,
                       generator=gen)
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(args.prompt + tokenizer.decode(new))
    return 0


def build_eval_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", allow_abbrev=False, help="validation loss, perplexity and bits per byte of a model",
                       description="Score a trained model on validation tokens: the run's own, a dataset (--data), "
                       "text files (--val-data) or token shards (--val-npy). Under torchrun the windows are split "
                       "over the processes, each scored once.")
    p.add_argument("path", nargs="?", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--checkpoint-path", dest="checkpoint_path", metavar="PATH",
                   help="the run folder or checkpoint (same as the positional argument; the original tool's name)")
    p.add_argument("--data", help="a dataset (any that `gptrain train --data` reads): its validation split")
    p.add_argument("--data-mode", default="auto", choices=("auto", "text", "nanogpt", "llmc", "npy", "fineweb_npy"),
                   help="what --data / --val-npy hold (default: detect it)")
    p.add_argument("--val-data", nargs="+", metavar="FILE", default=(), help="text files to score (tokenized with "
                   "the model's tokenizer, or --tokenizer-name)")
    p.add_argument("--val-npy", "--val-shards", nargs="+", metavar="SHARD", default=(),
                   help="token shards to score (.npy or llm.c .bin)")
    p.add_argument("--tokenizer-name", default=None, metavar="SPEC", help="tokenizer for --val-data (default: "
                   "the model's)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per window (default: the run's)")
    p.add_argument("--batch-size", type=int, default=None, help="windows per forward pass (default: the run's)")
    p.add_argument("--max-tokens", "--eval-tokens", dest="max_tokens", type=int, default=None,
                   help="validation tokens to score (default: the run's --eval-tokens)")
    p.add_argument("--no-amp", action="store_true", help="score in fp32 (default: the run's precision on CUDA)")
    p.add_argument("--seed", type=int, default=42, help="seed (scoring is deterministic; kept for the original's "
                   "command lines)")
    p.add_argument("--device", default="auto")
    tasks = p.add_argument_group("downstream tasks (lm-evaluation-harness: pip install -e '.[eval]')")
    tasks.add_argument("--tasks", nargs="+", metavar="TASK", default=None,
                       help="score these lm-eval tasks instead of the validation loss: task names, or task YAML "
                       "files / folders (local data files run offline); commas allowed")
    tasks.add_argument("--include-path", nargs="+", metavar="DIR", default=None, help="folders of task YAML files")
    tasks.add_argument("--num-fewshot", type=int, default=None, help="examples shown before each question")
    tasks.add_argument("--limit", type=float, default=None, help="score at most this many examples per task "
                       "(a fraction below 1: that share)")
    tasks.add_argument("--output", metavar="FILE", default=None, help="also write the results as JSON")
    return p


def cmd_eval(args: argparse.Namespace) -> int:
    from gptrain.evaluate import evaluate_checkpoint

    if args.tasks:
        return cmd_eval_tasks(args)
    result = evaluate_checkpoint(checkpoint_path_of(args, "eval"), data=args.data, batch_size=args.batch_size,
                                 device=args.device, data_mode=args.data_mode, val_data=list(args.val_data),
                                 val_npy=list(args.val_npy), tokenizer_name=args.tokenizer_name, seq_len=args.seq_len,
                                 max_tokens=args.max_tokens, amp=not args.no_amp, seed=args.seed)
    if result["rank"] == 0:
        print(f"checkpoint {result['checkpoint']} (step {result['step']})")
        print(f"data {result['dataset']}: {result['tokens']:,} val tokens ({result['windows']} windows of "
              f"{result['seq_len']}, over {result['world_size']} process(es))")
        bpb = f" | bits per byte {result['bpb']:.4f}" if result.get("bpb") is not None else ""
        print(f"val loss {result['loss']:.4f} | perplexity {result['ppl']:.2f}{bpb}")
    return 0


def cmd_eval_tasks(args: argparse.Namespace) -> int:
    import json

    from gptrain.hf_eval import evaluate_tasks, format_results

    tasks = [t.strip() for item in args.tasks for t in item.split(",") if t.strip()]
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    report = evaluate_tasks(checkpoint_path_of(args, "eval"), tasks, include_path=args.include_path,
                            num_fewshot=args.num_fewshot, limit=limit,
                            batch_size=args.batch_size or 8, device=args.device)
    print(format_results(report))
    if args.output:
        from pathlib import Path

        Path(args.output).write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {args.output}")
    return 0


# ---------------------------------------------------------------------------------------- export
def build_export_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("export", allow_abbrev=False, help="write a model as a Hugging Face transformers folder",
                       description="Export a run's newest checkpoint (or a given checkpoint, sharded ones included) "
                       "as a folder that transformers loads offline: AutoModelForCausalLM.from_pretrained(DIR) and "
                       "AutoTokenizer.from_pretrained(DIR). Needs pip install -e '.[hf]'.")
    p.add_argument("path", metavar="RUN_OR_CHECKPOINT")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write (an earlier export there is "
                   "replaced; any other non-empty folder is refused)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="weights' dtype (default: the training weights', fp32)")
    p.add_argument("--max-shard-size", default="5GB", help="split model.safetensors above this size (default 5GB)")
    return p


def cmd_export(args: argparse.Namespace) -> int:
    import json

    from gptrain.export import export_hf

    out = export_hf(args.path, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size)
    config = json.loads((out / "config.json").read_text())
    arch = ", ".join(config.get("architectures", []))
    remote = " — load with trust_remote_code=True" if "auto_map" in config else ""
    print(f"exported {args.path} → {out} ({arch}{remote})")
    return 0


# ---------------------------------------------------------------------------------------- runs / plot / sync
def build_runs_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("runs", allow_abbrev=False, help="table of runs: status, steps, losses, speed, W&B",
                       description="List the runs in DIR (default: runs) or one run folder.")
    p.add_argument("path", nargs="?", default="runs", metavar="DIR")
    p.add_argument("--json", action="store_true", help="one JSON object per run instead of a table")
    return p


def cmd_runs(args: argparse.Namespace) -> int:
    from gptrain.runs import runs_report

    print(runs_report(args.path, as_json=args.json))
    return 0


def build_plot_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("plot", allow_abbrev=False, help="plot loss, lr and throughput curves of runs to a PNG")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (runs/<name>)")
    p.add_argument("-o", "--out", default="curves.png", help="output image (default curves.png)")
    p.add_argument("--x", choices=("steps", "tokens"), default="steps", help="x axis: optimizer steps or tokens")
    return p


def cmd_plot(args: argparse.Namespace) -> int:
    from gptrain.plot import plot_runs

    counts = plot_runs(args.runs, args.out, x=args.x)
    print(f"wrote {args.out} ({counts['train/loss']} run(s))")
    return 0


def build_sync_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("sync", allow_abbrev=False, help="upload a run's offline W&B data",
                       description="Upload the offline W&B segments of a run, oldest first, into one W&B run.")
    p.add_argument("run", metavar="RUN", help="run folder (runs/<name>)")
    p.add_argument("--dry-run", action="store_true", help="list the segments and stop")
    p.add_argument("--project", help="upload into this W&B project instead of the recorded one")
    p.add_argument("--entity", help="upload into this W&B entity")
    p.add_argument("--include-online", action="store_true", help="also upload segments recorded online")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds one segment's upload may take before giving up (default 600)")
    return p


def cmd_sync(args: argparse.Namespace) -> int:
    from gptrain.sync import sync_run

    if args.timeout <= 0:
        raise UserError(f"--timeout must be positive, got {args.timeout:g}.")
    sync_run(args.run, dry_run=args.dry_run, project=args.project, entity=args.entity,
             include_online=args.include_online, timeout=args.timeout)
    return 0


# ---------------------------------------------------------------------------------------- main
COMMANDS = {
    "train": (build_train_parser, cmd_train),
    "prepare": (build_prepare_parser, cmd_prepare),
    "generate": (build_generate_parser, cmd_generate),
    "eval": (build_eval_parser, cmd_eval),
    "export": (build_export_parser, cmd_export),
    "runs": (build_runs_parser, cmd_runs),
    "plot": (build_plot_parser, cmd_plot),
    "sync": (build_sync_parser, cmd_sync),
    "bench": (build_bench_parser, cmd_bench),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = Parser(prog="gptrain", allow_abbrev=False, description="Pre-train GPT-style language models.")
    parser.add_argument("--version", action="version", version=f"gptrain {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers = {name: build(sub) for name, (build, _) in COMMANDS.items()}
    return parser, subparsers


def main(argv: list[str] | None = None, hooks=()) -> int:
    """The `gptrain` command. `hooks`: gptrain.trainer.TrainerHooks for `train` (programmatic callers)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, subparsers = build_parser()
    if not argv or argv[0] in ("-h", "--help", "--version"):
        if not argv:
            parser.print_help()
            return 0
        parser.parse_args(argv)
        return 0
    command = argv[0]
    if command not in COMMANDS:
        print(f"error: unknown command '{command}'.{suggest(command, list(COMMANDS))} "
              f"Commands: {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    try:
        args = parse_strict(subparsers[command], argv[1:])
        if command == "train":
            return cmd_train(args, hooks)
        return COMMANDS[command][1](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PeerFailure as e:  # another process of a torchrun job died or stopped answering
        if not getattr(e, "reported", False):
            print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

