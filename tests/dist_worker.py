"""`gptrain train` under torchrun, with one rank made to die: the worker of test_distributed's failure test.

    torchrun --nproc-per-node=2 tests/dist_worker.py train ARGS...   (env: DIE_RANK, DIE_AT_STEP)

The rank named by DIE_RANK exits with code 13 (os._exit: no cleanup, like a crash or an OOM kill)
once it has done DIE_AT_STEP optimizer steps; the other ranks must notice and stop on their own.
With DIE_ATTEMPT, only in that torchrun attempt (TORCHELASTIC_RESTART_COUNT), so a restart can finish.
"""

import os
import sys

from gptrain.cli import main
from gptrain.trainer import TrainerHooks


class DieAt(TrainerHooks):
    def on_step_end(self, trainer, step):
        attempt = os.environ.get("DIE_ATTEMPT")
        if attempt is not None and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != attempt:
            return
        if os.environ.get("RANK") == os.environ.get("DIE_RANK") and step == int(os.environ.get("DIE_AT_STEP", "-1")):
            print(f"rank {os.environ['RANK']}: dying at step {step}", file=sys.stderr, flush=True)
            os._exit(13)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], hooks=[DieAt()]))
