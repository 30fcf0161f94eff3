import json
import os

import pytest
import torch

from gptrain import checkpoint as C
from gptrain.errors import UserError


def save(tmp_path, step, val=None, value=1.0):
    return C.save_checkpoint(tmp_path, step, {"w": torch.full((3,), value)}, {"opt": {"lr": 0.1}},
                             {"val_loss": val})


def test_save_and_load_round_trip(tmp_path):
    path = save(tmp_path, 7, value=2.5)
    ckpt = C.read_checkpoint(path)
    assert ckpt.step == 7 and (path / C.MARKER).is_file()
    assert torch.equal(ckpt.load_model_state()["w"], torch.full((3,), 2.5))
    assert ckpt.load_train_state()["opt"]["lr"] == 0.1


def test_interrupted_save_is_ignored_and_cleaned(tmp_path):
    save(tmp_path, 10)
    # A save killed half-way leaves a .tmp- folder without the marker …
    broken = tmp_path / "step_0000020.tmp-99999"
    broken.mkdir()
    (broken / "model.pt").write_bytes(b"\x00" * 10)
    # … and a folder renamed in place but missing its marker (e.g. copied by hand) is incomplete too.
    no_marker = tmp_path / "step_0000030"
    no_marker.mkdir()
    assert C.latest_checkpoint(tmp_path).step == 10
    with pytest.raises(UserError, match="incomplete"):
        C.read_checkpoint(no_marker)
    C.prune_checkpoints(tmp_path, keep_last=3)
    assert not broken.exists()


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = save(tmp_path, 5)
    data = (path / "model.pt").read_bytes()
    (path / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt or truncated"):
        C.read_checkpoint(path).load_model_state()


def test_loading_never_runs_pickled_code(tmp_path):
    path = save(tmp_path, 5)

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"w": Evil()}, path / "model.pt")
    with pytest.raises(UserError):
        C.read_checkpoint(path).load_model_state()
    assert not (tmp_path / "pwned").exists()


def test_keep_last_plus_best(tmp_path):
    for step, val in [(1, 3.0), (2, 1.0), (3, 2.0), (4, None), (5, 2.5)]:
        save(tmp_path, step, val)
    C.prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in C.list_checkpoints(tmp_path)] == ["step_0000002", "step_0000004", "step_0000005"]
    info = json.loads((tmp_path / "step_0000002" / "info.json").read_text())
    assert info["val_loss"] == 1.0


def test_resolve_accepts_run_folder_and_checkpoints_folder(tmp_path):
    run = tmp_path / "run"
    save(run / "checkpoints", 3)
    save(run / "checkpoints", 9)
    assert C.resolve_checkpoint(run).step == 9
    assert C.resolve_checkpoint(run / "checkpoints").step == 9
    assert C.resolve_checkpoint(run / "checkpoints" / "step_0000003").step == 3
    with pytest.raises(UserError, match="does not exist"):
        C.resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(UserError, match="no complete checkpoint"):
        C.resolve_checkpoint(tmp_path)


# --------------------------------------------------------------------------- checkpoints


def test_resolve_finds_checkpoints_in_a_custom_checkpoint_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    elsewhere = tmp_path / "big-disk" / "ckpts"
    save(elsewhere, 4)
    save(elsewhere, 8)
    (run / "config.json").write_text(json.dumps({"train": {"checkpoint_dir": str(elsewhere)}}))
    assert C.resolve_checkpoint(run).path == elsewhere / "step_0000008"


def test_resolve_names_an_incomplete_checkpoint_folder(tmp_path):
    save(tmp_path / "checkpoints", 3)
    half = tmp_path / "checkpoints" / "step_0000006"
    half.mkdir()
    (half / "model.pt").write_bytes(b"\0")
    with pytest.raises(UserError, match=r"step_0000006 is incomplete \(no COMPLETE marker"):
        C.resolve_checkpoint(half)


def test_sharded_save_writes_info_extra_files_and_the_export(tmp_path):
    calls = []

    def write_shards(dcp_dir):
        dcp_dir.mkdir()
        (dcp_dir / "__0_0.distcp").write_bytes(b"shard")
        calls.append("shards")

    path = C.save_sharded_checkpoint(tmp_path, 10, write_shards, {"val_loss": 1.5},
                                     {"tokenizer.json": '{"model": "bpe"}'}, rank=0,
                                     broadcast_object=lambda obj: calls.append(obj[0]) or obj,
                                     barrier=lambda: calls.append("barrier"), full_model_state={"w": torch.ones(3)})
    # the folder's name to all ranks, the shards, a barrier, then rank 0's outcome to all (in place of a barrier)
    assert path == tmp_path / "step_0000010" and calls == ["ok", "shards", "barrier", "ok"]
    assert sorted(p.name for p in path.iterdir()) == ["COMPLETE", "dcp", "info.json", "model.pt", "tokenizer.json"]
    assert (path / "tokenizer.json").read_text() == '{"model": "bpe"}'  # generate needs it for a BPE run
    ckpt = C.read_checkpoint(path)
    assert ckpt.step == 10 and ckpt.info["val_loss"] == 1.5 and ckpt.is_sharded
    assert torch.equal(ckpt.load_model_state()["w"], torch.ones(3))
    assert not list(tmp_path.glob("*.tmp-*"))
