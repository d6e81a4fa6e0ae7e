"""Where the training loop meets its launcher: Ray Train, or a plain Python process.

The loop (raychat/loop.py) talks to a session for a few things only: its rank and world size, its device,
the run's `auto` settings resolved for this kind of run, the checkpoint to resume from, and persisting and
reporting checkpoints. `RayTrainSession` is what a Ray Train worker uses; `LocalSession` runs the same loop in
one process without Ray (benchmarks, debugging); `TuneTrialSession` runs it inside a Tune trial's process.
"""
import torch

from raychat import checkpoint as ckpt_files
from raychat import runs, storage


class _Session:
    rank = 0
    world_size = 1

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)

    def resume_checkpoint(self, cfg, fit_id: str):
        return runs.resume_checkpoint(cfg, fit_id, self.log)


class RayTrainSession(_Session):
    def __init__(self):
        import ray.train

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.local_rank = ctx.get_local_rank()

    def resolve(self, cfg):
        """The driver resolved the `auto` values for the Ray it runs on (local_ray.resolve_auto): every worker
        must see the same ones, so none is guessed here."""
        if cfg.cpus_per_worker <= 0 or cfg.data_backend == "auto":
            raise RuntimeError(f"--cpus-per-worker {cfg.cpus_per_worker:g} / --data-backend {cfg.data_backend} "
                               "reached a Ray Train worker unresolved: the driver that builds the trainer must "
                               "pass its config through raychat.local_ray.resolve_auto first")
        return cfg

    def device(self, device_type: str) -> torch.device:
        if device_type == "cuda":
            import ray.train.torch

            return ray.train.torch.get_device()  # not cuda:LOCAL_RANK: Ray shares CUDA_VISIBLE_DEVICES
        return torch.device(device_type)

    def _storage_step(self, step: int):
        import ray.train

        ray_storage = ray.train.get_context().get_storage()  # Ray's own view of {storage_path}/{run_name}
        return (ray_storage.storage_filesystem,
                ray_storage.build_checkpoint_path_from_name(ckpt_files.step_dir_name(step)))

    def persist(self, checkpoint_dir: str, step: int) -> None:
        """Copy this rank's files of a checkpoint to storage, on the writer thread (so behind the next steps, as
        Ray's ASYNC upload was): a failure surfaces in the loop, which decides between stopping and a retry,
        instead of in Ray's upload thread, whose every error restarts the group (into the same full disk)."""
        fs, dest = self._storage_step(step)
        storage.copy_to_storage(checkpoint_dir, fs, dest)

    def discard(self, step: int) -> None:
        """Delete a checkpoint directory whose persisting failed, so no half-written step stays behind."""
        fs, dest = self._storage_step(step)
        storage.delete_quietly(fs, dest)

    def report(self, metrics: dict, checkpoint_dir: str | None, step: int) -> None:
        """Every rank calls this at the same steps: it is a barrier. A checkpoint is already in storage
        (persist), so Ray only registers it (NO_UPLOAD)."""
        import ray.train

        checkpoint = None
        if checkpoint_dir:
            fs, dest = self._storage_step(step)
            checkpoint = ray.train.Checkpoint(path=dest, filesystem=fs)
        ray.train.report(metrics, checkpoint=checkpoint,
                         checkpoint_dir_name=ckpt_files.step_dir_name(step) if checkpoint_dir else None,
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)


class LocalSession(_Session):
    """The same loop in the calling process, checkpoints copied into `{storage_path}/{run_name}/`."""

    def __init__(self, cfg=None):
        self.run_dir = runs.run_dir(cfg) if cfg is not None else None  # None: nothing to resume or save (eval)
        self.reports = []

    def resolve(self, cfg):
        """A local run on the CPUs this process may use. It starts no Ray, so `--data-backend auto` tokenizes
        inline (an explicit `ray` still gets Ray Data)."""
        import dataclasses

        from raychat.common import available_cpus
        from raychat.local_ray import resolve_auto

        if cfg.data_backend == "auto":
            cfg = dataclasses.replace(cfg, data_backend="inline")
        return resolve_auto(cfg, local=True, cpus=available_cpus())

    def device(self, device_type: str) -> torch.device:
        return torch.device(device_type)

    def _step_dir(self, step: int):
        return storage.filesystem(storage.join(self.run_dir, ckpt_files.step_dir_name(step)))

    def persist(self, checkpoint_dir: str, step: int) -> None:
        storage.copy_to_storage(checkpoint_dir, *self._step_dir(step))

    def discard(self, step: int) -> None:
        storage.delete_quietly(*self._step_dir(step))

    def report(self, metrics: dict, checkpoint_dir: str | None, step: int) -> None:
        self.reports.append(dict(metrics))


class TuneTrialSession(LocalSession):
    """The loop inside a Tune trial's own process (a one-CPU-worker trial needs no Ray Train job): each report
    also goes to Tune. A NaN stop's report has no val_bpb, which Tune's metric check would turn into a trial
    error: it reaches Tune as NaN (ASHA and the best-trial choice ignore NaN), and the table shows the stop."""

    def report(self, metrics: dict, checkpoint_dir: str | None, step: int) -> None:
        import ray.tune

        super().report(metrics, checkpoint_dir, step)
        ray.tune.report({"val_bpb": float("nan"), **metrics})
