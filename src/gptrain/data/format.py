"""Token datasets on disk: gptrain's own format and the layouts of other tools, read in place.

gptrain's format (what `gptrain prepare` writes), a folder:

    train.bin, val.bin   flat little-endian token ids, uint16 when the vocabulary fits (≤ 65536) else uint32
    meta.json            format, vocab size, end-of-text id, dtype, token counts (checked against the
                         .bin sizes), tokenizer identity, how the data was made; written last
    tokenizer.json       the tokenizer (absent for `byte`, which needs none)

Layouts of other tools, trained on as they are (memory-mapped, never copied):

    nanoGPT    a folder with train.bin / val.bin (uint16, no header) and optionally meta.pkl
               (vocab_size; a character table `itos` for character-level data)
    llm.c      .bin shards: a header of 256 little-endian int32 (magic, version, token count), then
               the tokens: magic 20240520 version 1 = uint16 (GPT-2), magic 20240801 version 7 =
               uint32 (Llama 3), as llm.c's dev/data/data_common.py writes them
    .npy       1-D integer arrays, one per shard (build-nanoGPT's fineweb.py writes uint16)

`TokenShards` presents one or many such arrays as one sequence of tokens (len() and slicing
across shard boundaries): the loader and evaluation read every format through it.

This module imports nothing else of gptrain's data package: the tokenizer, prepare, the loader,
the trainer, eval and bench all build on it.
"""

from __future__ import annotations

import bisect
import glob
import hashlib
import json
import os
import pickle
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gptrain.errors import UserError
from gptrain.jsonio import read_json, write_json_atomic

FORMAT = "gptrain-tokens"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
DATASET_FILES = ("train.bin", "val.bin", "meta.json", "tokenizer.json")

LLMC_HEADER_INTS = 256
LLMC_HEADER_BYTES = 4 * LLMC_HEADER_INTS
# magic -> (version, token dtype, what llm.c calls it)
LLMC_MAGICS = {20240520: (1, np.dtype("<u2"), "gpt-2"), 20240801: (7, np.dtype("<u4"), "llama-3")}
NPY_MAGIC = b"\x93NUMPY"
SHARD_SUFFIXES = (".npy", ".bin")

SCAN_CHUNK_TOKENS = 1 << 24  # the id scan reads this many tokens at a time: memory stays bounded


def dtype_for(vocab_size: int) -> np.dtype:
    """The token dtype of gptrain's .bin files for a vocabulary: uint16 when it fits, else uint32."""
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


def cache_root() -> Path:
    """``$GPTRAIN_CACHE``, default ``~/.cache/gptrain``: datasets prepared on the fly and scan results live there."""
    return Path(os.environ.get("GPTRAIN_CACHE") or Path.home() / ".cache" / "gptrain").expanduser()


# ---------------------------------------------------------------------------------------- meta.json
def write_meta(dataset_dir: str | os.PathLike, meta: dict) -> dict:
    """Write a gptrain dataset's meta.json (atomically: it is the file that marks a dataset complete);
    returns what was written (``format`` and ``format_version`` first)."""
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta}
    missing = [k for k in ("vocab_size", "eot_id", "dtype", "splits", "tokenizer") if k not in meta]
    if missing:
        raise ValueError(f"meta.json needs {', '.join(missing)}")
    write_json_atomic(Path(dataset_dir) / "meta.json", meta)
    return meta


def read_meta(dataset_dir: str | os.PathLike, vocab_size: int | None = None) -> dict:
    """meta.json of a prepared dataset, checked against its .bin files; a nanoGPT folder is read too.

    For a nanoGPT folder (train.bin/val.bin, with or without meta.pkl) the result has the same keys,
    with ``format`` "nanogpt" (see `nanogpt_meta`; ``vocab_size`` is passed on to it).
    """
    d = Path(dataset_dir).expanduser()
    path = d / "meta.json"
    if not path.is_file():
        if is_nanogpt_dir(d):
            return nanogpt_meta(d, vocab_size)
        what = "does not exist" if not d.exists() else "has no meta.json (and no train.bin/val.bin)"
        raise UserError(f"Dataset {d} {what}. Fix: create it with `gptrain prepare INPUT... --out {d}`.")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is unreadable or corrupt ({e}). Fix: re-run gptrain prepare for it.") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{path} is not a gptrain dataset meta.json. Fix: re-run gptrain prepare for it.")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{path} was written by a newer gptrain (format {meta['format_version']}). Fix: upgrade gptrain.")
    try:
        dtype = np.dtype(meta["dtype"])
        for split in SPLITS:
            tokens = int(meta["splits"][split]["tokens"])
            size = (d / f"{split}.bin").stat().st_size
            if size != tokens * dtype.itemsize:
                raise UserError(
                    f"{d / f'{split}.bin'} has {size} bytes, meta.json expects {tokens * dtype.itemsize}: the dataset "
                    "is incomplete or corrupt. Fix: re-run gptrain prepare for it."
                )
        int(meta["vocab_size"]), int(meta["eot_id"]), meta["tokenizer"]["spec"]
    except (KeyError, TypeError, ValueError, OSError) as e:
        raise UserError(f"{path} is incomplete or the dataset is damaged ({e!r}). Fix: re-run gptrain prepare.") \
            from None
    return meta


def existing_meta(dataset_dir: Path) -> dict | None:
    """The folder's meta.json when it is a gptrain one, else None (no checks of the .bin files)."""
    meta = read_json(Path(dataset_dir) / "meta.json")
    return meta if meta.get("format") == FORMAT else None


# ---------------------------------------------------------------------------------------- nanoGPT
def is_nanogpt_dir(d: Path) -> bool:
    return d.is_dir() and (d / "train.bin").is_file() and (d / "val.bin").is_file() and not (d / "meta.json").exists()


def _load_meta_pkl(path: Path) -> dict:
    """nanoGPT's meta.pkl (plain dicts, strs and ints), loaded without running any pickled code."""

    class Restricted(pickle.Unpickler):
        def find_class(self, module, name):
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")

    try:
        with open(path, "rb") as f:
            pkl = Restricted(f).load()
        int(pkl["vocab_size"])
        return pkl
    except Exception as e:
        raise UserError(f"{path} is unreadable ({type(e).__name__}: {e}). Fix: re-make it with nanoGPT's "
                        "prepare.py, or remove it and pass --vocab-size.") from None


def nanogpt_meta(d: Path, vocab_size: int | None = None) -> dict:
    """What a nanoGPT folder holds, in meta.json's shape.

    ``vocab_size``: meta.pkl's; else the one given (the model's --vocab-size); else the data's
    largest id + 1 (a chunked scan, cached: see `id_range_of`). ``tokenizer``: a character table when
    meta.pkl has a complete `itos` (shakespeare_char), else None: nanoGPT datasets carry no other
    tokenizer, and training and evaluation need none.
    """
    tokenizer = None
    eot_id = None
    if (d / "meta.pkl").is_file():
        pkl = _load_meta_pkl(d / "meta.pkl")
        vocab_size = int(pkl["vocab_size"])
        itos = pkl.get("itos")
        if isinstance(itos, dict) and all(isinstance(itos.get(i), str) for i in range(vocab_size)):
            # character level: its characters are the tokenizer, end-of-text one id more
            tokenizer = {"spec": "chars", "chars": [itos[i] for i in range(vocab_size)]}
            eot_id = vocab_size
    dtype = np.dtype("<u2")  # nanoGPT writes uint16 whatever the vocabulary
    splits = {}
    for s in SPLITS:
        size = (d / f"{s}.bin").stat().st_size
        if size % dtype.itemsize:
            raise UserError(f"{d / f'{s}.bin'} has {size} bytes, not a whole number of uint16 tokens: it is not a "
                            "nanoGPT token file, or it is truncated. Fix: re-make it with nanoGPT's prepare.py.")
        splits[s] = {"tokens": size // dtype.itemsize, "documents": None}
    if vocab_size is None:
        vocab_size = 1 + max(id_range_of(open_bin(d / f"{s}.bin", dtype), d / f"{s}.bin")[1] for s in SPLITS)
    return {"format": "nanogpt", "format_version": 0, "tokenizer": tokenizer, "vocab_size": vocab_size,
            "eot_id": eot_id, "dtype": dtype.name, "splits": splits,
            "meta_pkl": (d / "meta.pkl").is_file()}


# ---------------------------------------------------------------------------------------- one file
def open_bin(path: Path, dtype: str | np.dtype) -> np.memmap:
    """A flat token file (gptrain's or nanoGPT's .bin), memory-mapped."""
    if not path.is_file():
        raise UserError(f"{path} does not exist. Fix: prepare the dataset with `gptrain prepare`.")
    dtype = np.dtype(dtype)
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise UserError(f"{path} has {size} bytes, not a whole number of {dtype.name} tokens: it is truncated or "
                        f"not a token file of this dtype. Fix: prepare the dataset again.")
    if size < 2 * dtype.itemsize:
        raise UserError(f"{path} holds fewer than 2 tokens; prepare a larger dataset.")
    return np.memmap(path, dtype=dtype, mode="r")


def read_llmc_header(path: Path) -> tuple[int, int, np.dtype]:
    """(version, token count, dtype) from an llm.c shard's header; UserError when it is not one."""
    try:
        with open(path, "rb") as f:
            raw = f.read(LLMC_HEADER_BYTES)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}.") from None
    if len(raw) < LLMC_HEADER_BYTES:
        raise UserError(f"{path} has {len(raw)} bytes, less than llm.c's {LLMC_HEADER_BYTES}-byte header "
                        f"({LLMC_HEADER_INTS} int32): it is truncated or not an llm.c token shard.")
    header = np.frombuffer(raw, dtype="<i4")
    magic, version, ntok = int(header[0]), int(header[1]), int(header[2])
    if magic not in LLMC_MAGICS:
        known = ", ".join(f"{m} ({d.name}, {name})" for m, (_, d, name) in LLMC_MAGICS.items())
        raise UserError(f"{path} is not an llm.c token shard: its header's magic number is {magic}, llm.c's are "
                        f"{known}. Fix: pass llm.c shards made by its dev/data scripts or .npy token files (for a "
                        "nanoGPT train.bin, pass its folder with --data).")
    want_version, dtype, name = LLMC_MAGICS[magic]
    if version != want_version:
        raise UserError(f"{path}: llm.c {name} shards (magic {magic}) have version {want_version} in their "
                        f"header, this one has {version}. Fix: re-make the shard with llm.c's dev/data scripts.")
    if ntok < 1:
        raise UserError(f"{path}: its llm.c header says it holds {ntok} tokens. Fix: re-make the shard.")
    return version, ntok, dtype


def open_llmc_shard(path: Path) -> np.memmap:
    """The tokens of an llm.c .bin shard (after its 1 KiB header), memory-mapped; the size must match the header."""
    _, ntok, dtype = read_llmc_header(path)
    size = path.stat().st_size
    want = LLMC_HEADER_BYTES + ntok * dtype.itemsize
    if size != want:
        problem = "is truncated" if size < want else "has trailing bytes"
        raise UserError(f"{path} {problem}: its header says {ntok:,} {dtype.name} tokens ({want:,} bytes with the "
                        f"header), the file has {size:,} bytes. Fix: re-make or re-download the shard.")
    return np.memmap(path, dtype=dtype, mode="r", offset=LLMC_HEADER_BYTES, shape=(ntok,))


def open_npy_shard(path: Path) -> np.ndarray:
    """A 1-D integer .npy array, memory-mapped (never loaded whole)."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"{path} is not a readable .npy file, or it is truncated ({e}). Fix: re-make or "
                        "re-download it.") from None
    if arr.ndim != 1:
        raise UserError(f"{path} holds a {arr.ndim}-D array of shape {arr.shape}; token shards are 1-D. Fix: "
                        "save the token ids as one flat array (np.save(path, ids.reshape(-1))).")
    if arr.dtype.kind not in "ui":
        raise UserError(f"{path} holds {arr.dtype} values, not integer token ids. Fix: save the ids as uint16 "
                        "(vocabularies up to 65536) or uint32.")
    if arr.dtype.itemsize > 8 or len(arr) < 1:
        raise UserError(f"{path} holds no tokens." if len(arr) < 1 else f"{path}: unsupported dtype {arr.dtype}.")
    return arr


def shard_kind(path: Path) -> str:
    """"npy" or "llmc" from the file's first bytes (not its name); UserError for anything else."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}.") from None
    if head.startswith(NPY_MAGIC):
        return "npy"
    if len(head) >= 4 and int(np.frombuffer(head[:4], dtype="<i4")[0]) in LLMC_MAGICS:
        return "llmc"
    if path.suffix == ".npy":
        return "npy"  # open_npy_shard explains what is wrong with it
    if path.suffix == ".bin":
        return "llmc"  # read_llmc_header names the magic number it found
    raise UserError(f"{path} is neither a .npy array nor an llm.c .bin shard. Fix: pass token shards (.npy or "
                    "llm.c .bin), a nanoGPT folder (train.bin, val.bin) or a folder made by `gptrain prepare`.")


def open_shard(path: Path, kind: str | None = None) -> np.ndarray:
    kind = kind or shard_kind(path)
    return open_npy_shard(path) if kind == "npy" else open_llmc_shard(path)


# ---------------------------------------------------------------------------------------- many files
_VAL_NAME = re.compile(r"(^|[_\-.])(val|valid|validation)([_\-.\d]|$)", re.IGNORECASE)


def is_val_shard_name(path: Path) -> bool:
    """llm.c and build-nanoGPT name validation shards *_val_NNNNNN.bin / .npy."""
    return bool(_VAL_NAME.search(path.stem))


def expand_shard_paths(specs: Sequence[str | os.PathLike], what: str) -> list[Path]:
    """Files named by paths, folders (their .npy/.bin files) and globs, in sorted order within each spec."""
    found: list[Path] = []
    for spec in specs:
        s = str(spec)
        p = Path(s).expanduser()
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in SHARD_SUFFIXES)
            if not files:
                raise UserError(f"{what} {p} is a folder without .npy or .bin token shards.")
        elif p.is_file():
            files = [p]
        elif glob.has_magic(s):
            files = sorted(Path(f) for f in glob.glob(os.path.expanduser(s)) if Path(f).is_file())
            if not files:
                raise UserError(f"{what} {s}: no file matches this pattern.")
        else:
            raise UserError(f"{what} {s} does not exist.")
        found.extend(files)
    seen: set[Path] = set()
    unique = []
    for f in found:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            unique.append(f)
    return unique


def shards_fingerprint(paths: Sequence[Path]) -> str:
    """Hash of (absolute path, size, mtime) of each shard: cheap, and changes when a shard does."""
    h = hashlib.sha256()
    for f in paths:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


class TokenShards:
    """One sequence of tokens made of several 1-D arrays (memory-mapped shards), end to end.

    ``len()`` is the total; ``shards[a:b]`` returns the tokens a..b as one array, a view when they
    lie in one shard, else a small concatenation (a window crossing a shard boundary). A plain
    numpy array or memmap behaves the same, so the loader and evaluation take either.
    """

    def __init__(self, parts: Sequence[np.ndarray], paths: Sequence[Path | None] | None = None):
        kept = [(a, p) for a, p in zip(parts, paths or [None] * len(parts), strict=True) if len(a)]
        self.parts = [a for a, _ in kept]
        self.paths = [p for _, p in kept]
        self.starts = [0]
        for a in self.parts:
            self.starts.append(self.starts[-1] + len(a))
        self._one = self.parts[0] if len(self.parts) == 1 else None  # the common case: no search per read

    def __len__(self) -> int:
        return self.starts[-1]

    @property
    def dtype(self) -> np.dtype:
        return np.result_type(*[a.dtype for a in self.parts]) if self.parts else np.dtype("<u2")

    def __getitem__(self, key):
        if self._one is not None:
            return self._one[key]
        n = len(self)
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                raise IndexError("TokenShards supports contiguous slices only")
            return self._read(start, max(start, stop))
        i = int(key)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"token {key} is outside 0..{n - 1}")
        k = bisect.bisect_right(self.starts, i) - 1
        return self.parts[k][i - self.starts[k]]

    def _read(self, start: int, stop: int) -> np.ndarray:
        k = bisect.bisect_right(self.starts, start) - 1
        if k >= len(self.parts):
            return np.empty(0, dtype=self.dtype)
        if stop <= self.starts[k + 1]:
            return self.parts[k][start - self.starts[k] : stop - self.starts[k]]
        pieces = []
        while start < stop:
            end = min(stop, self.starts[k + 1])
            pieces.append(self.parts[k][start - self.starts[k] : end - self.starts[k]])
            start, k = end, k + 1
        return np.concatenate(pieces)

    def span(self, start: int, stop: int) -> TokenShards:
        """Tokens start..stop as a TokenShards of views (no copy): e.g. a validation tail held out."""
        parts = []
        for k, a in enumerate(self.parts):
            lo, hi = max(start, self.starts[k]), min(stop, self.starts[k + 1])
            if lo < hi:
                parts.append(a[lo - self.starts[k] : hi - self.starts[k]])
        return TokenShards(parts)

    def describe(self) -> str:
        return f"{len(self.parts)} shard(s), {len(self):,} tokens"


def id_range_of(arr: np.ndarray, path: Path | None = None) -> tuple[int, int]:
    """(lowest, largest) id in a token array, reading SCAN_CHUNK_TOKENS at a time. ``lowest`` is the
    smallest id for signed dtypes (a negative one is an error) and 0 for unsigned ones (one pass less).

    With ``path`` (the file the array maps), the result is cached under cache_root()/token-stats,
    keyed by the file's path, size and modification time: a large corpus is scanned once.
    """
    key_file = None
    if path is not None:
        try:
            st = path.stat()
            key = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{arr.dtype.str}\0{len(arr)}"
            key_file = cache_root() / "token-stats" / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")
            cached = read_json(key_file)
            if "min" in cached and "max" in cached:
                return int(cached["min"]), int(cached["max"])
        except OSError:
            key_file = None
    lo, hi = None, None
    signed = arr.dtype.kind == "i"
    for i in range(0, len(arr), SCAN_CHUNK_TOKENS):
        chunk = np.asarray(arr[i : i + SCAN_CHUNK_TOKENS])
        c_lo, c_hi = int(chunk.min()) if signed else 0, int(chunk.max())
        lo = c_lo if lo is None else min(lo, c_lo)
        hi = c_hi if hi is None else max(hi, c_hi)
    if lo is None:
        raise ValueError("no tokens")
    if key_file is not None:
        try:
            key_file.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(key_file, {"path": str(path), "min": lo, "max": hi})
        except OSError:
            pass  # a read-only cache only costs a rescan next time
    return lo, hi
