"""Text → a token dataset directory: train.bin, val.bin, meta.json, tokenizer.json.

The format of that folder (and the other tools' layouts gptrain reads) lives in `data/format.py`;
this module turns text into it. Each document is followed by the tokenizer's end-of-text id.

How a run goes:

1. Resolve the inputs (no inputs = the default corpus, the standard library's .py files) and
   compute a cheap input fingerprint (paths, sizes, mtimes). If ``out_dir`` already holds a
   dataset made from the same inputs with the same settings, reuse it and stop.
2. Build the tokenizer. ``bpe:N`` trains on an evenly spaced sample of the train documents of at
   most ``bpe_sample_bytes`` (8 MiB by default): on the 31.5 MB default corpus that trains in
   ~2 s instead of ~12 s for the whole corpus, and its tokens are within ~2% as long.
3. One streaming pass: a reader thread reads and batches documents (~4 MiB of text per batch),
   two encoder threads each run the tokenizer's multi-core batch encoder on one batch (so it is
   never idle while a finished batch is turned into arrays), and the main thread appends the
   arrays to the split files in order. Memory is bounded by a few batches, whatever the corpus size.
4. The val split is whole documents: document i goes to val when hash(seed, i) < val_fraction
   (or val is exactly ``val_inputs``). If the pass ends with fewer than ``min_val_tokens`` val
   tokens (capped at 10% of all tokens), the trailing train documents move to val. To make that
   possible without a second pass, train documents are written with a delay: the last few
   documents whose tokens are still needed to cover the val shortfall stay in memory. No
   document ever lands in both splits.
5. Everything is written into a temporary directory beside ``out_dir``, meta.json last, then
   renamed into place: an interrupted run never leaves a dataset that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import shutil
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from gptrain.data import sources
from gptrain.data.format import (
    DATASET_FILES,
    FORMAT_VERSION,
    cache_root,
    dtype_for,
    existing_meta,
    read_meta,
    write_meta,
)
from gptrain.data.tokenizer import (
    Tokenizer,
    build_tokenizer,
    needs_training,
    normalize_spec,
    parse_spec,
    tokenizer_meta,
)
from gptrain.errors import UserError
from gptrain.processes import process_alive
from gptrain.settings import check_all, declaration, flags_of, setting

MAX_VAL_SHARE = 0.1  # the min_val_tokens top-up never makes val more than this share of all tokens
DEFAULT_CORPUS = "default-corpus"

Log = Callable[[str], None]


@dataclass
class TextSettings:
    """How raw text becomes tokens: declared once, used by `gptrain prepare` (PrepareConfig) and by
    `gptrain train` on raw files (gptrain.data.dataset.DataConfig)."""

    tokenizer: str | None = setting("bpe:4096", "tokenizer spec: byte, bpe:N (trained on the text), hf:NAME_OR_PATH, "
                                    "gpt2; for token files that carry none, the tokenizer that made them",
                                    flags=("--tokenizer-name", "--tokenizer"))
    val_fraction: float = setting(0.005, "fraction of documents (of token shards: of tokens) held out for validation",
                                  ge=0, lt=1, flags=("--val-ratio", "--val-fraction"))
    max_tokens: int | None = setting(None, "stop after this many training tokens (the last document is cut)", ge=2)
    text_field: str = setting("text", "JSON field / parquet column holding the text")
    line_docs: bool = setting(False, "each non-empty line of a .txt file is one document")


@dataclass
class PrepareConfig(TextSettings):
    """Settings of `prepare_dataset` (``gptrain prepare``); its command line is generated from these."""

    inputs: list[str] = setting(help="files/dirs (searched recursively); none: the default corpus (the standard "
                                "library's .py files)", default_factory=list, cli=False)
    out_dir: str = setting("data/default", "output dataset directory", flags=("--out",), metavar="DIR")
    val_inputs: list[str] | None = setting(None, "validation inputs: exactly these documents form the val split "
                                           "(else a split of the inputs)", flags=("--val",), metavar="INPUT")
    min_val_tokens: int = setting(100_000, "smallest validation split, in tokens (at most 10% of all tokens)", ge=0)
    seed: int = setting(1337, "seed of the validation split")
    bpe_sample_bytes: int = setting(8 * 2**20, "bpe:N trains on at most this much text", ge=1024, cli=False)
    batch_bytes: int = setting(4 * 2**20, "text per encode_batch call", ge=1024, cli=False)
    force: bool = setting(False, "rebuild even when a matching dataset exists in --out")

    def validate(self) -> None:
        check_all(self, lambda f: flags_of(f)[0] if declaration(f).cli else f.name)
        if self.tokenizer is None:
            raise UserError("gptrain prepare needs a tokenizer: pass --tokenizer byte, bpe:N or hf:NAME.")
        parse_spec(self.tokenizer)

    def settings(self) -> dict:
        """What determines the dataset's content (not where it goes or how fast it is made)."""
        d = asdict(self)
        for k in ("out_dir", "force", "batch_bytes", "inputs", "val_inputs"):
            d.pop(k)
        d["tokenizer"] = normalize_spec(self.tokenizer)
        if not needs_training(self.tokenizer):
            d.pop("bpe_sample_bytes")
        if self.val_inputs:
            d.pop("val_fraction")
            d.pop("min_val_tokens")
        return d


def _stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- inputs


@dataclass
class _Inputs:
    train: list[Path]
    val: list[Path]
    is_default: bool

    @property
    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.train + self.val)

    def fingerprint(self) -> str:
        return sources.input_fingerprint(self.train) + ":" + sources.input_fingerprint(self.val)


def _resolve(cfg: PrepareConfig) -> _Inputs:
    if cfg.inputs and not _is_default_corpus(cfg.inputs):
        train = sources.resolve_inputs(cfg.inputs)
        is_default = False
    else:
        train = sources.default_corpus_files()
        is_default = True
        if not train:
            raise UserError("The default corpus (the standard library's .py files) was not found. Fix: name inputs.")
    val = sources.resolve_inputs(cfg.val_inputs) if cfg.val_inputs else []
    both = {p.resolve() for p in train} & {p.resolve() for p in val}
    if both:
        raise UserError(
            f"{len(both)} file(s) are both train and val inputs, e.g. {sorted(both)[0]}. "
            "Fix: keep val files out of the train inputs."
        )
    return _Inputs(train, val, is_default)


def _is_default_corpus(inputs: Sequence[str | os.PathLike]) -> bool:
    """True when ``inputs`` lists exactly the default corpus files (as `default_corpus_files` gives them)."""
    if len(inputs) < 100:
        return False
    files = sources.default_corpus_files()
    return len(files) == len(inputs) and [str(p) for p in files] == [str(p) for p in inputs]


def _pieces(files: Sequence[Path], cfg: PrepareConfig, skip_bad: bool,
            stats: sources.SourceStats) -> Iterator[sources.Piece]:
    # Skipped files (default corpus only) are reported once, as a count, at the end.
    return sources.iter_pieces(files, line_docs=cfg.line_docs, text_field=cfg.text_field,
                               skip_bad_files=skip_bad, stats=stats)


# --------------------------------------------------------------------------- reuse and locations


def _reuse_key(cfg: PrepareConfig, inputs: _Inputs, tok: Tokenizer | None) -> str:
    key = {
        "format_version": FORMAT_VERSION,
        "settings": cfg.settings(),
        "inputs": inputs.fingerprint(),
        "tokenizer": tok.fingerprint() if tok is not None else None,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def dataset_cache_dir(cfg: PrepareConfig) -> Path:
    """A deterministic place for a dataset prepared on the fly (``train --train-data FILE...``).

    ``$GPTRAIN_CACHE/datasets/<name>-<hash>`` (default ``~/.cache/gptrain``), the hash over the
    absolute input paths and the settings. File contents are not in the hash: when a file
    changes, `prepare_dataset` notices (input fingerprint) and rebuilds in the same place.
    """
    base = cache_root()
    key = {
        "inputs": [str(Path(p).expanduser().resolve()) for p in cfg.inputs],
        "val_inputs": [str(Path(p).expanduser().resolve()) for p in cfg.val_inputs or []],
        "settings": cfg.settings(),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    name = Path(cfg.inputs[0]).stem if cfg.inputs and not _is_default_corpus(cfg.inputs) else DEFAULT_CORPUS
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:40] or "data"
    return base / "datasets" / f"{safe}-{digest}"


def _can_reuse(out_dir: Path, key: str) -> dict | None:
    meta = existing_meta(out_dir)
    if meta is None or meta.get("reuse_key") != key:
        return None
    try:
        read_meta(out_dir)  # checks the .bin sizes against the token counts
    except UserError:
        return None
    return meta


def _check_out_dir(out_dir: Path) -> None:
    """Refuse to replace anything that is not a gptrain dataset; make sure the parent exists."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise UserError(f"Output {out_dir} exists and is not a directory. Fix: choose another --out.")
        contents = list(out_dir.iterdir())
        if contents and (existing_meta(out_dir) is None or any(p.name not in DATASET_FILES for p in contents)):
            raise UserError(
                f"Output directory {out_dir} is not empty and is not a gptrain dataset; not overwriting it. "
                "Fix: choose another --out, or remove the directory."
            )
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"Cannot create the output directory {out_dir}: {e.strerror or e}. Fix: choose a writable --out path."
        ) from None


# --------------------------------------------------------------------------- writing


class _SplitFile:
    """Appends token arrays to one .bin file through a small buffer."""

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.path = path
        self.dtype = dtype
        self.f = open(path, "wb")
        self.buf: list[np.ndarray] = []
        self.buffered = 0
        self.tokens = 0
        self.docs = 0

    def write_doc(self, parts: list[np.ndarray]) -> None:
        for a in parts:
            self.buf.append(a)
            self.buffered += a.size
            self.tokens += a.size
        self.docs += 1
        if self.buffered >= 1 << 20:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            np.concatenate(self.buf).astype(self.dtype, copy=False).tofile(self.f)
            self.buf, self.buffered = [], 0

    def close(self) -> None:
        self.flush()
        self.f.close()


def _hash01(seed: int, index: int) -> float:
    """A uniform number in [0, 1) from (seed, index): splitmix64, cheap and platform-independent."""
    z = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return ((z ^ (z >> 31)) >> 11) / float(1 << 53)


class _Splitter:
    """Routes whole documents to train or val, holding back the trailing train documents that a
    val top-up might need (at most the val shortfall plus one document)."""

    def __init__(self, train: _SplitFile, val: _SplitFile, cfg: PrepareConfig, eot: np.ndarray) -> None:
        self.train, self.val, self.cfg, self.eot = train, val, cfg, eot
        self.tail: deque[tuple[list[np.ndarray], int]] = deque()
        self.tail_tokens = 0
        self.index = 0
        self.full = False  # max_tokens reached
        self.lone_document_cut = False

    @property
    def train_tokens(self) -> int:
        return self.train.tokens + self.tail_tokens

    def add(self, parts: list[np.ndarray], to_val: bool | None) -> None:
        """One document (``to_val`` None: decide by hash)."""
        if to_val is None:
            to_val = _hash01(self.cfg.seed, self.index) < self.cfg.val_fraction
        self.index += 1
        parts.append(self.eot)
        if to_val:
            self.val.write_doc(parts)
            return
        n = sum(a.size for a in parts)
        cap = self.cfg.max_tokens
        if cap is not None and self.train_tokens + n >= cap:
            parts = [np.concatenate(parts)[: cap - self.train_tokens - 1], self.eot]
            n = cap - self.train_tokens
            self.full = True
        self.tail.append((parts, n))
        self.tail_tokens += n
        shortfall = 0 if self.cfg.val_inputs else max(0, self.cfg.min_val_tokens - self.val.tokens)
        while len(self.tail) > 1 and self.tail_tokens - self.tail[0][1] >= shortfall:
            old, m = self.tail.popleft()
            self.tail_tokens -= m
            self.train.write_doc(old)

    def _cut_lone_document(self, val_tokens: int) -> None:
        """A corpus of one document cannot be split by document: its last ``val_tokens`` tokens
        become the val split and the rest train (nanoGPT's way), each ending with end-of-text."""
        (parts, _), = self.tail
        self.tail.clear()
        self.tail_tokens = 0
        ids = np.concatenate(parts[:-1])  # without its end-of-text
        cut = max(1, len(ids) - val_tokens)
        self.lone_document_cut = True
        self.train.write_doc([ids[:cut], self.eot])
        self.val.write_doc([ids[cut:], self.eot])

    def finish(self) -> int:
        """Top val up from the trailing train documents; returns how many documents moved."""
        moved = 0
        if not self.cfg.val_inputs:
            total = self.train_tokens + self.val.tokens
            target = min(self.cfg.min_val_tokens, int(MAX_VAL_SHARE * total))
            if self.index == 1 and self.val.docs == 0 and total >= 20:
                self._cut_lone_document(max(target, int(self.cfg.val_fraction * total), 1))
                return 1
            while self.tail and (self.val.tokens < target or self.val.docs == 0) \
                    and self.train.docs + len(self.tail) > 1:
                parts, m = self.tail.pop()
                self.tail_tokens -= m
                self.val.write_doc(parts)
                moved += 1
        while self.tail:
            parts, m = self.tail.popleft()
            self.tail_tokens -= m
            self.train.write_doc(parts)
        return moved


def _read_ahead(batches: Iterator[list[sources.Piece]], depth: int = 2) -> Iterator[list[sources.Piece]]:
    """Run ``batches`` in a thread so reading/decoding files overlaps with encoding."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False  # the consumer has gone

    def work() -> None:
        try:
            for b in batches:
                if not put(b):
                    return
            put(done)
        except BaseException as e:  # handed to the consumer, which re-raises it
            put(e)

    t = threading.Thread(target=work, name="gptrain-prepare-reader", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        t.join(timeout=5)


def _encode_ahead(tok: Tokenizer, batches: Iterator[list[sources.Piece]], depth: int = 2
                  ) -> Iterator[tuple[list[sources.Piece], list[np.ndarray]]]:
    """``(batch, its token arrays)`` in order, with up to ``depth`` batches being encoded at once.

    The tokenizer's batch encoder releases the GIL and spreads one batch over every core, but
    turning its output into arrays (``Encoding.ids`` -> numpy) is Python on one core: ~0.4 s of a
    6 s pass over the default corpus, during which the cores would otherwise wait. With the next
    batch already being encoded in a second thread, the tokenizer is never idle.
    """
    pending: deque[tuple[list[sources.Piece], Future]] = deque()
    with ThreadPoolExecutor(max_workers=depth, thread_name_prefix="gptrain-encode") as pool:
        try:
            for batch in batches:
                pending.append((batch, pool.submit(tok.encode_batch, [p.text for p in batch])))
                if len(pending) >= depth:
                    done, future = pending.popleft()
                    yield done, future.result()
            while pending:
                done, future = pending.popleft()
                yield done, future.result()
        finally:  # the consumer stopped early (max_tokens) or failed: drop what has not started
            for _, future in pending:
                future.cancel()


# --------------------------------------------------------------------------- progress


class _Progress:
    """A rich bar on a terminal; otherwise a plain line every ~10%."""

    def __init__(self, total_bytes: int, live: bool, log: Log, what: str) -> None:
        self.total = max(1, total_bytes)
        self.done = 0
        self.tokens = 0
        self.start = time.perf_counter()
        self.log = log
        self.next_mark = 0.1
        self.bar = None
        if live:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(),
                TextColumn("{task.fields[mb]}"), TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(), TimeRemainingColumn(), transient=False,
            )
            self.task = self.bar.add_task(what, total=self.total, mb="", rate="")
            self.bar.start()

    def update(self, nbytes: int, ntokens: int) -> None:
        self.done = min(self.total, self.done + nbytes)
        self.tokens += ntokens
        dt = max(1e-9, time.perf_counter() - self.start)
        if self.bar is not None:
            self.bar.update(
                self.task, completed=self.done,
                mb=f"{self.done / 1e6:.1f}/{self.total / 1e6:.1f} MB",
                rate=f"{self.done / 1e6 / dt:.2f} MB/s {self.tokens / 1e3 / dt:.0f}k tok/s",
            )
        elif self.done / self.total >= self.next_mark:
            self.log(f"  {100 * self.done / self.total:3.0f}%  {self.done / 1e6:.1f}/{self.total / 1e6:.1f} MB  "
                     f"{self.done / 1e6 / dt:.2f} MB/s  {self.tokens / dt:,.0f} tokens/s")
            while self.next_mark <= self.done / self.total:
                self.next_mark += 0.1

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=self.total)
            self.bar.stop()


# --------------------------------------------------------------------------- the pass


def _encode_into(splitter: _Splitter, tok: Tokenizer, pieces: Iterator[sources.Piece], to_val: bool | None,
                 cfg: PrepareConfig, dtype: np.dtype, progress: _Progress) -> None:
    doc: list[np.ndarray] = []
    for batch, encoded in _encode_ahead(tok, _read_ahead(sources.batch_pieces(pieces, cfg.batch_bytes))):
        nbytes = ntokens = 0
        for piece, ids in zip(batch, encoded, strict=True):
            doc.append(ids.astype(dtype, copy=False))
            nbytes += piece.nbytes
            ntokens += ids.size
            if piece.doc_end:
                splitter.add(doc, to_val)
                doc = []
                if splitter.full:
                    progress.update(nbytes, ntokens)
                    return
        progress.update(nbytes, ntokens)


def _bpe_sample(files: Sequence[Path], total_bytes: int, cfg: PrepareConfig, skip_bad: bool) -> Iterator[str]:
    """Evenly spaced pieces of the train documents, about ``bpe_sample_bytes`` in all."""
    ratio = min(1.0, cfg.bpe_sample_bytes / max(1, total_bytes))
    seen = taken = 0
    for piece in _pieces(files, cfg, skip_bad, sources.SourceStats()):
        seen += len(piece.text)
        if taken < seen * ratio:
            taken += len(piece.text)
            yield piece.text


def prepare_dataset(cfg: PrepareConfig, progress: bool | None = None, log: Log | None = None) -> Path:
    """Tokenize ``cfg.inputs`` into ``cfg.out_dir`` (or reuse a matching dataset there); returns it.

    ``progress``: a live bar (True), plain lines (False), or a bar only when stderr is a
    terminal (None). ``log`` receives status lines (default: print to stderr).
    """
    log = log or _stderr_log
    cfg.validate()
    live = sys.stderr.isatty() if progress is None else progress
    out_dir = Path(cfg.out_dir).expanduser()
    inputs = _resolve(cfg)
    spec = normalize_spec(cfg.tokenizer)
    pre_tok = None if needs_training(spec) else build_tokenizer(spec)
    key = _reuse_key(cfg, inputs, pre_tok)
    if not cfg.force:
        meta = _can_reuse(out_dir, key)
        if meta is not None:
            s = meta["splits"]
            log(f"reused {out_dir}: same inputs and settings (train {s['train']['tokens']:,} tokens, "
                f"val {s['val']['tokens']:,} tokens); pass --force to rebuild")
            return out_dir
    _check_out_dir(out_dir)

    t0 = time.perf_counter()
    total_bytes = inputs.total_bytes
    skip_bad = inputs.is_default
    what = "the default corpus (stdlib .py files)" if inputs.is_default else f"{len(inputs.train)} file(s)"
    log(f"preparing {what}, {total_bytes / 1e6:.1f} MB -> {out_dir} with tokenizer {spec}")

    if pre_tok is not None:
        tok = pre_tok
    else:
        n_bytes = min(cfg.bpe_sample_bytes, sum(p.stat().st_size for p in inputs.train))
        log(f"training {spec} on ~{n_bytes / 1e6:.1f} MB of text...")
        t = time.perf_counter()
        tok = build_tokenizer(spec, lambda: _bpe_sample(inputs.train, total_bytes, cfg, skip_bad), log=log)
        log(f"trained {spec} in {time.perf_counter() - t:.1f}s (vocab {tok.vocab_size})")
    dtype = dtype_for(tok.vocab_size)

    remove_stale_temp_dirs(out_dir)
    try:
        tmp = Path(_make_temp_dir(out_dir))
    except OSError as e:
        raise UserError(f"Cannot write to {out_dir.parent}: {e.strerror or e}. Fix: choose a writable --out path.") \
            from None
    try:
        with _sigterm_as_interrupt():
            meta = _write_dataset(tmp, cfg, inputs, tok, dtype, key, total_bytes, skip_bad, live, log, t0)
            _swap_into_place(tmp, out_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"Writing the dataset to {out_dir} failed: {e.strerror or e}. Fix: check free disk space "
                        "and permissions.") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    s = meta["splits"]
    log(f"done in {meta['seconds']:.1f}s: train {s['train']['tokens']:,} tokens ({s['train']['documents']:,} docs), "
        f"val {s['val']['tokens']:,} tokens ({s['val']['documents']:,} docs), {dtype.name} -> {out_dir}")
    return out_dir


class PrepareInterrupted(KeyboardInterrupt):
    """SIGTERM during preparation: raised so that the temporary folder is removed on the way out."""


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM's default action ends the process at once, leaving the temporary folder behind: raise instead
    (main thread only; elsewhere the next prepare removes it, see remove_stale_temp_dirs)."""

    def stop(signum, frame):
        raise PrepareInterrupted(f"stopped by {signal.Signals(signum).name}")

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def remove_stale_temp_dirs(out_dir: Path) -> list[Path]:
    """Temporary folders of earlier prepares into `out_dir` whose process is gone (killed, even with
    SIGKILL): removed. The folder name carries the writer's pid (`.<name>.tmp-<pid>-<random>`)."""
    removed = []
    for path in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        pid = path.name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _make_temp_dir(out_dir: Path) -> str:
    import tempfile

    tmp = tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=out_dir.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the dataset should look like any directory
    return tmp


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished dataset into place; an old dataset there is replaced."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f"{tmp.name}.old"
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_dataset(tmp: Path, cfg: PrepareConfig, inputs: _Inputs, tok: Tokenizer, dtype: np.dtype, key: str,
                   total_bytes: int, skip_bad: bool, live: bool, log: Log, t0: float) -> dict:
    train = _SplitFile(tmp / "train.bin", dtype)
    val = _SplitFile(tmp / "val.bin", dtype)
    eot = np.array([tok.eot_id], dtype=dtype)
    splitter = _Splitter(train, val, cfg, eot)
    stats = sources.SourceStats()
    bar = _Progress(total_bytes, live, log, "tokenizing")
    t_encode = time.perf_counter()
    try:
        if inputs.val:
            _encode_into(splitter, tok, _pieces(inputs.val, cfg, skip_bad, stats), True, cfg, dtype, bar)
            if val.docs == 0:
                raise UserError("The val inputs hold no text (no non-empty documents). Fix: give val files with text.")
        _encode_into(splitter, tok, _pieces(inputs.train, cfg, skip_bad, stats),
                     False if inputs.val else None, cfg, dtype, bar)
    finally:
        bar.close()
    if splitter.index == 0 or (inputs.val and splitter.index == val.docs):
        raise UserError(
            "The inputs hold no text (no non-empty documents"
            + (", after skipping unreadable files" if stats.skipped_files else "")
            + "). Fix: give files that contain text."
        )
    moved = splitter.finish()
    encode_s = time.perf_counter() - t_encode
    train.close()
    val.close()
    if val.docs == 0:
        raise UserError(
            f"The corpus has only {train.docs} document(s), so it cannot be split into train and val by "
            "document. Fix: use --line-docs (one document per line), give separate validation files (prepare --val, train --val-data), "
            "or split the text into several files."
        )
    if stats.skipped_files:
        log(f"skipped {len(stats.skipped_files)} unreadable file(s) of the default corpus "
            f"(not UTF-8 or unreadable), e.g. {stats.skipped_files[0]}")
    tok_json = tok.to_json()
    if tok_json is not None:
        (tmp / "tokenizer.json").write_text(tok_json, encoding="utf-8")
    meta = {
        "tokenizer": tokenizer_meta(tok),
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "dtype": dtype.name,
        "splits": {
            "train": {"tokens": train.tokens, "documents": train.docs},
            "val": {"tokens": val.tokens, "documents": val.docs,
                    "how": "val_inputs" if inputs.val else
                    "tail of the only document" if splitter.lone_document_cut else "hash of (seed, document index)",
                    "moved_from_train": 0 if splitter.lone_document_cut else moved},
        },
        "inputs": {
            "train": [DEFAULT_CORPUS] if inputs.is_default else [str(p) for p in cfg.inputs],
            "val": [str(p) for p in cfg.val_inputs or []],
            "files": len(inputs.train) + len(inputs.val),
            "bytes": total_bytes,
            "skipped_files": stats.skipped_files or [],
            "fingerprint": inputs.fingerprint(),
        },
        "prepare": cfg.settings(),
        "reuse_key": key,
        "seconds": round(time.perf_counter() - t0, 3),
        "encode_seconds": round(encode_s, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return write_meta(tmp, meta)  # last: marks the dataset complete


# --------------------------------------------------------------------------- in memory


def tokenize_files(inputs: Sequence[str | os.PathLike], tok: Tokenizer, *, max_tokens: int | None = None,
                   line_docs: bool = False, text_field: str = "text", batch_bytes: int = 1 << 20) -> np.ndarray:
    """The tokens of some text files in memory, each document followed by end-of-text: for evaluation
    text (`gptrain eval --val-data`), which is small or capped by ``max_tokens`` (reading stops there)."""
    files = sources.resolve_inputs(inputs)
    dtype = dtype_for(tok.vocab_size)
    out: list[np.ndarray] = []
    total = 0
    eot = np.array([tok.eot_id], dtype=dtype)
    pieces = sources.iter_pieces(files, line_docs=line_docs, text_field=text_field)
    for batch in sources.batch_pieces(pieces, batch_bytes):
        for piece, ids in zip(batch, tok.encode_batch([p.text for p in batch]), strict=True):
            out.append(ids.astype(dtype, copy=False))
            total += ids.size
            if piece.doc_end:
                out.append(eot)
                total += 1
        if max_tokens is not None and total >= max_tokens:
            break
    tokens = np.concatenate(out) if out else np.empty(0, dtype=dtype)
    return tokens if max_tokens is None else tokens[:max_tokens]
