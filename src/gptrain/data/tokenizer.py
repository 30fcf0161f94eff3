"""Tokenizers behind one small interface, named by one spec string.

  byte              the 256 byte values plus end-of-text (id 256): vocab 257, nothing to train
  bpe:N             a byte-level BPE with N tokens (``<|endoftext|>`` included, id 0) trained with
                    Hugging Face `tokenizers` on the corpus; saved as tokenizer.json
  hf:NAME_OR_PATH   a Hugging Face tokenizer: a tokenizer.json file, a directory holding one,
  NAME              the local HF hub cache, or the hub itself when there is a network
  chars             the characters of a nanoGPT character-level dataset, read from its meta.pkl
                    (not built from a spec: such datasets come tokenized); end-of-text is one id more

Every kind is byte-exact where it is byte-level: ``decode(encode(text)) == text`` for any
Unicode text with ``byte`` and ``bpe:N``. ``encode`` never adds special tokens (no BOS, no
end-of-text); the data pipeline appends ``eot_id`` after each document.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from gptrain.data.format import read_meta
from gptrain.errors import UserError

EOT_TEXT = "<|endoftext|>"
# End-of-text tokens of common tokenizers, in order of preference.
EOT_CANDIDATES = (EOT_TEXT, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]", "<|im_end|>", "<|eot_id|>")
MIN_BPE_VOCAB = 258  # 256 bytes + <|endoftext|> + at least one merge
MAX_BPE_VOCAB = 1_000_000
HUB_CONNECT_TIMEOUT_S = 5.0


class Tokenizer:
    """What the trainer, generation and checkpoints need of a tokenizer."""

    spec: str  # e.g. "bpe:8192", "byte", "hf:gpt2"
    vocab_size: int  # number of ids the model must be able to embed
    eot_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no special tokens added."""
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids (uint32 numpy arrays) of each text, encoded on all cores."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; the end-of-text id decodes to ``<|endoftext|>`` (or its own text)."""
        raise NotImplementedError

    def to_json(self) -> str | None:
        """The serialized tokenizer.json; None for ``byte``, which needs none."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A stable hash of the tokenizer's definition (same ids for same text ⇔ same hash): by default,
        of its serialized form."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, end-of-text as 256."""

    def __init__(self) -> None:
        self.spec = "byte"
        self.vocab_size = 257
        self.eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.uint32) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        out: list[str] = []
        buf = bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                buf.append(i)
            else:
                out.append(buf.decode("utf-8", errors="replace"))
                buf.clear()
                out.append(EOT_TEXT if i == self.eot_id else "")
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def to_json(self) -> None:
        return None

    def fingerprint(self) -> str:
        return hashlib.sha256(b"gptrain-byte-tokenizer-v1").hexdigest()[:16]


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers.Tokenizer` (trained BPE or loaded)."""

    def __init__(self, spec: str, tok, eot_id: int | None = None) -> None:
        self.spec = spec
        self.hf = tok
        self.eot_id = find_eot_id(tok, spec) if eot_id is None else eot_id
        vocab = tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(max(vocab.values()) + 1, tok.get_vocab_size(with_added_tokens=True))
        self._json: str | None = None
        # encode_batch_fast (tokenizers >= 0.21) skips the offsets we never use: ~10% faster.
        self._batch = getattr(tok, "encode_batch_fast", tok.encode_batch)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.array(e.ids, dtype=np.uint32) for e in self._batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_json(self) -> str:
        if self._json is None:
            self._json = self.hf.to_str()
        return self._json


def find_eot_id(tok, name: str) -> int:
    for text in EOT_CANDIDATES:
        i = tok.token_to_id(text)
        if i is not None:
            return i
    raise UserError(
        f"Tokenizer {name} has no end-of-text token (looked for {', '.join(EOT_CANDIDATES)}). "
        f"Fix: use a tokenizer that has one, or add {EOT_TEXT!r} to its tokenizer.json as a special token."
    )


# --------------------------------------------------------------------------- specs


def parse_spec(spec: str) -> tuple[str, str | int | None]:
    """("byte", None), ("bpe", N) or ("hf", name_or_path); a bare name means hf."""
    spec = spec.strip()
    if not spec:
        raise UserError("Empty tokenizer spec. Fix: use byte, bpe:N (e.g. bpe:8192) or hf:NAME_OR_PATH.")
    if spec == "byte":
        return "byte", None
    if spec == "bpe" or spec.startswith("bpe:"):
        raw = spec[4:]
        try:
            n = int(raw[:-1]) * 1024 if raw.lower().endswith("k") else int(raw)
        except ValueError:
            n = -1
        if not MIN_BPE_VOCAB <= n <= MAX_BPE_VOCAB:
            raise UserError(
                f"Bad tokenizer spec {spec!r}: bpe:N needs a vocabulary size N between {MIN_BPE_VOCAB} and "
                f"{MAX_BPE_VOCAB}. Fix: e.g. bpe:8192."
            )
        return "bpe", n
    if spec == "chars":
        return "chars", None
    if spec.startswith("hf:"):
        name = spec[3:]
        if not name:
            raise UserError("Bad tokenizer spec 'hf:'. Fix: hf:NAME (e.g. hf:gpt2) or hf:/path/to/tokenizer.json.")
        return "hf", name
    return "hf", spec


def normalize_spec(spec: str) -> str:
    kind, arg = parse_spec(spec)
    return "byte" if kind == "byte" else f"{kind}:{arg}"


def needs_training(spec: str) -> bool:
    return parse_spec(spec)[0] == "bpe"


class CharTokenizer(Tokenizer):
    """One id per character, in the order of a nanoGPT character-level dataset's meta.pkl (`itos`).

    End-of-text is the id after the last character. Text outside the character set cannot be
    encoded; prompts are checked for it before use.
    """

    def __init__(self, chars: list[str]) -> None:
        if not chars or len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise UserError("a character tokenizer needs distinct single characters (nanoGPT meta.pkl's itos).")
        self.spec = "chars"
        self.chars = list(chars)
        self.ids = {c: i for i, c in enumerate(self.chars)}
        self.eot_id = len(self.chars)
        self.vocab_size = len(self.chars) + 1

    def encode(self, text: str) -> list[int]:
        missing = sorted(set(text) - self.ids.keys())
        if missing:
            raise UserError(f"{''.join(missing)!r} are not among this dataset's {len(self.chars)} characters; "
                            "use text made of them (for samples: --sample-prompts, --sample-prompt).")
        return [self.ids[c] for c in text]

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.array(self.encode(t), dtype=np.uint32) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] if i < self.eot_id else (EOT_TEXT if i == self.eot_id else "")
                       for i in map(int, ids))

    def to_json(self) -> str:
        return json.dumps({"type": "chars", "chars": self.chars}, ensure_ascii=False)


def build_tokenizer(spec: str, training_texts: Callable[[], Iterable[str]] | None = None,
                    log: Callable[[str], None] | None = None) -> Tokenizer:
    """The tokenizer a spec names; ``bpe:N`` is trained on ``training_texts()``."""
    kind, arg = parse_spec(spec)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "chars":
        raise UserError("the chars tokenizer comes with a nanoGPT character-level dataset (its meta.pkl); to "
                        "tokenize text, use byte, bpe:N or hf:NAME.")
    if kind == "bpe":
        if training_texts is None:
            raise ValueError("bpe:N needs training texts")
        return train_bpe(training_texts(), int(arg), log=log)
    return load_hf_tokenizer(str(arg))


def train_bpe(texts: Iterable[str], vocab_size: int, log: Callable[[str], None] | None = None) -> HFTokenizer:
    """Train a byte-level BPE (GPT-2 pre-tokenizer) of ``vocab_size`` tokens on ``texts``.

    On a tiny corpus the trainer may stop with fewer tokens than asked (no pair left to merge);
    ``vocab_size`` of the result is then the real, smaller size.
    """
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    result = HFTokenizer(f"bpe:{vocab_size}", tok)
    if result.vocab_size < vocab_size and log is not None:
        log(f"note: the corpus only supports {result.vocab_size} BPE tokens (asked for {vocab_size})")
    return result


# --------------------------------------------------------------------------- Hugging Face


def hf_hub_cache_dir() -> Path:
    """Where huggingface_hub keeps downloads (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub).

    Read from the environment at each call: huggingface_hub.constants fixes it once, at import.
    """
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.default_cache_path)


def _cached_tokenizer_json(name: str) -> Path | None:
    """The cached tokenizer.json of a hub repo (its `main` snapshot), found by huggingface_hub itself."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(name, "tokenizer.json", cache_dir=hf_hub_cache_dir())
    except ValueError:  # not a valid repo id
        return None
    return Path(found) if isinstance(found, str) else None


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_reachable(timeout: float = HUB_CONNECT_TIMEOUT_S) -> bool:
    """Can we open a TCP connection to the hub? Bounded even when DNS itself hangs."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)
    ok = [False]

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok[0] = True
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return ok[0]


def load_hf_tokenizer(name: str) -> HFTokenizer:
    """A Hugging Face tokenizer from a path, the local hub cache, or the hub (in that order)."""
    from tokenizers import Tokenizer as HFTok

    spec = f"hf:{name}"
    path = Path(name).expanduser()
    if path.exists():
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise UserError(
                f"{path} has no tokenizer.json. Fix: save the tokenizer with tokenizer.save('tokenizer.json') "
                "(or AutoTokenizer.save_pretrained) and pass that file or directory."
            )
        try:
            return HFTokenizer(spec, HFTok.from_file(str(file)))
        except Exception as e:  # tokenizers raises a plain Exception on bad JSON
            raise UserError(f"{file} is not a valid tokenizer.json ({e}).") from None
    cached = _cached_tokenizer_json(name)
    if cached is not None:
        return HFTokenizer(spec, HFTok.from_file(str(cached)))
    how = (
        f"Fix: download https://huggingface.co/{name}/resolve/main/tokenizer.json and pass "
        f"--tokenizer hf:/path/to/tokenizer.json, or run once with network access (it is then cached in "
        f"{hf_hub_cache_dir()})."
    )
    looks_like_path = name.startswith((".", "/", "~")) or name.endswith(".json")
    if looks_like_path:
        raise UserError(f"Tokenizer path {name} not found. Fix: check the path to tokenizer.json or its directory.")
    if _offline() or not _hub_reachable():
        raise UserError(
            f"Hugging Face tokenizer {name!r} is not available offline: not a local path and not in the "
            f"HF cache ({hf_hub_cache_dir()}). " + how
        )
    try:
        return HFTokenizer(spec, HFTok.from_pretrained(name))
    except Exception as e:
        raise UserError(f"Could not fetch tokenizer {name!r} from the Hugging Face hub ({e}). " + how) from None


# --------------------------------------------------------------------------- saved tokenizers


def tokenizer_from_json(spec: str, tokenizer_json: str | None) -> Tokenizer:
    """Rebuild a tokenizer saved with a checkpoint or dataset (``spec`` + ``to_json()``)."""
    kind, _ = parse_spec(spec)
    if kind == "byte":
        return ByteTokenizer()
    if tokenizer_json is None:
        raise UserError(f"Tokenizer {spec} needs its tokenizer.json, which is missing. Fix: re-run prepare.")
    from tokenizers import Tokenizer as HFTok

    try:
        if kind == "chars":
            return CharTokenizer(json.loads(tokenizer_json)["chars"])
        return HFTokenizer(normalize_spec(spec), HFTok.from_str(tokenizer_json))
    except Exception as e:
        raise UserError(f"The saved tokenizer.json for {spec} is corrupt ({e}). Fix: re-run prepare.") from None


def dataset_tokenizer(dataset_dir: str | os.PathLike, meta: dict | None = None) -> Tokenizer | None:
    """The tokenizer a dataset folder carries (meta.json + tokenizer.json, or a nanoGPT meta.pkl's
    character table); None for token data that comes without one (a nanoGPT folder without meta.pkl)."""
    dataset_dir = Path(dataset_dir)
    meta = read_meta(dataset_dir) if meta is None else meta
    tok_meta = meta.get("tokenizer") or {}
    spec = tok_meta.get("spec")
    if not spec:
        return None
    if spec == "chars" and "chars" in tok_meta:
        return CharTokenizer(tok_meta["chars"])  # a nanoGPT meta.pkl's itos
    json_path = dataset_dir / "tokenizer.json"
    tok_json = json_path.read_text(encoding="utf-8") if json_path.is_file() else None
    tok = tokenizer_from_json(spec, tok_json)
    want = tok_meta.get("fingerprint")
    if want and tok.fingerprint() != want:
        raise UserError(
            f"{json_path} does not match {dataset_dir / 'meta.json'} (fingerprint {tok.fingerprint()} != {want}). "
            "Fix: re-run prepare for this dataset."
        )
    return tok


def load_dataset_tokenizer(dataset_dir: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a prepared dataset; UserError when the dataset has none."""
    tok = dataset_tokenizer(dataset_dir)
    if tok is None:
        raise UserError(
            f"{dataset_dir} has no tokenizer (a nanoGPT dataset without a meta.pkl character table). Fix: "
            "name the tokenizer that made its tokens with --tokenizer-name (e.g. gpt2, or hf:/path/tokenizer.json), "
            "or prepare its text with `gptrain prepare TEXT --tokenizer byte --out DIR`."
        )
    return tok


def tokenizer_meta(tok: Tokenizer) -> dict:
    return {"spec": tok.spec, "fingerprint": tok.fingerprint(), "vocab_size": tok.vocab_size, "eot_id": tok.eot_id}


# --------------------------------------------------------------------------- bytes per token


def token_byte_lengths(tok: Tokenizer) -> np.ndarray:
    """UTF-8 bytes of the text each id stands for (int64, one entry per id): the unit of bits per byte.

    Exact for byte-level vocabularies (byte, bpe:N, GPT-2-style hf tokenizers: a token's characters
    in the byte-level alphabet are its bytes) and character tables. Special tokens (end-of-text)
    count 0 bytes: they stand for a document boundary, not for text. Other Hugging Face tokenizers
    are measured by decoding each id alone.
    """
    n = tok.vocab_size
    out = np.zeros(n, dtype=np.int64)
    if isinstance(tok, ByteTokenizer):
        out[:256] = 1
    elif isinstance(tok, CharTokenizer):
        out[: len(tok.chars)] = [len(c.encode("utf-8")) for c in tok.chars]
    elif isinstance(tok, HFTokenizer):
        from tokenizers import decoders

        byte_level = isinstance(tok.hf.decoder, decoders.ByteLevel)
        added = tok.hf.get_added_tokens_decoder()  # id -> AddedToken
        for text, i in tok.hf.get_vocab(with_added_tokens=True).items():
            if i >= n or (i in added and added[i].special):
                continue
            if byte_level and i not in added:
                out[i] = len(text)  # one byte-level character per byte
            else:
                out[i] = len(tok.hf.decode([i], skip_special_tokens=False).encode("utf-8"))
    else:
        for i in range(n):
            out[i] = 0 if i == tok.eot_id else len(tok.decode([i]).encode("utf-8"))
    out[tok.eot_id] = 0
    return out
