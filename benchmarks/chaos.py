"""A user's bad day, played against gptrain (issue 18): prints `held` or `FAILED` per case.

Every case drives gptrain as a user would, through subprocesses of `python -m gptrain ...` (and
`torchrun` for the multi-process cases), at tiny model sizes on CPU, and checks what a user would
check afterwards: exit codes, messages, tracebacks, run.json, metrics.jsonl, checkpoints, weights.

    python benchmarks/chaos.py                 # every case
    python benchmarks/chaos.py --only kill9_loop two_resumes
    python benchmarks/chaos.py --list
    python benchmarks/chaos.py --keep          # keep the scratch folder to look at

This is a script, not a test: it takes minutes (the kill loops and torchrun cases most of them).
Record its output in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "WANDB_MODE": "disabled",
       "HF_HUB_OFFLINE": "1"}
# The documented restart recipe (torchrun shares one TCP store across restart attempts unless told not to:
# the restarted workers then read the dead attempt's addresses; see README, multi-process runs).
RESTART_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
TINY = ["--n-layers", "2", "--n-heads", "2", "--d-model", "32", "--context-length", "32", "--batch-size", "4",
        "--log-every", "2", "--eval-tokens", "512", "--sample-tokens", "0", "--progress", "plain"]


class Failed(Exception):
    pass


def check(condition: bool, what: str) -> None:
    if not condition:
        raise Failed(what)


class Scratch:
    """The working folder of one chaos session: a prepared byte-level dataset and helpers to run gptrain."""

    def __init__(self, root: Path):
        self.root = root
        self.data = root / "data"

    def prepare(self) -> None:
        corpus = self.root / "corpus"
        corpus.mkdir(parents=True, exist_ok=True)
        rng = random.Random(0)
        words = "the quick brown fox jumps over a lazy dog while seven wizards hex jolly frogs".split()
        for i in range(40):
            (corpus / f"doc{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(200)) + "\n")
        p = self.gptrain("prepare", str(corpus), "--out", str(self.data), "--tokenizer", "byte", timeout=300)
        if p.returncode != 0:
            raise SystemExit(f"prepare failed:\n{p.stderr}")

    def gptrain(self, *args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([PY, "-m", "gptrain", *args], capture_output=True, text=True, timeout=timeout,
                              env={**ENV, **(env or {})}, cwd=self.root)

    def train_args(self, runs: Path, name: str, steps: int, *extra: str) -> list[str]:
        return ["train", "--data", str(self.data), "--runs-dir", str(runs), "--run-name", name, "--num-steps",
                str(steps), *TINY, *extra]

    def train(self, runs: Path, name: str, steps: int, *extra: str, timeout: float = 300, env=None):
        return self.gptrain(*self.train_args(runs, name, steps, *extra), timeout=timeout, env=env)

    def start_train(self, runs: Path, name: str, steps: int, *extra: str) -> subprocess.Popen:
        return subprocess.Popen([PY, "-m", "gptrain", *self.train_args(runs, name, steps, *extra)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=self.root)


# --------------------------------------------------------------------------- what a user looks at


def no_traceback(p, what: str) -> None:
    err = p.stderr if isinstance(p.stderr, str) else ""
    last = err.strip().splitlines()[-1] if err.strip() else ""
    check("Traceback" not in err, f"{what}: a traceback ending in {last[:200]!r}")


def run_json(run: Path) -> dict:
    try:
        return json.loads((run / "run.json").read_text())
    except (OSError, ValueError):
        return {}


def events(run: Path) -> list[dict]:
    out = []
    for line in (run / "metrics.jsonl").read_bytes().split(b"\n"):
        try:
            row = json.loads(line.decode())
        except (UnicodeDecodeError, ValueError):
            continue
        if isinstance(row, dict):
            out.append(row)
    return out


def checkpoints(run: Path) -> list[Path]:
    d = run / "checkpoints"
    return sorted(p for p in d.iterdir() if (p / "COMPLETE").is_file() and ".tmp-" not in p.name) \
        if d.is_dir() else []


def weights(ckpt: Path) -> dict:
    import torch

    return torch.load(ckpt / "model.pt", map_location="cpu", weights_only=True)


def finite(ckpt: Path) -> bool:
    import torch

    return all(torch.isfinite(t).all() for t in weights(ckpt).values() if t.is_floating_point())


def same_weights(a: Path, b: Path) -> bool:
    import torch

    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def descendants(pid: int) -> list[int]:
    """Child processes of `pid`, recursively (from /proc: processes this script started)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def gptrain_workers(launcher: int) -> list[int]:
    out = []
    for pid in descendants(launcher):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"gptrain" in b" ".join(cmd) and b"torchrun" not in cmd[1 if len(cmd) > 1 else 0]:
            out.append(pid)
    return out


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.1)
    raise Failed(f"timed out waiting for {what}")


# --------------------------------------------------------------------------- the cases


def case_diverging_lr(s: Scratch, tmp: Path) -> str:
    """--lr 1e3: the run stops as diverged, non-zero exit, and no checkpoint holds non-finite weights."""
    p = s.train(tmp, "div", 40, "--lr", "1e3", "--save-every", "5", "--max-skipped-steps", "3")
    no_traceback(p, "train --lr 1e3")
    check(p.returncode != 0, f"exit {p.returncode} (expected non-zero)")
    check(run_json(tmp / "div").get("status") == "diverged", f"status {run_json(tmp / 'div').get('status')}")
    bad = [c.name for c in checkpoints(tmp / "div") if not finite(c)]
    check(not bad, f"non-finite checkpoints written: {bad}")
    return f"exit {p.returncode}, status diverged, {len(checkpoints(tmp / 'div'))} checkpoints, all finite"


def case_resume_diverging_keeps_finite(s: Scratch, tmp: Path) -> str:
    """A good run resumed with a diverging --lr and --save-every 10 keeps a finite checkpoint."""
    p = s.train(tmp, "good", 20, "--save-every", "10", "--eval-every", "0")
    check(p.returncode == 0, f"first segment: exit {p.returncode}: {p.stderr[-500:]}")
    p = s.gptrain("train", "--resume", str(tmp / "good"), "--num-steps", "80", "--lr", "1e3", "--save-every", "10",
                  "--keep-last", "1", "--max-skipped-steps", "50")
    no_traceback(p, "resume with --lr 1e3")
    good = [c.name for c in checkpoints(tmp / "good") if finite(c)]
    check(bool(good), "every finite checkpoint was pruned")
    return f"finite checkpoints kept: {good}"


def case_non_finite_settings(s: Scratch, tmp: Path) -> str:
    """--lr inf / --lr nan and generate --temperature nan are refused at start (exit 2, no traceback)."""
    for value in ("inf", "nan"):
        p = s.train(tmp, f"lr-{value}", 4, "--lr", value)
        no_traceback(p, f"--lr {value}")
        check(p.returncode == 2, f"--lr {value}: exit {p.returncode}")
    p = s.train(tmp, "ok", 4)
    check(p.returncode == 0, f"training a model to sample from: exit {p.returncode}")
    p = s.gptrain("generate", str(tmp / "ok"), "--temperature", "nan", "--max-new-tokens", "4")
    no_traceback(p, "generate --temperature nan")
    check(p.returncode == 2, f"generate --temperature nan: exit {p.returncode}")
    return "all refused with exit 2"


def case_non_finite_model(s: Scratch, tmp: Path) -> str:
    """eval and generate of a model with NaN weights exit non-zero with a message."""
    import torch

    p = s.train(tmp, "nan", 4)
    check(p.returncode == 0, f"train: exit {p.returncode}")
    ckpt = checkpoints(tmp / "nan")[-1]
    state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in weights(ckpt).items()}
    torch.save(state, ckpt / "model.pt")
    for cmd in (["eval", str(ckpt)], ["generate", str(ckpt), "--max-new-tokens", "4"]):
        p = s.gptrain(*cmd)
        no_traceback(p, cmd[0])
        check(p.returncode != 0, f"{cmd[0]} of a NaN model: exit 0")
    return "eval and generate refuse it"


def case_two_resumes(s: Scratch, tmp: Path) -> str:
    """Two simultaneous --resume of one run: one is refused at once, naming the other's process."""
    p = s.train(tmp, "r", 6, "--save-every", "2")
    check(p.returncode == 0, f"first segment: exit {p.returncode}")
    before = sum(e.get("event") == "resume" for e in events(tmp / "r"))
    procs = [subprocess.Popen([PY, "-m", "gptrain", "train", "--resume", str(tmp / "r"), "--num-steps", "60"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=s.root)
             for _ in range(2)]
    outs = [(q.wait(timeout=300), q.stderr.read()) for q in procs]
    codes = sorted(rc for rc, _ in outs)
    check(codes == [0, 2], f"exit codes {codes}")
    refused = next(err for rc, err in outs if rc == 2)
    check("in use" in refused and "process" in refused, f"refusal message: {refused[-300:]}")
    check("Traceback" not in "".join(err for _, err in outs), "a traceback")
    resumes = sum(e.get("event") == "resume" for e in events(tmp / "r")) - before
    ends = sum(e.get("event") == "end" for e in events(tmp / "r"))
    check(resumes == 1 and ends == 2, f"{resumes} resume and {ends} end events")
    return "second refused (exit 2), one resume event"


def case_two_fresh_starts(s: Scratch, tmp: Path, trials: int = 8) -> str:
    """Two simultaneous fresh starts with one --run-name never both train."""
    for i in range(trials):
        procs = [s.start_train(tmp / f"t{i}", "same", 4) for _ in range(2)]
        codes = sorted(q.wait(timeout=300) for q in procs)
        check(codes == [0, 2], f"trial {i}: exit codes {codes}")
    return f"{trials}/{trials} trials: one trained, one refused"


def case_damaged_metrics(s: Scratch, tmp: Path) -> str:
    """Non-UTF-8 bytes and a non-object line in metrics.jsonl: runs, plot and --resume carry on."""
    for name in ("healthy", "damaged"):
        p = s.train(tmp, name, 6, "--save-every", "2")
        check(p.returncode == 0, f"train {name}: exit {p.returncode}")
    with open(tmp / "damaged" / "metrics.jsonl", "ab") as f:
        f.write(b"\xff\xfe\x80 not utf-8\n[1, 2, 3]\n")
    p = s.gptrain("runs", str(tmp))
    no_traceback(p, "runs")
    check(p.returncode == 0 and "healthy" in p.stdout and "damaged" in p.stdout, f"runs: exit {p.returncode}")
    check("skipped 2 damaged lines" in p.stdout + p.stderr, "runs does not say how many lines it skipped")
    p = s.gptrain("plot", str(tmp / "healthy"), str(tmp / "damaged"), "-o", str(tmp / "c.png"))
    no_traceback(p, "plot")
    check(p.returncode == 0, f"plot: exit {p.returncode}")
    p = s.gptrain("train", "--resume", str(tmp / "damaged"), "--num-steps", "8")
    no_traceback(p, "resume")
    check(p.returncode == 0, f"resume: exit {p.returncode}")
    return "runs, plot and resume held"


def case_cut_last_line(s: Scratch, tmp: Path) -> str:
    """A cut last line (power loss), then a resume: its events stay readable and the wall time is right."""
    t0 = time.time()
    p = s.train(tmp, "cut", 6, "--save-every", "2")
    first = time.time() - t0
    check(p.returncode == 0, f"train: exit {p.returncode}")
    path = tmp / "cut" / "metrics.jsonl"
    data = path.read_bytes()
    path.write_bytes(data[:-15])  # the last event cut mid-line, no newline
    time.sleep(5)  # the gap between the segments, which is not training time
    t1 = time.time()
    p = s.gptrain("train", "--resume", str(tmp / "cut"), "--num-steps", "8")
    second = time.time() - t1
    check(p.returncode == 0, f"resume: exit {p.returncode}: {p.stderr[-300:]}")
    check(any(e.get("event") == "resume" for e in events(tmp / "cut")), "the resume event was swallowed")
    p = s.gptrain("runs", str(tmp / "cut"), "--json")
    wall = json.loads(p.stdout)[0]["wall_time"]
    check(wall < first + second, f"wall time {wall:.1f} s counts the 5 s gap ({first + second:.1f} s of processes)")
    return f"resume event readable, wall time {wall:.1f} s"


def case_damaged_checkpoint_files(s: Scratch, tmp: Path) -> str:
    """info.json = {} and a model.pt with wrong keys: generate / eval / resume exit 2 with one message."""
    import torch

    p = s.train(tmp, "d", 4)
    check(p.returncode == 0, f"train: exit {p.returncode}")
    ckpt = checkpoints(tmp / "d")[-1]
    info = (ckpt / "info.json").read_text()
    (ckpt / "info.json").write_text("{}")
    for cmd in (["generate", str(ckpt), "--max-new-tokens", "4"], ["eval", str(ckpt)],
                ["train", "--resume", str(ckpt), "--num-steps", "8"]):
        p = s.gptrain(*cmd)
        no_traceback(p, f"{cmd[0]} with info.json {{}}")
        check(p.returncode == 2, f"{cmd[0]} with info.json {{}}: exit {p.returncode}")
    (ckpt / "info.json").write_text(info)
    torch.save({"not.a.weight": torch.zeros(3)}, ckpt / "model.pt")
    for cmd in (["generate", str(ckpt), "--max-new-tokens", "4"], ["eval", str(ckpt)]):
        p = s.gptrain(*cmd)
        no_traceback(p, f"{cmd[0]} with wrong model.pt keys")
        check(p.returncode == 2, f"{cmd[0]} with wrong keys: exit {p.returncode}")
    return "one message, exit 2, each time"


def case_missing_run_json(s: Scratch, tmp: Path) -> str:
    """A copied run folder without run.json resumes in place (--runs-dir decides) and is still listed."""
    p = s.train(tmp / "a", "orig", 6, "--save-every", "2")
    check(p.returncode == 0, f"train: exit {p.returncode}")
    shutil.copytree(tmp / "a" / "orig", tmp / "b" / "copy")
    (tmp / "b" / "copy" / "run.json").unlink()
    original = (tmp / "a" / "orig" / "metrics.jsonl").read_bytes()
    p = s.gptrain("train", "--resume", "--runs-dir", str(tmp / "b"), "--run-name", "copy", "--num-steps", "8")
    no_traceback(p, "resume")
    check(p.returncode == 0, f"resume: exit {p.returncode}: {p.stderr[-300:]}")
    check((tmp / "a" / "orig" / "metrics.jsonl").read_bytes() == original, "the original run folder was written")
    check(run_json(tmp / "b" / "copy").get("status") == "finished", "the copy's run.json was not rebuilt")
    p = s.gptrain("runs", str(tmp / "b"))
    check(p.returncode == 0 and "copy" in p.stdout, "runs does not list it")
    return "resumed in its own folder, listed"


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def case_full_disk(s: Scratch, tmp: Path) -> str:
    """A full disk during a save: one message, no temporary folder left, the previous checkpoint newest,
    status failed; a resume on the still-full disk fails the same clean way (or trains)."""
    disk = tmp / "disk"
    if not _mount_tmpfs(disk, "3m"):
        return "not run: cannot mount a tmpfs here"
    try:
        p = s.train(disk, "full", 4, "--save-every", "2")
        check(p.returncode == 0, f"first run: exit {p.returncode}: {p.stderr[-300:]}")
        size = sum(f.stat().st_size for f in checkpoints(disk / "full")[-1].iterdir())
        free = shutil.disk_usage(disk).free
        (disk / "filler").write_bytes(b"\0" * max(0, free - size // 2))  # room for half a checkpoint
        p = s.gptrain("train", "--resume", str(disk / "full"), "--num-steps", "8")
        no_traceback(p, "save on a full disk")
        check(p.returncode != 0, "exit 0 on a full disk")
        check("no space left on" in p.stderr, f"message: {p.stderr[-300:]}")
        check(not list((disk / "full" / "checkpoints").glob("*.tmp-*")), "a temporary folder was left")
        check(checkpoints(disk / "full")[-1].name == "step_0000004", "the previous checkpoint is not the newest")
        status = run_json(disk / "full").get("status")
        check(status == "failed" or "could not be written" in p.stderr, f"run.json status {status}")
        p = s.gptrain("train", "--resume", str(disk / "full"), "--num-steps", "8")
        no_traceback(p, "resume on the still-full disk")
        return f"clean failure, status {status}; resume on the full disk: exit {p.returncode}"
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True, timeout=10)


def case_huge_model(s: Scratch, tmp: Path) -> str:
    """--d-model 100000 is refused before allocating, with the estimate."""
    t0 = time.monotonic()
    p = s.gptrain("train", "--data", str(s.data), "--runs-dir", str(tmp), "--d-model", "100000", "--num-steps", "2",
                  timeout=120)
    took = time.monotonic() - t0
    no_traceback(p, "--d-model 100000")
    check(p.returncode == 2 and "needs at least" in p.stderr, f"exit {p.returncode}: {p.stderr[-300:]}")
    return f"refused in {took:.1f} s: {p.stderr.strip().splitlines()[-1][:120]}"


def case_hostile_run_name(s: Scratch, tmp: Path) -> str:
    """run_name = "../../escape" in a TOML file, and --run-name a/b: refused, nothing outside --runs-dir."""
    toml = tmp / "exp.toml"
    toml.write_text('[train]\nrun_name = "../../escape"\n')
    runs = tmp / "deep" / "runs"
    p = s.gptrain("train", "--config", str(toml), "--data", str(s.data), "--runs-dir", str(runs), "--num-steps", "2",
                  *TINY)
    no_traceback(p, "TOML run_name")
    check(p.returncode == 2, f"TOML run_name: exit {p.returncode}")
    check(not (tmp / "escape").exists() and not (runs.parent.parent / "escape").exists(), "a folder escaped")
    p = s.train(runs, "a/b", 2)
    check(p.returncode == 2, f"--run-name a/b: exit {p.returncode}")
    return "refused"


def case_prepare_sigterm(s: Scratch, tmp: Path) -> str:
    """SIGTERM during prepare leaves no hidden temporary folder (at once, or after the next prepare)."""
    corpus = tmp / "big"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"{i}.txt").write_text(("lorem ipsum dolor sit amet " * 40000) + "\n")
    out = tmp / "out"
    q = subprocess.Popen([PY, "-m", "gptrain", "prepare", str(corpus), "--out", str(out), "--tokenizer", "bpe:512"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=s.root)
    time.sleep(3)
    q.send_signal(signal.SIGTERM)
    q.wait(timeout=60)
    left = [p.name for p in tmp.iterdir() if ".tmp" in p.name]
    if left:
        subprocess.run([PY, "-m", "gptrain", "prepare", str(corpus), "--out", str(out), "--tokenizer", "byte",
                        "--max-tokens", "1000"], capture_output=True, env=ENV, cwd=s.root, timeout=300)
        left = [p.name for p in tmp.iterdir() if ".tmp" in p.name]
    check(not left, f"left behind: {left}")
    return "no temporary folder left"


def case_kill9_loop(s: Scratch, tmp: Path, kills: int = 8) -> str:
    """kill -9 at random moments (some mid-save), resume each time: the final weights equal an
    uninterrupted run's, bit for bit."""
    steps = ["--save-every", "3", "--eval-every", "0"]
    p = s.train(tmp, "straight", 30, *steps)
    check(p.returncode == 0, f"uninterrupted run: exit {p.returncode}")
    rng = random.Random(0)
    q = s.start_train(tmp, "killed", 30, *steps)
    for _ in range(kills):
        time.sleep(rng.uniform(1.5, 4.0))
        if q.poll() is not None:
            break
        q.send_signal(signal.SIGKILL)
        q.wait()
        if not checkpoints(tmp / "killed"):  # killed before its first checkpoint: start again
            shutil.rmtree(tmp / "killed")
            q = s.start_train(tmp, "killed", 30, *steps)
            continue
        q = subprocess.Popen([PY, "-m", "gptrain", "train", "--resume", str(tmp / "killed")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=s.root)
    rc = q.wait(timeout=600)
    check(rc == 0, f"last segment: exit {rc}: {q.stderr.read()[-500:]}")
    a, b = checkpoints(tmp / "straight")[-1], checkpoints(tmp / "killed")[-1]
    check(a.name == b.name and same_weights(a, b), f"final weights differ ({a.name} vs {b.name})")
    check(all(finite(c) for c in checkpoints(tmp / "killed")), "a checkpoint does not load")
    return f"{kills} kills, final weights bitwise equal"


def _torchrun(s: Scratch, runs: Path, name: str, steps: int, *extra: str, restarts: int = 0) -> subprocess.Popen:
    port = str(random.Random(name).randint(20000, 40000))
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node", "2", f"--max-restarts={restarts}", "-m", "gptrain",
           *s.train_args(runs, name, steps, *extra)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=s.root,
                            env={**ENV, **RESTART_ENV, "MASTER_PORT": port})


def case_torchrun_restart(s: Scratch, tmp: Path) -> str:
    """A worker of a 2-process job killed once; torchrun restarts the job (the documented launch line), which
    continues from its newest checkpoint to the same final weights as a job that was never killed."""
    common = ["--save-every", "2", "--eval-every", "0"]
    q = _torchrun(s, tmp, "straight", 12, *common)
    out, err = q.communicate(timeout=600)
    check(q.returncode == 0, f"uninterrupted job: exit {q.returncode}: {err[-500:]}")
    q = _torchrun(s, tmp, "restarted", 12, *common, restarts=1)
    wait_for(lambda: len(checkpoints(tmp / "restarted")) >= 1 or q.poll() is not None, 300, "a first checkpoint")
    workers = gptrain_workers(q.pid)
    check(len(workers) >= 2, f"found {len(workers)} workers")
    os.kill(workers[-1], signal.SIGKILL)
    out, err = q.communicate(timeout=600)
    check(q.returncode == 0, f"restarted job: exit {q.returncode}: {err[-800:]}")
    a, b = checkpoints(tmp / "straight")[-1], checkpoints(tmp / "restarted")[-1]
    check(a.name == b.name and same_weights(a, b), f"final weights differ ({a.name} vs {b.name})")
    return "restarted, final weights equal"


def case_stalled_peer(s: Scratch, tmp: Path) -> str:
    """A peer stopped with SIGSTOP: rank 0 ends after --dist-timeout with gptrain's message."""
    q = _torchrun(s, tmp, "stall", 400, "--dist-timeout", "10", "--eval-every", "0")
    wait_for(lambda: (tmp / "stall" / "metrics.jsonl").is_file() or q.poll() is not None, 300, "training")
    workers = gptrain_workers(q.pid)
    check(len(workers) >= 2, f"found {len(workers)} workers")
    os.kill(workers[-1], signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        out, err = q.communicate(timeout=120)
    finally:
        for w in workers:
            try:
                os.kill(w, signal.SIGKILL)
            except ProcessLookupError:
                pass
    took = time.monotonic() - t0
    check(q.returncode != 0, "exit 0")
    check("pair closure" not in err and "error:" in err, f"message: {err[-600:]}")
    return f"ended after {took:.0f} s with our message"


CASES: dict[str, Callable[[Scratch, Path], str]] = {
    "diverging_lr": case_diverging_lr,
    "resume_diverging_keeps_finite": case_resume_diverging_keeps_finite,
    "non_finite_settings": case_non_finite_settings,
    "non_finite_model": case_non_finite_model,
    "two_resumes": case_two_resumes,
    "two_fresh_starts": case_two_fresh_starts,
    "damaged_metrics": case_damaged_metrics,
    "cut_last_line": case_cut_last_line,
    "damaged_checkpoint_files": case_damaged_checkpoint_files,
    "missing_run_json": case_missing_run_json,
    "full_disk": case_full_disk,
    "huge_model": case_huge_model,
    "hostile_run_name": case_hostile_run_name,
    "prepare_sigterm": case_prepare_sigterm,
    "kill9_loop": case_kill9_loop,
    "torchrun_restart": case_torchrun_restart,
    "stalled_peer": case_stalled_peer,
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", choices=list(CASES), metavar="CASE", help="run these cases only")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = ap.parse_args()
    if args.list:
        for name, fn in CASES.items():
            print(f"{name:32s} {fn.__doc__.splitlines()[0]}")
        return 0
    root = Path(tempfile.mkdtemp(prefix="gptrain-chaos-"))
    scratch = Scratch(root)
    scratch.prepare()
    failed = 0
    print(f"{'case':32s} {'result':7s} detail")
    for name in args.only or list(CASES):
        tmp = root / name
        tmp.mkdir()
        t0 = time.monotonic()
        try:
            detail, result = CASES[name](scratch, tmp), "held"
        except Failed as e:
            detail, result = str(e), "FAILED"
        except subprocess.TimeoutExpired as e:
            detail, result = f"timed out: {' '.join(map(str, e.cmd))[:120]}", "FAILED"
        except Exception as e:  # noqa: BLE001 - a bug in a case is reported as that case failing
            detail, result = f"{type(e).__name__}: {e}", "FAILED"
        failed += result == "FAILED"
        first_line = detail.strip().splitlines()[0] if detail.strip() else ""
        print(f"{name:32s} {result:7s} {first_line[:160]} ({time.monotonic() - t0:.0f} s)", flush=True)
    if args.keep:
        print(f"scratch folder: {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
