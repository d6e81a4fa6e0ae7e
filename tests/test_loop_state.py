"""LoopState: what a checkpoint's meta.json carries of the loop besides weights, optimizer and data, and how a
resume adds its world-size change and changed settings to the run's history."""
import time

from raychat.config import parse_args
from raychat.loop_state import LoopState

FLAGS = ["--depth", "2", "--num-iterations", "16"]


def _meta(state: LoopState, world_size: int, saved_at: float | None = None, **flags) -> dict:
    cfg = parse_args(FLAGS + [a for k, v in flags.items() for a in (f"--{k.replace('_', '-')}", str(v))])
    meta = {"step": state.step, "val_bpb": state.val_bpb, "world_size": world_size, "user_config": cfg.user_config(),
            **state.state_dict()}
    if saved_at is not None:
        meta["saved_at"] = saved_at
    return meta


def _trained_state() -> LoopState:
    state = LoopState(step=8, val_bpb=1.5, min_val_bpb=1.4, smooth_train_loss=2.5, total_training_time=3.0)
    state.history["train_loss"] = [[s, 3.0 - s / 10] for s in range(8)]
    state.history["val_bpb"] = [[0, 2.0], [8, 1.5]]
    return state


def test_resume_restores_the_state_and_marks_its_step():
    logged = []
    saved = _trained_state()
    state = LoopState.from_meta(_meta(saved, 1), 1, parse_args(FLAGS), logged.append)
    assert (state.step, state.val_bpb, state.min_val_bpb) == (8, 1.5, 1.4)
    assert (state.smooth_train_loss, state.total_training_time) == (2.5, 3.0)
    assert state.history == saved.history and state.resizes == [] and state.setting_changes == []
    assert state.resume_step == 8 and state.first_step_of_process and logged == []
    state.step += 1
    assert not state.first_step_of_process


def test_resume_at_another_world_size_records_the_resize():
    logged = []
    state = LoopState.from_meta(_meta(_trained_state(), 2, saved_at=time.time() - 5), 1, parse_args(FLAGS),
                                logged.append)
    [resize] = state.resizes
    assert (resize["step"], resize["from"], resize["to"]) == (8, 2, 1) and resize["lost_s"] >= 5
    assert logged[0].startswith("Resized from 2 to 1 workers at step 8 (")
    # The next resize appends to the run's list; a checkpoint without saved_at records no lost time.
    again = LoopState.from_meta({**_meta(state, 1), "step": 12}, 2, parse_args(FLAGS), logged.append)
    assert [(r["from"], r["to"]) for r in again.resizes] == [(2, 1), (1, 2)] and again.resizes[1]["lost_s"] is None


def test_resume_with_changed_settings_records_them():
    saved = _meta(_trained_state(), 1)
    cfg = parse_args(FLAGS[:2] + ["--num-iterations", "20", "--matrix-lr", "0.05", "--eval-every", "3"])
    state = LoopState.from_meta(saved, 1, cfg, print)
    assert state.setting_changes == [{"step": 8, "changed": {"num_iterations": [16, 20], "matrix_lr": [0.02, 0.05]}}]


def test_record_replaces_the_entry_of_a_resumed_step():
    state = _trained_state()
    state.record("val_bpb", 1.25)  # the resume step is evaluated again
    assert state.history["val_bpb"] == [[0, 2.0], [8, 1.25]]
    state.step = 16
    state.record("val_bpb", 1.0)
    assert state.history["val_bpb"] == [[0, 2.0], [8, 1.25], [16, 1.0]]
