"""The per-worker training loop: nanochat's base_train, block for block, on one Ray Train worker.

Read it beside the seed script: setup (device, tokenizer, derived sizes, model, resume, compile, optimizer,
data), then `while True` over steps 0..N with eval -> CORE -> sample -> save -> (stop) -> train -> log, as
spec §1.3. Ray appears only through the session (resume checkpoint at the top, report at save points).
"""
import functools
import gc
import io
import math
import os
import tempfile
import signal
import time
import uuid
from contextlib import nullcontext

import torch
import torch.distributed as dist

from raychat import checkpoint as ckpt_files
from raychat.common import autodetect_device_type, available_cpus, get_peak_flops, slot_range
from raychat.config import TrainConfig, changed_settings, derive
from raychat.schedules import lr_multiplier, muon_momentum, muon_weight_decay
from raychat.session import StorageError, free_bytes, new_checkpoint_dir, run_dir

SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]


class _NoWandb:
    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


def _init_wandb(cfg: TrainConfig, master: bool):
    if cfg.run == "dummy" or not master:
        return _NoWandb()
    import wandb

    # A fixed id derived from the run name continues one W&B run across restarts (RAY_PRACTICE §5).
    run_id = uuid.uuid5(uuid.NAMESPACE_URL, f"raychat/{cfg.run_name}").hex[:16]
    return wandb.init(project="raychat", name=cfg.run, id=run_id, resume="allow", config=cfg.user_config())


def _reduce_over_ranks(value: float, device, op) -> float:
    """`value` all-reduced with `op` (dist.ReduceOp); every rank must call it."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.item()


def _all_ranks_agree(flag: bool, device) -> bool:
    """True if `flag` holds on any rank (a MAX all-reduce); every rank must call it."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _start_profiler(cfg: TrainConfig, device_type: str):
    """--profile: a PyTorch profiler trace of steps 2-4 of this run on rank 0, as Chrome trace JSON in the run
    directory (`profile_rank0.json`, open it in https://ui.perfetto.dev or chrome://tracing)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device_type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    out = run_dir(cfg)

    def save(prof):
        import pyarrow.fs as pafs

        local = os.path.join(tempfile.mkdtemp(), "profile_rank0.json")
        prof.export_chrome_trace(local)
        fs, path = pafs.FileSystem.from_uri(out if "://" in out else os.path.abspath(out))
        fs.create_dir(path, recursive=True)
        pafs.copy_files(local, f"{path}/profile_rank0.json", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)
        print(f"Wrote profiler trace {out}/profile_rank0.json", flush=True)

    prof = torch.profiler.profile(activities=activities, record_shapes=True, with_stack=False,
                                  schedule=torch.profiler.schedule(wait=1, warmup=1, active=3, repeat=1),
                                  on_trace_ready=save)
    prof.start()
    return prof


def _record(series: list, step: int, value: float) -> None:
    """Append (step, value); a resumed run re-evaluates its resume step, which replaces the saved entry."""
    while series and series[-1][0] >= step:
        series.pop()
    series.append([step, value])


# --compile auto compiles on CPU from this much forward+backward work per micro-batch (6 x params x tokens plus
# attention, derive's num_flops_per_token): d4 at B 8 x T 256 is 85 GFLOP, the tests' tiny runs ~0.1-1. At d4
# on 2 cores compiling made a step ~2x faster, after ~100 s of cold compile (seconds from a warm cache,
# docs/LOG.md); at the tests' sizes the step is milliseconds and the compile would dominate the suite.
CPU_COMPILE_MIN_FLOPS = 20e9


def use_compile(cfg: TrainConfig, device_type: str, flops_per_micro_batch: float) -> bool:
    """--compile: torch.compile the model and the optimizer kernels (the reference compiles both everywhere)."""
    if cfg.compile != "auto":
        return cfg.compile == "true"
    return device_type == "cuda" or (device_type == "cpu" and flops_per_micro_batch >= CPU_COMPILE_MIN_FLOPS)


def cpu_threads(cfg: TrainConfig) -> int:
    """Torch threads of a CPU worker: its --cpus-per-worker (resolved by the driver), or with 0 (a run without
    the driver, e.g. LocalSession) every CPU this process may run on."""
    if cfg.cpus_per_worker > 0:
        return max(1, int(cfg.cpus_per_worker))
    return available_cpus()


def _inject_failure(cfg: TrainConfig, rank: int, step: int, phase: str) -> None:
    """Fault injection for the reliability tests (docs/RELIABILITY.md): once per run (a marker file in the run
    directory), rank --debug-fail-rank dies at step --debug-fail-at-step in the phase --debug-fail-kind names:
    `exit` os._exit(1) at the start of the step; `kill` SIGKILL between backward and the optimizer step;
    `kill-in-checkpoint` SIGKILL after writing its checkpoint files locally, before they are persisted."""
    if (cfg.debug_fail_at_step, cfg.debug_fail_kind, cfg.debug_fail_rank) != (step, phase, rank):
        return
    marker = os.path.join(run_dir(cfg), f".injected_failure_step{step}")
    if not os.path.exists(marker):
        open(marker, "w").close()
        print(f"Injected failure: rank {rank} dies ({phase}) at step {step}", flush=True)
        if phase == "exit":
            os._exit(1)
        os.kill(os.getpid(), signal.SIGKILL)


def train(cfg: TrainConfig, session, fit_id: str | None = None, tokenizer_files: dict | None = None) -> dict:
    """Train one worker's share. Returns the final metrics (rank 0's are the run's).

    `tokenizer_files` ({file name: bytes} of the tokenizer directory) replaces reading cfg.tokenizer_dir."""
    from raychat.data.shards import split_shards
    from raychat.data.stream import PackedStream, val_stream
    from raychat.engine import Engine
    from raychat.loss_eval import evaluate_bpb
    from raychat.model import GPT, GPTConfig
    from raychat.report import write_run_report
    from raychat.tokenizer import TOKEN_BYTES_FILE, TOKENIZER_FILE, Tokenizer

    fit_id = fit_id or uuid.uuid4().hex
    rank, world_size = session.rank, session.world_size
    master = rank == 0
    log = session.log

    # --- device, seeds, precision (spec §1.1 items 1-2, §12.1) ---
    device_type = cfg.device_type or autodetect_device_type()
    device = session.device(device_type)
    torch.manual_seed(42)  # the same seed on every rank: identical init, nothing broadcast (spec §8)
    if device_type == "cuda":
        torch.cuda.manual_seed(42)
    autocast_ctx = torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16) if device_type == "cuda" else nullcontext()
    synchronize = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
    if device_type == "cuda":
        get_max_memory = torch.cuda.max_memory_allocated
    else:  # no allocator statistics: the process's peak resident set (ru_maxrss: KiB on Linux, bytes on macOS)
        import resource

        rss_unit = 1 if os.uname().sysname == "Darwin" else 1024
        get_max_memory = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * rss_unit  # noqa: E731
    peak_flops = get_peak_flops(torch.cuda.get_device_name(device)) if device_type == "cuda" else float("inf")
    if device_type == "cuda":
        log(f"GPU: {torch.cuda.get_device_name(device)} | Peak FLOPS (BF16): {peak_flops:.2e}")
    if device_type == "cpu":
        torch.set_num_threads(cpu_threads(cfg))  # workers share the node's cores
    wandb_run = _init_wandb(cfg, master)

    # --- tokenizer, derived sizes, model ---
    if tokenizer_files is not None:  # shipped by the driver: this node need not have the tokenizer directory
        tokenizer = Tokenizer.from_bytes(tokenizer_files[TOKENIZER_FILE])
        token_bytes = torch.load(io.BytesIO(tokenizer_files[TOKEN_BYTES_FILE]), map_location=device, weights_only=True)
    else:
        tokenizer = Tokenizer.from_directory(cfg.tokenizer_dir)
        token_bytes = torch.load(os.path.join(cfg.tokenizer_dir, TOKEN_BYTES_FILE), map_location=device,
                                 weights_only=True)
    plan = derive(cfg, tokenizer.get_vocab_size(), world_size)
    for line in plan.lines:
        log(line)
    with torch.device("meta"):
        model = GPT(GPTConfig(**plan.model_config))
    model.to_empty(device=device)
    model.init_weights()

    # --- resume (three ways, see RayTrainSession.resume_checkpoint) or start from a nanochat checkpoint ---
    resume = None
    with session.resume_checkpoint(cfg, fit_id) as resume_dir:
        if resume_dir is not None:
            # Written by another world size (a rerun with other --num-workers, an elastic resize): the loader
            # redistributes the optimizer shards and the slots' data states (docs/ARCHITECTURE.md).
            model_state, optim_state, meta, data_state = ckpt_files.load_rank_files(resume_dir, rank, device,
                                                                                   world_size)
            ckpt_files.check_compatible(meta, plan.model_config, plan.num_slots, resume_dir)
            resume = dict(optim=optim_state, meta=meta, data=data_state)
            model.load_state_dict(model_state, strict=True, assign=True)
            log(f"Resuming from step {meta['step']} ({resume_dir})")
            del model_state
    if resume is None and cfg.init_from_nanochat:
        state, meta = ckpt_files.load_nanochat_model(cfg.init_from_nanochat, device=device)
        ckpt_files.check_compatible({**meta, "num_slots": plan.num_slots}, plan.model_config, plan.num_slots,
                                    cfg.init_from_nanochat)
        model.load_state_dict(state, strict=True, assign=True)
        log(f"Initialised from nanochat checkpoint {cfg.init_from_nanochat} (step {meta['step']})")

    orig_model = model  # uncompiled: sampling, CORE and the saved state dict (no `_orig_mod.` keys)
    compile_ = use_compile(cfg, device_type, plan.num_flops_per_token * cfg.device_batch_size * cfg.max_seq_len)
    if compile_:
        model = torch.compile(model, dynamic=False)
    ortho_dtype = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}[cfg.ortho_dtype]
    if device_type == "cpu":
        from raychat.optim import default_ortho_dtype

        log(f"CPU: {torch.get_num_threads()} thread(s) | compile: {compile_} | Muon orthogonalisation: "
            f"{str(ortho_dtype or default_ortho_dtype(device)).removeprefix('torch.')}")

    s = plan.batch_lr_scale
    optimizer = orig_model.setup_optimizer(
        unembedding_lr=cfg.unembedding_lr * s, embedding_lr=cfg.embedding_lr * s, matrix_lr=cfg.matrix_lr * s,
        weight_decay=plan.weight_decay_scaled, adam_betas=(cfg.adam_beta1, cfg.adam_beta2),
        scalar_lr=cfg.scalar_lr * s, distributed=world_size > 1, ortho_dtype=ortho_dtype,
        compile_kernels=compile_)
    if resume is not None:
        optimizer.load_state_dict(resume["optim"])

    # --- data: one stream per slot this rank owns (docs/ARCHITECTURE.md "slots") ---
    # This rank runs one micro-batch per slot it owns: A of the step's S, fewer than the busiest rank's
    # plan.grad_accum_steps when the world size does not divide S.
    B, T, S = cfg.device_batch_size, cfg.max_seq_len, plan.num_slots
    my_slots = slot_range(rank, world_size, S)
    A = len(my_slots)
    train_files, val_file = split_shards(cfg.data_dir)
    data_states = resume["data"] if resume is not None else [None] * A
    # --data-backend auto is resolved by the driver (train.resolve_auto); unresolved here (LocalSession, a
    # Tune trial) it means Ray Data.
    streams = [PackedStream(train_files, tokenizer, B, T, slot=my_slots[a], num_slots=S,
                            state=data_states[a], backend="inline" if cfg.data_backend == "inline" else "ray",
                            actors=cfg.data_actors)
               for a in range(A)]

    def next_batch(a):
        x, y = next(streams[a])
        if device_type == "cuda":  # pinned, the copy queues behind the running backward instead of waiting for it
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def data_state_for_checkpoint():
        # Slot 0's next batch is already pulled (the prefetch below), so save the state from before it.
        return [held_state] + [st.state_dict() for st in streams[1:]]

    held_state = streams[0].state_dict()
    x, y = next_batch(0)

    # --- loop state ---
    N = plan.num_iterations
    if resume is None:
        step, val_bpb, min_val_bpb, smooth_train_loss, total_training_time = 0, None, float("inf"), 0.0, 0.0
        history = {"train_loss": [], "val_bpb": [], "core_metric": []}
        resizes = []
        setting_changes = []
    else:
        meta = resume["meta"]
        step, val_bpb = meta["step"], meta["val_bpb"]
        ls = meta["loop_state"]
        min_val_bpb, smooth_train_loss, total_training_time = ls["min_val_bpb"], ls["smooth_train_loss"], ls["total_training_time"]
        history = meta["history"]
        # Every change of world size, with the wall time since the checkpoint it resumed from was written
        # (the steps redone plus the restart), kept in meta.json and the report.
        resizes = list(meta.get("resizes", []))
        if meta["world_size"] != world_size:
            lost = time.time() - meta["saved_at"] if "saved_at" in meta else None
            resizes.append({"step": step, "from": meta["world_size"], "to": world_size,
                            "lost_s": None if lost is None else round(lost, 2)})
            log(f"Resized from {meta['world_size']} to {world_size} workers at step {step}"
                + ("" if lost is None else f" ({lost:.1f}s since that checkpoint was written)"))
        # Trajectory settings changed on this resume (the driver refused any not named by --allow-changed).
        setting_changes = list(meta.get("setting_changes", []))
        if changed := changed_settings(meta.get("user_config", {}), cfg):
            setting_changes.append({"step": step, "changed": changed})
    resume_step = step if resume is not None else -1
    eval_steps = cfg.eval_tokens // (B * T * world_size)
    core_metric = None
    mfu = 0.0
    flops_per_step = plan.num_flops_per_token * cfg.total_batch_size
    stopped_reason = None

    profiler = _start_profiler(cfg, device_type) if cfg.profile and master else None
    writer = ckpt_files.BackgroundWriter()
    pending_report = None

    def persist_checkpoint(checkpoint_dir, saved_step):
        """On the writer thread, once the files are written locally: copy them to storage."""
        _inject_failure(cfg, rank, saved_step, "kill-in-checkpoint")
        session.persist(checkpoint_dir, saved_step)

    def flush_report(block: bool = True) -> str | None:
        """Report the pending metrics and checkpoint to Ray once its files are in storage. Every rank calls this
        at the same steps and they agree (one tiny all-reduce) on whether to report now, because `report` is a
        collective; with block=False a write still running on some rank defers the report to a later step.
        Returns a reason to stop if the checkpoint could not be persisted for a lasting reason (the storage is
        full or read-only: a restart would resume an older step and meet the same error again)."""
        nonlocal pending_report
        if pending_report is None:
            return None
        metrics_, checkpoint_dir, saved_step = pending_report
        if not block and checkpoint_dir is not None and _all_ranks_agree(not writer.done(), device):
            return None
        pending_report = None
        lasting = 0
        try:
            writer.wait()
        except RuntimeError as e:
            if not isinstance(e.__cause__, StorageError):
                raise  # anything else: Ray Train restarts the group from the newest checkpoint
            lasting = e.__cause__.errno
        if checkpoint_dir is not None:
            if errno_ := int(_reduce_over_ranks(lasting, device, dist.ReduceOp.MAX)):  # on any rank
                return storage_failure(saved_step, errno_)
            w = writer.timings
            log(f"Checkpoint of step {saved_step:05d}: copied in {w['staged']:.2f}s and written in "
                f"{w['written']:.2f}s on a thread, reported at step {step:05d}")
        session.report(metrics_, checkpoint_dir, saved_step)
        return None

    def storage_failure(saved_step: int, errno_: int) -> str:
        """Every rank's writer is done: remove the step's partial directory and say what it needed."""
        needed = _reduce_over_ranks(writer.written_bytes, device, dist.ReduceOp.SUM)
        if master:
            session.discard(saved_step)
        free = free_bytes(run_dir(cfg))
        mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
        reason = (f"the checkpoint of step {saved_step} could not be saved to {run_dir(cfg)}: {os.strerror(errno_)}; "
                  f"it needs {mib(needed)}" + ("" if free is None else f" and {mib(free)} are free there") +
                  ". Its partial files were removed and the older checkpoints are intact: free space or pass another "
                  "--storage-path, then rerun to resume")
        log(f"ERROR: {reason}")
        return reason

    while True:
        if (stopped_reason := flush_report(block=False)) is not None:
            break
        last_step = step == N
        flops_so_far = flops_per_step * step
        metrics = {}

        # --- val bpb (spec §1.3 item 2), all ranks ---
        if cfg.eval_every > 0 and (last_step or step % cfg.eval_every == 0):
            model.eval()
            # A fresh stream each time, so every evaluation sees the same batches (tokenized inline: it is
            # small, and starting an actor pool per evaluation would cost more).
            with val_stream(val_file, tokenizer, B, T, rank, world_size) as val_batches, autocast_ctx:
                val_bpb = evaluate_bpb(model, ((vx.to(device), vy.to(device)) for vx, vy in val_batches),
                                       eval_steps, token_bytes)
            log(f"Step {step:05d} | Validation bpb: {val_bpb:.6f}")
            min_val_bpb = min(min_val_bpb, val_bpb)
            _record(history["val_bpb"], step, val_bpb)
            wandb_run.log({"step": step, "total_training_flops": flops_so_far,
                           "total_training_time": total_training_time, "val/bpb": val_bpb})
            metrics["val_bpb"] = val_bpb
            model.train()

        # --- CORE (item 3), all ranks; never at step 0 ---
        if cfg.core_metric_every > 0 and (last_step or (step > 0 and step % cfg.core_metric_every == 0)):
            from raychat.core_eval import download_eval_bundle, evaluate_core

            model.eval()
            core_results = evaluate_core(orig_model, tokenizer, device, max_per_task=cfg.core_metric_max_per_task,
                                         bundle_dir=download_eval_bundle(cfg.base_dir), autocast_ctx=autocast_ctx)
            core_metric = core_results["core_metric"]
            log(f"Step {step:05d} | CORE metric: {core_metric:.4f}")
            _record(history["core_metric"], step, core_metric)
            wandb_run.log({"step": step, "total_training_flops": flops_so_far, "core_metric": core_metric,
                           "centered_results": core_results["centered_results"]})
            metrics["core_metric"] = core_metric
            model.train()

        # --- samples (item 4), rank 0 only; the others go on and wait in the next collective ---
        if master and cfg.sample_every > 0 and (last_step or (step > 0 and step % cfg.sample_every == 0)):
            orig_model.eval()
            engine = Engine(orig_model, tokenizer)
            for prompt in SAMPLE_PROMPTS:
                tokens = tokenizer(prompt, prepend="<|bos|>")
                with autocast_ctx:
                    sample, _ = engine.generate_batch(tokens, num_samples=1, max_tokens=16, temperature=0)
                log(tokenizer.decode(sample[0]))
            orig_model.train()

        # --- checkpoint (item 5) and the report to Ray, at the same steps on every rank ---
        save = last_step or (step > 0 and step != resume_step and cfg.save_every > 0 and step % cfg.save_every == 0)
        if save or metrics:
            metrics.update(step=step, min_val_bpb=min_val_bpb, total_training_time=total_training_time,
                           train_loss=history["train_loss"][-1][1] if history["train_loss"] else float("nan"))
            if val_bpb is not None:
                metrics.setdefault("val_bpb", val_bpb)  # carried forward: every report has it (RAY_PRACTICE §3)
            # One report in flight at a time (only waits if checkpoints outpace their writes).
            if (stopped_reason := flush_report()) is not None:
                break
            checkpoint_dir = None
            if save:
                checkpoint_dir = new_checkpoint_dir()
                meta = {
                    "step": step, "val_bpb": val_bpb, "model_config": plan.model_config,
                    "user_config": cfg.user_config(), "device_batch_size": B, "max_seq_len": T,
                    "world_size": world_size, "grad_accum_steps": plan.grad_accum_steps, "num_slots": S,
                    "fit_id": fit_id, "saved_at": time.time(), "resizes": resizes, "setting_changes": setting_changes,
                    "loop_state": {"min_val_bpb": min_val_bpb, "smooth_train_loss": smooth_train_loss,
                                   "total_training_time": total_training_time},
                    "history": history,
                }
                writer.submit(checkpoint_dir, rank, optimizer.state_dict(), data_state_for_checkpoint(),
                              model_state=orig_model.state_dict() if master else None, meta=meta if master else None,
                              then=functools.partial(persist_checkpoint, checkpoint_dir, step), copy=not last_step)
            # Written behind the next steps (writer.wait_staged() below is the only wait), reported by
            # flush_report once written on every rank, or right after the loop at the last step.
            pending_report = (metrics, checkpoint_dir, step)

        if last_step:
            break

        # --- one training step (item 7) ---
        if profiler is not None:
            profiler.step()
        synchronize()
        t0 = time.time()
        finite = torch.ones((), dtype=torch.bool, device=device)
        for micro_step in range(A):
            with autocast_ctx:
                loss = model(x, y)
            if cfg.debug_fail_kind == "nan" and (step, micro_step, rank) == (cfg.debug_fail_at_step, 0, cfg.debug_fail_rank):
                loss = loss * float("nan")  # fault injection (docs/RELIABILITY.md), on every run with the flag
            train_loss = loss.detach()  # QUIRK kept: the logged loss is rank 0's last micro-batch (spec §1.3)
            # Every micro-batch counts for the NaN check, not only the logged last one: one non-finite
            # micro-batch poisons the accumulated gradient. A device tensor, so no sync per micro-step.
            finite &= torch.isfinite(train_loss)
            # The optimizer averages over the W ranks, so each of the S micro-batches counts 1/S: divide by S/W
            # (exactly A when W divides S, the reference's loss / grad_accum_steps, bit for bit).
            (loss / (S / world_size)).backward()
            if micro_step == 0:
                _inject_failure(cfg, rank, step, "kill")
            nxt = (micro_step + 1) % A
            if nxt == 0:
                held_state = streams[0].state_dict()
            x, y = next_batch(nxt)  # packed on the CPU while the accelerator runs the queued backward
        lrm = lr_multiplier(step, N, cfg.warmup_ratio, cfg.warmdown_ratio, cfg.final_lr_frac)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = muon_momentum(step)
                group["weight_decay"] = muon_weight_decay(step, N, plan.weight_decay_scaled)
        non_finite = _all_ranks_agree(not finite.item(), device)
        if non_finite and cfg.nan_policy == "stop":
            stopped_reason = f"loss became non-finite at step {step}; the last checkpoint is intact"
            log(f"ERROR: {stopped_reason}. Stopping (use --nan-policy skip to skip such steps).")
            break
        if non_finite:
            log(f"WARNING: non-finite loss at step {step}: update skipped (--nan-policy skip)")
        else:
            writer.wait_staged()  # a checkpoint's copy of the weights must be taken before they change
            optimizer.step()
        model.zero_grad(set_to_none=True)
        train_loss_f = train_loss.item()
        synchronize()
        dt = time.time() - t0

        # --- logging (item 8) ---
        if math.isfinite(train_loss_f):
            smooth_train_loss = 0.9 * smooth_train_loss + 0.1 * train_loss_f
        debiased = smooth_train_loss / (1 - 0.9 ** (step + 1))
        pct_done = 100 * step / N
        tok_per_sec = int(cfg.total_batch_size / dt)
        mfu = 100 * flops_per_step / dt / (peak_flops * world_size)
        if step > 10:
            total_training_time += dt  # steps 0-10 (compile warm-up) excluded, as the leaderboard counter
        eta = f" | eta: {(N - step) * total_training_time / (step - 10) / 60:.1f}m" if step > 10 else ""
        epoch = streams[0].epoch
        log(f"step {step:05d}/{N:05d} ({pct_done:.2f}%) | loss: {debiased:.6f} | lrm: {lrm:.2f} | "
            f"dt: {dt * 1000:.2f}ms | tok/sec: {tok_per_sec:,} | mfu: {mfu:.2f} | epoch: {epoch} | "
            f"total time: {total_training_time / 60:.2f}m{eta} | workers: {world_size}")
        history["train_loss"].append([step, debiased])
        if step % 100 == 0:
            wandb_run.log({"step": step, "total_training_flops": flops_so_far, "total_training_time": total_training_time,
                           "train/loss": debiased, "train/lrm": lrm, "train/dt": dt, "train/tok_per_sec": tok_per_sec,
                           "train/mfu": mfu, "train/epoch": epoch})

        # --- GC (item 9): freeze and disable after the first step, collect every 5000 ---
        first_step_of_run = step == 0 or step == resume_step
        step += 1
        if first_step_of_run:
            # Host buffers for the checkpoints' copies, allocated behind the next steps: the optimizer's state
            # exists from its first step, and copying into mapped memory is what keeps a save's pause short.
            # Only for a checkpoint before the last step: the last one is written uncopied (nothing trains after
            # it), so a run that saves only at its end holds one copy of the state, as the reference does.
            if cfg.save_every > 0 and (step // cfg.save_every + 1) * cfg.save_every < N:
                writer.reserve(optimizer.state_dict(), orig_model.state_dict() if master else None)
            gc.collect()
            gc.freeze()
            gc.disable()
        elif step % 5000 == 0:
            gc.collect()
        _inject_failure(cfg, rank, step, "exit")

    stopped_reason = flush_report() or stopped_reason  # the last step's checkpoint, or the last good one
    if profiler is not None:
        profiler.stop()
    for st in streams:
        st.close()
    gc.enable()
    peak_mem_mib = get_max_memory() / 1024 / 1024
    log(f"Peak memory usage{'' if device_type == 'cuda' else ' (host RSS)'}: {peak_mem_mib:.2f}MiB")
    log(f"Total training time: {total_training_time / 60:.2f}m")
    if val_bpb is not None:
        log(f"Minimum validation bpb: {min_val_bpb:.6f}")
    summary = {
        "step": step, "num_iterations": N, "val_bpb": val_bpb, "min_val_bpb": min_val_bpb,
        "core_metric": core_metric, "mfu": mfu, "device_type": device_type, "total_training_time": total_training_time,
        "total_training_flops": flops_per_step * step, "peak_memory_mib": peak_mem_mib, "stopped": stopped_reason,
        "resizes": resizes, "setting_changes": setting_changes,
    }
    if stopped_reason is not None:
        # A clean return (not an exception): Ray would retry an exception, and a NaN would come back.
        if master:
            from raychat.session import write_stop

            write_stop(cfg, stopped_reason)
        session.report({"step": step, "stopped": stopped_reason}, None, step)
    elif master:
        write_run_report(cfg, plan, summary, history)
    wandb_run.finish()
    return summary


def train_loop_per_worker(config: dict) -> None:
    """The Ray Train entry point: `config` is plain data built by the driver (raychat.train)."""
    from raychat.session import RayTrainSession

    cfg = TrainConfig.from_dict(config["cfg"])
    train(cfg, RayTrainSession(), fit_id=config["fit_id"], tokenizer_files=config.get("tokenizer_files"))

