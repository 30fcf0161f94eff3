"""Weights & Biases: the run streamed online, or recorded offline in runs/<name>/wandb/ to sync later.

Start. `--wandb-mode auto` goes online when an API key is configured and offline otherwise. An online
start that fails or exceeds `--wandb-init-timeout` falls back to offline, and an offline start that
fails switches W&B off; either way the training goes on, with one warning.

Identity and steps. The W&B run id is the gptrain run id (run.json, every checkpoint), so `--resume`
reattaches to the same W&B run. The step axis is the optimizer step, passed explicitly to every
`log` call, so it only ever increases within one segment.

Resume (the "rewind" scheme). A segment resumed from the checkpoint of step K whose predecessor
logged steps after K (it crashed between two checkpoints) starts with
`wandb.init(resume_from="<id>?_step=K")`: W&B truncates the run's history to K (archiving the cut
rows) and the new segment logs K+1, K+2, ... again, so every step appears once with the values of
the segment that carried on (the rule metrics.jsonl and TensorBoard follow). Offline, the branch
point is written into the segment's transaction log and applied when `gptrain sync` uploads the
segments in order. A segment whose predecessor logged nothing after K (a Ctrl-C, SIGTERM or a
finished run continued with more --num-steps) uses plain `resume="allow"`: nothing to cut.
W&B rewind is a preview feature on some servers: if the server refuses it online, the segment
reattaches with `resume="allow"` and skips the steps W&B already holds (up to the crash), with one
warning saying so; nothing is logged twice.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from gptrain.jsonio import read_json, write_json_atomic

EXIT_CODES = {"finished": 0, "crashed": 1, "failed": 1, "diverged": 1, "interrupted": 255}


def has_api_key() -> bool:
    """Whether W&B credentials are configured (env var, identity token, or `wandb login`'s netrc)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:
        from wandb.sdk.lib.wbauth.wbnetrc import read_netrc_auth

        return bool(read_netrc_auth(host=os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")))
    except Exception:  # noqa: BLE001 - a changed wandb internal means "unknown": go offline
        return False


def read_tracking_record(run_dir: Path) -> dict[str, Any]:
    return read_json(Path(run_dir) / "tracking.json")  # missing or damaged (not UTF-8, not JSON): {}


def write_tracking_record(run_dir: Path, record: dict[str, Any]) -> None:
    write_json_atomic(Path(run_dir) / "tracking.json", record)


class WandbStartError(Exception):
    pass


class WandbTracker:
    name = "wandb"

    def __init__(self, run_dir: Path, run_id: str, run_name: str, tracking, config: dict[str, Any],
                 resumed_from_step: int | None = None, last_logged_step: int | None = None,
                 say=print, warn=print):
        import wandb

        self.wandb = wandb
        self.run_dir = Path(run_dir)
        self.tr = tracking
        self.warn = warn
        self.skip_until = -1  # steps ≤ this are already in W&B (only when a rewind was refused)
        self._samples: list[list[Any]] = []
        self._artifacts = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wandb-artifacts")
        self._pending: list[Any] = []

        mode = tracking.wandb_mode
        if mode == "auto":
            mode = "online" if has_api_key() else "offline"
            if mode == "offline":
                say(f"W&B: no API key configured, recording offline in {self.run_dir / 'wandb'} "
                    f"(upload later with: gptrain sync {self.run_dir})")
        rewind = (resumed_from_step is not None and last_logged_step is not None
                  and last_logged_step > resumed_from_step)
        base = dict(project=tracking.wandb_project, entity=tracking.wandb_entity, id=run_id,
                    name=tracking.wandb_run_name or run_name, group=tracking.wandb_group, tags=tracking.tags() or None,
                    notes=tracking.wandb_notes, dir=str(self.run_dir), config=config)
        resume_kw = {"resume_from": f"{run_id}?_step={resumed_from_step}"} if rewind else {"resume": "allow"}

        failures: list[str] = []
        self.run = None
        attempts = [mode] if mode == "offline" else [mode, "offline"]
        for attempt in attempts:
            try:
                self.run = self._init(attempt, base, resume_kw)
            except Exception as e:  # noqa: BLE001 - any failure means: try the next mode
                reason = " ".join(str(e).split())[:300] or type(e).__name__
                if attempt == "online" and rewind and "rewind" in reason.lower():
                    # The server does not offer rewind: reattach and skip what W&B already holds.
                    try:
                        self.run = self._init("online", base, {"resume": "allow"})
                        self.skip_until = last_logged_step
                        warn(f"W&B refused to rewind run {run_id} to step {resumed_from_step} ({reason}); steps "
                             f"{resumed_from_step + 1}–{last_logged_step} keep the values logged before the crash "
                             "in W&B (metrics.jsonl has the recomputed ones).")
                    except Exception as e2:  # noqa: BLE001
                        failures.append(f"{attempt}: {' '.join(str(e2).split())[:300]}")
                        continue
                else:
                    failures.append(f"{attempt}: {reason}")
                    continue
            self.mode = attempt
            break
        if self.run is None:
            raise WandbStartError("; ".join(failures))
        if failures:
            warn(f"W&B could not start online ({failures[0]}); recording offline in {self.run_dir / 'wandb'} "
                 f"instead. Upload it once a network is there: gptrain sync {self.run_dir}")

        self.run.define_metric("val/loss", summary="min")
        self.run.define_metric("val/ppl", summary="min")
        self.segment_dir = Path(self.run.dir).parent
        self.url = getattr(self.run, "url", None) if self.mode == "online" else None
        self._record(resumed_from_step or 0, rewind and self.skip_until < 0, status="running")

    def _init(self, mode: str, base: dict[str, Any], resume_kw: dict[str, Any]):
        wandb = self.wandb
        settings = wandb.Settings(init_timeout=self.tr.wandb_init_timeout, console="off",
                                  silent=os.environ.get("WANDB_SILENT", "").lower() in ("1", "true"))
        try:
            return wandb.init(mode=mode, settings=settings, reinit="create_new", **base, **resume_kw)
        except Exception:
            # A failed start can leave the run id claimed in W&B's service process; restart it.
            try:
                wandb.teardown()
            except Exception:  # noqa: BLE001
                pass
            raise

    def _record(self, from_step: int, rewind: bool, status: str) -> None:
        record = read_tracking_record(self.run_dir)
        w = record.setdefault("wandb", {"segments": []})
        w.update(id=self.run.id, project=self.tr.wandb_project, entity=self.tr.wandb_entity, mode=self.mode,
                 url=self.url or w.get("url"), group=self.tr.wandb_group)
        seg = {"dir": str(self.segment_dir.relative_to(self.run_dir)), "mode": self.mode, "from_step": from_step,
               "rewind": rewind, "status": status, "started_at": time.time()}
        segs = w["segments"]
        if segs and segs[-1]["dir"] == seg["dir"]:
            segs[-1].update(status=status, ended_at=time.time())
        else:
            segs.append(seg)
        write_tracking_record(self.run_dir, record)

    # ------------------------------------------------------------------ the Tracker protocol
    def log_config(self, config: dict[str, Any]) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if step > self.skip_until:
            self.run.log(metrics, step=step)

    def log_samples(self, samples: list[dict[str, Any]], step: int) -> None:
        if step <= self.skip_until:
            return
        self._samples.extend([step, s["prompt"], s["completion"]] for s in samples)
        # A W&B table is immutable once logged: log the growing table so the latest shows every step.
        table = self.wandb.Table(columns=["step", "prompt", "completion"], data=[list(r) for r in self._samples])
        self.run.log({"samples": table}, step=step)

    def alert(self, title: str, text: str, level: str, step: int) -> None:
        self.run.alert(title=f"gptrain: {title}"[:63], text=f"run {self.run.name}: {text}", level=level,
                       wait_duration=self.tr.alert_interval)

    def log_checkpoint(self, path: Path, step: int, info: dict[str, Any]) -> None:
        how = self.tr.wandb_log_checkpoints
        if how == "off":
            return
        # Hashing (reference) or staging (upload) gigabytes must not hold the training loop: a worker does it.
        self._pending.append(self._artifacts.submit(self._log_checkpoint, Path(path), step, dict(info), how))

    def _log_checkpoint(self, path: Path, step: int, info: dict[str, Any], how: str) -> None:
        try:
            artifact = self.wandb.Artifact(f"checkpoint-{self.run.id}", type="model",
                                           metadata={"step": step, "path": str(path.resolve()), **info})
            if how == "reference":
                artifact.add_reference(path.resolve().as_uri(), name=path.name)
            else:
                artifact.add_dir(str(path), name=path.name)
            self.run.log_artifact(artifact, aliases=["latest", f"step-{step}"])
        except Exception as e:  # noqa: BLE001 - a worker thread has no MultiTracker around it
            self.warn(f"W&B could not record checkpoint {path}: {type(e).__name__}: {e}")

    def finish(self, status: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        for fut in self._pending:
            try:
                fut.result(timeout=max(0.1, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - already warned or timed out
                pass
        self._artifacts.shutdown(wait=False)
        self.run.summary["gptrain/status"] = status
        log = self.run_dir / "train.log"
        if log.is_file():
            try:
                self.run.save(str(log), base_path=str(self.run_dir), policy="now")
            except Exception:  # noqa: BLE001 - a missing log file is not worth a warning
                pass
        if status == "interrupted":
            try:
                self.run.mark_preempting()
            except Exception:  # noqa: BLE001
                pass
        # An online finish waits for the upload: bound it, the local record is complete anyway.
        done = threading.Event()

        def _finish() -> None:
            try:
                self.run.finish(exit_code=EXIT_CODES.get(status, 1))
            finally:
                done.set()

        threading.Thread(target=_finish, name="wandb-finish", daemon=True).start()
        if not done.wait(max(1.0, deadline - time.monotonic())):
            self.warn(f"W&B is still uploading after {timeout:.0f} s; the run is complete in {self.segment_dir}. "
                      f"Upload the rest with: gptrain sync {self.run_dir}")
        self._record(0, False, status=status)
