"""Checkpoint files: what a training checkpoint holds, how it is written, checked and read.

One checkpoint is one directory (Ray Train uploads it to `{storage}/{run_name}/step_{step:06d}/`):

    model.pt             rank 0: the model state dict (the reference's keys and dtypes, no `_orig_mod.`)
    meta.json            rank 0: step, configs, loop state, metrics history, world layout (spec §9 + more)
    optim_rank{r}.pt     every rank: its optimizer shard (spec §3.4; `load_rank_files` reshards them all
                         for another world size)
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
import copy
import glob
import json
import os
import re
import threading
import time
import zlib

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
    """CRC-32 of a file's bytes. Against bit rot, not an adversary: zlib's CRC runs at ~3.9 GB/s here (blake2b
    0.8, sha256 1.8) and releases the GIL, so it costs the writer thread ~0.4 s per GB (BENCHMARKS.md). Read
    back from the file just written (page cache), so the sum covers the bytes that reached the disk."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def _map_tensors(obj, fn, other=lambda v: v):
    """`obj` (nested dicts, lists, tuples) with `fn` applied to each tensor, in a fixed traversal order, and
    `other` to every other leaf."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn, other) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn, other) for v in obj)
    return other(obj)


def _detach(obj):
    """A copy of a state's containers and plain values, taken now; its tensors are still the live ones."""
    return _map_tensors(obj, torch.Tensor.detach, copy.deepcopy)


def _tensors(obj) -> list:
    found = []
    _map_tensors(obj, found.append)
    return found


class BackgroundWriter:
    """Writes a checkpoint on a thread, so that the training loop does not wait for it.

    `submit` copies the state's small parts and returns; the thread first *stages* the tensors (copies them
    into host buffers; from a GPU, a device-to-host copy into pinned memory on its own CUDA stream) and then
    writes the files. Until staging ends the live tensors must not change: the loop calls `wait_staged()` right
    before `optimizer.step()`, so staging overlaps the next forward and backward (which read the weights but do
    not write them) and the loop only waits if staging takes longer. `done()` says whether the files are written
    (the loop reports the checkpoint to Ray only then), `wait()` joins the thread and re-raises its error.
    One checkpoint at a time: `submit` first waits for the previous one.

    The host buffers are kept from one checkpoint to the next, and `reserve` allocates them ahead, on the
    thread: copying into memory already mapped is several times faster than into fresh pages (BENCHMARKS.md:
    d20's 9.2 GB copy on this CPU VM), at the price of holding a second copy of the state."""

    def __init__(self):
        self._thread = None
        self._staged = threading.Event()
        self._staged.set()
        self._error = None
        self._buffers = []
        self.timings = {}  # the last checkpoint's seconds from submit to staged and to written
        self.written_bytes = 0  # the last checkpoint's size on this rank

    def reserve(self, optim_state: dict, model_state: dict | None = None) -> None:
        """Allocate (and fault in) host buffers for a later `submit` of a state shaped like this one."""
        self.wait()
        tensors = _tensors((optim_state, model_state))
        self._start(lambda: self._buffers_for(tensors))

    def submit(self, directory: str, rank: int, optim_state: dict, data_state, model_state: dict | None = None,
               meta: dict | None = None, then=None, copy: bool = True) -> None:
        """`then()`, if given, runs on the thread once the files are written (to persist them to storage).
        copy=False writes the live tensors themselves (a GPU's through a plain device-to-host copy): for a state
        that nothing changes any more, the run's last checkpoint, so no second copy of it is held in memory."""
        self.wait()
        # The tensors' order here matches reserve()'s: optimizer, then model (data and meta hold none).
        state = (_detach(optim_state), _detach(data_state), _detach(model_state), _detach(meta))
        live = _tensors(state)
        device = next((t.device for t in live if t.is_cuda), None)
        ready = None
        if device is not None:  # the staging stream must wait for the kernels that produced the tensors
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(device))
        self._staged = staged = threading.Event()
        self.timings = timings = {}
        t0 = time.perf_counter()

        def stage():
            if not copy:
                return _map_tensors(state, lambda t: t.cpu())
            buffers = iter(self._buffers_for(live))
            return _map_tensors(state, lambda t: next(buffers).copy_(t, non_blocking=t.is_cuda))

        def run():
            try:
                if device is None:
                    snapshot = stage()
                else:
                    stream = torch.cuda.Stream(device=device)
                    stream.wait_event(ready)
                    with torch.cuda.stream(stream):
                        snapshot = stage()
                    stream.synchronize()
                timings["staged"] = time.perf_counter() - t0
            finally:
                staged.set()
            optim, data, model, meta_ = snapshot
            self.written_bytes = save_rank_files(directory, rank, optim, data, model_state=model, meta=meta_)
            if then is not None:
                then()
            timings["written"] = time.perf_counter() - t0

        self._start(run)

    def _buffers_for(self, tensors: list) -> list:
        """Host buffers for copies of `tensors`: the kept ones if they fit, else new ones (pinned for CUDA
        tensors), zero-filled so that their pages are mapped now rather than during a copy."""
        specs = [(t.shape, t.dtype, t.is_cuda) for t in tensors]
        if [(b.shape, b.dtype, b.is_pinned()) for b in self._buffers] != specs:
            self._buffers = []  # free the old ones first
            self._buffers = [torch.zeros(shape, dtype=dtype, pin_memory=pinned) for shape, dtype, pinned in specs]
        return self._buffers

    def _start(self, work) -> None:
        # A new thread starts on CUDA device 0: keep the writer on this rank's GPU (Ray shares
        # CUDA_VISIBLE_DEVICES between the workers of a node, so device 0 is another rank's).
        device = torch.cuda.current_device() if torch.cuda.is_initialized() else None

        def run():
            try:
                if device is not None:
                    torch.cuda.set_device(device)
                work()
            except BaseException as e:  # surfaced on the training thread by wait_staged() or wait()
                self._error = e

        self._thread = threading.Thread(target=run, name="raychat-checkpoint-writer", daemon=True)
        self._thread.start()

    def wait_staged(self) -> None:
        """Block until the state is copied (the live tensors may change after this); raise a staging error.
        An error while writing or persisting the files is left for `wait()` (the loop decides what it means)."""
        self._staged.wait()
        if "staged" not in self.timings:
            self._raise()

    def done(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"writing the checkpoint failed: {error}") from error


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


def load_rank_files(directory: str, rank: int, device,
                    world_size: int | None = None) -> tuple[dict, object, dict, list]:
    """(model_state, optim_state, meta, data_state) for rank `rank` of `world_size` (None: the writer's). Raises
    with the reason if incomplete.

    When `world_size` differs from the one that wrote the checkpoint (a rerun with another --num-workers, an
    elastic resize), every rank's files are read: `optim_state` is then the list of all the writer's optimizer
    shards, which `MuonAdamW.load_state_dict` reshards to this rank (raychat.optim.reshard), and `data_state`
    is the states of the slots this rank now owns (raychat.common.slot_range), cut from all ranks' slots."""
    problem = check_complete(directory)
    if problem is not None:
        raise RuntimeError(f"checkpoint {directory} is incomplete: {problem}")
    meta = read_meta(directory)
    saved_world = meta.get("world_size", 1)
    model_state = torch.load(os.path.join(directory, MODEL_FILE), map_location=device, weights_only=True)

    def data_of(r):
        with open(os.path.join(directory, f"data_rank{r}.json")) as f:
            return json.load(f)

    if world_size is None or world_size == saved_world:
        optim_state = torch.load(os.path.join(directory, f"optim_rank{rank}.pt"), map_location=device,
                                 weights_only=True)
        return model_state, optim_state, meta, data_of(rank)
    from raychat.common import slot_range

    # On the CPU: the full state exists only while this rank's shard is cut from it.
    optim_state = [torch.load(os.path.join(directory, f"optim_rank{r}.pt"), map_location="cpu", weights_only=True)
                   for r in range(saved_world)]
    slots = [slot for r in range(saved_world) for slot in data_of(r)]
    if len(slots) != saved_num_slots(meta):
        raise ValueError(f"checkpoint {directory} holds {len(slots)} data slot states, its meta.json says "
                         f"{saved_num_slots(meta)}: the checkpoint is damaged")
    return model_state, optim_state, meta, [slots[s] for s in slot_range(rank, world_size, len(slots))]


def check_compatible(meta: dict, model_config: dict, num_slots: int, where: str) -> None:
    """Refuse, loudly, a checkpoint this run cannot continue exactly. The world size may differ (the state is
    resharded, `load_rank_files`); the data slots (micro-batches per step) may not."""
    saved = meta.get("model_config", {})
    diffs = {k: (saved.get(k), v) for k, v in model_config.items() if saved.get(k) != v}
    if diffs:
        desc = ", ".join(f"{k}: checkpoint {a!r} vs this run {b!r}" for k, (a, b) in diffs.items())
        raise ValueError(f"checkpoint {where} is from another model ({desc}); use the same model flags or a "
                         "new --run-name")
    if saved_num_slots(meta) != num_slots:
        raise ValueError(f"checkpoint {where} read {saved_num_slots(meta)} micro-batches (data slots) per step, "
                         f"this run {num_slots}: the data slots differ; keep --total-batch-size, "
                         "--device-batch-size and --max-seq-len as they were")


# ----------------------------------------------------------------------------------------------------
# nanochat's layout (spec §9), for interchange in both directions


def export_nanochat(out_dir: str, step: int, model_state: dict, meta: dict) -> list[str]:
    """Write a model in the reference's layout so nanochat's own tools can load it."""
    os.makedirs(out_dir, exist_ok=True)
    model_path = os.path.join(out_dir, f"model_{step:06d}.pt")
    meta_path = os.path.join(out_dir, f"meta_{step:06d}.json")
    torch.save(model_state, model_path)
    nanochat_meta = {
        "step": step,
        "val_bpb": meta.get("val_bpb"),
        "model_config": meta["model_config"],
        "user_config": meta.get("user_config", {}),
        "device_batch_size": meta.get("device_batch_size"),
        "max_seq_len": meta.get("max_seq_len"),
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
    """(model_state, meta) of a nanochat base checkpoint, converted as the reference's build_model does:
    `_orig_mod.` prefixes stripped, bf16 tensors upcast off CUDA, missing lambdas patched."""
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
    return state, meta
