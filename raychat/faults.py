"""Fault injection for the reliability tests (docs/RELIABILITY.md): `--debug-fail-at-step N
--debug-fail-kind KIND --debug-fail-rank R` makes rank R fail at step N in one of these ways:

    exit                os._exit(1) at the start of step N
    kill                SIGKILL between step N's first backward and its optimizer step
    kill-in-checkpoint  SIGKILL after writing step N's checkpoint files locally, before they reach storage
    nan                 step N's first micro-batch loss becomes NaN (every run with the flag)

The process-killing kinds fire once per run (a marker file in the run directory), so the automatic restart
that follows trains on instead of dying again.
"""
import os
import signal

import torch

from raychat import storage


class FaultInjector:
    def __init__(self, cfg, rank: int, run_dir: str):
        self.step, self.kind = cfg.debug_fail_at_step, cfg.debug_fail_kind
        self.armed = cfg.debug_fail_at_step >= 0 and cfg.debug_fail_rank == rank
        self.rank, self.run_dir = rank, run_dir

    def at(self, step: int, kind: str) -> None:
        """Die here if this is the configured step and kind (and it has not fired in this run yet)."""
        if not self.armed or (step, kind) != (self.step, self.kind):
            return
        import pyarrow.fs as pafs

        fs, marker = storage.filesystem(storage.join(self.run_dir, f".injected_failure_step{step}"))
        if fs.get_file_info(marker).type != pafs.FileType.NotFound:
            return
        fs.create_dir(marker.rpartition("/")[0], recursive=True)
        with fs.open_output_stream(marker):  # in the run directory, local or in a bucket
            pass
        print(f"Injected failure: rank {self.rank} dies ({kind}) at step {step}", flush=True)
        if kind == "exit":
            os._exit(1)
        os.kill(os.getpid(), signal.SIGKILL)

    def loss(self, loss: torch.Tensor, step: int, micro_step: int) -> torch.Tensor:
        """The loss, NaN at the configured step's first micro-batch under `--debug-fail-kind nan`."""
        if self.armed and self.kind == "nan" and (step, micro_step) == (self.step, 0):
            return loss * float("nan")
        return loss
