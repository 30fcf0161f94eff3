"""`gptrain sync RUN`: upload a run's offline W&B data, segment by segment, in the order they ran.

A run trained in several segments (first start, then each --resume) has one W&B folder per segment
in runs/<name>/wandb/, all with the same run id. They are uploaded oldest first, one `wandb sync` at
a time, so W&B appends each to the same run; a segment that resumed after a crash carries a branch
point (rewind to its checkpoint's step) that W&B applies before appending it. The result is one
continuous history with each step once. Segments already uploaded (W&B writes a `.synced` marker)
are skipped, so running `gptrain sync` again after a failure continues where it stopped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptrain.errors import UserError
from gptrain.jsonio import read_json


@dataclass
class Segment:
    dir: Path
    mode: str  # offline | online
    synced: bool
    from_step: int | None = None


def wandb_cli(*args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    """The official wandb CLI of this Python, run from a scratch folder (it writes a debug log into ./wandb/),
    so paths given to it must be absolute."""
    with tempfile.TemporaryDirectory() as scratch:
        return subprocess.run([sys.executable, "-m", "wandb", *args], cwd=scratch, capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "WANDB_SILENT": "true"})


def wandb_segments(run_dir: str | Path) -> list[Segment]:
    """The run's W&B segment folders in the order they ran (tracking.json's order, else by start time)."""
    run_dir = Path(run_dir).resolve()  # absolute: the wandb CLI runs from another folder
    root = run_dir / "wandb"
    found = {p.resolve(): p for p in sorted(root.glob("*run-*")) if p.is_dir() and any(p.glob("*.wandb"))}
    ordered: list[Segment] = []
    record = read_json(run_dir / "tracking.json").get("wandb")  # {} when missing or damaged
    listed = record.get("segments") if isinstance(record, dict) else None
    for seg in listed if isinstance(listed, list) else []:
        if not isinstance(seg, dict) or not isinstance(seg.get("dir"), str):
            continue  # a damaged entry: its folder is still found below, by name
        p = (run_dir / seg["dir"]).resolve()
        if p in found:
            d = found.pop(p)
            ordered.append(Segment(d, seg.get("mode", "offline"), any(d.glob("*.wandb.synced")), seg.get("from_step")))
    # Folders tracking.json does not list: their names start with the start time (run-YYYYMMDD_HHMMSS-id).
    for d in sorted(found.values(), key=lambda p: p.name.split("run-", 1)[1]):
        ordered.append(Segment(d, "offline" if d.name.startswith("offline-") else "online",
                               any(d.glob("*.wandb.synced"))))
    return ordered


def inspect_segment(segment_dir: str | Path) -> dict[str, Any]:
    """A segment's records through `wandb leet inspect --json`: run id, branch point, history rows by step."""
    proc = wandb_cli("leet", "inspect", "--json", str(Path(segment_dir).resolve()), timeout=60)
    if proc.returncode != 0:
        raise UserError(f"cannot read the W&B data in {segment_dir}: {proc.stderr.strip()[:300]}")
    out: dict[str, Any] = {"run_id": None, "branch_step": None, "history": [], "exit_code": None}
    for line in proc.stdout.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        kind = rec.get("type")
        if kind == "run":
            run = rec["run"]
            out["run_id"] = run.get("run_id")
            bp = run.get("branch_point")
            if bp:
                out["branch_step"] = bp.get("value", 0)
        elif kind == "history":
            out["history"].append(rec["history"]["item"])
        elif kind == "exit":
            out["exit_code"] = rec["exit"].get("exit_code", 0)
    return out


def composed_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """The history W&B shows once every segment is synced: each segment in order, a segment's branch point
    first cutting the rows after it (rewind). One row per step."""
    rows: list[dict[str, Any]] = []
    for seg in wandb_segments(run_dir):
        data = inspect_segment(seg.dir)
        if data["branch_step"] is not None:
            rows = [r for r in rows if r["_step"] <= data["branch_step"]]
        elif rows and data["history"]:
            # Plain resume: W&B drops rows whose step is not above the run's last step.
            last = rows[-1]["_step"]
            data["history"] = [r for r in data["history"] if r["_step"] > last]
        rows.extend(data["history"])
    return rows


def sync_run(run_dir: str | Path, *, dry_run: bool = False, project: str | None = None,
             entity: str | None = None, include_online: bool = False, timeout: float = 600.0,
             say=print) -> list[Segment]:
    """Upload the run's unsynced W&B segments oldest first; stops at the first failure (order matters).

    Segments recorded online were streamed as they ran; `include_online` uploads them again (for a run
    whose online upload was cut short at exit). `timeout`: seconds one segment's upload may take (with
    an API key but no network, `wandb sync` retries forever)."""
    given = run_dir
    from gptrain.runs import is_run_folder

    if not is_run_folder(Path(run_dir)):
        raise UserError(f"{run_dir} is not a run folder (no run.json, metrics.jsonl or checkpoints/). Pass runs/<name>; `gptrain runs` lists them.")
    run_dir = Path(run_dir).resolve()
    segments = wandb_segments(run_dir)
    if not segments:
        raise UserError(f"{run_dir} has no W&B data. Train with --use-wandb (or --trackers wandb) to record it.")
    todo = [s for s in segments if not s.synced and (s.mode == "offline" or include_online)]
    for i, seg in enumerate(segments, 1):
        state = "to upload" if seg in todo else ("synced" if seg.synced else "streamed online")
        say(f"segment {i}/{len(segments)}: {seg.dir.relative_to(run_dir)} ({seg.mode}, {state})")
    if dry_run or not todo:
        if not todo:
            say("nothing to upload: every segment is synced.")
        return todo
    for seg in todo:
        args = ["sync", "--include-online"]
        if project:
            args += ["--project", project]
        if entity:
            args += ["--entity", entity]
        try:
            proc = wandb_cli(*args, str(seg.dir), timeout=timeout)
        except subprocess.TimeoutExpired:
            raise UserError(f"uploading {seg.dir} got no answer from W&B in {timeout:g} s. Check the network (and "
                            f"--timeout for a large run), then run `gptrain sync {given}` again: segments already "
                            "uploaded are skipped.") from None
        if proc.returncode != 0 or not any(seg.dir.glob("*.wandb.synced")):
            detail = (proc.stderr or proc.stdout).strip().splitlines()
            raise UserError(f"uploading {seg.dir} failed ({detail[-1] if detail else f'exit {proc.returncode}'}). "
                            f"Check `wandb login` and the network, then run `gptrain sync {given}` again: "
                            "segments already uploaded are skipped.")
        say(f"uploaded {seg.dir.relative_to(run_dir)}")
    return todo
