"""`examples/distill.py` with a fault injected into one process, for the multi-process failure tests.

    accelerate launch ... tests/distill/fault_injection_launch.py <raise|stall> <rank> <step> <stamp file> -- <args>

Right after process ``rank`` has saved ``checkpoint-<step>`` it raises (``raise``) or stops answering (``stall``:
sleeps far longer than any test waits).  The time of the fault is written to ``<stamp file>`` first, so the test
can measure how long the launch takes to end after it.
"""

import sys
import time
from pathlib import Path

from accelerate import PartialState

from diffusers_qalora.distill import trainer
from diffusers_qalora.distill.cli import main


class InjectedFault(RuntimeError):
    pass


def install(mode: str, rank: int, step: int, stamp: Path) -> None:
    original = trainer.DataFreeDistiller.save_checkpoint

    def save_checkpoint(self):
        path = original(self)
        if PartialState().process_index == rank and self.progress.global_step == step:
            stamp.write_text(str(time.time()))
            if mode == "raise":
                raise InjectedFault(f"injected fault on process {rank} after checkpoint-{step}")
            time.sleep(3600)
        return path

    trainer.DataFreeDistiller.save_checkpoint = save_checkpoint


if __name__ == "__main__":
    mode, rank, step, stamp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    assert sys.argv[5] == "--"
    install(mode, rank, step, stamp)
    main(sys.argv[6:])
