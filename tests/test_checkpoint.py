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
