"""The device a worker computes on, and what the loop and evaluation need to know of it.

One object instead of the five device-dependent values the reference keeps in globals: bf16 autocast on
CUDA (fp32 elsewhere), a synchronize for honest step timings, the peak memory, and the peak FLOP/s that MFU
divides by (infinite off CUDA, so MFU reads 0 there). On CUDA it also sets what the reference sets for the
whole process: TF32 for fp32 matmuls and, before anything is allocated, expandable segments.
"""
import os
from contextlib import nullcontext

import torch
import torch.distributed as dist

from raychat.common import autodetect_device_type, get_peak_flops

# The reference's allocator setting: segments that grow in place, so varying shapes fragment less.
ALLOC_CONF = "expandable_segments:True"


def process_env(gpu_worker: bool = False, environ=None) -> dict:
    """The environment variables a process that may use CUDA should start with, the user's own kept: the CUDA
    allocator's configuration (PYTORCH_ALLOC_CONF, or its older name PYTORCH_CUDA_ALLOC_CONF, which torch
    reads only when the first is unset), and for a GPU worker one OpenMP thread, as torchrun gives each
    process (Ray would give it one per CPU it reserves)."""
    environ = os.environ if environ is None else environ
    names = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
    env = {k: environ[k] for k in names if k in environ} or {"PYTORCH_ALLOC_CONF": ALLOC_CONF}
    if gpu_worker:
        env["OMP_NUM_THREADS"] = environ.get("OMP_NUM_THREADS", "1")
    return env


def set_process_env() -> None:
    """Put process_env() into this process's environment. Early: the CUDA allocator reads its configuration
    once, at its first allocation."""
    for k, v in process_env().items():
        os.environ.setdefault(k, v)


def init_nccl_group(rank: int, world_size: int, timeout_s: int, device: torch.device) -> None:
    """This process's NCCL group (env:// rendezvous: MASTER_ADDR/MASTER_PORT set), created with its GPU, as the
    reference and torchrun scripts do: the communicator is formed at once, so a broken NCCL fails here rather
    than at the first collective, and collectives such as barrier know their device."""
    from datetime import timedelta

    torch.cuda.set_device(device)
    # A collective that times out fails the worker instead of hanging it (Ray Train's own setting).
    if "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in os.environ and "TORCH_NCCL_BLOCKING_WAIT" not in os.environ:
        os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1"
    dist.init_process_group(backend="nccl", init_method="env://", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s), device_id=device)


def compute_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The 2026-07 recipe's compute dtype (--compute-dtype): bf16 on CUDA from sm80 (Ampere), fp32 on older
    GPUs and off CUDA (CPU bf16 is opt-in: `bf16`), as nanochat 92d63d4 decides its COMPUTE_DTYPE."""
    if setting != "auto":
        return {"bf16": torch.bfloat16, "fp32": torch.float32}[setting]
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        return torch.bfloat16
    return torch.float32


class DeviceContext:
    def __init__(self, device: torch.device, compute_dtype: torch.dtype | None = None):
        """`compute_dtype` None: the seed recipe's precision (bf16 autocast on CUDA); a dtype: the 2026-07
        recipe's, where the model itself casts (raychat.model) and autocast stays off."""
        self.device = device
        self.type = device.type
        self.compute_dtype = compute_dtype
        if self.type == "cuda":
            set_process_env()
            # TF32 for the fp32 matmuls outside autocast, as the reference. The legacy call rather than
            # torch.backends.cuda.matmul.fp32_precision: mixing the two makes torch.get_float32_matmul_precision()
            # raise, and inductor calls it.
            torch.set_float32_matmul_precision("high")
        self.name = torch.cuda.get_device_name(device) if self.type == "cuda" else self.type
        self.peak_flops = get_peak_flops(self.name) if self.type == "cuda" else float("inf")

    @classmethod
    def for_session(cls, session, device_type: str = "", recipe: str = "seed",
                    compute: str = "auto") -> "DeviceContext":
        """The session's device of `device_type` (empty: the best one this machine has), computing as `recipe`
        does (`compute`: its --compute-dtype)."""
        device = session.device(device_type or autodetect_device_type())
        return cls(device, None if recipe == "seed" else compute_dtype(compute, device))

    @property
    def asynchronous(self) -> bool:
        """Whether kernels run behind the Python thread (CUDA): reading a value from the device then waits for
        every kernel queued before it, so the loop reads as late as it can."""
        return self.type == "cuda"

    def autocast(self):
        """The seed recipe's bf16 autocast on CUDA; nothing elsewhere (the model is fp32 on CPU, as the
        reference's) or with a compute dtype (the model casts)."""
        if self.type == "cuda" and self.compute_dtype is None:
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

    def any_rank(self, flag: torch.Tensor) -> torch.Tensor:
        """A bool tensor on this device: whether `flag` (a bool tensor here) is true on any rank. All-reduced
        on the device, so on CUDA it is queued behind the kernels that compute `flag` rather than waited for;
        every rank must call it."""
        if not (dist.is_available() and dist.is_initialized()):
            return flag
        t = flag.to(torch.uint8)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.bool()

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
