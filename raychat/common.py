"""Small helpers shared by every layer: the base directory, rank-0 printing, devices, peak FLOPs.

Nothing here imports Ray, so model, optimizer and tokenizer code can use it.
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist

from raychat import storage


def get_base_dir(base_dir: str | None = None, create: bool = True) -> str:
    """Where shards, the tokenizer and checkpoints live: `RAYCHAT_BASE_DIR`, else ~/.cache/raychat.

    Like the reference's NANOCHAT_BASE_DIR, but created on demand rather than at import time (and never by
    a dry run: `create=False`, which must leave the disk as it found it).
    """
    if base_dir is None:
        base_dir = os.environ.get("RAYCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "raychat")
    if not storage.is_remote(base_dir):
        base_dir = storage.absolute(base_dir)
        if create:
            os.makedirs(base_dir, exist_ok=True)
    return base_dir


class HelpFormatter(argparse.HelpFormatter):
    """The one --help style of every raychat command: an option's default once, at the end, when it has one
    (None, False and "" mean "not set" and are left out; a help text that names its default keeps its own)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or not action.option_strings or action.default in (None, False, "", argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def cli_parser(module: str, description: str) -> argparse.ArgumentParser:
    """The argument parser of `python -m MODULE`, so usage lines read as the command a user types."""
    return argparse.ArgumentParser(prog=f"python -m {module}", description=description, formatter_class=HelpFormatter)


def dist_info() -> tuple[int, int]:
    """(rank, world_size) of the current torch process group, (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def slot_range(rank: int, world_size: int, num_slots: int) -> range:
    """The data slots rank `rank` of `world_size` owns: a contiguous, near-even share of the `num_slots`
    micro-batches of a step (docs/ARCHITECTURE.md "slots"). With world_size dividing num_slots this is
    rank * A .. rank * A + A - 1, A = num_slots / world_size; otherwise the first ranks own one slot fewer.
    The whole layout depends only on num_slots, so a step reads the same batches whatever the world size."""
    if not 1 <= world_size <= num_slots or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of {world_size} worker(s) over {num_slots} data slot(s): every worker "
                         "needs at least one slot, so use at most num_slots workers")
    return range(rank * num_slots // world_size, (rank + 1) * num_slots // world_size)


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only."""
    if dist_info()[0] == 0:
        print(*args, **kwargs, flush=True)


def autodetect_device_type() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


# Peak dense bf16 FLOP/s by device name. Every substring of a pattern must be present in the
# lower-cased device name; the first matching row wins.
_PEAK_FLOPS = [
    (("gb200",), 2.5e15), (("grace blackwell",), 2.5e15), (("b200",), 2.25e15), (("b100",), 1.8e15),
    (("h200", "nvl"), 836e12), (("h200", "pcie"), 836e12), (("h200",), 989e12),
    (("h100", "nvl"), 835e12), (("h100", "pcie"), 756e12), (("h100",), 989e12),
    (("h800", "nvl"), 989e12), (("h800",), 756e12),
    (("a100",), 312e12), (("a800",), 312e12), (("a40",), 149.7e12), (("a30",), 165e12),
    (("l40s",), 362e12), (("l40-s",), 362e12), (("l40 s",), 362e12), (("l4",), 121e12),
    (("mi355",), 2.5e15), (("mi325",), 1.3074e15), (("mi300x",), 1.3074e15), (("mi300a",), 980.6e12),
    (("mi250x",), 383e12), (("mi250",), 362.1e12),
    (("5090",), 209.5e12), (("4090",), 165.2e12), (("3090",), 71e12),
]


def get_peak_flops(device_name: str) -> float:
    """Peak bf16 FLOP/s for MFU; +inf (MFU reads 0) for CPUs and unknown devices, as the reference."""
    name = device_name.lower()
    if "data center gpu max 1550" in name and hasattr(torch, "xpu") and torch.xpu.is_available():
        return 512 * torch.xpu.get_device_properties().max_compute_units * 1300e6
    for patterns, flops in _PEAK_FLOPS:
        if all(p in name for p in patterns):
            return flops
    return float("inf")


def run_cli(main) -> int:
    """Run a command's main(): the input errors it raises (their messages name the file and the fix) are
    printed as one `error:` line with exit status 2 instead of a traceback."""
    try:
        return main()
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one, else the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def all_reduce_value(value: float, device, op) -> float:
    """`value` all-reduced over the ranks with `op` (a dist.ReduceOp); every rank must call it."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.item()


def any_rank(flag: bool, device) -> bool:
    """True if `flag` holds on any rank; every rank must call it."""
    return bool(all_reduce_value(float(flag), device, dist.ReduceOp.MAX))
