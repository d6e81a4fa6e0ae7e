"""Checkpoints of `--recipe 2026-07` interchange with nanochat 92d63d4 both ways, proven with nanochat's own code.

    python bench/peer_checkpoint_roundtrip.py [--nanochat-dir ../shared/peers/nanochat-92d63d4]
        [--peer-python /tmp/nanochat-venv/bin/python]

Run it in raychat's venv; the peer runs in its own (a nanochat 92d63d4 checkout and a venv with the same torch,
tiktoken and rustbpe). About 30 s on one core. Everything is written under a temporary directory:
- a tokenizer (vocab 512, trained on the test corpus tests/data/tinyshakespeare.txt.gz) in nanochat's layout
  `$NANOCHAT_BASE_DIR/tokenizer/`: nanochat's loader insists that the model's vocabulary is the tokenizer's;
- raychat -> peer: for each config, raychat's 2026-07 GPT (fp32 init, then a seeded perturbation of every
  tensor: the init zeroes the output projections, which would hide attention and the MLP) is exported with
  `raychat.checkpoint.export_nanochat` into `$NANOCHAT_BASE_DIR/base_checkpoints/rc_<config>/`, with the meta
  raychat's loop writes; the peer loads it as its scripts do (`checkpoint_manager.load_model("base", ...)`)
  and computes logits on fixed token ids;
- peer -> raychat: the peer builds and initialises its own GPT, perturbs it the same way and saves it with its
  `save_checkpoint` (model, optimizer and a base_train-like meta) into `base_checkpoints/pc_<config>/`; raychat
  reads it with `load_nanochat_model` into `GPT(GPTConfig(**meta["model_config"]))` (strict) and compares;
- the CLI: `python -m raychat.train --recipe 2026-07 --init-from-nanochat <peer dir> --dry-run`, then the same
  flags for one step with every learning-rate flag 0 through raychat's loop in this process (no Ray): the
  weights it saves are the peer's, bit for bit, but for the smear group, which both optimizers train at a
  fixed lr 0.2 that no flag sets (it moves, as it should).
Both sides compute in fp32 on one thread, where the two GPTs are the same arithmetic: every comparison is exact
(torch.equal); the table prints the largest absolute difference. Exits 1 on any mismatch.
"""
import argparse
import contextlib
import dataclasses
import gzip
import io
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from bench import peers  # noqa: E402  (after the path: this file also runs as a script)

STEP = 7        # the checkpoints' step (any: nothing here trains)
SEED = 1234     # torch.manual_seed before init_weights, on both sides
VOCAB = 512
# The flags of the "train" config: the tiny run of the tests with the recipe. Its model is the one
# raychat.train derives from them (depth 2, width 64, 2 heads, T 64), so --init-from-nanochat accepts the peer's.
TRAIN_FLAGS = ["--recipe", "2026-07", "--depth", "2", "--aspect-ratio", "32", "--head-dim", "32",
               "--max-seq-len", "64", "--device-batch-size", "4", "--total-batch-size", "512",
               "--window-pattern", "SL", "--warmup-steps", "4", "--eval-tokens", "1024", "--core-metric-every", "-1",
               "--sample-every", "-1", "--cpus-per-worker", "1", "--data-backend", "inline"]
SMEAR_GROUP = ("smear_gate.weight", "smear_lambda", "backout_lambda")  # the peer's optimizer group at lr 0.2
# A second model: 4 layers, grouped-query attention, three short-window layers (T/4 = 16 < T) per long one.
GQA_CONFIG = dict(sequence_len=64, vocab_size=VOCAB, n_layer=4, n_head=4, n_kv_head=2, n_embd=128,
                  window_pattern="SSSL")


def token_ids(cfg: dict):
    import torch
    g = torch.Generator().manual_seed(99)
    return torch.randint(0, cfg["vocab_size"], (2, cfg["sequence_len"]), generator=g)


def perturbed(state: dict, seed: int) -> dict:
    """`state` plus seeded noise on every entry (vectors 0.1·N(0, 1), matrices N(0, 1/fan_in)), in state-dict
    order: the same formula runs in both venvs. Nothing stays zero, no entry keeps its init."""
    import torch
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in state.items():
        noise = torch.randn(tuple(t.shape), generator=g)
        scale = 0.1 if t.dim() < 2 else t.size(-1) ** -0.5
        out[name] = (t.float() + scale * noise).to(t.dtype)
    return out


# ----------------------------------------------------------------------------------------------------
# The peer's side: this file again, run by --peer-python from the nanochat checkout with NANOCHAT_BASE_DIR set.

def child(job_path: str) -> None:
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, os.getcwd())
    from nanochat.checkpoint_manager import load_model, save_checkpoint
    from nanochat.common import COMPUTE_DTYPE, get_base_dir
    from nanochat.gpt import GPT, GPTConfig

    with open(job_path) as f:
        job = json.load(f)
    results = {"compute_dtype": str(COMPUTE_DTYPE), "loaded": {}, "saved": {}}
    device = torch.device("cpu")
    for tag in job["load"]:  # what scripts/base_eval.py and chat_cli.py do with a base model
        model, tokenizer, meta = load_model("base", device, "eval", model_tag=tag)
        with torch.no_grad():
            logits = model(token_ids(dataclasses.asdict(model.config)))
        results["loaded"][tag] = {"logits": logits, "state": dict(model.state_dict()),
                                  "config": dataclasses.asdict(model.config), "step": meta["step"]}
    for tag, cfg in job["save"].items():  # what scripts/base_train.py does: build, init, save
        torch.manual_seed(SEED)
        with torch.device("meta"):
            model = GPT(GPTConfig(**cfg))
        model.to_empty(device=device)
        model.init_weights()
        model.load_state_dict(perturbed(model.state_dict(), SEED + 1))
        optimizer = model.setup_optimizer()
        meta = {"step": STEP, "val_bpb": 1.5, "model_config": dataclasses.asdict(model.config),
                "user_config": {"depth": cfg["n_layer"], "max_seq_len": cfg["sequence_len"], "run": "roundtrip"},
                "device_batch_size": 4, "max_seq_len": cfg["sequence_len"], "total_batch_size": 512,
                "dataloader_state_dict": {"pq_idx": 0, "rg_idx": 1, "epoch": 1},
                "loop_state": {"min_val_bpb": 1.5, "smooth_train_loss": 5.0, "total_training_time": 1.0}}
        save_checkpoint(os.path.join(get_base_dir(), "base_checkpoints", tag), STEP, model.state_dict(),
                        optimizer.state_dict(), meta)
        model.eval()
        with torch.no_grad():
            logits = model(token_ids(cfg))
        results["saved"][tag] = {"logits": logits, "state": dict(model.state_dict())}
    torch.save(results, job["out"])


# ----------------------------------------------------------------------------------------------------
# raychat's side

def max_abs(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def same_state(a: dict, b: dict) -> tuple[bool, float]:
    """(identical keys, dtypes and values; the largest absolute difference over the shared keys)."""
    import torch
    shared = [k for k in a if k in b and a[k].shape == b[k].shape]
    diff = max((max_abs(a[k], b[k]) for k in shared), default=float("inf"))
    ok = a.keys() == b.keys() and len(shared) == len(a) and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    return ok, diff


def raychat_model(model_config: dict, state: dict | None = None):
    """raychat's GPT of a model_config, fp32 compute; `state` loaded strictly if given."""
    import torch
    from raychat.model import GPT, GPTConfig

    with torch.device("meta"):
        model = GPT(GPTConfig(**model_config))
    model.to_empty(device="cpu")
    model.init_weights(compute_dtype=torch.float32)
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model.eval()


def logits_of(model, model_config: dict):
    import torch
    with torch.no_grad():
        return model(token_ids(model_config))


def make_inputs(tmp: str) -> tuple[str, str, str]:
    """(nanochat base dir with tokenizer/, raychat tokenizer dir, data dir) from the test corpus."""
    from raychat.data.shards import prepare
    from raychat.tokenizer import Tokenizer

    with gzip.open(os.path.join(REPO, "tests", "data", "tinyshakespeare.txt.gz"), "rt", encoding="utf-8") as f:
        text = f.read()
    corpus = os.path.join(tmp, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.write(text)
    base = os.path.join(tmp, "nanochat_base")
    tok_dir = os.path.join(base, "tokenizer")  # nanochat's layout; raychat reads the same files
    Tokenizer.train_from_iterator(iter([text]), VOCAB).save(tok_dir)
    data_dir = os.path.join(tmp, "data")
    prepare(corpus, data_dir, rows_per_group=64, shard_chars=400_000, val_fraction=0.1, progress=False)
    return base, tok_dir, data_dir


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    peers.add_arguments(p, "92d63d4")
    p.add_argument("--child", metavar="JOB_JSON", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.child)
        return 0
    a.nanochat_dir = os.path.abspath(a.nanochat_dir)
    why = peers.problem(a.nanochat_dir, os.path.join("nanochat", "checkpoint_manager.py"), a.peer_python, "92d63d4")
    if why is not None:
        print(f"error: {why}", file=sys.stderr)
        return 2

    import torch
    from bench.machine import cpu_description
    from raychat import checkpoint as ckpt_files
    from raychat.config import model_config as derived_model_config
    from raychat.config import parse_args
    from raychat.model import RECIPE_OPTIONS
    from raychat.tokenizer import Tokenizer

    torch.set_num_threads(1)
    print(f"CPU: {cpu_description()} | torch {torch.__version__} | peer {a.nanochat_dir}")
    t_start = time.time()
    rows = []  # (direction, config, what, max |diff|, ok)

    def row(direction, name, what, diff, ok):
        rows.append((direction, name, what, diff, bool(ok)))

    with tempfile.TemporaryDirectory(prefix="peer-roundtrip-") as tmp:
        base, tok_dir, data_dir = make_inputs(tmp)
        assert Tokenizer.from_directory(tok_dir).get_vocab_size() == VOCAB
        train_cfg = parse_args([*TRAIN_FLAGS, "--data-dir", data_dir, "--tokenizer-dir", tok_dir])
        train_model = dataclasses.asdict(derived_model_config(train_cfg, VOCAB))
        configs = {  # name: raychat's full model_config (nanochat's 7 fields + the recipe's options)
            "d2_SL": train_model,
            "d4_SSSL_gqa": {**GQA_CONFIG, **RECIPE_OPTIONS["2026-07"]},
        }

        # 1. raychat -> peer: export what raychat's loop would save.
        ours = {}
        for name, mc in configs.items():
            torch.manual_seed(SEED)
            model = raychat_model(mc)
            model.load_state_dict(perturbed(model.state_dict(), SEED + 2), strict=True)
            state = {k: v.clone() for k, v in model.state_dict().items()}
            meta = {"step": STEP, "val_bpb": 1.25, "model_config": mc, "user_config": train_cfg.user_config(),
                    "device_batch_size": 4, "max_seq_len": mc["sequence_len"], "total_batch_size": 512,
                    "world_size": 1, "grad_accum_steps": 2, "num_slots": 2, "fit_id": "roundtrip",
                    "saved_at": time.time(), "inputs": {}, "min_val_bpb": 1.25, "total_training_time": 1.0}
            ckpt_files.export_nanochat(os.path.join(base, "base_checkpoints", f"rc_{name}"), STEP, state, meta)
            ours[name] = (state, logits_of(model, mc))

        # The peer: load raychat's exports, write its own checkpoints.
        job = {"load": [f"rc_{n}" for n in configs], "out": os.path.join(tmp, "peer.pt"),
               "save": {f"pc_{n}": {k: mc[k] for k in ckpt_files.NANOCHAT_CONFIG_KEYS} for n, mc in configs.items()}}
        job_path = os.path.join(tmp, "job.json")
        with open(job_path, "w") as f:
            json.dump(job, f)
        env = {**os.environ, "NANOCHAT_BASE_DIR": base, "NANOCHAT_DTYPE": "float32", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": a.nanochat_dir}
        t0 = time.time()
        proc = subprocess.run([a.peer_python, os.path.abspath(__file__), "--child", job_path], cwd=a.nanochat_dir,
                              env=env, capture_output=True, text=True)
        peer_s = time.time() - t0
        if proc.returncode != 0:
            print(proc.stdout + proc.stderr, file=sys.stderr)
            print(f"error: the peer failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        peer = torch.load(job["out"], weights_only=True)
        print(f"peer: compute dtype {peer['compute_dtype']}, {peer_s:.1f} s (its checkpoint_manager's log below)")
        for line in proc.stderr.splitlines() + proc.stdout.splitlines():
            if "checkpoint_manager" in line or "Saved" in line:
                print("  " + line.split(" - ")[-1])

        for name, mc in configs.items():
            state, logits = ours[name]
            got = peer["loaded"][f"rc_{name}"]
            row("raychat -> peer", name, "config (7 fields)", 0.0,
                got["config"] == {k: mc[k] for k in ckpt_files.NANOCHAT_CONFIG_KEYS})
            row("raychat -> peer", name, "state dict", *reversed(same_state(state, got["state"])))
            row("raychat -> peer", name, "logits fp32", max_abs(logits, got["logits"]),
                torch.equal(logits, got["logits"]))

        # 2. peer -> raychat: read the peer's own checkpoints as --init-from-nanochat does.
        for name, mc in configs.items():
            peer_dir = os.path.join(base, "base_checkpoints", f"pc_{name}")
            saved = peer["saved"][f"pc_{name}"]
            state, meta = ckpt_files.load_nanochat_model(peer_dir)
            row("peer -> raychat", name, "config (2026-07 inferred)", 0.0, meta["model_config"] == mc)
            model = raychat_model(meta["model_config"], state)  # strict
            row("peer -> raychat", name, "state dict", *reversed(same_state(saved["state"], model.state_dict())))
            logits = logits_of(model, mc)
            row("peer -> raychat", name, "logits fp32", max_abs(logits, saved["logits"]),
                torch.equal(logits, saved["logits"]))

        # 3. The CLI on the peer's checkpoint: the dry run, then one step with every learning rate 0.
        peer_dir = os.path.join(base, "base_checkpoints", "pc_d2_SL")
        run_flags = [*TRAIN_FLAGS, "--data-dir", data_dir, "--tokenizer-dir", tok_dir,
                     "--storage-path", os.path.join(tmp, "runs"), "--init-from-nanochat", peer_dir]
        env = {**os.environ, "RAYCHAT_BASE_DIR": os.path.join(tmp, "raychat_base"), "OMP_NUM_THREADS": "1"}
        dry = subprocess.run([sys.executable, "-m", "raychat.train", *run_flags, "--run-name", "dry", "--dry-run",
                              "--num-iterations", "1"], cwd=REPO, env=env, capture_output=True, text=True)
        row("peer -> raychat.train", "d2_SL", "--dry-run exit 0", 0.0, dry.returncode == 0)
        if dry.returncode != 0:
            print(dry.stdout + dry.stderr, file=sys.stderr)

        from raychat.loop import train
        from raychat.session import LocalSession

        zero_lrs = ["--embedding-lr", "0", "--unembedding-lr", "0", "--matrix-lr", "0", "--scalar-lr", "0"]
        cfg = parse_args([*run_flags, "--run-name", "from-peer", "--num-iterations", "1", "--eval-every", "1",
                          *zero_lrs]).resolve_paths()
        session = LocalSession(cfg)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            train(cfg, session)
        row("peer -> raychat.train", "d2_SL", "loop: 'Initialised from nanochat'", 0.0,
            "Initialised from nanochat checkpoint" in out.getvalue())
        trained = torch.load(os.path.join(cfg.storage_path, "from-peer", ckpt_files.step_dir_name(1), "model.pt"),
                             weights_only=True)
        # The smear group trains at the peer's fixed lr 0.2 whatever the flags say (raychat keeps that): the
        # one step moves it and nothing else.
        ref = peer["saved"]["pc_d2_SL"]["state"]
        held = [k for k in ref if k not in SMEAR_GROUP]
        row("peer -> raychat.train", "d2_SL", "1 step at lr 0: weights but smear group", *reversed(
            same_state({k: ref[k] for k in held}, {k: trained[k] for k in held if k in trained})))
        moved = all(k in trained and not torch.equal(ref[k], trained[k]) for k in SMEAR_GROUP)
        row("peer -> raychat.train", "d2_SL", "1 step: smear group (lr 0.2) moved",
            max(max_abs(ref[k], trained[k]) for k in SMEAR_GROUP), moved and trained.keys() == ref.keys())
        step0 = [r for r in session.reports if r["step"] == 0]
        val0 = step0[0].get("val_bpb") if step0 else None

    elapsed = time.time() - t_start
    print("\n| direction | config | check | max abs diff | result |\n|---|---|---|---|---|")
    for direction, name, what, diff, ok in rows:
        print(f"| {direction} | {name} | {what} | {diff:.3g} | {'ok' if ok else '**MISMATCH**'} |")
    print(f"\nval bpb of the peer's d2 weights at raychat's step 0: {val0}")
    bad = [r for r in rows if not r[4]]
    print(f"{len(rows) - len(bad)}/{len(rows)} checks ok in {elapsed:.1f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
