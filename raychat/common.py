"""Small helpers shared by every layer: the base directory, rank-0 printing, devices, peak FLOPs.

Nothing here imports Ray, so model, optimizer and tokenizer code can use it.
"""
import os
import sys

import torch
import torch.distributed as dist


def get_base_dir(base_dir: str | None = None) -> str:
    """Where shards, the tokenizer and checkpoints live: `RAYCHAT_BASE_DIR`, else ~/.cache/raychat.

    Like the reference's NANOCHAT_BASE_DIR, but created on demand rather than at import time.
    """
    if base_dir is None:
        base_dir = os.environ.get("RAYCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "raychat")
    if "://" not in base_dir:
        base_dir = os.path.abspath(base_dir)
        os.makedirs(base_dir, exist_ok=True)
    return base_dir


def dist_info() -> tuple[int, int]:
    """(rank, world_size) of the current torch process group, (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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


# Peak dense bf16 FLOP/s by device name (spec §12.3). Every substring of a pattern must be present in the
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
