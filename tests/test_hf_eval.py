"""lm-evaluation-harness on an exported model, offline: a tiny multiple-choice task written here.

The task's answers are chosen from transformers' own log-likelihoods (the most likely choice for half the
questions, the least likely for the others), so the accuracy lm-eval must report is exactly 0.5, and its
per-choice log-likelihoods (computed in padded batches) must equal the ones computed here one by one. The
model is the default family's (value embeddings): GptrainForCausalLM, gptrain's own remote code.
"""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
import torch
from conftest import WORDS

from gptrain.errors import UserError

QUESTIONS = 6


pytestmark = pytest.mark.usefixtures("private_hf_home")  # conftest: remote code under tmp



def write_run(tmp_path):
    """A gptrain checkpoint of a small random model with a BPE tokenizer (no trainer involved)."""
    from gptrain.checkpoint import save_checkpoint
    from gptrain.data.tokenizer import tokenizer_meta, train_bpe
    from gptrain.model import DEFAULT_FAMILY, GPT, ModelConfig, model_settings_for

    rng = random.Random(0)
    tok = train_bpe([" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(200)], 300)
    torch.manual_seed(0)
    model = GPT(ModelConfig(**{**model_settings_for("tiny", DEFAULT_FAMILY), "vocab_size": tok.vocab_size,
                               "max_position_embeddings": 64, "n_layers": 2, "n_heads": 2, "d_model": 32}))
    assert model.cfg.value_embeds
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)  # a model with opinions: choices far apart in likelihood
    info = {"config": {"model": dataclasses.asdict(model.cfg)}, "tokenizer": tokenizer_meta(tok)}
    save_checkpoint(tmp_path / "run" / "checkpoints", 7, model.state_dict(), {}, info,
                    extra_files={"tokenizer.json": tok.to_json()})
    return tmp_path / "run"


def transformers_loglikelihoods(folder, docs) -> list[list[float]]:
    """log P(" " + choice | question) of each choice, by transformers, as lm-eval asks for it: the
    continuation's tokens are those of question + continuation after the question's own tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    out = []
    for doc in docs:
        lls = []
        for choice in doc["choices"]:
            context = tok(doc["question"], add_special_tokens=False)["input_ids"]
            whole = tok(doc["question"] + " " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), dim=-1)
            lls.append(sum(logprobs[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
        out.append(lls)
    return out


def write_task(folder, docs) -> str:
    folder.mkdir()
    with open(folder / "quiz.jsonl", "w") as f:
        for doc in docs:
            f.write(json.dumps(doc) + "\n")
    (folder / "tiny_quiz.yaml").write_text(f"""task: tiny_quiz
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "quiz.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")
    return str(folder / "tiny_quiz.yaml")


def test_lm_eval_scores_a_local_task_as_transformers_log_likelihoods_say(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from gptrain.export import export_hf
    from gptrain.hf_eval import evaluate_tasks, format_results

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    run = write_run(tmp_path)
    folder = export_hf(run, tmp_path / "hf")
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["GptrainForCausalLM"]
    rng = random.Random(1)
    docs = [{"question": " ".join(rng.choice(WORDS) for _ in range(5)),
             "choices": [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3))) for _ in range(3)]}
            for _ in range(QUESTIONS)]
    lls = transformers_loglikelihoods(folder, docs)
    for i, (doc, ll) in enumerate(zip(docs, lls, strict=True)):
        doc["answer"] = int(np.argmax(ll)) if i < QUESTIONS // 2 else int(np.argmin(ll))
    want_acc_norm = np.mean([np.argmax(np.array(ll) / [len(c) for c in doc["choices"]]) == doc["answer"]
                             for doc, ll in zip(docs, lls, strict=True)])
    task = write_task(tmp_path / "tasks", docs)

    # The run folder itself (exported on the fly), on the CPU, no network.
    report = evaluate_tasks(run, [task], device="cpu", batch_size=4, bootstrap_iters=0, log_samples=True)
    results = report["results"]["tiny_quiz"]
    print(format_results(report))
    assert results["acc"] == 0.5
    assert results["acc_norm"] == pytest.approx(want_acc_norm, abs=1e-12)
    samples = sorted(report["samples"]["tiny_quiz"], key=lambda s: s["doc_id"])
    assert len(samples) == QUESTIONS
    worst = max(abs(got[0] - want) for s, ll in zip(samples, lls, strict=True) for got, want in zip(s["filtered_resps"], ll, strict=True))
    print(f"lm-eval against transformers: max |log-likelihood difference| {worst:.2e}")
    assert worst < 1e-4
    assert not list(tmp_path.glob("gptrain-eval-*"))

    # The exported folder gives the same numbers.
    again = evaluate_tasks(folder, [str(tmp_path / "tasks")], device="cpu", bootstrap_iters=0)
    assert again["results"]["tiny_quiz"]["acc"] == 0.5
    assert again["results"]["tiny_quiz"]["acc_norm"] == results["acc_norm"]


def test_unknown_tasks_are_refused(tmp_path):
    pytest.importorskip("lm_eval")
    from gptrain.hf_eval import evaluate_tasks, resolve_tasks

    with pytest.raises(UserError, match="task file .*missing.yaml does not exist"):
        evaluate_tasks(tmp_path, [str(tmp_path / "missing.yaml")])
    (tmp_path / "empty.yaml").write_text("dataset_path: json\n")
    with pytest.raises(UserError, match="declares no lm-eval task"):
        resolve_tasks([str(tmp_path / "empty.yaml")])
    (tmp_path / "t.yaml").write_text("task: mine\ndataset_path: json\n")
    assert resolve_tasks([str(tmp_path / "t.yaml"), "hellaswag"]) == (["mine", "hellaswag"], [str(tmp_path)])
    # (an unknown task name is refused the same way, after lm-eval indexed its built-in tasks: 14 s, not run here)


def test_only_gptrain_s_own_remote_code_is_trusted(tmp_path):
    from gptrain.data.tokenizer import ByteTokenizer
    from gptrain.export import runs_own_remote_code, save_hf
    from gptrain.hf_eval import _needs_own_remote_code
    from gptrain.model import GPT, ModelConfig

    tok = ByteTokenizer()
    for name, value_embeds in (("gpt2", False), ("gptrain", True)):
        cfg = ModelConfig(vocab_size=257, max_position_embeddings=16, n_layers=2, n_heads=2, d_model=16,
                          value_embeds=value_embeds)
        save_hf(cfg, GPT(cfg).state_dict(), tok, tmp_path / name)
    assert runs_own_remote_code(tmp_path / "gpt2") is None and not _needs_own_remote_code(tmp_path / "gpt2")
    assert runs_own_remote_code(tmp_path / "gptrain") is True and _needs_own_remote_code(tmp_path / "gptrain")
    modeling = tmp_path / "gptrain" / "modeling_gptrain.py"
    modeling.write_text(modeling.read_text() + "\nimport os  # anything\n")
    assert runs_own_remote_code(tmp_path / "gptrain") is False
    with pytest.raises(UserError, match=r"holds remote code .* that is not this gptrain's own.*"
                                        r"--model_args pretrained=.*,trust_remote_code=True"):
        _needs_own_remote_code(tmp_path / "gptrain")
