"""Checkpoint files: what a training checkpoint holds, how it is written, checked and read.

One checkpoint is one directory, `{storage}/{run_name}/step_{step:06d}/` (each rank copies its own files
there, raychat.saver):

    model.pt             rank 0: the model state dict (the reference's keys and dtypes, no `_orig_mod.`)
    meta.json            rank 0: step, configs, loop state, metrics history, world layout
    optim_rank{r}.pt     every rank: its optimizer state (DistMuonAdamW's shard; `load_rank_state` lays the
                         shards out anew for another world size)
    data_rank{r}.json    every rank: the exact state of each data slot it owns (raychat.data.stream), in
                         slot order; all ranks' lists concatenated are slots 0 .. num_slots - 1
    done_rank{r}.json    every rank, written last: the byte size and CRC-32 of each file that rank wrote

A checkpoint counts as complete only when meta.json and every rank's done file exist and every listed file
has its recorded size and checksum, so a checkpoint cut short by a crash or a partial upload, or damaged on
disk later (bit rot, a bad copy), is detected and skipped. Checkpoints written before checksums existed
(done files without "crc32") are checked by size only.
Everything is read with `torch.load(weights_only=True)`: loading a checkpoint never executes code.

nanochat's own layout (`model_{step:06d}.pt`, `meta_{step:06d}.json`, `optim_{step:06d}_rank{r}.pt`) is
written by `export_nanochat` and read by `load_nanochat_model`.
"""
import glob
import json
import os
import re
import zlib
from dataclasses import dataclass

import torch

MODEL_FILE = "model.pt"
META_FILE = "meta.json"
STEP_DIR = re.compile(r"^step_(\d{6,})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def _write_json(path: str, obj) -> None:
    # +inf (min_val_bpb before any eval) is valid Python JSON ("Infinity"), as in the reference's meta files.
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def save_rank_files(directory: str, rank: int, optim_state: dict, data_state, model_state: dict | None = None,
                    meta: dict | None = None) -> int:
    """Write this rank's part of a checkpoint into a local directory; the done file goes last. Returns the
    bytes written."""
    os.makedirs(directory, exist_ok=True)
    written = []
    if model_state is not None:
        torch.save(model_state, os.path.join(directory, MODEL_FILE))
        written.append(MODEL_FILE)
    if meta is not None:
        _write_json(os.path.join(directory, META_FILE), meta)
        written.append(META_FILE)
    torch.save(optim_state, os.path.join(directory, f"optim_rank{rank}.pt"))
    _write_json(os.path.join(directory, f"data_rank{rank}.json"), data_state)
    written += [f"optim_rank{rank}.pt", f"data_rank{rank}.json"]
    sizes = {name: os.path.getsize(os.path.join(directory, name)) for name in written}
    crcs = {name: file_crc32(os.path.join(directory, name)) for name in written}
    _write_json(os.path.join(directory, f"done_rank{rank}.json"), {"files": sizes, "crc32": crcs})
    return sum(sizes.values()) + os.path.getsize(os.path.join(directory, f"done_rank{rank}.json"))


def file_crc32(path: str) -> int:
    """CRC-32 of a file's bytes. Against bit rot, not an adversary: zlib's CRC is several times faster than
    a cryptographic hash and releases the GIL, so the writer thread pays little for it (docs/BENCHMARKS.md).
    Read back from the file just written (page cache), so the sum covers the bytes that reached the disk."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def read_meta(directory: str) -> dict:
    with open(os.path.join(directory, META_FILE)) as f:
        return json.load(f)


def check_complete(directory: str) -> str | None:
    """None when the checkpoint is complete and intact, else a sentence saying what is missing, truncated or
    corrupt (every file is read once for its checksum: ~0.4 s per GB)."""
    meta_path = os.path.join(directory, META_FILE)
    if not os.path.exists(meta_path):
        return f"{meta_path} is missing"
    try:
        meta = read_meta(directory)
    except (OSError, ValueError) as e:
        return f"{meta_path} is unreadable ({e})"
    for rank in range(meta.get("world_size", 1)):
        done_path = os.path.join(directory, f"done_rank{rank}.json")
        try:
            with open(done_path) as f:
                done = json.load(f)
            sizes, crcs = done["files"], done.get("crc32", {})  # no "crc32": written before checksums, sizes only
        except (OSError, ValueError, KeyError):
            return f"{done_path} is missing or unreadable: rank {rank} never finished writing"
        for name, size in sizes.items():
            path = os.path.join(directory, name)
            if not os.path.exists(path):
                return f"{path} is missing"
            if os.path.getsize(path) != size:
                return f"{path} has {os.path.getsize(path)} bytes, {size} were written: truncated"
        for name, crc in crcs.items():
            path = os.path.join(directory, name)
            if (found := file_crc32(path)) != crc:
                return f"{path} does not match its checksum (crc32 {found:08x}, {crc:08x} was written): corrupt"
    return None


def list_step_dirs(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every step_XXXXXX directory of a local run directory, oldest first."""
    found = []
    for path in glob.glob(os.path.join(run_dir, "step_*")):
        m = STEP_DIR.match(os.path.basename(path))
        if m and os.path.isdir(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def saved_num_slots(meta: dict) -> int:
    """The data slots (micro-batches per step) of the run that wrote `meta`; older checkpoints have no
    `num_slots` and always used world_size x grad_accum_steps."""
    return meta.get("num_slots") or meta.get("world_size", 1) * meta.get("grad_accum_steps", 1)


@dataclass
class RankState:
    """What one rank resumes from a checkpoint, already laid out for the current world size."""
    model: dict  # the model's state dict
    optimizer: dict  # this rank's optimizer state dict (a shard of DistMuonAdamW, or MuonAdamW's whole state)
    meta: dict
    data: list  # the state of each data slot this rank owns, in slot order


def load_rank_state(directory: str, rank: int, world_size: int, device, param_shapes: list[tuple] | None = None,
                    model_config: dict | None = None, num_slots: int | None = None) -> RankState:
    """Rank `rank` of `world_size`'s state from a complete checkpoint (raises with the reason otherwise). With
    `model_config` and `num_slots` (the training loop's), a checkpoint of another model or data layout is
    refused before any tensor is read (`check_compatible`).

    A checkpoint written by another world size (a rerun with another --num-workers, an elastic resize) is
    laid out anew: every rank's optimizer shard is read and this rank's cut from their union
    (raychat.optim.reshard; `param_shapes` is the optimizer's `param_shapes()`), and the data slots this rank
    now owns (raychat.common.slot_range) are taken from all ranks' slot states."""
    from raychat.common import slot_range
    from raychat.optim import reshard

    problem = check_complete(directory)
    if problem is not None:
        raise RuntimeError(f"checkpoint {directory} is incomplete: {problem}")
    meta = read_meta(directory)
    if model_config is not None:
        check_compatible(meta, model_config, num_slots, directory)
    saved_world = meta.get("world_size", 1)
    model_state = torch.load(os.path.join(directory, MODEL_FILE), map_location=device, weights_only=True)

    def optimizer_of(r, where):
        return torch.load(os.path.join(directory, f"optim_rank{r}.pt"), map_location=where, weights_only=True)

    def data_of(r):
        with open(os.path.join(directory, f"data_rank{r}.json")) as f:
            return json.load(f)

    if world_size == saved_world:
        return RankState(model_state, optimizer_of(rank, device), meta, data_of(rank))
    if param_shapes is None:
        raise ValueError(f"checkpoint {directory} was written by {saved_world} rank(s): laying it out for "
                         f"{world_size} needs the optimizer's param_shapes()")
    # On the CPU: the full state exists only while this rank's shard is cut from it.
    shards = [optimizer_of(r, "cpu") for r in range(saved_world)]
    slots = [slot for r in range(saved_world) for slot in data_of(r)]
    if len(slots) != saved_num_slots(meta):
        raise ValueError(f"checkpoint {directory} holds {len(slots)} data slot states, its meta.json says "
                         f"{saved_num_slots(meta)}: the checkpoint is damaged")
    return RankState(model_state, reshard(shards, param_shapes, rank, world_size), meta,
                     [slots[s] for s in slot_range(rank, world_size, len(slots))])


def check_compatible(meta: dict, model_config: dict, num_slots: int, where: str) -> None:
    """Refuse, loudly, a checkpoint this run cannot continue exactly. The world size may differ (the state is
    resharded, `load_rank_files`); the data slots (micro-batches per step) may not."""
    from raychat.model import RECIPE_OPTIONS

    saved = with_model_options(meta.get("model_config", {}))
    diffs = {k: (saved.get(k), v) for k, v in model_config.items() if saved.get(k) != v}
    if set(diffs) & set(RECIPE_OPTIONS["seed"]):  # the architecture itself: say which recipes
        raise ValueError(f"checkpoint {where} is a --recipe {recipe_of(saved)} model, this run trains --recipe "
                         f"{recipe_of(model_config)}; use the checkpoint's recipe or a new --run-name")
    if diffs:
        desc = ", ".join(f"{k}: checkpoint {a!r} vs this run {b!r}" for k, (a, b) in diffs.items())
        raise ValueError(f"checkpoint {where} is from another model ({desc}); use the same model flags or a "
                         "new --run-name")
    if saved_num_slots(meta) != num_slots:
        raise ValueError(f"checkpoint {where} read {saved_num_slots(meta)} micro-batches (data slots) per step, "
                         f"this run {num_slots}: the data slots differ; keep --total-batch-size, "
                         "--device-batch-size and --max-seq-len as they were")


def with_model_options(model_config: dict) -> dict:
    """A saved model_config with the architecture options it predates filled in: checkpoints written before
    raychat had them (and nanochat 07c4dd4's) are the seed's model."""
    from raychat.model import RECIPE_OPTIONS

    return {**RECIPE_OPTIONS["seed"], **model_config}


def recipe_of(model_config: dict) -> str:
    """The recipe whose architecture a model_config is (raychat.model.RECIPE_OPTIONS)."""
    from raychat.model import RECIPE_OPTIONS

    config = with_model_options(model_config)
    for recipe, options in RECIPE_OPTIONS.items():
        if all(config[k] == v for k, v in options.items()):
            return recipe
    raise ValueError(f"model options {({k: config[k] for k in RECIPE_OPTIONS['seed']})} are no recipe's "
                     f"architecture ({', '.join(RECIPE_OPTIONS)})")


# ----------------------------------------------------------------------------------------------------
# nanochat's layout (model_XXXXXX.pt, meta_XXXXXX.json), for interchange in both directions.
# nanochat's GPTConfig has only the fields below; its version tells the architecture: a 92d63d4 model (the
# 2026-07 recipe) has smear and backout parameters in its state dict, a 07c4dd4 one (the seed) has not.

NANOCHAT_CONFIG_KEYS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "window_pattern")


def export_nanochat(out_dir: str, step: int, model_state: dict, meta: dict) -> list[str]:
    """Write a model in the layout of the nanochat that trains its recipe (07c4dd4 for the seed, 92d63d4 for
    2026-07) so that nanochat's own tools load it."""
    recipe_of(meta["model_config"])  # refuses a model no nanochat version can build
    os.makedirs(out_dir, exist_ok=True)
    model_path = os.path.join(out_dir, f"model_{step:06d}.pt")
    meta_path = os.path.join(out_dir, f"meta_{step:06d}.json")
    torch.save(model_state, model_path)
    nanochat_meta = {
        "step": step,
        "val_bpb": meta.get("val_bpb"),
        "model_config": {k: meta["model_config"][k] for k in NANOCHAT_CONFIG_KEYS},
        "user_config": meta.get("user_config", {}),
        "device_batch_size": meta.get("device_batch_size"),
        "max_seq_len": meta.get("max_seq_len"),
        "total_batch_size": meta.get("total_batch_size"),  # 92d63d4 records the (possibly automatic) batch
        "dataloader_state_dict": None,  # raychat's exact data state has no nanochat equivalent
        "loop_state": meta.get("loop_state", {}),
    }
    _write_json(meta_path, nanochat_meta)
    return [model_path, meta_path]


def find_nanochat_step(directory: str) -> int:
    steps = [int(m.group(1)) for p in glob.glob(os.path.join(directory, "model_*.pt"))
             if (m := re.match(r"model_(\d+)\.pt$", os.path.basename(p)))]
    if not steps:
        raise FileNotFoundError(f"no nanochat checkpoint (model_XXXXXX.pt) in {directory}")
    return max(steps)


def load_nanochat_model(directory: str, step: int | None = None, device="cpu") -> tuple[dict, dict]:
    """(model_state, meta) of a nanochat base checkpoint (07c4dd4's or 92d63d4's), converted as the reference's
    build_model does: `_orig_mod.` prefixes stripped, bf16 tensors upcast off CUDA, missing lambdas patched; the
    model_config gets the architecture options of the nanochat version that wrote it."""
    step = find_nanochat_step(directory) if step is None else step
    model_path = os.path.join(directory, f"model_{step:06d}.pt")
    meta_path = os.path.join(directory, f"meta_{step:06d}.json")
    for path in (model_path, meta_path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"nanochat checkpoint file {path} is missing")
    state = torch.load(model_path, map_location=device, weights_only=True)
    with open(meta_path) as f:
        meta = json.load(f)
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    if torch.device(device).type != "cuda":
        state = {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in state.items()}
    n_layer = meta["model_config"]["n_layer"]
    ref = state["transformer.wte.weight"]
    state.setdefault("resid_lambdas", torch.ones(n_layer, device=ref.device))
    state.setdefault("x0_lambdas", torch.zeros(n_layer, device=ref.device))
    meta["model_config"].setdefault("window_pattern", "L")
    from raychat.model import RECIPE_OPTIONS

    recipe = "2026-07" if "smear_lambda" in state else "seed"
    meta["model_config"].update(RECIPE_OPTIONS[recipe])
    return state, meta
