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
from gptrain.config import NOT_YET_SUPPORTED, OPTIONS, build_config, field_type, suggest
from gptrain.errors import PeerFailure, UserError

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
    """One flag group per setting section; defaults are SUPPRESS so only given flags override.

    `hidden(path)`: settings left out of --help (still parsed, so that the command can refuse them by name).
    """
    groups: dict[str, argparse._ArgumentGroup] = {}
    for opt in OPTIONS:
        section = opt.path.split(".")[0]
        group = groups.setdefault(section, parser.add_argument_group(f"{section} settings"))
        t = field_type(opt.path)
        kwargs: dict[str, Any] = dict(dest=_flag_dest(opt.path), default=argparse.SUPPRESS,
                                      help=argparse.SUPPRESS if hidden(opt.path) else opt.help)
        if t is bool:
            group.add_argument(*opt.flags, action="store_const", const=True, **kwargs)
            if opt.negate:
                # listed in --help too: for settings that default to on it is the flag that does something
                group.add_argument(opt.negate, action="store_const", const=False, dest=kwargs["dest"],
                                   default=argparse.SUPPRESS,
                                   help=argparse.SUPPRESS if hidden(opt.path) else f"turn off {opt.flags[0]}")
        elif typing.get_origin(t) is list or list in typing.get_args(t):
            group.add_argument(*opt.flags, nargs="+", metavar=opt.path.split(".", 1)[1].upper(), **kwargs)
        else:
            if opt.choices:
                kwargs["choices"] = opt.choices
            else:
                kwargs["metavar"] = opt.path.split(".", 1)[1].upper()
            group.add_argument(*opt.flags, **kwargs)


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
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if flag in NOT_YET_SUPPORTED:
            raise UserError(f"{flag} is not supported yet: {NOT_YET_SUPPORTED[flag]}")
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


def cmd_train(args: argparse.Namespace) -> int:
    from gptrain.trainer import train

    cfg, explicit = build_config(collect_overrides(args), args.config)
    result = train(cfg, explicit)
    if result.status == "finished" and os.environ.get("RANK", "0") == "0":  # under torchrun: global rank 0
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
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--tokenizer", "--tokenizer-name", default="bpe:4096",
                   help="byte, bpe:N (trained on the inputs), hf:NAME_OR_PATH, or a name such as gpt2")
    p.add_argument("--val", nargs="+", default=[], metavar="INPUT", help="validation inputs (else a split)")
    p.add_argument("--val-fraction", "--val-ratio", type=float, default=None,
                   help="fraction of documents held out for validation")
    p.add_argument("--min-val-tokens", type=int, default=None, help="smallest validation split, in tokens")
    p.add_argument("--line-docs", action="store_true", help="each non-empty line of a .txt file is a document")
    p.add_argument("--text-field", default="text", help="JSON field / parquet column with the text")
    p.add_argument("--max-tokens", type=int, default=None, help="stop after this many training tokens")
    p.add_argument("--seed", type=int, default=None, help="seed of the validation split")
    p.add_argument("--force", action="store_true", help="rebuild even when a matching dataset exists in --out")
    return p


def cmd_prepare(args: argparse.Namespace) -> int:
    from gptrain.data.prepare import PrepareConfig, prepare_dataset

    kwargs = dict(inputs=args.inputs, out_dir=args.out, tokenizer=args.tokenizer, val_inputs=args.val,
                  line_docs=args.line_docs, text_field=args.text_field, max_tokens=args.max_tokens,
                  force=args.force)
    for name in ("val_fraction", "min_val_tokens", "seed"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    prepare_dataset(PrepareConfig(**kwargs))
    return 0


# ---------------------------------------------------------------------------------------- generate / eval
def build_generate_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("generate", allow_abbrev=False, help="sample text from a trained model")
    p.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole prefix for every token")
    return p


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from gptrain.generate import generate, load_trained_model, tokens_that_fit

    for name, value in [("max-new-tokens", args.max_new_tokens), ("num-samples", args.num_samples),
                        ("top-k", args.top_k)]:
        if value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}.")
    if args.temperature < 0:
        raise UserError(f"--temperature must be ≥ 0 (0: greedy decoding), got {args.temperature:g}.")
    model, tokenizer, ckpt = load_trained_model(args.path, args.device)
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
        new = generate(model, prompt_ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       use_cache=not args.no_kv_cache, stop_id=tokenizer.eot_id, generator=gen)
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(args.prompt + tokenizer.decode(new))
    return 0


def build_eval_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", allow_abbrev=False, help="validation loss and perplexity of a trained model")
    p.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--data", help="dataset directory (default: the one the model was trained on)")
    p.add_argument("--eval-tokens", type=int, default=None, help="validation tokens to score (default: run's)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default="auto")
    return p


def cmd_eval(args: argparse.Namespace) -> int:
    from gptrain.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(args.path, data=args.data, eval_tokens=args.eval_tokens,
                                 batch_size=args.batch_size, device=args.device)
    print(f"checkpoint {result['checkpoint']} (step {result['step']})")
    print(f"data {result['dataset']}: {result['tokens']:,} val tokens")
    print(f"val loss {result['loss']:.4f} | perplexity {result['ppl']:.2f}")
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


def main(argv: list[str] | None = None) -> int:
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

