"""`dit` with one injected fault, for the multi-process tests in tests/test_scale.py.

    torchrun ... tests/faults/dit_with_fault.py train ...      # same arguments as `dit`

DIT_FAULT="SIGNAL:RANK:AFTER" sends SIGNAL (TERM, INT or KILL) to this process when rank RANK has finished training
step AFTER (`dit train`) or written its AFTER-th batch (`dit sample`). Only in torchrun's first attempt, so a restarted
group runs clean.
"""

import os
import signal

from ditcli.cli.app import main
from ditcli.sampling.writers import NpzWriter
from ditcli.training.trainer import Trainer


def _fault() -> tuple[signal.Signals, int, int] | None:
    spec = os.environ.get("DIT_FAULT")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    name, rank, after = spec.split(":")
    if int(os.environ.get("RANK", "0")) != int(rank):
        return None
    return signal.Signals[f"SIG{name}"], int(rank), int(after)


def _install(fault: tuple[signal.Signals, int, int]) -> None:
    sig, _, after = fault
    train_step, write = Trainer.train_step, NpzWriter.write
    written = [0]

    def faulty_step(self):
        metrics = train_step(self)
        if self.state.step == after:
            os.kill(os.getpid(), sig)
        return metrics

    def faulty_write(self, batch):
        write(self, batch)
        written[0] += 1
        if written[0] == after:
            os.kill(os.getpid(), sig)

    Trainer.train_step, NpzWriter.write = faulty_step, faulty_write


if __name__ == "__main__":
    if (fault := _fault()) is not None:
        _install(fault)
    main()
