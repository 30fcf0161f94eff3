"""The command line: the documented commands work, and bad input ends in one clear message with exit code 2."""

import json
import subprocess
import sys

import pytest

from gptrain.cli import main


def cli(*args):
    return main([str(a) for a in args])


def err_of(capsys):
    return capsys.readouterr().err


TINY = ["--n-layers", "2", "--n-heads", "2", "--d-model", "32", "--max-position-embeddings", "32",
        "--batch-size", "4", "--log-every", "2", "--eval-tokens", "256", "--progress", "plain", "--sample-tokens", "4"]


def test_prepare_train_generate_eval(tmp_path, capsys):
    from conftest import make_corpus

    corpus = make_corpus(tmp_path / "corpus", n_docs=30)
    data = tmp_path / "data"
    assert cli("prepare", corpus, "--tokenizer", "bpe:300", "--out", data, "--val-fraction", "0.1") == 0
    assert (data / "tokenizer.json").is_file()
    assert cli("train", "--data", data, "--runs-dir", tmp_path / "runs", "--run-name", "r", "--num-steps", "6",
               *TINY) == 0
    out = capsys.readouterr().out
    assert "done: 6 steps" in out and "non-embedding" in out and "tokens per optimizer step" in out
    assert cli("generate", tmp_path / "runs" / "r", "--prompt", "the quick", "--max-new-tokens", "10") == 0
    assert capsys.readouterr().out.startswith("the quick")
    assert cli("eval", tmp_path / "runs" / "r") == 0
    out = capsys.readouterr().out
    assert "val loss" in out and "perplexity" in out


def test_train_from_raw_files_and_toml_with_overrides(tmp_path, capsys):
    from conftest import make_corpus

    corpus = make_corpus(tmp_path / "corpus", n_docs=20)
    toml = tmp_path / "run.toml"
    toml.write_text('[train]\nnum_steps = 4\nrun_name = "from-toml"\n[optim]\nlr = 0.01\n')
    rc = cli("train", "--config", toml, "--train-data", corpus, "--tokenizer-name", "byte", "--runs-dir",
             tmp_path / "runs", "--lr", "0.005", *TINY)
    assert rc == 0
    cfg = json.loads((tmp_path / "runs" / "from-toml" / "config.json").read_text())
    assert cfg["train"]["num_steps"] == 4 and cfg["optim"]["lr"] == 0.005  # the flag beats the file
    assert cfg["data"]["tokenizer"] == "byte"


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--lrr", "0.1"], "unknown option --lrr. Did you mean '--lr'?"),
        (["train", "--n-layer", "2"], "Did you mean '--n-layers'?"),
        (["train", "--d-model", "30", "--n-heads", "4"], "d_model (30) must be divisible by n_heads (4)"),
        (["train", "--seq-len", "4096", "--max-position-embeddings", "256"], "longer than the model's context"),
        (["train", "--tp", "2"], "the layout needs a multiple of 2 processes (dp_replicate -1 × dp_shard 1 × tp 2), but 1 is running"),
        (["train", "--data", "/nonexistent/dir"], "does not exist"),
        (["prepare", "/nonexistent/file.txt", "--out", "x"], "not found"),
        (["generate", "/nonexistent/run"], "does not exist"),
        (["trian"], "Did you mean 'train'?"),
    ],
)
def test_bad_input_is_one_clear_message(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli(*args) == 2
    err = err_of(capsys)
    assert message in err and "Traceback" not in err


def test_attention_backend_this_device_lacks_is_an_error_before_any_work(byte_dataset, tmp_path, capsys):
    rc = cli("train", "--data", byte_dataset, "--runs-dir", tmp_path / "runs", "--run-name", "x",
             "--attention-backend", "cudnn", *TINY)
    assert rc == 2
    err = err_of(capsys)
    assert "--attention-backend cudnn cannot run this model's attention on cpu in fp32" in err
    assert "On CPU, PyTorch has the flash and math backends only" in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "x").exists()


def test_unknown_toml_setting_suggests_the_closest(tmp_path, capsys):
    toml = tmp_path / "bad.toml"
    toml.write_text("[optim]\nlearning_rat = 0.1\n")
    assert cli("train", "--config", toml) == 2
    assert "unknown setting 'optim.learning_rat'" in err_of(capsys)
    toml.write_text("[optimizer]\nlr = 0.1\n")
    assert cli("train", "--config", toml) == 2
    assert "Did you mean 'optim'?" in err_of(capsys)


def test_module_entry_point_and_exit_code():
    proc = subprocess.run([sys.executable, "-m", "gptrain", "train", "--lrr", "1"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Did you mean '--lr'?" in proc.stderr and "Traceback" not in proc.stderr


def test_help_lists_every_setting_flag_and_its_negation(capsys):
    from gptrain.config import SECTIONS
    from gptrain.settings import declaration, declared_fields, flags_of

    with pytest.raises(SystemExit):
        cli("train", "--help")
    shown = capsys.readouterr().out
    flags = [flag for cls in SECTIONS.values() for f in declared_fields(cls) if declaration(f).cli
             for flag in (*flags_of(f), *([declaration(f).negate] if declaration(f).negate else []))]
    assert len(flags) > 80
    for flag in flags:
        assert f"{flag} " in shown or f"{flag}\n" in shown or f"{flag}," in shown, flag


def test_nanogpt_character_level_dataset_trains_and_generates(tmp_path, capsys):
    # nanoGPT's shakespeare_char layout: uint16 ids, meta.pkl with vocab_size, itos and stoi.
    import pickle

    import numpy as np

    text = "first citizen: before we proceed any further, hear me speak. def class import\n" * 40
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = tmp_path / "shakespeare_char"
    data.mkdir()
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    ids[: len(ids) * 9 // 10].tofile(data / "train.bin")
    ids[len(ids) * 9 // 10 :].tofile(data / "val.bin")
    with open(data / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)

    assert cli("train", "--data", data, "--runs-dir", tmp_path / "runs", "--run-name", "c", *TINY,
               "--num-steps", "4", "--sample-prompt", "hear ") == 0
    capsys.readouterr()
    assert cli("generate", tmp_path / "runs" / "c", "--prompt", "speak", "--max-new-tokens", "12", "--seed", "1") == 0
    out = capsys.readouterr().out
    assert out.startswith("speak") and set(out) <= set(text) | set("<|endoftext|>")  # decoded characters

    # A prompt outside the characters is refused before training starts.
    assert cli("train", "--data", data, "--runs-dir", tmp_path / "runs", "--run-name", "q", *TINY,
               "--sample-prompt", "QQ") == 2
    assert "'Q' are not among this dataset's" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "q").exists()


@pytest.mark.parametrize("command", ["train", "prepare", "generate", "eval", "runs", "plot", "sync", "bench"])
def test_every_command_prints_its_help(command, capsys):
    with pytest.raises(SystemExit) as stop:
        cli(command, "--help")
    assert stop.value.code == 0 and "usage: gptrain" in capsys.readouterr().out
