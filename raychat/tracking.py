"""What watches a run from outside the loop: Weights & Biases logging and the PyTorch profiler."""
import os
import tempfile
import uuid

import torch


class _NoWandb:
    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


def init_wandb(cfg, master: bool):
    """A W&B run on rank 0 unless `--run dummy` (the reference's switch), else a no-op logger."""
    if cfg.run == "dummy" or not master:
        return _NoWandb()
    import wandb

    # An id derived from the run name: a restarted or resumed run keeps logging into the same W&B run.
    run_id = uuid.uuid5(uuid.NAMESPACE_URL, f"raychat/{cfg.run_name}").hex[:16]
    return wandb.init(project="raychat", name=cfg.run, id=run_id, resume="allow", config=cfg.user_config())


def start_profiler(device_type: str, out_dir: str):
    """--profile: a PyTorch profiler trace of steps 2-4 on rank 0, written as Chrome trace JSON to
    `{out_dir}/profile_rank0.json` (local or s3://, gs://; open it in https://ui.perfetto.dev). The loop
    calls `.step()` before each training step and `.stop()` at the end."""
    from raychat.storage import copy_file_to

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device_type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)

    def save(prof):
        local = os.path.join(tempfile.mkdtemp(), "profile_rank0.json")
        prof.export_chrome_trace(local)
        copy_file_to(local, f"{out_dir.rstrip('/')}/profile_rank0.json")
        print(f"Wrote profiler trace {out_dir}/profile_rank0.json", flush=True)

    prof = torch.profiler.profile(activities=activities, record_shapes=True, with_stack=False,
                                  schedule=torch.profiler.schedule(wait=1, warmup=1, active=3, repeat=1),
                                  on_trace_ready=save)
    prof.start()
    return prof
