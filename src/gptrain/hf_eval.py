"""Downstream tasks with lm-evaluation-harness, on a gptrain run or an exported Hugging Face folder.

    evaluate_tasks("runs/my-run", ["hellaswag"])                    a built-in task (needs its dataset)
    evaluate_tasks("hf-out/", ["tasks/my_quiz.yaml"])               a task of your own, offline

A run or checkpoint is exported first (gptrain.export, into a temporary folder removed afterwards);
lm-eval then scores the folder through transformers (`--model hf`), exactly as

    lm_eval --model hf --model_args pretrained=DIR,dtype=float32 --tasks NAMES --include_path TASK_DIR

would. A model exported as GptrainForCausalLM (gptrain's own architecture as transformers remote code: value
embeddings and other option mixes no standard class computes) is loaded with trust_remote_code=True, given
only when the folder's code is this gptrain's own, byte for byte: code gptrain runs anyway. A folder with any
other remote code is refused (lm_eval itself can be told to trust it).

A task given as a YAML file (or a folder of them) is read from there: with `dataset_path: json`
and `dataset_kwargs: {data_files: {test: questions.jsonl}}` it needs no network at all.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gptrain.errors import UserError

EVAL_EXTRA = "pip install 'gptrain[eval]'"
TASK_NAME = re.compile(r"^task:\s*['\"]?([^'\"\s#]+)", re.MULTILINE)


def _task_names_in(path: Path) -> list[str]:
    """The task names a YAML file (or the YAML files of a folder) declare (`task: NAME`)."""
    files = sorted([*path.rglob("*.yaml"), *path.rglob("*.yml")]) if path.is_dir() else [path]
    names = []
    for f in files:
        m = TASK_NAME.search(f.read_text(encoding="utf-8"))
        if m:
            names.append(m.group(1))
    if not names:
        raise UserError(f"{path} declares no lm-eval task (no 'task: NAME' line in a .yaml file). "
                        "See the README's evaluation section for a task file of your own.")
    return names


def resolve_tasks(tasks: Sequence[str], include_path: str | Path | Sequence[str | Path] | None = None
                  ) -> tuple[list[str], list[str]]:
    """(task names, folders lm-eval must also search): task YAML files and folders become both."""
    if isinstance(include_path, (str, Path)):
        include_path = [include_path]
    folders = [str(Path(p).expanduser().absolute()) for p in include_path or []]
    names: list[str] = []
    for task in tasks:
        path = Path(task).expanduser()
        if task.endswith((".yaml", ".yml")) or path.is_dir():
            if not path.exists():
                raise UserError(f"task file {path} does not exist.")
            folders.append(str((path if path.is_dir() else path.parent).absolute()))
            names += _task_names_in(path)
        else:
            names.append(task)
    if not names:
        raise UserError("no tasks given. Name lm-eval tasks (e.g. hellaswag) or pass task YAML files.")
    return names, list(dict.fromkeys(folders))


def evaluate_tasks(model: str | Path, tasks: Sequence[str], *, include_path=None, num_fewshot: int | None = None,
                   limit: int | float | None = None, batch_size: int | str = 8, device: str = "auto",
                   dtype: str | None = None, bootstrap_iters: int = 100_000, log_samples: bool = False,
                   seed: int = 1234) -> dict[str, Any]:
    """Score `model` (a run folder, a checkpoint, or a Hugging Face folder) on lm-eval tasks.

    `tasks`: lm-eval task names, or task YAML files / folders (searched with `include_path`). `dtype`:
    of the export and of transformers' weights (None: float32, the precision the export tests prove
    equal to gptrain). Returns {"model", "results": {task: {metric: value}}, "samples" (with
    log_samples: per document, lm-eval's requests and log-likelihoods), "config"}.
    """
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError(f"evaluating tasks needs lm-evaluation-harness: {EVAL_EXTRA}") from None
    from gptrain.export import export_hf, is_hf_folder

    names, folders = resolve_tasks(tasks, include_path)
    only_local = all(task.endswith((".yaml", ".yml")) or Path(task).is_dir() for task in tasks)
    manager = TaskManager(include_path=folders or None, include_defaults=not only_local)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown lm-eval task(s): {', '.join(unknown)}. Pass a task name lm-eval knows "
                        "(`lm_eval ls tasks`) or a task YAML file.")
    device = _device(device)
    tmp = None
    try:
        if is_hf_folder(model):
            folder = Path(model)
        else:
            tmp = Path(tempfile.mkdtemp(prefix="gptrain-eval-"))
            folder = export_hf(model, tmp / "model", dtype=dtype)
        model_args = {"pretrained": str(folder), "dtype": _torch_dtype_name(dtype)}
        if _needs_own_remote_code(folder):
            model_args["trust_remote_code"] = True
        out = lm_eval.simple_evaluate(
            model="hf", model_args=model_args,
            tasks=names, num_fewshot=num_fewshot, limit=limit, batch_size=batch_size, device=device,
            task_manager=manager, bootstrap_iters=bootstrap_iters, log_samples=log_samples,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    results = {task: {_metric_name(k): v for k, v in metrics.items() if k not in ("name", "alias", "sample_len")}
               for task, metrics in out["results"].items()}
    report = {"model": str(model), "results": results, "config": out.get("config", {})}
    if log_samples:
        report["samples"] = out.get("samples", {})
    return report


def _needs_own_remote_code(folder: Path) -> bool:
    """Whether transformers must run the folder's code to load it; a UserError when that code is not gptrain's."""
    from gptrain.export import runs_own_remote_code

    ours = runs_own_remote_code(folder)
    if ours is False:
        raise UserError(f"{folder} holds remote code (config.json's auto_map) that is not this gptrain's own, "
                        "so gptrain will not run it. Export the run again with this gptrain (gptrain export), or, "
                        "if you trust the folder's code, score it with lm_eval --model hf --model_args "
                        f"pretrained={folder},trust_remote_code=True.")
    return bool(ours)


def _metric_name(key: str) -> str:
    """lm-eval's "acc,none" (metric, filter) as "acc"; other filters keep their name ("acc,strict")."""
    metric, _, flt = key.partition(",")
    return metric if flt in ("", "none") else key


def _torch_dtype_name(dtype: str | None) -> str:
    from gptrain.export import DTYPE_NAMES, parse_dtype

    return DTYPE_NAMES[parse_dtype(dtype)] if dtype else "float32"


def _device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def format_results(report: dict[str, Any]) -> str:
    """The results as a small table: task, metric, value (± its standard error where lm-eval has one)."""
    lines = [f"{'task':<24} {'metric':<16} value"]
    for task, metrics in report["results"].items():
        for metric, value in metrics.items():
            if metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            err = metrics.get(f"{metric}_stderr")
            tail = f" ± {err:.4f}" if isinstance(err, (int, float)) else ""
            lines.append(f"{task:<24} {metric:<16} {value:.4f}{tail}")
    return "\n".join(lines)
