"""`gptrain train` under torchrun, with one rank made to die: the worker of test_distributed's failure test.

    torchrun --nproc-per-node=2 tests/dist_worker.py train ARGS...   (env: DIE_RANK, DIE_AT_STEP)

The rank named by DIE_RANK exits with code 13 (os._exit: no cleanup, like a crash or an OOM kill)
when it reaches optimizer step DIE_AT_STEP; the other ranks must notice and stop on their own.
"""

import os
import sys

import gptrain.trainer as trainer
from gptrain.cli import main

_lr_at = trainer.lr_at


def lr_at(step, *args, **kwargs):
    if os.environ.get("RANK") == os.environ.get("DIE_RANK") and step == int(os.environ.get("DIE_AT_STEP", "-1")):
        print(f"rank {os.environ['RANK']}: dying at step {step}", file=sys.stderr, flush=True)
        os._exit(13)
    return _lr_at(step, *args, **kwargs)


trainer.lr_at = lr_at

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
