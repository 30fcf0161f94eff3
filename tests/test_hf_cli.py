"""The Hugging Face commands end to end: `gptrain export`, `gptrain train --init-from`, `--export-hf`,
`gptrain eval --tasks` (the functions behind them are tested in test_export.py and test_hf_eval.py)."""

from __future__ import annotations

import json

import pytest
import torch

from gptrain.cli import main

pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("private_hf_home")  # conftest: remote code under tmp


TINY = ["--n-layers", "2", "--n-heads", "2", "--d-model", "32", "--max-position-embeddings", "32",
        "--batch-size", "4", "--eval-tokens", "256", "--progress", "plain", "--sample-tokens", "0"]


def cli(*args):
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def trained(byte_dataset, tmp_path_factory):
    runs = tmp_path_factory.mktemp("hf_runs")
    out = runs / "hf-at-end"
    assert cli("train", "--data", byte_dataset, "--runs-dir", runs, "--run-name", "r", "--num-steps", "4", *TINY,
               "--export-hf", out) == 0
    return runs / "r", out


def test_export_command_writes_a_folder_transformers_loads(trained, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, at_end = trained
    out = tmp_path / "hf"
    assert cli("export", run, "--out", out) == 0
    # The default model has value embeddings, which no standard transformers class computes: gptrain's own
    # class, as remote code in the folder.
    assert "GptrainForCausalLM" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("def ", add_special_tokens=False)["input_ids"] == list(b"def ")  # the byte tokenizer
    # --export-hf wrote the same weights at the end of training
    again = AutoModelForCausalLM.from_pretrained(at_end, trust_remote_code=True).eval()
    ids = torch.randint(0, 256, (1, 16))
    assert torch.equal(model(ids).logits, again(ids).logits)


def test_init_from_starts_from_the_folders_weights(trained, byte_dataset, tmp_path):
    from gptrain.config import build_config
    from gptrain.export import load_hf_model
    from gptrain.trainer import Trainer

    run, _ = trained
    hf = tmp_path / "hf"
    assert cli("export", run, "--out", hf) == 0
    cfg, explicit = build_config({"train.init_from": str(hf), "data.dataset": str(byte_dataset),
                                  "train.runs_dir": str(tmp_path / "runs"), "train.num_steps": 2,
                                  "train.batch_size": 4, "train.eval_tokens": 256, "train.progress": "plain"})
    trainer = Trainer.from_config(cfg, explicit)
    _, state, _ = load_hf_model(hf)
    for name, value in trainer.raw_model.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert trainer.cfg.model.n_layers == 2 and trainer.cfg.model.family == "modern" and trainer.cfg.model.value_embeds
    assert trainer.fit().status == "finished"
    # A shape given that the folder does not have is refused by name.
    cfg, explicit = build_config({"train.init_from": str(hf), "data.dataset": str(byte_dataset), "model.n_layers": 3,
                                  "train.runs_dir": str(tmp_path / "runs2")})
    from gptrain.errors import UserError

    with pytest.raises(UserError, match="its model has n_layers = 2, but --n-layers 3 was given"):
        Trainer.from_config(cfg, explicit)


def test_eval_tasks_scores_a_local_task_offline(trained, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    run, _ = trained
    data = tmp_path / "quiz.jsonl"
    data.write_text("".join(json.dumps({"question": f"def f{i}():", "choices": [" return", " class"], "answer": i % 2})
                            + "\n" for i in range(4)))
    task = tmp_path / "quiz.yaml"
    task.write_text(f"task: quiz\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
                    "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
                    "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n")
    capsys.readouterr()
    assert cli("eval", run, "--tasks", task, "--output", tmp_path / "r.json", "--device", "cpu") == 0
    out = capsys.readouterr().out
    assert "quiz" in out and "acc" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert 0.0 <= report["results"]["quiz"]["acc"] <= 1.0
