"""Token datasets of other tools, written here in their own layouts, opened in place and trained on.

nanoGPT folders (with and without meta.pkl), llm.c .bin shards (uint16 GPT-2 and uint32 Llama 3
headers, as llm.c's dev/data/data_common.py writes them), .npy shards (build-nanoGPT's fineweb.py):
each goes through the public path, `open_dataset` then the loader's `TrainBatches`, and the
batches are compared with the tokens read back independently. Bad files end with one clear error.
"""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from gptrain.data import format as F
from gptrain.data.dataset import DataConfig, open_dataset
from gptrain.data.format import TokenShards
from gptrain.data.loader import BatchLayout, TrainBatches
from gptrain.errors import UserError
from gptrain.model import GPT, ModelConfig

SEQ = 16


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTRAIN_CACHE", str(tmp_path / "cache"))


def write_llmc(path: Path, tokens, magic=20240520, version=1, dtype=np.uint16, ntok=None) -> Path:
    """An llm.c shard: 256 int32 header (magic, version, token count), then the tokens."""
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = magic, version, len(tokens) if ntok is None else ntok
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=dtype).tobytes())
    return path


def ids(n, high, seed):
    return np.random.default_rng(seed).integers(0, high, n)


def train_a_few_steps(ds, steps=3) -> list[float]:
    """Train a tiny model on the dataset's batches; every batch is checked against the raw tokens."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=ds.vocab_size, max_position_embeddings=SEQ, n_layers=1, n_heads=2,
                            d_model=32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batches = TrainBatches(ds.train, SEQ, BatchLayout(4, 1), seed=1)
    losses = []
    for step in range(steps):
        x, y = batches.get(step, 0)
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    return losses


def expected_rows(flat: np.ndarray, batches: TrainBatches, step: int, micro: int = 0) -> np.ndarray:
    rows = []
    for pos in batches.window_ids(step, micro):
        epoch, offset = divmod(int(pos), batches.num_windows)
        start = int(batches.permutation(epoch)[offset]) * SEQ
        rows.append(flat[start : start + SEQ + 1])
    return np.stack(rows).astype(np.int64)


# ---------------------------------------------------------------------------------------- nanoGPT
def test_nanogpt_folder_without_meta_pkl_trains_with_the_datas_vocabulary(tmp_path):
    d = tmp_path / "bytes"
    d.mkdir()
    train, val = ids(3000, 256, 0).astype(np.uint16), ids(500, 256, 1).astype(np.uint16)
    train.tofile(d / "train.bin")
    val.tofile(d / "val.bin")
    notes = []
    ds = open_dataset(DataConfig(dataset=str(d)), console=type("C", (), {"print": staticmethod(notes.append)}))
    assert (ds.kind, ds.tokenizer, ds.vocab_size) == ("nanogpt", None, int(train.max()) + 1)
    assert len(notes) == 1 and "samples are skipped" in notes[0]  # one line, and training goes on
    assert isinstance(ds.train.parts[0], np.memmap)  # read in place
    b = TrainBatches(ds.train, SEQ, BatchLayout(4, 1), seed=1)
    assert torch.equal(b.rows(2, 0), torch.from_numpy(expected_rows(train, b, 2)))
    assert np.array_equal(ds.val[0:500], val)
    train_a_few_steps(ds)
    # --vocab-size 256 (the command) is the vocabulary when given
    assert open_dataset(DataConfig(dataset=str(d)), vocab_size=256).vocab_size == 256
    with pytest.raises(UserError, match=r"holds the token id \d+, beyond --vocab-size 100"):
        open_dataset(DataConfig(dataset=str(d)), vocab_size=100)


def test_nanogpt_character_level_folder_brings_its_tokenizer(tmp_path):
    text = "to be or not to be, that is the question\n" * 30
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    d = tmp_path / "shakespeare_char"
    d.mkdir()
    data = np.array([stoi[c] for c in text], dtype=np.uint16)
    data[:1000].tofile(d / "train.bin")
    data[1000:].tofile(d / "val.bin")
    with open(d / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
    ds = open_dataset(DataConfig(dataset=str(d)))
    assert ds.tokenizer.spec == "chars" and ds.tokenizer.decode(ds.val[0:12]) == text[1000:1012]
    assert ds.vocab_size == len(chars) + 1  # the characters and end-of-text
    train_a_few_steps(ds)
    with open(d / "meta.pkl", "wb") as f:  # a meta.pkl that claims fewer ids than the data holds
        pickle.dump({"vocab_size": 3}, f)
    with pytest.raises(UserError, match="beyond its meta.pkl's vocab_size 3"):
        open_dataset(DataConfig(dataset=str(d)))


def test_nanogpt_file_that_is_not_uint16_is_refused(tmp_path):
    d = tmp_path / "odd"
    d.mkdir()
    (d / "train.bin").write_bytes(b"\x01\x00\x02")
    (d / "val.bin").write_bytes(b"\x01\x00\x02\x00")
    with pytest.raises(UserError, match="not a whole number of uint16 tokens"):
        open_dataset(DataConfig(dataset=str(d)))


# ---------------------------------------------------------------------------------------- llm.c
def test_llmc_uint16_shards_train_across_shard_boundaries(tmp_path):
    d = tmp_path / "fineweb10B"
    d.mkdir()
    shards = [ids(n, 50257, s) for s, n in enumerate((700, 450, 910))]
    for i, s in enumerate(shards):
        write_llmc(d / f"fineweb_train_{i + 1:06d}.bin", s)
    val = ids(600, 50257, 9)
    write_llmc(d / "fineweb_val_000000.bin", val)
    flat = np.concatenate(shards)
    for data in (str(d), str(d / "fineweb_*.bin")):  # a folder or llm.c's own glob
        ds = open_dataset(DataConfig(dataset=data))
        assert (ds.kind, ds.meta["format"], len(ds.train), len(ds.val)) == ("shards", "llmc", len(flat), 600)
        assert ds.train.dtype == np.uint16 and ds.vocab_size == int(max(flat.max(), val.max())) + 1
        b = TrainBatches(ds.train, SEQ, BatchLayout(8, 2, 2, 1), seed=3)
        for step in range(0, 40, 7):  # many windows cross the two shard boundaries
            assert torch.equal(b.rows(step, 1), torch.from_numpy(expected_rows(flat, b, step, 1)))
    assert np.array_equal(ds.val[0:600], val)
    assert np.array_equal(ds.train[690:720], flat[690:720])  # a slice across a boundary
    train_a_few_steps(ds)


def test_llmc_uint32_shards(tmp_path):
    tokens = ids(1200, 128_256, 4)
    tokens[5] = 128_255  # beyond uint16
    write_llmc(tmp_path / "llama_train_000001.bin", tokens, magic=20240801, version=7, dtype=np.uint32)
    write_llmc(tmp_path / "llama_val_000000.bin", ids(400, 128_256, 5), magic=20240801, version=7, dtype=np.uint32)
    ds = open_dataset(DataConfig(dataset=str(tmp_path / "llama_*.bin"), data_mode="llmc"))
    assert ds.train.dtype == np.uint32 and ds.vocab_size == 128_256
    assert np.array_equal(ds.train[0:1200], tokens)
    b = TrainBatches(ds.train, SEQ, BatchLayout(2, 1), seed=0)
    assert torch.equal(b.rows(5, 0), torch.from_numpy(expected_rows(tokens, b, 5)))


@pytest.mark.parametrize("damage, message", [
    (dict(magic=12345), "magic number is 12345"),
    (dict(version=2), "have version 1 in their header, this one has 2"),
    (dict(ntok=1000), "is truncated: its header says 1,000 uint16 tokens"),
    (dict(ntok=10), "has trailing bytes"),
])
def test_damaged_llmc_shards_are_clear_errors(tmp_path, damage, message):
    write_llmc(tmp_path / "a_train_000001.bin", ids(500, 100, 0), **damage)
    write_llmc(tmp_path / "a_val_000000.bin", ids(500, 100, 1))
    with pytest.raises(UserError, match=message):
        open_dataset(DataConfig(dataset=str(tmp_path)))


def test_a_short_llmc_header_is_a_clear_error(tmp_path):
    (tmp_path / "x_train_000001.bin").write_bytes(np.array([20240520, 1, 5], dtype=np.int32).tobytes())
    with pytest.raises(UserError, match="less than llm.c's 1024-byte header"):
        open_dataset(DataConfig(train_shards=[str(tmp_path / "x_train_000001.bin")]))


# ---------------------------------------------------------------------------------------- .npy
def test_one_npy_shard_each_with_the_original_flags(tmp_path):
    train, val = ids(2000, 50257, 0).astype(np.uint16), ids(700, 50257, 1).astype(np.uint16)
    np.save(tmp_path / "edufineweb_train_000001.npy", train)
    np.save(tmp_path / "edufineweb_val_000000.npy", val)
    cfg = DataConfig(data_mode="fineweb_npy", train_shards=[str(tmp_path / "edufineweb_train_000001.npy")],
                     val_shards=[str(tmp_path / "edufineweb_val_000000.npy")])
    ds = open_dataset(cfg)
    assert (ds.meta["format"], len(ds.train), len(ds.val)) == ("npy", 2000, 700)
    assert isinstance(ds.train.parts[0], np.memmap)
    b = TrainBatches(ds.train, SEQ, BatchLayout(4, 1), seed=1)
    assert torch.equal(b.rows(3, 0), torch.from_numpy(expected_rows(train, b, 3)))
    train_a_few_steps(ds)


def test_many_npy_shards_from_a_folder_with_a_held_out_tail(tmp_path):
    shards = [ids(n, 1000, s).astype(np.int32) for s, n in enumerate((400, 1000, 600))]
    for i, s in enumerate(shards):
        np.save(tmp_path / f"shard_{i:03d}.npy", s)
    notes = []
    ds = open_dataset(DataConfig(dataset=str(tmp_path), val_fraction=0.1),
                      console=type("C", (), {"print": staticmethod(notes.append)}))
    flat = np.concatenate(shards)
    held = 200  # 10% of 2000 tokens: the last tokens, never trained on
    assert (len(ds.train), len(ds.val)) == (2000 - held, held)
    assert np.array_equal(ds.val[0:held], flat[-held:]) and np.array_equal(ds.train[0:1800], flat[:1800])
    assert any("held out" in n for n in notes)
    b = TrainBatches(ds.train, SEQ, BatchLayout(4, 1), seed=1)
    assert torch.equal(b.rows(7, 0), torch.from_numpy(expected_rows(flat[:1800], b, 7)))
    # The same shards named one by one (--train-npy A B C) are the same tokens
    same = open_dataset(DataConfig(train_shards=[str(tmp_path / f"shard_{i:03d}.npy") for i in range(3)],
                                   val_fraction=0.1))
    assert same.fingerprint == ds.fingerprint


@pytest.mark.parametrize("array, message", [
    (np.linspace(0, 1, 100), "holds float64 values, not integer token ids"),
    (np.zeros((10, 10), dtype=np.uint16), "holds a 2-D array"),
    (np.array([5, -1, 3] * 50, dtype=np.int64), "negative token id -1"),
])
def test_npy_that_are_not_token_ids_are_clear_errors(tmp_path, array, message):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(UserError, match=message):
        open_dataset(DataConfig(train_shards=[str(tmp_path / "bad.npy")]))


def test_a_truncated_npy_shard_is_a_clear_error(tmp_path):
    np.save(tmp_path / "t.npy", np.arange(1000, dtype=np.uint16))
    raw = (tmp_path / "t.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError, match="not a readable .npy file, or it is truncated"):
        open_dataset(DataConfig(train_shards=[str(tmp_path / "t.npy")]))


def test_ids_beyond_a_named_tokenizer_are_refused_and_a_fitting_one_is_used(tmp_path):
    np.save(tmp_path / "a.npy", np.array(list(b"hello world, " * 40), dtype=np.uint16))
    np.save(tmp_path / "b.npy", np.array([300] + list(b"x" * 100), dtype=np.uint16))
    ds = open_dataset(DataConfig(train_shards=[str(tmp_path / "a.npy")], val_fraction=0.1), tokenizer="byte")
    assert ds.tokenizer.spec == "byte" and ds.vocab_size == 257 and ds.eot_id == 256
    with pytest.raises(UserError, match=r"token id 300, beyond the 257 ids of the tokenizer byte"):
        open_dataset(DataConfig(train_shards=[str(tmp_path / "b.npy")]), tokenizer="byte")
    with pytest.raises(UserError, match="token files come tokenized"):
        open_dataset(DataConfig(train_shards=[str(tmp_path / "a.npy")]), tokenizer="bpe:512")


# ---------------------------------------------------------------------------------------- choosing the source
def test_data_mode_and_conflicting_sources_are_checked(tmp_path):
    np.save(tmp_path / "a.npy", ids(500, 100, 0).astype(np.uint16))
    write_llmc(tmp_path / "b.bin", ids(500, 100, 0))
    with pytest.raises(UserError, match="--data-mode nanogpt expects --data DIR"):
        open_dataset(DataConfig(train_shards=[str(tmp_path / "a.npy")], data_mode="nanogpt"))
    with pytest.raises(UserError, match="b.bin is an llm.c shard, not a .npy file"):
        open_dataset(DataConfig(train_shards=[str(tmp_path / "b.bin")], data_mode="fineweb_npy"))
    with pytest.raises(UserError, match="both name the training tokens"):
        open_dataset(DataConfig(dataset=str(tmp_path), train_shards=[str(tmp_path / "a.npy")]))
    with pytest.raises(UserError, match="no file matches this pattern"):
        open_dataset(DataConfig(train_shards=[str(tmp_path / "nothing_*.npy")]))
    with pytest.raises(UserError, match="--val-npy names validation shards but no training shards"):
        open_dataset(DataConfig(val_shards=[str(tmp_path / "a.npy")]))


def test_a_prepared_folder_opens_with_its_tokenizer(byte_dataset):
    ds = open_dataset(DataConfig(dataset=str(byte_dataset)))
    assert (ds.kind, ds.vocab_size, ds.tokenizer.spec, ds.dir) == ("prepared", 257, "byte", byte_dataset)
    assert np.array_equal(ds.val[0:50], np.fromfile(byte_dataset / "val.bin", dtype=np.uint16)[:50])
    with pytest.raises(UserError, match="uses 257 token ids but the model has --vocab-size 200"):
        open_dataset(DataConfig(dataset=str(byte_dataset)), vocab_size=200)
    with pytest.raises(UserError, match="was prepared with byte"):
        open_dataset(DataConfig(dataset=str(byte_dataset)), tokenizer="bpe:512")


# ---------------------------------------------------------------------------------------- TokenShards
def test_token_shards_read_like_one_array():
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 1000, n).astype(np.uint16) for n in (5, 1, 17, 0, 9)]
    flat = np.concatenate(parts)
    shards = TokenShards(parts)
    assert len(shards) == len(flat) and len(shards.parts) == 4  # the empty one is dropped
    for a in range(len(flat) + 1):
        for b in range(a, len(flat) + 2):
            assert np.array_equal(shards[a:b], flat[a:b])
    assert [int(shards[i]) for i in range(len(flat))] == flat.tolist() and shards[-1] == flat[-1]
    view = shards.span(3, 25)
    assert np.array_equal(view[0:len(view)], flat[3:25])
    # the loader is the same function of (seed, step, micro-step, rank) over shards as over one array
    for layout in (BatchLayout(3, 2), BatchLayout(2, 1, 2, 1)):
        one, many = TrainBatches(flat, 4, layout, 7), TrainBatches(shards, 4, layout, 7)
        for step in range(6):
            assert torch.equal(one.rows(step, layout.grad_accum - 1), many.rows(step, layout.grad_accum - 1))


def test_the_id_scan_reads_in_chunks_and_is_cached(tmp_path, monkeypatch):
    path = tmp_path / "big.bin"
    tokens = np.random.default_rng(0).integers(0, 60000, 10_007).astype(np.uint16)
    tokens[9_999] = 65000
    tokens.tofile(path)
    read = []
    real_asarray = np.asarray
    monkeypatch.setattr(F, "SCAN_CHUNK_TOKENS", 1000)
    monkeypatch.setattr(F.np, "asarray", lambda a, *k, **kw: read.append(len(a)) or real_asarray(a, *k, **kw))
    mm = F.open_bin(path, "<u2")
    assert F.id_range_of(mm, path) == (0, 65000)
    assert max(read) == 1000 and sum(read) == 10_007  # never more than a chunk in memory
    read.clear()
    assert F.id_range_of(mm, path) == (0, 65000) and read == []  # from the cache
    tokens[0] = 65100
    tokens.tofile(path)  # the file changed: scanned again
    assert F.id_range_of(F.open_bin(path, "<u2"), path)[1] == 65100


# ---------------------------------------------------------------------------------------- one home, no cycle
def gptrain_imports(module: str) -> set[str]:
    src = Path(__file__).parents[1] / "src" / "gptrain" / (module.replace(".", "/") + ".py")
    found = set()
    for node in ast.walk(ast.parse(src.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gptrain"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("gptrain")}
    return found


def test_the_format_module_is_a_leaf_and_nothing_imports_in_a_cycle():
    assert gptrain_imports("data.format") <= {"gptrain.errors", "gptrain.jsonio"}
    assert "gptrain.data.prepare" not in gptrain_imports("data.tokenizer")
    assert "gptrain.data.format" in gptrain_imports("data.tokenizer")
    assert "gptrain.data.format" in gptrain_imports("data.prepare")
    assert "gptrain.data.prepare" not in gptrain_imports("data.loader")
