"""Reading input files into documents, one at a time.

Inputs are files and directories. A directory is searched recursively, in sorted order, for
the suffixes below; other files inside it are skipped. A file named explicitly is read by its
suffix, or as plain text when the suffix is unknown.

  .txt .text .md .py   one file is one document (or one document per non-empty line with
                       ``line_docs=True``)
  .jsonl .json         the ``text_field`` of each object: JSON lines, or a .json list of objects
  .parquet             the ``text_field`` column (needs the optional ``pyarrow`` package)

Everything streams: a reader yields `Piece`s, never the whole corpus. A document longer than
``max_piece_chars`` is cut into several pieces at a newline followed by a non-space character
(else at a space between two words); for byte-level tokenizers with a GPT-2/tiktoken-style
pre-tokenizer such a cut is a pre-token boundary, so encoding the pieces gives exactly the ids of
encoding the whole document, while memory stays bounded even for a 1 GB one-document file.

Bad input is a `UserError`: a missing path, a file that is not UTF-8 (with its byte offset), an
explicitly named empty file, a bad JSON line. Whitespace-only documents are skipped (they would
only add an end-of-text token). The default corpus (the standard library's .py files) instead
skips unreadable files, since a few test files there are deliberately not UTF-8.
"""

from __future__ import annotations

import codecs
import json
import os
import random
import sysconfig
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from gptrain.errors import UserError

TEXT_SUFFIXES = (".txt", ".text", ".md", ".py")
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
KNOWN_SUFFIXES = TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES

# A piece is at most this many characters; see the module docstring.
MAX_PIECE_CHARS = 256 * 1024
_READ_CHUNK_BYTES = 1 << 20


@dataclass(slots=True)
class Piece:
    """Part of a document (all of it when ``doc_end`` and it is the first piece)."""

    text: str
    doc_end: bool  # the last piece of its document: an end-of-text token follows it
    nbytes: int  # input bytes consumed to produce it (for progress only)


# --------------------------------------------------------------------------- finding files


def resolve_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand files and directories into a sorted, de-duplicated list of files to read."""
    if not inputs:
        raise UserError("No input given. Fix: name at least one text/jsonl/parquet file or directory.")
    files: list[Path] = []
    for raw in inputs:
        path = Path(raw).expanduser()
        if not path.exists():
            raise UserError(f"Input not found: {path}. Fix: check the path (files and directories are accepted).")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in KNOWN_SUFFIXES and p.is_file())
            if not found:
                raise UserError(
                    f"Input directory {path} holds no readable files "
                    f"(looked for {', '.join(KNOWN_SUFFIXES)}). Fix: point at the files or convert them."
                )
            files.extend(found)
        else:
            if path.stat().st_size == 0:
                raise UserError(f"Input file {path} is empty. Fix: give a file that contains text, or leave it out.")
            files.append(path)
    seen: set[Path] = set()
    unique = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def default_corpus_files() -> list[Path]:
    """The .py files of this interpreter's standard library (~30 MB), sorted; no site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages"}
    return sorted(p for p in root.rglob("*.py") if skip.isdisjoint(p.relative_to(root).parts) and p.is_file())


def input_fingerprint(files: Iterable[Path]) -> str:
    """Hash of (absolute path, size, mtime) of every file.

    Cheap at any corpus size (no reading) and the same rule `make` uses: editing or touching a
    file forces a re-prepare. It does not notice a same-size edit that restores the mtime.
    """
    import hashlib

    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- reading


def _not_utf8(path: Path, offset: int) -> UserError:
    return UserError(
        f"{path} is not valid UTF-8 (first bad byte at offset {offset}). "
        f"Fix: convert it, e.g. `iconv -f LATIN1 -t UTF-8 {path} > {path.stem}.utf8{path.suffix}`, "
        "or leave it out of the inputs."
    )


def _cut_point(text: str, limit: int) -> int:
    """Where to cut ``text`` (longer than ``limit``) so that tokenization is unchanged."""
    lo = limit // 2
    pos = text.rfind("\n", lo, limit)
    while pos >= lo:
        if not text[pos + 1].isspace():
            return pos + 1
        pos = text.rfind("\n", lo, pos)
    pos = text.rfind(" ", lo, limit)
    while pos >= lo:
        if not text[pos - 1].isspace() and not text[pos + 1].isspace():
            return pos
        pos = text.rfind(" ", lo, pos)
    return limit


def split_document(text: str, max_chars: int = MAX_PIECE_CHARS, nbytes: int = 0) -> Iterator[Piece]:
    """One document as pieces of at most ``max_chars`` characters; the last has ``doc_end``."""
    while len(text) > max_chars:
        cut = _cut_point(text, max_chars)
        yield Piece(text[:cut], False, 0)
        text = text[cut:]
    yield Piece(text, True, nbytes)


def _read_text_file(path: Path, max_chars: int) -> Iterator[Piece]:
    """A whole file as one document, read in chunks so a huge file never sits in memory twice."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")("strict")
    carry = ""
    consumed = 0
    pending_bytes = 0
    emitted = False
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_READ_CHUNK_BYTES)
            final = not chunk
            buffered = len(decoder.getstate()[0])
            try:
                carry += decoder.decode(chunk, final=final)
            except UnicodeDecodeError as e:
                raise _not_utf8(path, max(0, consumed - buffered + e.start)) from None
            consumed += len(chunk)
            pending_bytes += len(chunk)
            while len(carry) > 2 * max_chars:
                cut = _cut_point(carry, max_chars)
                yield Piece(carry[:cut], False, pending_bytes)
                pending_bytes = 0
                emitted = True
                carry = carry[cut:]
            if final:
                break
    if not emitted and not carry.strip():
        return
    yield from split_document(carry, max_chars, pending_bytes)


def _read_lines(path: Path) -> Iterator[tuple[int, str, int]]:
    """(line number, decoded line without its newline, raw byte length) for each line."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, offset + e.start) from None
            if lineno == 1 and line.startswith("\ufeff"):
                line = line[1:]
            offset += len(raw)
            yield lineno, line.rstrip("\r\n"), len(raw)


def _read_text_lines(path: Path, max_chars: int) -> Iterator[Piece]:
    pending = 0
    for _, line, nbytes in _read_lines(path):
        pending += nbytes
        if line.strip():
            yield from split_document(line, max_chars, pending)
            pending = 0


def _text_of(obj: object, path: Path, where: str, text_field: str) -> str | None:
    if not isinstance(obj, dict):
        raise UserError(f"{path}, {where}: expected a JSON object with a {text_field!r} field, got {type(obj).__name__}.")
    if text_field not in obj:
        keys = ", ".join(map(repr, list(obj)[:10]))
        raise UserError(
            f"{path}, {where}: no {text_field!r} field (fields: {keys}). "
            "Fix: pass the field that holds the text (--text-field NAME)."
        )
    value = obj[text_field]
    if value is None:
        return None
    if not isinstance(value, str):
        raise UserError(f"{path}, {where}: field {text_field!r} is a {type(value).__name__}, not a string.")
    return value


def _read_json(path: Path, text_field: str, max_chars: int) -> Iterator[Piece]:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"["):
        # A JSON list must be parsed whole; use .jsonl for corpora that do not fit in memory.
        try:
            items = json.loads(path.read_bytes().decode("utf-8-sig"))
        except UnicodeDecodeError as e:
            raise _not_utf8(path, e.start) from None
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e}). Fix: repair the file or write it as JSON lines.") from None
        size = path.stat().st_size
        for i, obj in enumerate(items):
            text = _text_of(obj, path, f"item {i}", text_field)
            if text and text.strip():
                yield from split_document(text, max_chars, size)
                size = 0
        return
    pending = 0
    for lineno, line, nbytes in _read_lines(path):
        pending += nbytes
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == 1 and path.suffix.lower() == ".json":  # one pretty-printed object
                try:
                    obj = json.loads(path.read_bytes().decode("utf-8-sig"))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    obj = None
                if obj is not None:
                    text = _text_of(obj, path, "the object", text_field)
                    if text and text.strip():
                        yield from split_document(text, max_chars, path.stat().st_size)
                    return
            raise UserError(
                f"{path}, line {lineno}: not valid JSON ({e.msg}). Fix: one JSON object per line (JSON lines)."
            ) from None
        text = _text_of(obj, path, f"line {lineno}", text_field)
        if text and text.strip():
            yield from split_document(text, max_chars, pending)
            pending = 0


def _read_parquet(path: Path, text_field: str, max_chars: int) -> Iterator[Piece]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(
            f"Reading {path} needs pyarrow, which is not installed. Fix: pip install 'gptrain[parquet]' (or pyarrow)."
        ) from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends
        raise UserError(f"{path} is not a readable Parquet file ({e}).") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise UserError(
            f"{path}: no {text_field!r} column (columns: {', '.join(names[:10])}). "
            "Fix: pass the column that holds the text (--text-field NAME)."
        )
    rows = max(1, pf.metadata.num_rows)
    per_row = path.stat().st_size / rows
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        pending = int(per_row * batch.num_rows)
        for text in batch.column(0).to_pylist():
            if text is None:
                continue
            if not isinstance(text, str):
                raise UserError(f"{path}: column {text_field!r} holds {type(text).__name__}, not strings.")
            if text.strip():
                yield from split_document(text, max_chars, pending)
                pending = 0


def read_file(path: Path, *, line_docs: bool = False, text_field: str = "text",
              max_chars: int = MAX_PIECE_CHARS) -> Iterator[Piece]:
    """The pieces of one file, by its suffix (unknown suffixes are read as text)."""
    suffix = path.suffix.lower()
    if suffix in JSON_SUFFIXES:
        return _read_json(path, text_field, max_chars)
    if suffix in PARQUET_SUFFIXES:
        return _read_parquet(path, text_field, max_chars)
    if line_docs:
        return _read_text_lines(path, max_chars)
    return _read_text_file(path, max_chars)


@dataclass
class SourceStats:
    """What reading found: used for messages and meta.json."""

    files: int = 0
    skipped_files: list[str] | None = None  # only when skipping bad files (default corpus)


def iter_pieces(files: Sequence[Path], *, line_docs: bool = False, text_field: str = "text",
                max_chars: int = MAX_PIECE_CHARS, skip_bad_files: bool = False,
                stats: SourceStats | None = None,
                on_skip: Callable[[Path, str], None] | None = None) -> Iterator[Piece]:
    """Pieces of every document of every file, in order.

    ``skip_bad_files=False`` (user inputs): a bad file raises `UserError`, and so does a named
    empty file. ``skip_bad_files=True`` (the default corpus): a bad file is skipped, counted in
    ``stats.skipped_files`` and reported through ``on_skip``.
    """
    stats = stats if stats is not None else SourceStats()
    if skip_bad_files and stats.skipped_files is None:
        stats.skipped_files = []
    for path in files:
        stats.files += 1
        produced = False
        try:
            for piece in read_file(path, line_docs=line_docs, text_field=text_field, max_chars=max_chars):
                produced = True
                yield piece
        except UserError as e:
            if not skip_bad_files:
                raise
            assert stats.skipped_files is not None
            stats.skipped_files.append(str(path))
            if on_skip is not None:
                on_skip(path, str(e))
            continue
        except OSError as e:
            if not skip_bad_files:
                raise UserError(f"Cannot read {path}: {e.strerror or e}. Fix: check its permissions.") from None
            assert stats.skipped_files is not None
            stats.skipped_files.append(str(path))
            continue
        if not produced and not skip_bad_files and len(files) == 1:
            what = "has no non-empty lines" if line_docs else "has no text"
            raise UserError(f"Input file {path} is empty ({what}). Fix: give a file that contains text.")


def iter_documents(files: Sequence[Path], **kwargs) -> Iterator[str]:
    """Whole documents (pieces joined): handy for tests and small corpora."""
    parts: list[str] = []
    for piece in iter_pieces(files, **kwargs):
        parts.append(piece.text)
        if piece.doc_end:
            yield "".join(parts)
            parts = []


def batch_pieces(pieces: Iterable[Piece], batch_chars: int) -> Iterator[list[Piece]]:
    """Group pieces into lists of about ``batch_chars`` characters (for `encode_batch`)."""
    batch: list[Piece] = []
    size = 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece.text)
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


# --------------------------------------------------------------------------- toy corpus

_NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy"]
_THINGS = ["apple", "book", "cat", "dog", "egg", "flower", "guitar", "hat", "kite", "lamp"]
_COLORS = ["red", "blue", "green", "yellow", "black", "white"]
_VERBS = ["sees", "likes", "has", "wants", "finds", "gives away"]


def _toy_document(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(3, 8)):
        kind = rng.randrange(4)
        if kind == 0:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            lines.append(f"{a} + {b} = {a + b}")
        elif kind == 1:
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            lines.append(f"{a} * {b} = {a * b}")
        elif kind == 2:
            n = rng.randint(2, 9)
            lines.append(f"{rng.choice(_NAMES)} {rng.choice(_VERBS)} {n} {rng.choice(_COLORS)} {rng.choice(_THINGS)}s.")
        else:
            start = rng.randint(0, 50)
            lines.append("count: " + " ".join(str(start + i) for i in range(rng.randint(3, 8))))
    return "\n".join(lines) + "\n"


def write_toy_corpus(path: str | os.PathLike, size_bytes: int = 400_000, seed: int = 0) -> Path:
    """Write a deterministic synthetic corpus of about ``size_bytes``; returns ``path``.

    Simple sentences, sums, products and counting: patterns a tiny model learns in minutes,
    so a falling loss is visible quickly. Same ``size_bytes`` and ``seed``, same bytes.
    A ``.jsonl``/``.json`` path gets JSON lines, one document per line; any other path gets plain
    text, documents separated by blank lines (read as a .txt it is one document, which `prepare`
    splits by tokens for val; with ``line_docs`` each line is a document).
    """
    path = Path(path)
    as_json = path.suffix.lower() in JSON_SUFFIXES
    rng = random.Random(seed)
    written = 0
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            while written < size_bytes:
                doc = _toy_document(rng)
                line = json.dumps({"text": doc}) + "\n" if as_json else doc + "\n"
                f.write(line)
                written += len(line)
    except OSError as e:
        raise UserError(f"Cannot write the toy corpus to {path}: {e.strerror or e}.") from None
    return path
