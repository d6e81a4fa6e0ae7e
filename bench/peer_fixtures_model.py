"""Writes the model fixtures that tests/test_model_2026_07.py checks raychat's GPT against: nanochat's own GPT,
built and run in nanochat's venv, for a few small configs.

    python bench/peer_fixtures_model.py [--nanochat-dir ../shared/peers/nanochat-92d63d4]
        [--peer-python /tmp/nanochat-venv/bin/python] [--out tests/data/peer_92d63d4_model]
    python bench/peer_fixtures_model.py --nanochat-dir ../shared/peers/nanochat-07c4dd4   # the seed's

About 20 s on one core per peer. The committed fixtures were made with torch 2.13.0 (CPU) on both sides.

The peer is not part of this repository: a nanochat checkout (`--nanochat-dir`, 92d63d4 for the 2026-07
recipe or 07c4dd4 for the seed's, told apart by the nanochat/fp8.py that 92d63d4 added) and a venv with the
same torch as raychat's (`--peer-python`). For each dtype the peer computes in (fp32, and for 92d63d4 also
bf16 through its NANOCHAT_DTYPE=bfloat16 override, on this CPU) a child process in the peer's venv, one thread,
does per config:
- seed torch, build the GPT on the meta device, `to_empty("cpu")`, `init_weights()`; record the state dict's
  keys, shapes, dtypes and the sha256 of every tensor's bytes;
- load random weights from a fixed generator (`random_state`, below; the init zeroes the projections, which
  would hide attention and the MLP), then on fixed token ids: the logits' sha256 and a slice of them, the
  loss with targets, the sha256 of every gradient of that loss;
- estimate_flops and num_scaling_params;
- setup_optimizer(**OPTIMIZER_ARGS)'s groups: their settings and the names of their parameters, in order;
- from a prompt, the peer Engine's (KV cache) greedy continuation and its temperature-1 samples of 2 rows
  (seed 7), and the naive full-forward greedy continuation (model.generate).
One file per config, `<out>/<config>.pt` (torch.save of plain tensors, ints, strings and lists), 13-36 KB.
The test rebuilds the same weights with the same `random_state` formula, so nothing big is stored.
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile

from bench import peers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (GPTConfig fields of both GPTs, batch, prompt length, new tokens). T 256 is the one config whose
# "quarter" short windows (128) are shorter than T; its prompt runs past the window.
CONFIGS = {
    "d2_L_gqa": (dict(sequence_len=32, vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                      window_pattern="L"), 2, 8, 16),
    "d3_SL": (dict(sequence_len=64, vocab_size=400, n_layer=3, n_head=2, n_kv_head=2, n_embd=128,
                   window_pattern="SL"), 2, 8, 16),
    "d4_SSSL_gqa": (dict(sequence_len=48, vocab_size=600, n_layer=4, n_head=4, n_kv_head=1, n_embd=256,
                         window_pattern="SSSL"), 2, 8, 16),
    "d3_SSSL_T256": (dict(sequence_len=256, vocab_size=300, n_layer=3, n_head=2, n_kv_head=1, n_embd=64,
                          window_pattern="SSSL"), 1, 150, 12),
}
SEED = 1234                  # torch.manual_seed before init_weights
# setup_optimizer's arguments: all distinct from its defaults, so that a swapped learning rate shows.
OPTIMIZER_ARGS = dict(unembedding_lr=0.008, embedding_lr=0.3, matrix_lr=0.025, weight_decay=0.28, scalar_lr=0.4)
GROUP_KEYS = ("kind", "lr", "initial_lr", "betas", "eps", "weight_decay", "momentum", "ns_steps", "beta2")
LOGIT_SLICE_VOCAB = 128      # the stored slice: these vocab columns ...
RECIPE_OF_PEER = {"07c4dd4": "seed", "92d63d4": "2026-07"}


def logit_positions(T: int) -> list[int]:
    """... at these positions (the sha256 covers all of them)."""
    return [0, 1, T // 2, T - 1]


def inputs(cfg: dict, batch: int):
    """(idx, targets) of shape (batch, T), from a fixed generator."""
    import torch
    g = torch.Generator().manual_seed(99)
    data = torch.randint(0, cfg["vocab_size"], (batch, cfg["sequence_len"] + 1), generator=g)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


def random_state(model) -> dict:
    """Random weights for every state-dict entry, in state-dict order, from one fixed generator: vectors
    0.5 + 0.25·N(0, 1), embeddings N(0, 1), other matrices N(0, 1/fan_in). Independent of the init, so the
    peer and raychat (same formula) load the same weights in any compute dtype."""
    import torch
    g = torch.Generator().manual_seed(4321)
    state = {}
    for name, t in model.state_dict().items():
        noise = torch.randn(tuple(t.shape), generator=g)
        if t.dim() == 1:
            state[name] = 0.5 + 0.25 * noise
        elif "wte" in name or "value_embeds" in name:
            state[name] = noise
        else:
            state[name] = noise / t.size(-1) ** 0.5
    return state


def sha(t) -> str:
    """sha256 of a tensor's bytes (bf16 included), with its dtype and shape."""
    import torch
    t = t.detach().contiguous().cpu()
    raw = t.view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8)
    return hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode() + raw.numpy().tobytes()).hexdigest()


class NoSpecialTokens:
    """What the peer's Engine asks of a tokenizer, with special tokens no model here can emit."""

    def encode_special(self, name: str) -> int:
        return -1

    def get_bos_token_id(self) -> int:
        return -1


def child(nanochat_dir: str, out_path: str) -> None:
    """In the peer's venv: compute every config, torch.save the results to out_path."""
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, nanochat_dir)
    from nanochat.engine import Engine
    from nanochat.gpt import GPT, GPTConfig

    results = {}
    for name, (cfg, batch, prompt_len, new_tokens) in CONFIGS.items():
        torch.manual_seed(SEED)
        with torch.device("meta"):
            model = GPT(GPTConfig(**cfg))
        model.to_empty(device="cpu")
        model.init_weights()
        init = [(k, tuple(v.shape), str(v.dtype).removeprefix("torch."), sha(v)) for k, v in model.state_dict().items()]
        names = {id(p): k for k, p in model.named_parameters()}
        groups = [{"params": [names[id(p)] for p in g["params"]], **{k: g[k] for k in GROUP_KEYS if k in g}}
                  for g in model.setup_optimizer(**OPTIMIZER_ARGS).param_groups]
        model.load_state_dict(random_state(model))
        idx, targets = inputs(cfg, batch)
        with torch.no_grad():
            logits = model(idx)
        loss = model(idx, targets)
        loss.backward()
        grads = [(k, sha(p.grad)) for k, p in model.named_parameters()]
        model.zero_grad(set_to_none=True)
        model.eval()
        prompt = idx[0, :prompt_len].tolist()
        engine = Engine(model, NoSpecialTokens())
        greedy = [col[0] for col, _ in engine.generate(prompt, num_samples=1, max_tokens=new_tokens, temperature=0.0)]
        sampled = [col for col, _ in engine.generate(prompt, num_samples=2, max_tokens=new_tokens, temperature=1.0,
                                                     seed=7)]
        naive = list(model.generate(prompt, new_tokens, temperature=0.0))
        positions = logit_positions(cfg["sequence_len"])
        results[name] = {
            "init_state": init,
            "logits_sha256": sha(logits),
            "logits_slice": logits[:, positions, :LOGIT_SLICE_VOCAB].clone(),
            "loss": loss.detach().clone(),
            "grads_sha256": grads,
            "estimate_flops": int(model.estimate_flops()),
            "num_scaling_params": {k: int(v) for k, v in model.num_scaling_params().items()},
            "optimizer_groups": groups,
            "prompt": prompt,
            "engine_greedy": greedy,
            "engine_sampled": sampled,
            "naive_greedy": naive,
        }
    torch.save(results, out_path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    peers.add_arguments(p, "92d63d4")
    p.add_argument("--out", default=None, help="default: tests/data/peer_<version>_model")
    p.add_argument("--child", metavar="OUT_PATH", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.nanochat_dir = os.path.abspath(a.nanochat_dir)
    if a.child:
        child(a.nanochat_dir, a.child)
        return 0
    if (why := peers.problem(a.nanochat_dir, os.path.join("nanochat", "gpt.py"), a.peer_python)) is not None:
        print(f"error: {why}", file=sys.stderr)
        return 2
    import torch

    version = peers.version_of(a.nanochat_dir)
    out = a.out or os.path.join(REPO, "tests", "data", f"peer_{version}_model")
    dtypes = ["float32", "bfloat16"] if version == "92d63d4" else ["float32"]  # 07c4dd4 has no dtype override
    by_dtype = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in dtypes:
            path = os.path.join(tmp, f"{dtype}.pt")
            env = {**os.environ, "NANOCHAT_DTYPE": dtype, "OMP_NUM_THREADS": "1"}
            subprocess.run([a.peer_python, os.path.abspath(__file__), "--nanochat-dir", a.nanochat_dir,
                            "--child", path], cwd=a.nanochat_dir, env=env, check=True)
            by_dtype[dtype] = torch.load(path, weights_only=True)
    os.makedirs(out, exist_ok=True)
    for name, (cfg, batch, prompt_len, new_tokens) in CONFIGS.items():
        fixture = {"peer": version, "recipe": RECIPE_OF_PEER[version], "config": cfg, "batch": batch,
                   "seed": SEED, "new_tokens": new_tokens, "logit_positions": logit_positions(cfg["sequence_len"]),
                   **{dtype: by_dtype[dtype][name] for dtype in dtypes}}
        path = os.path.join(out, f"{name}.pt")
        torch.save(fixture, path)
        f32 = fixture["float32"]
        print(f"{path}: {os.path.getsize(path)} bytes | loss {f32['loss'].item():.6f} | flops "
              f"{f32['estimate_flops']} | greedy {f32['engine_greedy']}")
    print(json.dumps({"peer": version, "dtypes": dtypes, "configs": list(CONFIGS)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
