"""The training loop's resumable state: everything besides weights, optimizer and data that a checkpoint
must carry for a resumed run to log, evaluate and report exactly as an uninterrupted one."""
import dataclasses
import time
from dataclasses import dataclass, field

from raychat.config import changed_settings


def _empty_history() -> dict:
    return {"train_loss": [], "val_bpb": [], "core_metric": []}


@dataclass
class LoopState:
    step: int = 0
    val_bpb: float | None = None
    min_val_bpb: float = float("inf")
    smooth_train_loss: float = 0.0  # EMA of the train loss, not yet debiased
    total_training_time: float = 0.0  # seconds, steps 0-10 (compile warm-up) excluded as the reference does
    history: dict = field(default_factory=_empty_history)  # per series: [[step, value], ...]
    resizes: list = field(default_factory=list)  # each change of world size: step, from, to, lost_s
    setting_changes: list = field(default_factory=list)  # each --allow-changed resume: step, {name: [old, new]}
    resume_step: int = -1  # the step this process resumed at (-1: a fresh start)

    @classmethod
    def from_meta(cls, meta: dict, world_size: int, cfg, log) -> "LoopState":
        """The state saved in a checkpoint's meta.json, with this resume's world-size change and changed
        settings (already allowed by the driver) appended to the run's history."""
        loop = meta["loop_state"]
        state = cls(step=meta["step"], val_bpb=meta["val_bpb"], min_val_bpb=loop["min_val_bpb"],
                    smooth_train_loss=loop["smooth_train_loss"], total_training_time=loop["total_training_time"],
                    history=meta["history"], resizes=list(meta.get("resizes", [])),
                    setting_changes=list(meta.get("setting_changes", [])), resume_step=meta["step"])
        if meta["world_size"] != world_size:
            # The wall time since that checkpoint was written: the steps redone plus the restart.
            lost = time.time() - meta["saved_at"] if "saved_at" in meta else None
            state.resizes.append({"step": state.step, "from": meta["world_size"], "to": world_size,
                                  "lost_s": None if lost is None else round(lost, 2)})
            log(f"Resized from {meta['world_size']} to {world_size} workers at step {state.step}"
                + ("" if lost is None else f" ({lost:.1f}s since that checkpoint was written)"))
        if changed := changed_settings(meta.get("user_config", {}), cfg):
            state.setting_changes.append({"step": state.step, "changed": changed})
        return state

    def state_dict(self) -> dict:
        """The meta.json entries this state owns (meta.json adds the run's configs and layout)."""
        return {"resizes": self.resizes, "setting_changes": self.setting_changes,
                "loop_state": {"min_val_bpb": self.min_val_bpb, "smooth_train_loss": self.smooth_train_loss,
                               "total_training_time": self.total_training_time},
                "history": self.history}

    def record(self, series: str, value: float) -> None:
        """Append (step, value) to a history series. A resumed run evaluates its resume step again, and that
        entry replaces the saved one."""
        points = self.history[series]
        while points and points[-1][0] >= self.step:
            points.pop()
        points.append([self.step, value])

    @property
    def first_step_of_process(self) -> bool:
        return self.step == 0 or self.step == self.resume_step

    def summary(self) -> dict:
        return dataclasses.asdict(self)
