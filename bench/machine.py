"""What every benchmark prints first: the CPU it ran on, since no speed figure carries from one CPU to another."""
import os
import platform


def cpu_description() -> str:
    """Model name, usable CPUs and the SIMD flags that decide the kernels' speed, from /proc/cpuinfo."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() in ("flags", "Features"):
                    flags = set(value.split())
    except OSError:
        pass
    simd = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "sse4", "asimd", "sve")) or f == "bf16")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cpus} CPUs, flags: {' '.join(simd) or 'none listed'}"
