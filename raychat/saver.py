"""Saving checkpoints behind the training steps.

`BackgroundWriter` writes one rank's checkpoint files on a thread; `CheckpointSaver` is what the training loop
uses: at a save point it starts the write, and once every rank's files are in storage it reports the
checkpoint (with the step's metrics) to the launcher, so a checkpoint Ray knows of is always complete. A
storage error that a restart would meet again (a full or read-only disk) ends the run cleanly instead.
"""
import copy
import functools
import math
import os
import tempfile
import threading
import time
import weakref

import torch
import torch.distributed as dist

from raychat.checkpoint import save_rank_files
from raychat.common import all_reduce_value, any_rank
from raychat.storage import UNREACHABLE, StorageError, free_bytes


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


_ALIGN = 512  # bytes from one staging buffer's start to the next's: aligned for every dtype and for fast copies


def _host_buffers(specs: list, pinned: bool) -> list:
    """Zero-filled host tensors of the (shape, dtype)s in `specs`, carved from one allocation (page-locked
    when `pinned`). Each has a storage of its own over its part, so torch.save writes exactly its bytes, as
    for a tensor allocated alone."""
    sizes = [math.prod(shape) * dtype.itemsize for shape, dtype in specs]
    offsets, total = [], 0
    for nbytes in sizes:
        offsets.append(total)
        # An empty tensor gets a slot too: torch.save tells storages apart by where they start.
        total += -(-max(nbytes, 1) // _ALIGN) * _ALIGN
    block = torch.zeros(total, dtype=torch.uint8)  # zero-filled, so its pages are mapped now, not during a copy
    if pinned and total:
        _page_lock(block)
    storage = block.untyped_storage()
    return [torch.empty(0, dtype=dtype).set_(storage[o:o + n], 0, shape)
            for (shape, dtype), o, n in zip(specs, offsets, sizes)]


def _page_lock(block: torch.Tensor) -> None:
    """Page-lock `block`'s memory for CUDA's copies until its storage is freed (torch's own checkpoint stager
    does the same). Not torch's pinned allocator: it rounds every allocation up to a power of two, so one
    9.2 GB block would lock 16 GB."""
    cudart, ptr = torch.cuda.cudart(), block.data_ptr()
    torch.cuda.check_error(cudart.cudaHostRegister(ptr, block.nbytes, 1))  # 1: portable, for every CUDA context
    unlock = weakref.finalize(block.untyped_storage(), cudart.cudaHostUnregister, ptr)  # the views keep it alive
    unlock.atexit = False  # never after CUDA has shut down


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
        self._buffers, self._layout = [], None
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
        """Host buffers for copies of `tensors`: the kept ones if they fit, else new ones carved from one
        block of memory (page-locked for CUDA tensors)."""
        layout = ([(t.shape, t.dtype) for t in tensors], any(t.is_cuda for t in tensors))
        if layout != self._layout:
            self._buffers, self._layout = [], None  # free the old ones first
            self._buffers, self._layout = _host_buffers(*layout), layout
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


class CheckpointSaver:
    """The loop's checkpoints and reports, every rank at the same steps (a report is a collective).

        saver.save_point(step, metrics, meta)   at an eval or save step: report the metrics, and with `meta`
                                                start writing this step's checkpoint behind the next steps
        saver.before_update()                   before optimizer.step(): the weights may change after it
        saver.poll(step)                        each step: report a written checkpoint without waiting for one
        saver.close(step)                       at the end: wait for the last one; why the run stopped, if it did

    `save_point`, `poll` and `close` return None, or the reason to stop when a checkpoint could not be
    persisted for a lasting reason (a restart would resume an older step and meet the same error)."""

    def __init__(self, session, run_dir: str, model, optimizer, streams, faults, device, log):
        self.session, self.run_dir, self.device, self.log = session, run_dir, device, log
        self.model, self.optimizer, self.streams, self.faults = model, optimizer, streams, faults
        self.master = session.rank == 0
        self.writer = BackgroundWriter()
        self._pending = None  # (metrics, local checkpoint dir or None, its step): the next report
        self._reserved = False

    def save_point(self, step: int, metrics: dict, meta: dict | None = None, last: bool = False) -> str | None:
        if (stop := self._flush(step)) is not None:  # one report in flight at a time
            return stop
        checkpoint_dir = None
        if meta is not None:
            checkpoint_dir = tempfile.mkdtemp(prefix="raychat-ckpt-")
            # The last checkpoint is written from the live tensors: nothing trains after it, so the run holds
            # one copy of its state, as the reference does.
            self.writer.submit(checkpoint_dir, self.session.rank, self.optimizer.state_dict(),
                               self.streams.state_dict(), model_state=self.model.state_dict() if self.master else None,
                               meta=meta if self.master else None,
                               then=functools.partial(self._persist, checkpoint_dir, step), copy=not last)
        self._pending = (metrics, checkpoint_dir, step)
        return None

    def before_update(self) -> None:
        self.writer.wait_staged()

    def poll(self, step: int) -> str | None:
        return self._flush(step, block=False)

    def close(self, step: int) -> str | None:
        return self._flush(step)

    def reserve_buffers(self, step: int, save_every: int, num_iterations: int) -> None:
        """Once, after the first step (the optimizer's state exists from then on): allocate the host buffers of
        the checkpoints' copies behind the next steps, since copying into memory already mapped is what keeps a
        save's pause short. Only when a checkpoint comes before the last step, which is written uncopied."""
        if self._reserved:
            return
        self._reserved = True
        if save_every > 0 and (step // save_every + 1) * save_every < num_iterations:
            self.writer.reserve(self.optimizer.state_dict(), self.model.state_dict() if self.master else None)

    def _persist(self, checkpoint_dir: str, step: int) -> None:
        """On the writer thread, once the files are written locally: copy them to storage."""
        self.faults.at(step, "kill-in-checkpoint")
        self.session.persist(checkpoint_dir, step)

    def _flush(self, step: int, block: bool = True) -> str | None:
        """Report the pending metrics and checkpoint once its files are in storage on every rank. The ranks
        agree (one tiny all-reduce) on whether to report now; with block=False a write still running on any
        rank defers the report to a later step."""
        if self._pending is None:
            return None
        metrics, checkpoint_dir, saved_step = self._pending
        if not block and checkpoint_dir is not None and any_rank(not self.writer.done(), self.device):
            return None
        self._pending = None
        lasting, why = 0, None
        try:
            self.writer.wait()
        except RuntimeError as e:
            if not isinstance(e.__cause__, StorageError):
                raise  # anything else: Ray Train restarts the group from the newest checkpoint
            lasting, why = e.__cause__.errno, str(e.__cause__)
        if checkpoint_dir is not None:
            if errno_ := int(all_reduce_value(lasting, self.device, dist.ReduceOp.MAX)):  # on any rank
                return self._storage_failure(saved_step, errno_, why)
            w = self.writer.timings
            self.log(f"Checkpoint of step {saved_step:05d}: copied in {w['staged']:.2f}s and written in "
                     f"{w['written']:.2f}s on a thread, reported at step {step:05d}")
        self.session.report(metrics, checkpoint_dir, saved_step)
        return None

    def _storage_failure(self, step: int, errno_: int, why: str | None) -> str:
        """Every rank's writer is done: remove the step's partial directory (on a storage that answers) and say
        what went wrong. `why` is this rank's own StorageError, if it had one."""
        needed = all_reduce_value(self.writer.written_bytes, self.device, dist.ReduceOp.SUM)
        if self.master and errno_ != UNREACHABLE:  # a store that kept failing would fail this too
            self.session.discard(step)
        if errno_ == UNREACHABLE:  # the storage kept failing through every retry (raychat.storage.with_retries)
            reason = (f"the checkpoint of step {step} could not be saved to {self.run_dir}: "
                      f"{why or 'the storage kept failing on another rank'}. The older checkpoints are intact and "
                      "this step's partial files are never taken for a checkpoint: check that the storage is "
                      "reachable (endpoint, network, credentials), then rerun to resume")
            self.log(f"ERROR: {reason}")
            return reason
        free = free_bytes(self.run_dir)
        mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
        reason = (f"the checkpoint of step {step} could not be saved to {self.run_dir}: {os.strerror(errno_)}; "
                  f"it needs {mib(needed)}" + ("" if free is None else f" and {mib(free)} are free there") +
                  ". Its partial files were removed and the older checkpoints are intact: free space or pass another "
                  "--storage-path, then rerun to resume")
        self.log(f"ERROR: {reason}")
        return reason
