"""Writes the FP8 fixture that tests/test_fp8.py checks raychat.fp8 against: nanochat 92d63d4's own Float8Linear
(its tensorwise recipe), run in nanochat's venv on fixed inputs.

    python -m bench.peer_fixtures_fp8 [--nanochat-dir ../shared/peers/nanochat-92d63d4]
        [--peer-python /tmp/nanochat-venv/bin/python] [--out tests/data/peer_92d63d4_fp8.pt]

torch._scaled_mm runs on the CPU too (torch 2.13.0), so the fixture is made here and the test runs in CI; the
committed one was made with torch 2.13.0 (CPU) in the peer's venv. A child process in that venv, with
NANOCHAT_DTYPE=bfloat16 (FP8 runs beside bf16 compute), converts a Linear with the peer's
convert_to_float8_training and, per shape, does one forward of bf16 inputs and one backward of a bf16 gradient.
It records the inputs, the output and both gradients (dW comes back in bf16 and autograd upcasts it for
the fp32 weight, so every tensor is stored as bf16 without loss). About 200 KiB.

The peer is not part of this repository: a nanochat 92d63d4 checkout (`--nanochat-dir`) and a venv with the
same torch as raychat's (`--peer-python`).
"""
import argparse
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (M rows of input, K in_features, N out_features); the second has rows with very different magnitudes.
SHAPES = ((48, 128, 256), (32, 128, 128))


def child(out_path: str) -> None:
    import torch
    import torch.nn as nn
    from nanochat.common import COMPUTE_DTYPE
    from nanochat.fp8 import convert_to_float8_training

    assert COMPUTE_DTYPE == torch.bfloat16, COMPUTE_DTYPE
    gen = torch.Generator().manual_seed(2026)
    cases = []
    for i, (m, k, n) in enumerate(SHAPES):
        x = torch.randn(m, k, generator=gen).bfloat16()
        if i == 1:
            x = x * torch.logspace(-3, 2, m).unsqueeze(1).bfloat16()
        w = (torch.randn(n, k, generator=gen) * 0.05).bfloat16().float()  # fp32, stored exactly as bf16
        dy = (torch.randn(m, n, generator=gen) * 1e-3).bfloat16()
        holder = nn.Sequential(nn.Linear(k, n, bias=False))
        with torch.no_grad():
            holder[0].weight.copy_(w)
        convert_to_float8_training(holder)
        assert "Float8" in type(holder[0]).__name__
        xg = x.clone().requires_grad_(True)
        y = holder(xg)
        y.backward(dy)
        dw = holder[0].weight.grad
        assert dw.dtype == torch.float32 and torch.equal(dw.bfloat16().float(), dw)  # a bf16 result, upcast
        cases.append(dict(x=x, w=w.bfloat16(), dy=dy, y=y.detach(), dx=xg.grad, dw=dw.bfloat16()))
    torch.save(dict(cases=cases, torch=str(torch.__version__), peer="nanochat 92d63d4"), out_path)


def main() -> None:
    if sys.argv[1:2] == ["--child"]:  # in the peer's venv, from its root: no raychat, no bench
        return child(sys.argv[2])
    from bench import peers

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    peers.add_arguments(p, "92d63d4")
    p.add_argument("--out", default=os.path.join(REPO, "tests", "data", "peer_92d63d4_fp8.pt"))
    a = p.parse_args()
    a.nanochat_dir = os.path.abspath(a.nanochat_dir)
    if (why := peers.problem(a.nanochat_dir, os.path.join("nanochat", "fp8.py"), a.peer_python, "92d63d4")):
        sys.exit(f"error: {why}")
    with tempfile.TemporaryDirectory(prefix="peer_fp8") as tmp:
        out = os.path.join(tmp, "fp8.pt")
        env = dict(os.environ, PYTHONPATH=a.nanochat_dir, NANOCHAT_DTYPE="bfloat16")
        subprocess.run([a.peer_python, os.path.abspath(__file__), "--child", out], cwd=a.nanochat_dir, env=env,
                       check=True)
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
        os.replace(out, a.out)
    print(f"wrote {a.out} ({os.path.getsize(a.out) / 1024:.1f} KiB), shapes {SHAPES}")


if __name__ == "__main__":
    main()
