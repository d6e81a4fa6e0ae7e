"""Run a function on N real processes joined by a gloo process group (no Ray), for the distributed tests.

The processes meet through a FileStore in a fresh directory, not a TCP port: a port picked "free" can be
taken by another process (a test's Ray) before rank 0 binds it, and rank 0 then also hosts no TCPStore server
thread. That thread was the only one rank 0 had and rank 1 lacked when, once in a CI run, rank 0 aborted
("terminate called without an active exception") at a point nothing in the test could name.
"""
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank, world_size, store_path, fn, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
        dist.barrier()  # no rank tears its group down while another still talks to it
    finally:
        dist.destroy_process_group()


def run_gloo(fn, world_size, *args):
    """fn(rank, world_size, *args) on world_size spawned processes; fn must be importable (module level)."""
    with tempfile.TemporaryDirectory(prefix="gloo") as tmp:
        mp.spawn(_entry, args=(world_size, os.path.join(tmp, "store"), fn, args), nprocs=world_size, join=True)
