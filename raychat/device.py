"""The device a worker computes on, and what the loop and evaluation need to know of it.

One object instead of the five device-dependent values the reference keeps in globals: bf16 autocast on
CUDA (fp32 elsewhere), a synchronize for honest step timings, the peak memory, and the peak FLOP/s that MFU
divides by (infinite off CUDA, so MFU reads 0 there).
"""
import os
from contextlib import nullcontext

import torch

from raychat.common import autodetect_device_type, get_peak_flops


class DeviceContext:
    def __init__(self, device: torch.device):
        self.device = device
        self.type = device.type
        self.name = torch.cuda.get_device_name(device) if self.type == "cuda" else self.type
        self.peak_flops = get_peak_flops(self.name) if self.type == "cuda" else float("inf")

    @classmethod
    def for_session(cls, session, device_type: str = "") -> "DeviceContext":
        """The session's device of `device_type` (empty: the best one this machine has)."""
        return cls(session.device(device_type or autodetect_device_type()))

    def autocast(self):
        """bf16 autocast on CUDA, nothing elsewhere (the model is fp32 on CPU, as the reference's)."""
        if self.type == "cuda":
            return torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16)
        return nullcontext()

    def synchronize(self) -> None:
        if self.type == "cuda":
            torch.cuda.synchronize()

    def to_device(self, *tensors: torch.Tensor) -> tuple:
        """Host tensors on the device. On CUDA through pinned memory without waiting, so a batch's copy queues
        behind the running backward instead of stalling it (the reference's copy blocks: its pin check
        compares a torch.device with a string and never pins)."""
        if self.type == "cuda":
            return tuple(t.pin_memory().to(self.device, non_blocking=True) for t in tensors)
        return tuple(t.to(self.device) for t in tensors)

    def peak_memory_mib(self) -> float:
        """CUDA's allocator peak; elsewhere, the process's peak resident set (ru_maxrss: KiB on Linux)."""
        if self.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        import resource

        unit = 1 if os.uname().sysname == "Darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit / 2**20

    @property
    def memory_label(self) -> str:
        return "" if self.type == "cuda" else " (host RSS)"
