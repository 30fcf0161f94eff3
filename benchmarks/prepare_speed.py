"""How fast is `gptrain prepare`, compared with the tokenizer alone, and how much memory does it take?

    python benchmarks/prepare_speed.py                  # bpe:8192 on the default corpus + 100 MB RSS run
    python benchmarks/prepare_speed.py --specs bpe:2048 bpe:8192 --rss-mb 0

For each tokenizer spec, on the default corpus (the stdlib's .py files):
  * BPE training time (on the capped sample prepare uses), and the whole prepare time;
  * raw encode throughput: the tokenizer's own batch encoder (encode_batch_fast) over the same
    text, already in memory, in the same batches prepare makes: the ceiling for prepare;
  * prepare throughput: input MB / the time of prepare's streaming pass (read, encode, split,
    write) with the same tokenizer, and the ratio of the two (the goal is >= 0.9).
    Raw and prepare runs alternate, best of --rounds each.
Then peak RSS of a prepare of a generated ~100 MB corpus (one 30+ MB single-document file, JSON
lines, many small files), run in a child process and read with resource.getrusage.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gptrain.data import sources
from gptrain.data.prepare import PrepareConfig, prepare_dataset, read_meta
from gptrain.data.tokenizer import load_dataset_tokenizer


def quiet(msg: str) -> None:
    pass


def bench_spec(spec: str, work: Path, rounds: int) -> dict:
    out = work / spec.replace(":", "_")
    logs: list[str] = []
    t = time.perf_counter()
    prepare_dataset(PrepareConfig(out_dir=str(out), tokenizer=spec, force=True), progress=False, log=logs.append)
    total_s = time.perf_counter() - t
    meta = read_meta(out)
    train_line = next((line for line in logs if line.startswith("trained ")), "")
    train_s = float(train_line.split(" in ")[1].split("s")[0]) if train_line else 0.0
    tok = load_dataset_tokenizer(out)

    # The same text, in the same batches, in memory: what the tokenizer alone achieves.
    files = sources.default_corpus_files()
    pieces = list(sources.iter_pieces(files, skip_bad_files=True))
    batches = [[p.text for p in b] for b in sources.batch_pieces(pieces, PrepareConfig().batch_bytes)]
    n_bytes = sum(len(p.text.encode()) for p in pieces)
    raw = getattr(tok, "hf", None)
    encode = (lambda b: raw.encode_batch_fast(b, add_special_tokens=False)) if raw is not None else tok.encode_batch
    # Alternate raw and pipeline runs (and their order), and compare each pair: this VM's speed drifts by
    # 30% within a minute, so the ratio of two adjacent runs is steadier than a ratio of two best times.
    tok_file = out / "tokenizer.json"
    again = f"hf:{tok_file}" if tok_file.exists() else spec  # the same tokenizer, without retraining
    raw_times: list[float] = []
    prep_times: list[float] = []

    def time_raw() -> None:
        t = time.perf_counter()
        for b in batches:
            for _ in encode(b):
                pass
        raw_times.append(time.perf_counter() - t)

    def time_prepare() -> None:
        prepare_dataset(PrepareConfig(out_dir=str(work / "again"), tokenizer=again, force=True), progress=False,
                        log=quiet)
        prep_times.append(read_meta(work / "again")["encode_seconds"])

    for r in range(rounds):
        for run in (time_raw, time_prepare) if r % 2 == 0 else (time_prepare, time_raw):
            run()
    # Both encode the same text (prepare's input bytes also count the few unreadable files it skips).
    ratios = [raw / prep for raw, prep in zip(raw_times, prep_times, strict=True)]
    n_tokens = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
    return {
        "spec": spec,
        "bpe_train_s": train_s,
        "prepare_s": total_s,
        "raw_MBps": n_bytes / 1e6 / statistics.median(raw_times),
        "prepare_MBps": n_bytes / 1e6 / statistics.median(prep_times),
        "ratio_median": statistics.median(ratios),
        "ratios": ratios,
        "ratio_best": min(raw_times) / min(prep_times),
        "tokens": n_tokens,
        "bytes_per_token": n_bytes / n_tokens,
    }


def make_corpus(root: Path, mb: int) -> Path:
    """~``mb`` MB: stdlib text as one huge .txt document, as JSON lines, and as many small files."""
    root.mkdir(parents=True, exist_ok=True)
    docs = list(sources.iter_documents(sources.default_corpus_files(), skip_bad_files=True))
    target = mb * 1_000_000
    written = 0
    part = 0
    while written < target:
        variant = f"# copy {part}\n"
        if part % 3 == 0:
            with open(root / f"big{part}.txt", "w", encoding="utf-8") as f:
                for d in docs:
                    f.write(variant + d)
                    written += len(d) + len(variant)
        elif part % 3 == 1:
            with open(root / f"docs{part}.jsonl", "w", encoding="utf-8") as f:
                for d in docs:
                    line = json.dumps({"text": variant + d}) + "\n"
                    f.write(line)
                    written += len(line)
        else:
            sub = root / f"small{part}"
            sub.mkdir()
            for i, d in enumerate(docs):
                (sub / f"{i:05d}.txt").write_text(variant + d, encoding="utf-8")
                written += len(d) + len(variant)
        part += 1
    return root


def rss_run(work: Path, mb: int, spec: str) -> dict:
    corpus = make_corpus(work / "corpus", mb)
    size = sum(p.stat().st_size for p in corpus.rglob("*") if p.is_file())
    code = (
        "import sys, time; from gptrain.data.prepare import PrepareConfig, prepare_dataset; t=time.perf_counter();"
        f"prepare_dataset(PrepareConfig(inputs=[{str(corpus)!r}], out_dir={str(work / 'rss_out')!r}, "
        f"tokenizer={spec!r}), progress=False, log=lambda m: None); print(time.perf_counter()-t)"
    )
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert peak_kb >= before
    return {"corpus_MB": size / 1e6, "peak_rss_MB": peak_kb / 1024, "seconds": float(res.stdout.strip())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--specs", nargs="+", default=["bpe:8192"])
    ap.add_argument("--rounds", type=int, default=5, help="raw/prepare timing rounds (pairs, order alternating)")
    ap.add_argument("--rss-mb", type=int, default=100, help="size of the RSS corpus (0 skips it)")
    ap.add_argument("--rss-spec", default="bpe:8192")
    args = ap.parse_args()
    print(f"{os.cpu_count()} CPUs, python {sys.version.split()[0]}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = [bench_spec(s, work, args.rounds) for s in args.specs]
        print(f"\ndefault corpus ({len(sources.default_corpus_files())} files)")
        print(f"{'tokenizer':<10} {'bpe train s':>11} {'prepare s':>9} {'raw MB/s':>9} {'prep MB/s':>9} "
              f"{'ratio':>6} {'best/best':>9} {'tokens':>11} {'bytes/tok':>9}")
        for r in rows:
            print(f"{r['spec']:<10} {r['bpe_train_s']:>11.1f} {r['prepare_s']:>9.1f} {r['raw_MBps']:>9.2f} "
                  f"{r['prepare_MBps']:>9.2f} {r['ratio_median']:>6.2f} {r['ratio_best']:>9.2f} {r['tokens']:>11,} "
                  f"{r['bytes_per_token']:>9.2f}")
            print(f"{'':<10} per-round ratios: {', '.join(f'{x:.2f}' for x in r['ratios'])}")
        if args.rss_mb:
            r = rss_run(work, args.rss_mb, args.rss_spec)
            print(f"\nmemory: {args.rss_spec} prepare of {r['corpus_MB']:.0f} MB: peak RSS {r['peak_rss_MB']:.0f} MB, "
                  f"{r['seconds']:.1f}s")


if __name__ == "__main__":
    main()
