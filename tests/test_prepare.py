"""prepare_dataset: what lands in train.bin / val.bin / meta.json, and every bad input."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest

from gptrain.data import sources
from gptrain.data.format import read_meta
from gptrain.data.prepare import PrepareConfig, dataset_cache_dir, prepare_dataset
from gptrain.data.tokenizer import EOT_TEXT, load_dataset_tokenizer
from gptrain.errors import UserError


def unique_docs(n: int, words: int = 40) -> list[str]:
    """Distinct documents with unicode, emoji and whitespace runs; each names its own index."""
    extra = ["héllo", "wörld", "😀", "中文", "  ", "\t", "x = 1\n    y = 2", "the", "fox"]
    return [f"doc {i} <{i * 7919}> " + " ".join(extra[(i + k) % len(extra)] for k in range(words)) + "\n"
            for i in range(n)]


def write_txt_docs(directory, docs):
    directory.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(docs):
        (directory / f"d{i:04d}.txt").write_text(d, encoding="utf-8")
    return directory


def read_split(out, split):
    meta = read_meta(out)
    return np.fromfile(out / f"{split}.bin", dtype=meta["dtype"])


def split_docs(out, split) -> list[str]:
    """Decode a split and cut it at end-of-text tokens (each document ends with one)."""
    tok = load_dataset_tokenizer(out)
    ids = read_split(out, split)
    assert ids.size == 0 or ids[-1] == tok.eot_id
    docs, start = [], 0
    for end in np.flatnonzero(ids == tok.eot_id):
        docs.append(tok.decode(ids[start:end]))
        start = end + 1
    return docs


def prep(tmp_path, inputs, out="ds", logs=None, **kw) -> tuple:
    logs = [] if logs is None else logs
    cfg = PrepareConfig(inputs=[str(p) for p in inputs], out_dir=str(tmp_path / out), **kw)
    return prepare_dataset(cfg, progress=False, log=logs.append), logs


# --------------------------------------------------------------------------- content


@pytest.mark.parametrize("spec", ["byte", "bpe:600"])
def test_splits_hold_every_document_once_with_eot(tmp_path, spec):
    docs = unique_docs(200)
    out, logs = prep(tmp_path, [write_txt_docs(tmp_path / "c", docs)], tokenizer=spec, val_fraction=0.1,
                     min_val_tokens=0)
    train, val = split_docs(out, "train"), split_docs(out, "val")
    assert sorted(train + val) == sorted(docs)  # exact text back: nothing lost, nothing changed
    assert not set(train) & set(val)
    assert 8 <= len(val) <= 35  # ~10% of 200 documents
    meta = read_meta(out)
    tok = load_dataset_tokenizer(out)
    for split, got in (("train", train), ("val", val)):
        ids = read_split(out, split)
        assert meta["splits"][split] == {**meta["splits"][split], "tokens": ids.size, "documents": len(got)}
        assert int((ids == tok.eot_id).sum()) == len(got)  # one end-of-text after every document
    assert any(line.startswith("done in") for line in logs)


def test_meta_json_contents_byte(tmp_path):
    docs = unique_docs(50)
    out, _ = prep(tmp_path, [write_txt_docs(tmp_path / "c", docs)], tokenizer="byte", val_fraction=0.2,
                  min_val_tokens=0, seed=7)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["format"] == "gptrain-tokens" and meta["format_version"] == 1
    assert meta["tokenizer"]["spec"] == "byte" and meta["vocab_size"] == 257 and meta["eot_id"] == 256
    assert meta["dtype"] == "uint16"
    n_bytes = sum(len(d.encode()) for d in docs)
    s = meta["splits"]
    assert s["train"]["tokens"] + s["val"]["tokens"] == n_bytes + len(docs)
    assert s["train"]["documents"] + s["val"]["documents"] == 50
    assert meta["inputs"]["files"] == 50 and meta["inputs"]["bytes"] == n_bytes
    assert meta["prepare"]["seed"] == 7 and meta["prepare"]["val_fraction"] == 0.2
    assert len(meta["inputs"]["fingerprint"]) > 16
    assert not (out / "tokenizer.json").exists()
    assert (out / "train.bin").stat().st_size == 2 * s["train"]["tokens"]
    # the split depends on the seed
    out2, _ = prep(tmp_path, [tmp_path / "c"], out="ds2", tokenizer="byte", val_fraction=0.2, min_val_tokens=0,
                   seed=8)
    assert set(split_docs(out2, "val")) != set(split_docs(out, "val"))


def test_bpe_dataset_saves_its_tokenizer(tmp_path):
    out, logs = prep(tmp_path, [write_txt_docs(tmp_path / "c", unique_docs(80))], tokenizer="bpe:500")
    meta = read_meta(out)
    tok = load_dataset_tokenizer(out)
    assert meta["tokenizer"]["fingerprint"] == tok.fingerprint()
    assert json.loads((out / "tokenizer.json").read_text())["added_tokens"][0]["content"] == EOT_TEXT
    assert tok.vocab_size == meta["vocab_size"] == 500 and tok.eot_id == meta["eot_id"] == 0
    assert any("trained bpe:500" in line for line in logs)


def test_uint32_when_the_vocabulary_exceeds_65536(tmp_path):
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models, pre_tokenizers

    words = ["<unk>", EOT_TEXT] + [f"w{i}" for i in range(70_000)]
    hf = HFTok(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "big.json"))
    docs = [f"w{69_990 + i} w{i} w65537" for i in range(6)]
    corpus = write_txt_docs(tmp_path / "c", docs)
    out, _ = prep(tmp_path, [corpus], tokenizer=f"hf:{tmp_path / 'big.json'}", min_val_tokens=4)
    meta = read_meta(out)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_002
    ids = np.concatenate([read_split(out, "train"), read_split(out, "val")])
    assert ids.max() == 69_995 + 2 and 65_539 in ids.tolist()
    assert (out / "train.bin").stat().st_size == 4 * meta["splits"]["train"]["tokens"]


# --------------------------------------------------------------------------- splits


def test_val_inputs_are_exactly_the_val_split(tmp_path):
    docs = unique_docs(30)
    train_dir = write_txt_docs(tmp_path / "train", docs[:25])
    val_dir = write_txt_docs(tmp_path / "val", docs[25:])
    out, _ = prep(tmp_path, [train_dir], tokenizer="byte", val_inputs=[str(val_dir)], val_fraction=0.5)
    assert sorted(split_docs(out, "val")) == sorted(docs[25:])
    assert sorted(split_docs(out, "train")) == sorted(docs[:25])
    assert read_meta(out)["splits"]["val"]["how"] == "val_inputs"
    with pytest.raises(UserError, match="both train and val inputs"):
        prep(tmp_path, [train_dir], out="bad", tokenizer="byte", val_inputs=[str(train_dir / "d0001.txt")])


def test_min_val_tokens_moves_trailing_train_documents(tmp_path):
    docs = unique_docs(100)
    corpus = write_txt_docs(tmp_path / "c", docs)
    out, _ = prep(tmp_path, [corpus], tokenizer="byte", val_fraction=0.0, min_val_tokens=1000)
    meta = read_meta(out)
    val = split_docs(out, "val")
    assert 1000 <= meta["splits"]["val"]["tokens"] < 1000 + max(len(d.encode()) + 1 for d in docs)
    assert sorted(val) == sorted(docs[-len(val):])  # the trailing documents, whole
    assert sorted(split_docs(out, "train")) == sorted(docs[:-len(val)])
    assert meta["splits"]["val"]["moved_from_train"] == len(val)
    # the top-up is capped at 10% of all tokens
    out, _ = prep(tmp_path, [corpus], out="capped", tokenizer="byte", val_fraction=0.0, min_val_tokens=10**9)
    s = read_meta(out)["splits"]
    total = s["train"]["tokens"] + s["val"]["tokens"]
    assert 0.1 * total <= s["val"]["tokens"] < 0.1 * total + 200


def test_a_single_document_is_cut_by_tokens_into_train_and_val(tmp_path):
    text = "".join(f"line {i}: some text\n" for i in range(500))
    (tmp_path / "one.txt").write_text(text)
    out, _ = prep(tmp_path, [tmp_path / "one.txt"], tokenizer="byte", min_val_tokens=100)
    train, val = split_docs(out, "train"), split_docs(out, "val")
    assert len(train) == len(val) == 1 and train[0] + val[0] == text
    assert len(val[0].encode()) == 100  # min_val_tokens (below 10% of the tokens)
    out, _ = prep(tmp_path, [tmp_path / "one.txt"], out="ds2", tokenizer="byte")  # min_val_tokens 100k
    assert len(split_docs(out, "val")[0].encode()) == int(0.1 * (len(text) + 1))  # capped at 10%
    assert read_meta(out)["splits"]["val"]["how"] == "tail of the only document"


def test_max_tokens_caps_train_exactly(tmp_path):
    docs = unique_docs(60)
    out, _ = prep(tmp_path, [write_txt_docs(tmp_path / "c", docs)], tokenizer="byte", max_tokens=2000,
                  val_fraction=0.1, min_val_tokens=0)
    ids = read_split(out, "train")
    assert ids.size == 2000 and ids[-1] == 256


def test_encoding_ahead_keeps_batch_order_when_batches_finish_out_of_order():
    """Two batches are encoded at once; a slow first batch still comes out first, and each batch with its
    own arrays."""
    import time

    from gptrain.data.prepare import _encode_ahead

    class SlowFirst:
        def encode_batch(self, texts):
            if texts[0] == "0":
                time.sleep(0.2)  # the second batch finishes first
            return [np.array([int(t)], dtype=np.uint32) for t in texts]

    batches = [[sources.Piece(str(i), True, 1)] for i in range(6)]
    out = list(_encode_ahead(SlowFirst(), iter(batches)))
    assert [b[0].text for b, _ in out] == [str(i) for i in range(6)]
    assert [int(enc[0][0]) for _, enc in out] == list(range(6))


def test_many_small_batches_give_the_tokens_of_one_serial_encode(tmp_path):
    docs = unique_docs(120)
    out, _ = prep(tmp_path, [write_txt_docs(tmp_path / "c", docs)], tokenizer="bpe:600", batch_bytes=1024,
                  val_fraction=0.0, min_val_tokens=0)
    tok = load_dataset_tokenizer(out)
    expect = np.concatenate([np.append(tok.encode_batch([d])[0], tok.eot_id) for d in docs])
    # Nothing hashed into val, so the top-up moved the last document there: train then val is the corpus.
    assert np.array_equal(np.concatenate([read_split(out, "train"), read_split(out, "val")]), expect)


# --------------------------------------------------------------------------- formats


def test_jsonl_json_and_text_field(tmp_path):
    docs = unique_docs(40)
    d = tmp_path / "j"
    d.mkdir()
    with open(d / "a.jsonl", "w") as f:
        for i, doc in enumerate(docs[:20]):
            f.write(json.dumps({"body": doc, "id": i}) + "\n\n")
        f.write(json.dumps({"body": None}) + "\n")
    (d / "b.json").write_text(json.dumps([{"body": doc} for doc in docs[20:]]))
    (d / "notes.csv").write_text("skipped: unknown suffix inside a directory")
    out, _ = prep(tmp_path, [d], tokenizer="byte", text_field="body", val_fraction=0.2, min_val_tokens=0)
    assert sorted(split_docs(out, "train") + split_docs(out, "val")) == sorted(docs)
    with pytest.raises(UserError, match=r"a.jsonl, line 1: no 'text' field \(fields: 'body', 'id'\).*--text-field"):
        prep(tmp_path, [d / "a.jsonl"], out="bad", tokenizer="byte")
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(UserError, match="broken.jsonl, line 2: not valid JSON"):
        prep(tmp_path, [tmp_path / "broken.jsonl"], out="bad", tokenizer="byte")


def test_line_docs_and_unknown_suffix_named_explicitly(tmp_path):
    lines = [f"line document {i} ünïcode" for i in range(50)]
    (tmp_path / "lines.log").write_text("\n".join(lines[:25]) + "\n\n   \n" + "\r\n".join(lines[25:]) + "\n")
    out, _ = prep(tmp_path, [tmp_path / "lines.log"], tokenizer="byte", line_docs=True, val_fraction=0.2,
                  min_val_tokens=0)
    assert sorted(split_docs(out, "train") + split_docs(out, "val")) == sorted(lines)


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    docs = unique_docs(30)
    pq.write_table(pa.table({"content": docs + [None], "n": list(range(31))}), tmp_path / "data.parquet")
    out, _ = prep(tmp_path, [tmp_path / "data.parquet"], tokenizer="byte", text_field="content",
                  val_fraction=0.2, min_val_tokens=0)
    assert sorted(split_docs(out, "train") + split_docs(out, "val")) == sorted(docs)
    with pytest.raises(UserError, match=r"no 'text' column \(columns: content, n\)"):
        prep(tmp_path, [tmp_path / "data.parquet"], out="bad", tokenizer="byte")


def test_a_long_document_is_read_in_pieces_with_the_same_tokens(tmp_path):
    text = "".join(f"def f{i}(x):\n    return x + {i}  # ünï\n\n" for i in range(20_000))  # ~700k chars
    (tmp_path / "big.py").write_text(text)
    pieces = list(sources.iter_pieces([tmp_path / "big.py"]))
    assert len(pieces) >= 3 and max(len(p.text) for p in pieces) <= sources.MAX_PIECE_CHARS
    assert "".join(p.text for p in pieces) == text and [p.doc_end for p in pieces][-1]
    assert sum(p.nbytes for p in pieces) == len(text.encode())


# --------------------------------------------------------------------------- reuse, atomicity, locations


def test_rerun_reuses_and_changes_rebuild(tmp_path):
    corpus = write_txt_docs(tmp_path / "c", unique_docs(40))
    out, _ = prep(tmp_path, [corpus], tokenizer="byte")
    before = (out / "train.bin").stat().st_mtime_ns, (out / "meta.json").read_text()
    _, logs = prep(tmp_path, [corpus], tokenizer="byte")
    assert logs[0].startswith(f"reused {out}")
    assert ((out / "train.bin").stat().st_mtime_ns, (out / "meta.json").read_text()) == before
    # a changed setting, a touched input or force rebuild
    _, logs = prep(tmp_path, [corpus], tokenizer="byte", seed=2)
    assert not any("reused" in line for line in logs)
    _, logs = prep(tmp_path, [corpus], tokenizer="byte", seed=2)
    assert logs[0].startswith("reused")
    os.utime(corpus / "d0003.txt", ns=(1, 1))
    _, logs = prep(tmp_path, [corpus], tokenizer="byte", seed=2)
    assert not any("reused" in line for line in logs)
    _, logs = prep(tmp_path, [corpus], tokenizer="byte", seed=2, force=True)
    assert not any("reused" in line for line in logs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "ds"]  # no temp dirs left behind


def test_an_interrupted_prepare_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    corpus = write_txt_docs(tmp_path / "c", unique_docs(40))
    from gptrain.data import tokenizer as T

    def boom(self, texts):
        raise KeyboardInterrupt

    monkeypatch.setattr(T.ByteTokenizer, "encode_batch", boom)
    with pytest.raises(KeyboardInterrupt):
        prep(tmp_path, [corpus], tokenizer="byte")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_dataset_cache_dir_is_deterministic(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTRAIN_CACHE", str(tmp_path / "cache"))
    a = PrepareConfig(inputs=["some/file.txt"], tokenizer="bpe:512")
    assert dataset_cache_dir(a) == dataset_cache_dir(PrepareConfig(inputs=["some/file.txt"], tokenizer="bpe:512"))
    assert dataset_cache_dir(a).parent == tmp_path / "cache" / "datasets"
    assert dataset_cache_dir(a).name.startswith("file-")
    assert dataset_cache_dir(a) != dataset_cache_dir(PrepareConfig(inputs=["some/file.txt"], tokenizer="byte"))
    assert dataset_cache_dir(a) != dataset_cache_dir(PrepareConfig(inputs=["other.txt"], tokenizer="bpe:512"))


def test_toy_corpus_is_deterministic_and_prepares(tmp_path):
    a = sources.write_toy_corpus(tmp_path / "a.jsonl", size_bytes=50_000)
    b = sources.write_toy_corpus(tmp_path / "b.jsonl", size_bytes=50_000)
    assert a.read_bytes() == b.read_bytes() and 50_000 <= a.stat().st_size < 52_000
    t = sources.write_toy_corpus(tmp_path / "t.txt", size_bytes=50_000)
    assert t.suffix == ".txt" and "+" in t.read_text()
    out, _ = prep(tmp_path, [a], tokenizer="bpe:400", min_val_tokens=500)
    s = read_meta(out)["splits"]
    assert s["train"]["documents"] > 200 and s["val"]["tokens"] >= 500


def test_default_corpus_files():
    files = sources.default_corpus_files()
    assert files == sorted(files) and len(files) > 500
    assert all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)
    assert sum(f.stat().st_size for f in files) > 10_000_000


# --------------------------------------------------------------------------- bad input


def test_missing_input(tmp_path):
    with pytest.raises(UserError, match=r"Input not found: .*nope\.txt\. Fix: check the path"):
        prep(tmp_path, [tmp_path / "nope.txt"])


def test_empty_file_and_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match=r"empty\.txt is empty"):
        prep(tmp_path, [tmp_path / "empty.txt"])
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "a.txt").write_text("   \n\n")
    (blank / "b.txt").write_text("")
    with pytest.raises(UserError, match="hold no text"):
        prep(tmp_path, [blank], tokenizer="byte")
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "data.bin").write_bytes(b"\0")
    with pytest.raises(UserError, match="holds no readable files"):
        prep(tmp_path, [tmp_path / "nothing"])
    assert not (tmp_path / "ds").exists()


def test_non_utf8_names_file_and_offset(tmp_path):
    (tmp_path / "latin.txt").write_bytes(b"caf" + "é au lait".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin\.txt is not valid UTF-8 \(first bad byte at offset 3\).*iconv"):
        prep(tmp_path, [tmp_path / "latin.txt"], tokenizer="byte")
    big = tmp_path / "big.txt"  # the bad byte far into a file read in chunks
    big.write_bytes(b"a" * 3_000_000 + b"\xff")
    with pytest.raises(UserError, match="offset 3000000"):
        list(sources.iter_pieces([big]))
    lines = tmp_path / "l.jsonl"
    lines.write_bytes(b'{"text": "ok"}\n{"text": "\xe9"}\n')
    with pytest.raises(UserError, match="offset 25"):
        list(sources.iter_pieces([lines]))
    # the default corpus mode skips such files and counts them
    (tmp_path / "good.txt").write_text("fine")
    stats = sources.SourceStats()
    docs = list(sources.iter_documents([tmp_path / "latin.txt", tmp_path / "good.txt"], skip_bad_files=True,
                                       stats=stats))
    assert docs == ["fine"] and stats.skipped_files == [str(tmp_path / "latin.txt")]


def test_unwritable_or_foreign_output(tmp_path):
    corpus = write_txt_docs(tmp_path / "c", unique_docs(20))
    (tmp_path / "file").write_text("a regular file")
    with pytest.raises(UserError, match=r"Cannot create the output directory .*file/sub/ds.*writable"):
        prepare_dataset(PrepareConfig(inputs=[str(corpus)], out_dir=str(tmp_path / "file" / "sub" / "ds"),
                                      tokenizer="byte"), progress=False, log=lambda m: None)
    with pytest.raises(UserError, match="not a directory"):
        prepare_dataset(PrepareConfig(inputs=[str(corpus)], out_dir=str(tmp_path / "file"), tokenizer="byte"),
                        progress=False, log=lambda m: None)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a gptrain dataset; not overwriting"):
        prepare_dataset(PrepareConfig(inputs=[str(corpus)], out_dir=str(mine), tokenizer="byte"), progress=False,
                        log=lambda m: None)
    assert (mine / "precious.txt").read_text() == "keep me"


def test_read_meta_checks_the_dataset(tmp_path):
    out, _ = prep(tmp_path, [write_txt_docs(tmp_path / "c", unique_docs(30))], tokenizer="byte")
    assert read_meta(out)["vocab_size"] == 257
    with open(out / "train.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(UserError, match="train.bin has .* bytes, meta.json expects"):
        read_meta(out)
    (out / "meta.json").write_text("{truncated")
    with pytest.raises(UserError, match="meta.json is unreadable or corrupt"):
        read_meta(out)
    with pytest.raises(UserError, match="does not exist.*gptrain prepare"):
        read_meta(tmp_path / "nothing")


def test_read_meta_accepts_nanogpt_datasets(tmp_path, monkeypatch):
    # Without meta.pkl nanoGPT data carries no vocabulary and no tokenizer: the vocabulary is the one
    # given (the model's --vocab-size), else the data's largest id + 1, found by a chunked scan.
    monkeypatch.setenv("GPTRAIN_CACHE", str(tmp_path / "cache"))
    d = tmp_path / "nano"
    d.mkdir()
    np.arange(100, dtype=np.uint16).tofile(d / "train.bin")
    np.arange(10, dtype=np.uint16).tofile(d / "val.bin")
    meta = read_meta(d)
    assert (meta["format"], meta["vocab_size"], meta["dtype"], meta["tokenizer"]) == ("nanogpt", 100, "uint16", None)
    assert meta["splits"]["train"]["tokens"] == 100 and meta["splits"]["val"]["tokens"] == 10
    assert read_meta(d, vocab_size=256)["vocab_size"] == 256
    with open(d / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 65, "itos": {0: "a"}, "stoi": {"a": 0}}, f)
    assert read_meta(d)["vocab_size"] == 65 and read_meta(d)["tokenizer"] is None


# --------------------------------------------------------------------------- data: sources, prepare


def prep_byte(tmp_path, inputs, **kw):
    from gptrain.data.prepare import PrepareConfig, prepare_dataset

    logs = []
    kw = {"tokenizer": "byte", "val_fraction": 0.2, "min_val_tokens": 0, **kw}
    out = prepare_dataset(PrepareConfig(inputs=[str(p) for p in inputs], out_dir=str(tmp_path / "ds"), **kw),
                          progress=False, log=logs.append)
    return out, logs


def all_text(out) -> bytes:
    return b"".join(np.fromfile(out / f"{s}.bin", dtype=np.uint16).astype(np.uint8).tobytes() for s in ("train", "val"))


def test_prepare_rebuilds_when_text_field_or_line_docs_change(tmp_path):
    rows = [{"title": f"title {i}", "body": f"body {i} " * 20} for i in range(30)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, _ = prep_byte(tmp_path, [data], text_field="body")
    assert b"body 3" in all_text(out)
    _, logs = prep_byte(tmp_path, [data], text_field="title")
    assert not any("reused" in line for line in logs)
    assert b"body" not in all_text(out) and b"title 3" in all_text(out)
    text = tmp_path / "t.txt"
    text.write_text("".join(f"line {i}\n" for i in range(40)))
    out, _ = prep_byte(tmp_path, [text], min_val_tokens=50)
    one_doc = json.loads((out / "meta.json").read_text())["splits"]
    _, logs = prep_byte(tmp_path, [text], min_val_tokens=50, line_docs=True)
    assert not any("reused" in line for line in logs)
    s = json.loads((out / "meta.json").read_text())["splits"]
    assert s["train"]["documents"] + s["val"]["documents"] == 40 != one_doc["train"]["documents"] + 1


def test_a_file_named_twice_is_read_once(tmp_path):
    from gptrain.data.sources import resolve_inputs

    d = tmp_path / "c"
    d.mkdir()
    for i in range(3):
        (d / f"{i}.txt").write_text(f"doc {i}")
    files = resolve_inputs([str(d), str(d / "1.txt"), str(tmp_path / "c" / ".." / "c" / "2.txt")])
    assert files == [d / "0.txt", d / "1.txt", d / "2.txt"]


def test_a_pretty_printed_json_object_is_one_document(tmp_path):
    from gptrain.data.sources import iter_documents

    body = "first line\nsecond line of the only document\n" * 5
    (tmp_path / "one.json").write_text(json.dumps({"id": 1, "text": body}, indent=2))
    assert list(iter_documents([tmp_path / "one.json"])) == [body]


def test_sigterm_during_prepare_leaves_no_temporary_folder(tmp_path):
    """Was: hidden `.OUT.tmp-*` folders (up to 57 MB) that nothing removed."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import make_corpus

    corpus = make_corpus(tmp_path / "corpus", n_docs=4000, words_per_doc=400)
    out = tmp_path / "ds"
    proc = subprocess.Popen([sys.executable, "-m", "gptrain", "prepare", str(corpus), "--tokenizer", "byte", "--out",
                             str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".ds.tmp-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert not list(tmp_path.glob(".ds.tmp-*")) and not out.exists()
    # A folder left by a process killed outright (SIGKILL: no handler runs) goes with the next prepare.
    stale = tmp_path / ".ds.tmp-999999999-abc"
    stale.mkdir()
    from gptrain.data.prepare import remove_stale_temp_dirs

    assert remove_stale_temp_dirs(out) == [stale] and not stale.exists()
