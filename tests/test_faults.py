"""FaultInjector: each --debug-fail-kind fires on the configured rank, step and point only, and a process-killing
fault fires once per run (its marker file), so the restart that follows trains on."""
import os
import types

import pytest
import torch

from raychat import faults
from raychat.faults import FaultInjector


def _cfg(step=3, kind="exit", rank=0):
    return types.SimpleNamespace(debug_fail_at_step=step, debug_fail_kind=kind, debug_fail_rank=rank)


class Died(Exception):
    pass


@pytest.fixture
def deaths(monkeypatch):
    """The process-ending calls, recorded and raised instead of ending the test."""
    seen = []

    def die(kind):
        def fn(*args):
            seen.append(kind)
            raise Died(kind)
        return fn

    monkeypatch.setattr(faults, "os", types.SimpleNamespace(path=os.path, _exit=die("exit"), kill=die("kill"),
                                                            getpid=os.getpid))
    return seen


@pytest.mark.parametrize("kind, how", [("exit", "exit"), ("kill", "kill"), ("kill-in-checkpoint", "kill")])
def test_a_fault_fires_once_per_run_at_its_step_and_point(tmp_path, deaths, kind, how):
    injector = FaultInjector(_cfg(kind=kind), 0, str(tmp_path))
    for step, point in ((2, kind), (4, kind), (3, "exit" if kind != "exit" else "kill")):
        injector.at(step, point)  # another step or another point: nothing
    assert deaths == []
    with pytest.raises(Died):
        injector.at(3, kind)
    assert deaths == [how] and os.path.exists(tmp_path / ".injected_failure_step3")
    FaultInjector(_cfg(kind=kind), 0, str(tmp_path)).at(3, kind)  # the restarted run: already fired
    assert deaths == [how]


def test_only_the_configured_rank_fails(tmp_path, deaths):
    FaultInjector(_cfg(rank=1), 0, str(tmp_path)).at(3, "exit")
    FaultInjector(_cfg(step=-1), 0, str(tmp_path)).at(3, "exit")  # no fault configured
    assert deaths == []
    with pytest.raises(Died):
        FaultInjector(_cfg(rank=1), 1, str(tmp_path)).at(3, "exit")


def test_nan_poisons_the_first_micro_batch_of_its_step_every_run(tmp_path):
    injector = FaultInjector(_cfg(kind="nan"), 0, str(tmp_path))
    loss = torch.tensor(2.0)
    assert torch.isnan(injector.loss(loss, 3, 0))
    assert injector.loss(loss, 3, 1) == 2.0 and injector.loss(loss, 4, 0) == 2.0
    assert torch.isnan(injector.loss(loss, 3, 0))  # no marker: a rerun with the flag meets it again
    assert FaultInjector(_cfg(kind="nan"), 1, str(tmp_path)).loss(loss, 3, 0) == 2.0
    assert FaultInjector(_cfg(kind="exit"), 0, str(tmp_path)).loss(loss, 3, 0) == 2.0
