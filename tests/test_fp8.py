"""FP8 training (raychat.fp8, `--recipe 2026-07 --fp8`). torch._scaled_mm runs on the CPU as well, so the
arithmetic is checked here; the GPU run (scripts/gpu_check.sh) checks it compiled on CUDA.

The fixture (tests/data/peer_92d63d4_fp8.pt, written by bench/peer_fixtures_fp8.py) holds nanochat 92d63d4's own
Float8Linear on fixed inputs: the tensorwise recipe must give its output and both gradients bit for bit.
"""
import os

import pytest
import torch

from raychat.fp8 import Float8Linear, RowwiseMatmul, TensorwiseMatmul, check_device, fp8_disabled, quantize, to_fp8
from raychat.model import GPT, RECIPE_OPTIONS, GPTConfig, Linear

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "peer_92d63d4_fp8.pt")


@pytest.fixture(scope="module")
def cases():
    return torch.load(FIXTURE, weights_only=True)["cases"]


def run(fn, case):
    """y, dx, dW of one matmul: fn(x, W) (x bf16, W an fp32 parameter) backward from the case's gradient."""
    x = case["x"].clone().requires_grad_(True)
    w = torch.nn.Parameter(case["w"].float())
    y = fn(x, w)
    y.backward(case["dy"])
    return y.detach(), x.grad, w.grad


def rel(a, b) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def test_tensorwise_equals_the_reference_bit_for_bit(cases):
    for case in cases:
        y, dx, dw = run(TensorwiseMatmul.apply, case)
        assert torch.equal(y, case["y"]) and torch.equal(dx, case["dx"])
        assert dw.dtype == torch.float32 and torch.equal(dw, case["dw"].float())  # the master weight's dtype


def test_both_recipes_are_fp8_close_to_the_exact_matmul(cases):
    """e4m3 keeps 3 mantissa bits (~3% per value): each result is a few % off the exact fp32 matmul, far more
    than bf16's 0.2%, so FP8 is really in use; rowwise's per-row scales make the gradients closer."""
    for case in cases:
        exact = run(lambda x, w: x.float() @ w.t(), case)
        bf16 = run(lambda x, w: x @ w.to(x.dtype).t(), case)
        tensorwise = run(TensorwiseMatmul.apply, case)
        rowwise = run(RowwiseMatmul.apply, case)
        for i in range(3):
            assert rel(bf16[i], exact[i]) < 5e-3
            assert 1e-2 < rel(tensorwise[i], exact[i]) < 8e-2
            assert 1e-2 < rel(rowwise[i], exact[i]) < 5e-2
        assert rel(rowwise[1], exact[1]) < rel(tensorwise[1], exact[1])  # dx: e4m3 rows vs e5m2 tensor


def test_quantize_saturates_scales_by_slice_and_survives_zeros():
    t = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]])
    q, inv = quantize(t, torch.float8_e4m3fn)
    assert inv.shape == () and float(q.float().abs().max()) == 448.0  # the largest value maps to e4m3's max
    q, inv = quantize(t, torch.float8_e4m3fn, dim=1, pow2=True)
    assert inv.shape == (2, 1) and torch.isfinite(inv).all() and not q[1].float().any()
    assert float(torch.log2(inv[0])) == int(torch.log2(inv[0]))  # a power of two
    assert float((q.float() * inv)[0].sub(t[0]).abs().max()) < 0.07


def small_model() -> GPT:
    """A 2026-07 GPT, bf16 compute, whose attention and MLP Linears are 128 wide or more."""
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=64, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=128,
                    window_pattern="SL", **RECIPE_OPTIONS["2026-07"])
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    model.init_weights(compute_dtype=torch.bfloat16)
    with torch.no_grad():  # the init zeroes the projections, which would hide them
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    return model


def test_to_fp8_converts_the_wide_linears_and_keeps_the_state_dict():
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    idx = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1))
    plain = model(idx)
    converted, total = to_fp8(model, "tensorwise")
    fp8 = [n for n, m in model.named_modules() if isinstance(m, Float8Linear)]
    # c_q/c_k/c_v/c_proj (128x128), c_fc/c_proj (128x512) per layer, lm_head (128x256); not the value-embedding
    # gate (12 -> 2, on the one layer of two with value embeddings) nor smear's gate (24 -> 1)
    assert converted == len(fp8) == 2 * 6 + 1 and total == converted + 1 + 1
    assert not any("gate" in n for n in fp8) and "lm_head" in fp8
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    out = model(idx)
    assert 1e-3 < rel(out, plain) < 0.1  # FP8 matmuls: close, not equal
    with fp8_disabled(model):
        assert not any(isinstance(m, Float8Linear) for m in model.modules())
        assert torch.equal(model(idx), plain)  # evaluation runs the bf16 matmuls
    assert torch.equal(model(idx), out)
    # The loss and its gradients run through both FP8 GEMMs of backward.
    model(idx, idx).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.dim() == 2)
    with pytest.raises(ValueError, match="must be one of tensorwise, rowwise"):
        to_fp8(small_model(), "blockwise")


@pytest.mark.slow
def test_compiled_model_follows_fp8_disabled():
    """torch.compile sees each FP8 matmul as one opaque node; evaluation swaps the Linears back inside a
    compiled model: its guards must send that call to a bf16 graph, then training back to the FP8 one."""
    model = small_model()
    idx = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1))
    plain_eager = model(idx)
    to_fp8(model, "tensorwise")
    fp8_eager = model(idx)
    compiled = torch.compile(model, dynamic=False)
    fp8_compiled = compiled(idx)
    with fp8_disabled(model):
        plain_compiled = compiled(idx)
    again = compiled(idx)
    # Compiled bf16 ops round a little differently, and each FP8 cast rounds what it gets: the compiled and
    # eager FP8 outputs are both FP8-far (~4%) from bf16, the disabled call bf16-close (<1%) to eager bf16.
    assert rel(fp8_compiled, plain_eager) > 2e-2 and rel(fp8_eager, plain_eager) > 2e-2
    assert rel(plain_compiled, plain_eager) < rel(fp8_compiled, plain_eager) / 3
    assert torch.equal(again, fp8_compiled)  # back on the FP8 graph


def test_fp8_is_refused_off_cuda_naming_the_device():
    with pytest.raises(ValueError, match="FP8 matmuls need a CUDA GPU; this worker's device is cpu"):
        check_device(torch.device("cpu"))


def test_linear_classes_swap_in_place():
    """The FP8 layer is a raychat Linear (num_matmul_params and the optimizer groups count it alike)."""
    assert issubclass(Float8Linear, Linear)
