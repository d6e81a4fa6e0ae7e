"""What a GPU run sets up beyond the model, checked on this CPU: the process environment (the CUDA allocator's
setting, OpenMP threads), TF32, checkpoint dtypes across devices, the NCCL group's device, and the NaN check
that does not wait for the device before the update. tests/test_cuda.py runs the same paths on a GPU."""
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from conftest import REPO_ROOT, assert_same_run, tiny_config, train_local
from raychat import checkpoint as ckpt_files
from raychat import optim
from raychat.device import DeviceContext, process_env
from raychat.model import GPT, GPTConfig

# ---- the process environment ---------------------------------------------------------------------------


def test_process_env_keeps_the_users_settings():
    assert process_env(environ={}) == {"PYTORCH_ALLOC_CONF": "expandable_segments:True"}
    assert process_env(environ={"PYTORCH_ALLOC_CONF": "max_split_size_mb:64"}) == \
        {"PYTORCH_ALLOC_CONF": "max_split_size_mb:64"}
    # The older name alone: passed on as it is, and not shadowed by the newer one (which torch reads first).
    assert process_env(environ={"PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync"}) == \
        {"PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync"}
    assert process_env(gpu_worker=True, environ={})["OMP_NUM_THREADS"] == "1"  # torchrun's default
    assert process_env(gpu_worker=True, environ={"OMP_NUM_THREADS": "8"})["OMP_NUM_THREADS"] == "8"
    assert "OMP_NUM_THREADS" not in process_env(environ={})  # a CPU worker's threads are --cpus-per-worker


@pytest.mark.parametrize("user", [None, "max_split_size_mb:64"])
def test_set_process_env_reaches_the_allocator_after_torch_is_imported(user):
    """The allocator reads its configuration at its first use, not when torch is imported: setting it in
    DeviceContext, before the model is built, is early enough. A user's setting wins."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")}
    if user:
        env["PYTORCH_ALLOC_CONF"] = user
    code = ("import torch\nfrom raychat.device import set_process_env\nset_process_env()\n"
            "print(torch._C._accelerator_getAllocatorSettings())")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == (user or "expandable_segments:True")


def test_a_cuda_device_context_sets_tf32_and_the_allocator(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", calls.append)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    DeviceContext(torch.device("cpu"))
    assert calls == [] and "PYTORCH_ALLOC_CONF" not in os.environ  # a CPU process keeps torch's defaults
    dev = DeviceContext(torch.device("cuda", 0))
    # "high": TF32 for fp32 matmuls, as the reference (the legacy call: inductor reads the legacy getter).
    assert calls == ["high"] and os.environ["PYTORCH_ALLOC_CONF"] == "expandable_segments:True"
    assert dev.asynchronous and dev.peak_flops == 989e12


def test_tf32_setting_keeps_the_precision_getter_working():
    """Why the legacy call: with the newer per-backend setting alone, torch.get_float32_matmul_precision()
    (which inductor calls) raises. Checked in a fresh process: the setting is process-wide."""
    code = ("import torch\ntorch.set_float32_matmul_precision('high')\n"
            "print(torch.backends.cuda.matmul.fp32_precision, torch.get_float32_matmul_precision())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["tf32", "high"]


# ---- checkpoint dtypes across devices ------------------------------------------------------------------

CONFIG = dict(sequence_len=32, vocab_size=128, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, window_pattern="SL")


def _model(cuda_dtypes: bool):
    """A CPU model; with `cuda_dtypes`, in the dtypes init_weights gives it on CUDA (bf16 wte and value
    embeddings, everything else fp32)."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(GPTConfig(**CONFIG))
    model.to_empty(device="cpu")
    model.init_weights()
    if cuda_dtypes:
        model.transformer.wte.to(dtype=torch.bfloat16)
        for ve in model.value_embeds.values():
            ve.to(dtype=torch.bfloat16)
    return model


def _checkpoint(directory, cuda_dtypes: bool):
    """A one-rank checkpoint written by a model of those dtypes after one update (so AdamW's state exists)."""
    model = _model(cuda_dtypes)
    opt = optim.MuonAdamW(model.optimizer_groups())
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    ckpt_files.save_rank_files(str(directory), 0, opt.state_dict(), [], model_state=model.state_dict(),
                               meta={"step": 1, "world_size": 1, "model_config": CONFIG})
    return model


def _dtypes(model):
    return {n: p.dtype for n, p in model.named_parameters()}


def _load_as_the_loop_does(directory, model):
    saved = ckpt_files.load_rank_state(str(directory), 0, 1, "cpu")
    opt = optim.MuonAdamW(model.optimizer_groups())
    model.load_state_dict(saved.model, strict=True)
    opt.load_state_dict(saved.optimizer)
    return opt


@pytest.mark.parametrize("written_on, read_on", [("cuda", "cpu"), ("cpu", "cuda")])
def test_a_checkpoint_takes_the_dtypes_of_the_model_it_loads_into(tmp_path, written_on, read_on):
    """A CUDA run's checkpoint (bf16 embeddings) resumed on a CPU is all fp32, and a CPU run's resumed on a
    GPU has bf16 embeddings beside fp32 matrices: weights and optimizer state take the dtypes of the model
    they load into, values kept (bf16 -> fp32 is exact)."""
    source = _checkpoint(tmp_path, cuda_dtypes=written_on == "cuda")
    model = _model(cuda_dtypes=read_on == "cuda")
    want = _dtypes(model)
    opt = _load_as_the_loop_does(tmp_path, model)
    assert _dtypes(model) == want
    for p in model.parameters():
        for key, value in opt.state.get(p, {}).items():
            if key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
                assert value.dtype == p.dtype, key
    if written_on == "cuda":
        for (name, p), q in zip(model.named_parameters(), source.parameters()):
            assert torch.equal(p, q.float()), name


def test_eval_loads_a_cuda_checkpoint_in_fp32_on_a_cpu(tmp_path):
    from raychat.eval import load_model

    source = _checkpoint(tmp_path, cuda_dtypes=True)
    model, meta = load_model("raychat", str(tmp_path), None, torch.device("cpu"))
    assert set(_dtypes(model).values()) == {torch.float32} and meta["step"] == 1
    for (name, p), q in zip(model.named_parameters(), source.parameters()):
        assert torch.equal(p, q.float()), name
    x = torch.randint(0, CONFIG["vocab_size"], (1, 8))
    assert torch.isfinite(model(x)).all()  # runs on the CPU, with no autocast to mix dtypes


# ---- the process group -----------------------------------------------------------------------------------


def test_nccl_group_is_created_with_its_device(monkeypatch):
    """A Ray Train worker's NCCL group gets Ray Train's device for that worker (tests/test_cuda.py creates a
    real one)."""
    import ray.train.torch

    from raychat import rendezvous

    seen = {}
    gpu = torch.device("cuda", 3)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen.update(current=d))
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: gpu)
    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", raising=False)
    monkeypatch.delenv("TORCH_NCCL_BLOCKING_WAIT", raising=False)
    rendezvous.init_process_group("nccl", world_rank=1, world_size=4, timeout_s=60)
    assert seen["device_id"] == gpu and seen["current"] == gpu and seen["backend"] == "nccl"
    assert (seen["rank"], seen["world_size"], seen["init_method"]) == (1, 4, "env://")
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"  # as Ray Train's own setup


def test_gloo_group_is_ray_trains(monkeypatch):
    import socket

    from raychat import rendezvous

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    rendezvous.init_process_group("gloo", world_rank=0, world_size=1, timeout_s=60)
    try:
        assert dist.get_backend() == "gloo" and dist.get_world_size() == 1
        assert DeviceContext(torch.device("cpu")).any_rank(torch.tensor(True)).item() is True
    finally:
        dist.destroy_process_group()


def _any_rank_on(rank, world_size, out):
    flags = [DeviceContext(torch.device("cpu")).any_rank(torch.tensor(rank == r)) for r in (1, 5)]
    with open(os.path.join(out, f"rank{rank}"), "w") as f:
        f.write(" ".join(str(bool(t.item())) for t in flags))


def test_any_rank_agrees_across_ranks(tmp_path):
    from tests._gloo import run_gloo

    run_gloo(_any_rank_on, 2, str(tmp_path))
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == ["True False", "True False"]


# ---- the NaN check on a device that runs behind the host --------------------------------------------------


def _record_order(monkeypatch):
    """Events of the loop, in order: `flag` (the NaN flag's all-reduce), `read` (any value read from a
    tensor, a host sync on CUDA) and `update` (optimizer.step)."""
    events = []

    def wrap(cls, name, event):
        orig = getattr(cls, name)

        def recorded(self, *args, **kwargs):
            events.append(event)
            return orig(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, recorded)

    wrap(torch.Tensor, "item", "read")
    wrap(optim.MuonAdamW, "step", "update")
    wrap(DeviceContext, "any_rank", "flag")
    monkeypatch.setattr(DeviceContext, "asynchronous", property(lambda self: True))  # as on CUDA
    return events


def _reads_between_flag_and_update(events):
    out = []
    for i, e in enumerate(events):
        if e == "flag":
            j = events.index("update", i)
            out.append(events[i:j].count("read"))
    return out


def test_stop_reads_the_nan_flag_only_after_the_update_is_queued(local_baseline, tiny_data_dir, tiny_tokenizer_dir,
                                                                   storage, monkeypatch):
    """--nan-policy stop where kernels run behind the host: no value is read between the NaN flag and the
    update, so the host does not wait for the step before queuing it. The run still stops at the NaN step,
    and its checkpoints are the uninterrupted run's (the update that reached memory is never saved)."""
    events = _record_order(monkeypatch)
    cfg = tiny_config(tiny_data_dir, tiny_tokenizer_dir, storage, "nan-async", "--debug-fail-at-step", "10",
                      "--debug-fail-kind", "nan")
    summary, _ = train_local(cfg)
    assert summary["stopped"].startswith("loss became non-finite at step 10") and summary["step"] == 10
    reads = _reads_between_flag_and_update(events)
    assert len(reads) == 11 and set(reads) == {0}, reads
    run = os.path.join(storage, "nan-async")
    assert [s for s, _ in ckpt_files.list_step_dirs(run)] == [4, 8]
    assert_same_run(run, local_baseline, 8)


def test_skip_reads_the_nan_flag_before_the_update(tiny_data_dir, tiny_tokenizer_dir, storage, monkeypatch):
    """--nan-policy skip must know before the update whether to apply it: one read there, even on CUDA."""
    events = _record_order(monkeypatch)
    cfg = tiny_config(tiny_data_dir, tiny_tokenizer_dir, storage, "nan-async-skip", "--nan-policy", "skip",
                      "--num-iterations", "3", "--eval-every", "-1", "--save-every", "-1")
    summary, _ = train_local(cfg)
    assert summary["stopped"] is None
    assert _reads_between_flag_and_update(events) == [1, 1, 1]
