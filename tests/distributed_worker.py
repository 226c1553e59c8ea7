"""`minidpo` under torchrun with a fault injected after one optimizer step (a test helper).

    python -m torch.distributed.run ... tests/distributed_worker.py {hang,fail} STEP DIR -- train ARGS...

hang: after step STEP every rank writes DIR/pid-<rank> (its process id) and sleeps, so the
      test can kill -9 the whole run at a known point.
fail: rank 1 raises MiniDPOError after step STEP; the other ranks go on as they would.
"""

import os
import sys
import time
from pathlib import Path

from minidpo.cli import main
from minidpo.errors import MiniDPOError
from minidpo.train import Trainer

mode, step, folder = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
argv = sys.argv[sys.argv.index("--") + 1 :]
optimizer_step = Trainer._optimizer_step


def faulty_step(self, group, interrupted):
    record = optimizer_step(self, group, interrupted)
    if self.step == step and mode == "hang":
        (folder / f"pid-{self.ranks.rank}").write_text(str(os.getpid()))
        time.sleep(600)
    if self.step == step and mode == "fail" and self.ranks.rank == 1:
        raise MiniDPOError("injected failure")
    return record


Trainer._optimizer_step = faulty_step
sys.exit(main(argv))
