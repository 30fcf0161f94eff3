"""Tokenizers: exact round trips, specs, saved/loaded forms, and the offline Hugging Face path."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTok
from tokenizers import models, pre_tokenizers

from gptrain.data import sources
from gptrain.data.tokenizer import (
    ByteTokenizer,
    build_tokenizer,
    load_hf_tokenizer,
    parse_spec,
    tokenizer_from_json,
    train_bpe,
)
from gptrain.errors import UserError

HARD_TEXTS = [
    "hello world",
    "  leading and trailing spaces   ",
    "tabs\tand\n\nnewlines\r\nand    runs          of spaces\n\n\n",
    "unicode: héllo wörld ñandú Ελληνικά русский 中文字符 日本語のテキスト",
    "emoji: 😀🎉👩‍👩‍👧‍👦 🇫🇷 and combining e\u0301",
    "def f(x):\n    return x ** 2  # comment\n",
    "\x00\x01 control \u200b zero-width \ufeff bom",
    "",
]

TRAIN_TEXTS = [f"document {i}: the quick brown fox jumps over the lazy dog {i * 7}\n    indented line\n"
               for i in range(300)]


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(TRAIN_TEXTS, 400)


def test_byte_tokenizer_round_trips_and_ids():
    tok = ByteTokenizer()
    assert (tok.spec, tok.vocab_size, tok.eot_id) == ("byte", 257, 256)
    assert tok.encode("é") == [0xC3, 0xA9]
    for text in HARD_TEXTS:
        ids = tok.encode(text)
        assert len(ids) == len(text.encode("utf-8"))
        assert tok.decode(ids) == text
    assert tok.decode(tok.encode("a") + [256] + tok.encode("b")) == "a<|endoftext|>b"
    batch = tok.encode_batch(HARD_TEXTS)
    assert [b.tolist() for b in batch] == [tok.encode(t) for t in HARD_TEXTS]
    assert tok.to_json() is None
    assert tok.fingerprint() == ByteTokenizer().fingerprint()


def test_bpe_round_trips_any_unicode(bpe):
    assert bpe.spec == "bpe:400"
    assert bpe.vocab_size == 400
    assert bpe.eot_id == bpe.hf.token_to_id("<|endoftext|>") == 0
    for text in HARD_TEXTS + TRAIN_TEXTS[:3]:
        assert bpe.decode(bpe.encode(text)) == text, text
    # merges were learned: common text is shorter in tokens than in bytes
    assert len(bpe.encode(TRAIN_TEXTS[5])) < len(TRAIN_TEXTS[5].encode()) / 2
    # no special tokens are added by encode
    assert bpe.eot_id not in bpe.encode("hello")
    # encode_batch gives the same ids as encode, as uint32 arrays
    batch = bpe.encode_batch(HARD_TEXTS)
    assert all(b.dtype == np.uint32 for b in batch)
    assert [b.tolist() for b in batch] == [bpe.encode(t) for t in HARD_TEXTS]
    assert bpe.decode([*bpe.encode("a"), bpe.eot_id]) == "a<|endoftext|>"


def test_bpe_training_is_deterministic_and_serializes(bpe):
    again = train_bpe(TRAIN_TEXTS, 400)
    assert again.fingerprint() == bpe.fingerprint()
    assert train_bpe(TRAIN_TEXTS, 380).fingerprint() != bpe.fingerprint()
    rebuilt = tokenizer_from_json("bpe:400", bpe.to_json())
    assert rebuilt.fingerprint() == bpe.fingerprint()
    assert (rebuilt.vocab_size, rebuilt.eot_id) == (bpe.vocab_size, bpe.eot_id)
    assert rebuilt.encode(HARD_TEXTS[4]) == bpe.encode(HARD_TEXTS[4])
    assert tokenizer_from_json("byte", None).vocab_size == 257


def test_bpe_on_a_tiny_corpus_reports_its_real_vocab_size():
    tok = train_bpe(["ab ab ab"], 5000)
    assert 258 <= tok.vocab_size < 5000
    assert tok.decode(tok.encode("zzz ab")) == "zzz ab"


def test_documents_cut_into_pieces_encode_like_the_whole(bpe):
    text = "".join(f"line {i} with some words\n  indented {i}\nx = [{i}, {i + 1}]  \n\n" for i in range(400))
    pieces = list(sources.split_document(text, max_chars=500))
    assert len(pieces) > 20 and all(len(p.text) <= 500 for p in pieces)
    assert "".join(p.text for p in pieces) == text
    assert [p.doc_end for p in pieces].count(True) == 1 and pieces[-1].doc_end
    joined = np.concatenate(bpe.encode_batch([p.text for p in pieces])).tolist()
    assert joined == bpe.encode(text)
    # a long line without newlines is cut at spaces between words, also exactly
    line = " ".join(f"word{i}" for i in range(2000))
    pieces = [p.text for p in sources.split_document(line, max_chars=300)]
    assert len(pieces) > 10
    assert np.concatenate(bpe.encode_batch(pieces)).tolist() == bpe.encode(line)


@pytest.mark.parametrize("spec", ["bpe:10", "bpe:abc", "bpe:", "hf:", "  "])
def test_bad_specs_are_user_errors(spec):
    with pytest.raises(UserError, match="spec"):
        parse_spec(spec)


def test_spec_parsing():
    assert parse_spec("byte") == ("byte", None)
    assert parse_spec("bpe:8192") == ("bpe", 8192)
    assert parse_spec("bpe:8k") == ("bpe", 8192)
    assert parse_spec("hf:gpt2") == ("hf", "gpt2")
    assert parse_spec("gpt2") == ("hf", "gpt2")
    assert parse_spec("hf:/x/tokenizer.json") == ("hf", "/x/tokenizer.json")


def _save_hf(path, tok: HFTok):
    tok.save(str(path))
    return path


def test_hf_tokenizer_from_a_local_file_or_directory(tmp_path, bpe):
    file = _save_hf(tmp_path / "tokenizer.json", bpe.hf)
    for spec in (f"hf:{file}", f"hf:{tmp_path}", str(file)):
        tok = build_tokenizer(spec)
        assert tok.spec == f"hf:{spec.removeprefix('hf:')}"
        assert tok.fingerprint() == bpe.fingerprint()
        assert tok.eot_id == 0 and tok.vocab_size == 400
        assert tok.decode(tok.encode(HARD_TEXTS[3])) == HARD_TEXTS[3]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no tokenizer.json"):
        load_hf_tokenizer(str(tmp_path / "empty"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid tokenizer.json"):
        load_hf_tokenizer(str(tmp_path / "bad.json"))


def _word_level(tokens: list[str]) -> HFTok:
    tok = HFTok(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=tokens[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def test_hf_end_of_text_is_found_by_common_names(tmp_path):
    path = _save_hf(tmp_path / "t.json", _word_level(["<unk>", "hello", "</s>", "world"]))
    tok = load_hf_tokenizer(str(path))
    assert tok.eot_id == 2 and tok.vocab_size == 4
    assert tok.encode("hello world").__len__() == 2
    path = _save_hf(tmp_path / "n.json", _word_level(["<unk>", "hello"]))
    with pytest.raises(UserError, match="no end-of-text token"):
        load_hf_tokenizer(str(path))


def test_hf_tokenizer_from_the_local_hub_cache(tmp_path, monkeypatch, bpe):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    repo = tmp_path / "hf" / "hub" / "models--some-org--tiny-model"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    _save_hf(repo / "snapshots" / "abc123" / "tokenizer.json", bpe.hf)
    tok = build_tokenizer("hf:some-org/tiny-model")
    assert tok.spec == "hf:some-org/tiny-model"
    assert tok.fingerprint() == bpe.fingerprint()
    # HF_HUB_CACHE wins over HF_HOME
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    with pytest.raises(UserError):
        build_tokenizer("some-org/tiny-model")


def test_hf_tokenizer_unavailable_offline_is_a_clear_error_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError("the network must not be touched")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(HFTok, "from_pretrained", no_network)
    with pytest.raises(UserError) as e:
        build_tokenizer("gpt2")
    msg = str(e.value)
    assert "not available offline" in msg
    assert "https://huggingface.co/gpt2/resolve/main/tokenizer.json" in msg
    assert "hf:/path/to/tokenizer.json" in msg
    with pytest.raises(UserError, match="not found"):
        build_tokenizer("hf:./missing/tokenizer.json")


def test_hf_lookup_gives_up_fast_when_the_hub_is_unreachable(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)

    def refused(*args, **kwargs):
        raise ConnectionRefusedError("refused")

    monkeypatch.setattr(socket, "create_connection", refused)
    monkeypatch.setattr(HFTok, "from_pretrained", lambda *a, **k: pytest.fail("must not try the hub"))
    with pytest.raises(UserError, match="not available offline"):
        build_tokenizer("hf:org/model")


def test_tokenizer_json_saved_by_hf_is_loadable_by_spec(tmp_path, bpe):
    path = tmp_path / "tokenizer.json"
    path.write_text(bpe.to_json())
    assert json.loads(path.read_text())["model"]["type"] == "BPE"
    assert build_tokenizer(f"hf:{path}").encode("the quick fox") == bpe.encode("the quick fox")


# --------------------------------------------------------------------------- tokenizer: the Hugging Face hub cache
def test_hub_cache_uses_the_snapshot_refs_main_points_to(tmp_path, monkeypatch):
    import os

    from gptrain.data.tokenizer import build_tokenizer, train_bpe

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    texts = [f"document {i}: the quick brown fox {i * 3}\n" for i in range(200)]
    main_tok, newer_tok = train_bpe(texts, 300), train_bpe(texts, 280)
    repo = tmp_path / "hf" / "hub" / "models--org--model"
    for rev, tok in (("aaa111", main_tok), ("bbb222", newer_tok)):
        (repo / "snapshots" / rev).mkdir(parents=True)
        tok.hf.save(str(repo / "snapshots" / rev / "tokenizer.json"))
    os.utime(repo / "snapshots" / "aaa111" / "tokenizer.json", (1, 1))  # an older download, still main
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("aaa111")  # as huggingface_hub writes it
    assert build_tokenizer("hf:org/model").fingerprint() == main_tok.fingerprint() != newer_tok.fingerprint()


# --------------------------------------------------------------------------- tokenizer: bytes per token
def test_token_byte_lengths_add_up_to_the_texts_utf8_bytes(bpe):
    # The unit of bits per byte: summed over a text's tokens they give its UTF-8 size exactly,
    # also where a character's bytes are split between tokens; end-of-text is 0 bytes.
    from gptrain.data.tokenizer import CharTokenizer, token_byte_lengths

    for tok in (ByteTokenizer(), bpe):
        table = token_byte_lengths(tok)
        assert len(table) == tok.vocab_size and table[tok.eot_id] == 0
        for text in HARD_TEXTS:
            assert int(table[tok.encode(text)].sum()) == len(text.encode("utf-8")), (tok.spec, text)
    chars = CharTokenizer(list("aé中 "))
    assert int(token_byte_lengths(chars)[chars.encode("中 é a")].sum()) == len("中 é a".encode())


def test_a_nanogpt_folder_without_meta_pkl_has_no_tokenizer(tmp_path, monkeypatch):
    from gptrain.data.tokenizer import dataset_tokenizer, load_dataset_tokenizer

    monkeypatch.setenv("GPTRAIN_CACHE", str(tmp_path / "cache"))
    np.arange(50, dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.arange(20, dtype=np.uint16).tofile(tmp_path / "val.bin")
    assert dataset_tokenizer(tmp_path) is None
    with pytest.raises(UserError, match="has no tokenizer .*--tokenizer-name"):
        load_dataset_tokenizer(tmp_path)
