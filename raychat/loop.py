"""The per-worker training loop: nanochat's base_train, block for block, on one Ray Train worker.

Read it beside the reference script: setup (device, tokenizer and derived sizes, model, compile, optimizer,
resume, data), then `while True` over steps 0..N with eval -> CORE -> sample -> save -> (stop) -> train ->
log -> GC (docs/REFERENCE.md). Ray stays at the edges: the session gives rank, device and the checkpoint to
resume, and receives reports (raychat.session); checkpoints are written behind the steps (raychat.saver).
"""
import gc
import io
import math
import time
import uuid

import torch

from raychat.attention import attention_path
from raychat.checkpoint import check_compatible, load_nanochat_model, load_rank_state
from raychat.common import slot_range
from raychat.config import TrainConfig, derive
from raychat.device import DeviceContext
from raychat.faults import FaultInjector
from raychat.fp8 import check_device as check_fp8_device, fp8_disabled, to_fp8
from raychat.inputs import check_unchanged, fingerprint, read_tokenizer_files
from raychat.loop_state import LoopState
from raychat.runs import run_dir
from raychat.saver import CheckpointSaver
from raychat.schedules import apply_schedules
from raychat.tracking import init_wandb, start_profiler

SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]

# --compile auto compiles on CPU from this much forward+backward work per micro-batch (derive's
# num_flops_per_token x B x T): d4 at B 8 x T 256 is above it, the tests' tiny runs (~0.1-1 GFLOP) far below.
# Above it a compiled step wins back the cold compile within one run; below it the step is milliseconds and
# the compile would dominate (the measurements are in docs/LOG.md).
CPU_COMPILE_MIN_FLOPS = 20e9


def use_compile(cfg: TrainConfig, device_type: str, flops_per_micro_batch: float) -> bool:
    """--compile: torch.compile the model and the optimizer kernels (the reference compiles both everywhere)."""
    if cfg.compile != "auto":
        return cfg.compile == "true"
    return device_type == "cuda" or (device_type == "cpu" and flops_per_micro_batch >= CPU_COMPILE_MIN_FLOPS)


def build_optimizer(model, cfg: TrainConfig, plan, world_size: int, compile_kernels: bool,
                    compute_dtype: torch.dtype | None = None):
    """MuonAdamW over the model's parameter groups, ZeRO-2 sharded (DistMuonAdamW) across several workers.
    The learning rates scale with the batch size as derive() computed."""
    from raychat.optim import DistMuonAdamW, MuonAdamW

    s = plan.batch_lr_scale
    betas = {} if cfg.recipe != "seed" else {"adam_betas": (cfg.adam_beta1, cfg.adam_beta2)}
    groups = model.optimizer_groups(
        unembedding_lr=cfg.unembedding_lr * s, embedding_lr=cfg.embedding_lr * s, matrix_lr=cfg.matrix_lr * s,
        weight_decay=plan.weight_decay_scaled, scalar_lr=cfg.scalar_lr * s, recipe=cfg.recipe, **betas)
    ortho_dtype = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}[cfg.ortho_dtype]
    if ortho_dtype is None and compute_dtype is not None:
        ortho_dtype = compute_dtype  # the 2026-07 recipe orthogonalises in bf16 only when it computes in bf16
    return (DistMuonAdamW if world_size > 1 else MuonAdamW)(groups, ortho_dtype=ortho_dtype,
                                                            compile_kernels=compile_kernels, recipe=cfg.recipe)


def load_tokenizer(tokenizer_files: dict, device):
    """(tokenizer, token_bytes) from the tokenizer directory's files as bytes (raychat.inputs.read_tokenizer_files):
    the driver ships them with the config, so a node needs no tokenizer directory."""
    from raychat.tokenizer import TOKEN_BYTES_FILE, TOKENIZER_FILE, Tokenizer

    return (Tokenizer.from_bytes(tokenizer_files[TOKENIZER_FILE]),
            torch.load(io.BytesIO(tokenizer_files[TOKEN_BYTES_FILE]), map_location=device, weights_only=True))


def train(cfg: TrainConfig, session, fit_id: str | None = None, tokenizer_files: dict | None = None,
          inputs: dict | None = None) -> dict:
    """Train one worker's share. Returns the final metrics (rank 0's are the run's).

    `tokenizer_files` ({file name: bytes} of the tokenizer directory) replaces reading cfg.tokenizer_dir;
    `inputs`, the driver's fingerprint of shards and tokenizer (raychat.inputs), replaces computing it here."""
    from raychat.data.shards import split_shards
    from raychat.data.stream import SlotStreams, val_stream
    from raychat.engine import Engine
    from raychat.loss_eval import evaluate_bpb
    from raychat.model import GPT, GPTConfig
    from raychat.report import write_run_report

    cfg = session.resolve(cfg)  # the `auto` flags, as this kind of run resolves them
    fit_id = fit_id or uuid.uuid4().hex
    rank, world_size = session.rank, session.world_size
    master = rank == 0
    log = session.log

    # --- device, seeds, precision ---
    dev = DeviceContext.for_session(session, cfg.device_type, cfg.recipe, cfg.compute_dtype)
    device = dev.device
    if cfg.fp8:
        check_fp8_device(device)
    torch.manual_seed(42)  # the same seed on every rank: identical init, nothing broadcast
    if dev.type == "cuda":
        torch.cuda.manual_seed(42)
        log(f"GPU: {dev.name} | Peak FLOPS (BF16): {dev.peak_flops:.2e}")
    if dev.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))  # the workers share the node's cores
    wandb_run = init_wandb(cfg, master)

    # --- tokenizer, derived sizes, model ---
    tokenizer_files = tokenizer_files or read_tokenizer_files(cfg.tokenizer_dir)  # a directory or a bucket
    tokenizer, token_bytes = load_tokenizer(tokenizer_files, device)
    inputs = inputs or fingerprint(cfg.data_dir, tokenizer_files)
    plan = derive(cfg, tokenizer.get_vocab_size(), world_size)
    for line in plan.lines:
        log(line)
    with torch.device("meta"):
        model = GPT(GPTConfig(**plan.model_config))
    model.to_empty(device=device)
    model.init_weights(compute_dtype=dev.compute_dtype)
    if dev.compute_dtype is not None:
        log(f"Compute dtype: {str(dev.compute_dtype).removeprefix('torch.')} (--compute-dtype {cfg.compute_dtype})")
    if cfg.fp8:  # before compile; the same parameters, so the optimizer and state dict do not change
        converted, linears = to_fp8(model, cfg.fp8_recipe)
        log(f"FP8: {cfg.fp8_recipe} scaling in {converted} of {linears} Linears (the rest are narrower than 128 "
            "or not multiples of 16); evaluation and samples in bf16")
    attention = attention_path(model.window_sizes, cfg.max_seq_len, dev.type)
    log(f"Attention: {attention}")
    orig_model = model  # uncompiled: sampling, CORE and the saved state dict (no `_orig_mod.` keys)
    compile_ = use_compile(cfg, dev.type, plan.num_flops_per_token * cfg.device_batch_size * cfg.max_seq_len)
    if compile_:
        model = torch.compile(model, dynamic=False)
    optimizer = build_optimizer(orig_model, cfg, plan, world_size, compile_kernels=compile_,
                                compute_dtype=dev.compute_dtype)
    if dev.type == "cpu":
        log(f"CPU: {torch.get_num_threads()} thread(s) | compile: {compile_} | Muon orthogonalisation: "
            f"{str(optimizer.ortho_dtype_for(device)).removeprefix('torch.')}")

    # --- resume (a retry of this fit, --resume-from-step, or the run's newest checkpoint: runs.resume_checkpoint)
    # in this world size's layout, or start from a nanochat checkpoint ---
    B, T, S = cfg.device_batch_size, cfg.max_seq_len, plan.num_slots
    state, data_states = LoopState(), None
    with session.resume_checkpoint(cfg, fit_id) as resume_dir:
        if resume_dir is not None:
            saved = load_rank_state(resume_dir, rank, world_size, device, optimizer.param_shapes(),
                                    plan.model_config, S)
            check_unchanged(saved.meta, inputs, cfg.allowed_changes(), cfg.run_name, resume_dir)
            orig_model.load_state_dict(saved.model, strict=True)
            optimizer.load_state_dict(saved.optimizer)
            state, data_states = LoopState.from_meta(saved.meta, world_size, cfg, log), saved.data
            log(f"Resuming from step {state.step} ({resume_dir})")
            del saved
    if resume_dir is None and cfg.init_from_nanochat:
        weights, meta = load_nanochat_model(cfg.init_from_nanochat, device=device)
        check_compatible({**meta, "num_slots": S}, plan.model_config, S, cfg.init_from_nanochat)
        orig_model.load_state_dict(weights, strict=True)
        log(f"Initialised from nanochat checkpoint {cfg.init_from_nanochat} (step {meta['step']})")

    # --- data: one stream per data slot this rank owns (docs/ARCHITECTURE.md "slots") ---
    train_files, val_file = split_shards(cfg.data_dir)
    my_slots = slot_range(rank, world_size, S)
    streams = SlotStreams(train_files, tokenizer, B, T, my_slots, S, data_states, backend=cfg.data_backend,
                          actors=cfg.data_actors, to_device=dev.to_device)

    # --- what the loop reports and saves with ---
    N = plan.num_iterations
    eval_steps = cfg.eval_tokens // (B * T * world_size)
    flops_per_step = plan.num_flops_per_token * plan.total_batch_size
    faults = FaultInjector(cfg, rank, run_dir(cfg))
    saver = CheckpointSaver(session, run_dir(cfg), orig_model, optimizer, streams, faults, device, log)
    profiler = start_profiler(dev.type, run_dir(cfg)) if cfg.profile and master else None
    core_metric, mfu, stopped_reason = None, 0.0, None
    wait_s, wait_dt_s, wait_steps = 0.0, 0.0, 0  # data wait over this process's steps after step 10 (the report)

    while True:
        step = state.step
        last_step = step == N
        flops_so_far = flops_per_step * step
        metrics = {}

        # --- val bpb, all ranks ---
        if cfg.eval_every > 0 and (last_step or step % cfg.eval_every == 0):
            model.eval()
            # A fresh stream each time, so every evaluation sees the same batches (tokenized inline: it is
            # small, and starting an actor pool per evaluation would cost more).
            with val_stream(val_file, tokenizer, B, T, rank, world_size) as val_batches, dev.autocast(), \
                    fp8_disabled(orig_model):
                state.val_bpb = evaluate_bpb(model, (dev.to_device(vx, vy) for vx, vy in val_batches),
                                             eval_steps, token_bytes)
            log(f"Step {step:05d} | Validation bpb: {state.val_bpb:.6f}")
            state.min_val_bpb = min(state.min_val_bpb, state.val_bpb)
            state.record("val_bpb", state.val_bpb)
            wandb_run.log({"step": step, "total_training_flops": flops_so_far,
                           "total_training_time": state.total_training_time, "val/bpb": state.val_bpb})
            metrics["val_bpb"] = state.val_bpb
            model.train()

        # --- CORE, all ranks; never at step 0 ---
        if cfg.core_metric_every > 0 and (last_step or (step > 0 and step % cfg.core_metric_every == 0)):
            from raychat.core_eval import download_eval_bundle, evaluate_core

            model.eval()
            with fp8_disabled(orig_model):
                core_results = evaluate_core(orig_model, tokenizer, device, max_per_task=cfg.core_metric_max_per_task,
                                             bundle_dir=download_eval_bundle(cfg.base_dir),
                                             autocast_ctx=dev.autocast())
            core_metric = core_results["core_metric"]
            log(f"Step {step:05d} | CORE metric: {core_metric:.4f}")
            state.record("core_metric", core_metric)
            wandb_run.log({"step": step, "total_training_flops": flops_so_far, "core_metric": core_metric,
                           "centered_results": core_results["centered_results"]})
            metrics["core_metric"] = core_metric
            model.train()

        # --- samples, rank 0 only; the others go on and wait in the next collective ---
        if master and cfg.sample_every > 0 and (last_step or (step > 0 and step % cfg.sample_every == 0)):
            orig_model.eval()
            engine = Engine(orig_model, tokenizer)
            for prompt in SAMPLE_PROMPTS:
                tokens = tokenizer(prompt, prepend="<|bos|>")
                with dev.autocast(), fp8_disabled(orig_model):
                    sample, _ = engine.generate_batch(tokens, num_samples=1, max_tokens=16, temperature=0)
                log(tokenizer.decode(sample[0]))
            orig_model.train()

        # --- checkpoint, and the report to Ray, at the same steps on every rank ---
        save = last_step or (step > 0 and step != state.resume_step and cfg.save_every > 0
                             and step % cfg.save_every == 0)
        if save or metrics:
            last_loss = state.history["train_loss"][-1][1] if state.history["train_loss"] else float("nan")
            metrics.update(step=step, min_val_bpb=state.min_val_bpb, total_training_time=state.total_training_time,
                           train_loss=last_loss)
            if state.val_bpb is not None:
                metrics.setdefault("val_bpb", state.val_bpb)  # every report carries it: Tune's metric
            meta = None
            if save:
                meta = {"step": step, "val_bpb": state.val_bpb, "model_config": plan.model_config,
                        "user_config": cfg.user_config(), "device_batch_size": B, "max_seq_len": T,
                        "total_batch_size": plan.total_batch_size,
                        "world_size": world_size, "grad_accum_steps": plan.grad_accum_steps, "num_slots": S,
                        "fit_id": fit_id, "saved_at": time.time(), "inputs": inputs, **state.state_dict()}
            if (stopped_reason := saver.save_point(step, metrics, meta, last=last_step)) is not None:
                break

        if last_step:
            break

        # --- one training step: A micro-batches (this rank's slots), then the optimizer ---
        if profiler is not None:
            profiler.step()
        dev.synchronize()
        t0 = time.time()
        finite = torch.ones((), dtype=torch.bool, device=device)
        for micro_step, (x, y) in enumerate(streams.step_batches()):
            with dev.autocast():
                loss = faults.loss(model(x, y), step, micro_step)
            train_loss = loss.detach()  # QUIRK kept: the logged loss is rank 0's last micro-batch
            # Every micro-batch counts for the NaN check, not only the logged last one: one non-finite
            # micro-batch poisons the accumulated gradient. A device tensor, so no sync per micro-step.
            finite &= torch.isfinite(train_loss)
            # The optimizer averages over the W ranks, so each of the S micro-batches counts 1/S: divide by S/W
            # (exactly A when W divides S, the reference's loss / grad_accum_steps, bit for bit).
            (loss / (S / world_size)).backward()
            if micro_step == 0:
                faults.at(step, "kill")
        lrm = apply_schedules(optimizer, step, N, cfg, plan.weight_decay_scaled)
        non_finite = dev.any_rank(~finite)  # all-reduced on the device: nothing waits for it yet
        # A non-finite update is never applied under skip, which must read the flag before the update (a host
        # sync). Stop on CUDA reads it only at the loss's sync below, with the update queued: that update then
        # reaches only the weights in memory, which the stopping run never saves (a checkpoint's copy is taken
        # before it, in before_update). Elsewhere reading is free, and stop too skips the update.
        skip = (cfg.nan_policy == "skip" or not dev.asynchronous) and bool(non_finite.item())
        if skip and cfg.nan_policy == "skip":
            log(f"WARNING: non-finite loss at step {step}: update skipped (--nan-policy skip)")
        if not skip:
            saver.before_update()  # a checkpoint's copy of the weights must be taken before they change
            optimizer.step()
        model.zero_grad(set_to_none=True)
        train_loss_f = train_loss.item()
        if cfg.nan_policy == "stop" and non_finite.item():
            stopped_reason = f"loss became non-finite at step {step}; the last checkpoint is intact"
            log(f"ERROR: {stopped_reason}. Stopping (use --nan-policy skip to skip such steps).")
            break
        dev.synchronize()
        dt = time.time() - t0
        data_wait = streams.take_data_wait()  # of dt, the time spent waiting for batches (a stall when large)

        # --- logging ---
        if math.isfinite(train_loss_f):
            state.smooth_train_loss = 0.9 * state.smooth_train_loss + 0.1 * train_loss_f
        debiased = state.smooth_train_loss / (1 - 0.9 ** (step + 1))
        pct_done = 100 * step / N
        tok_per_sec = int(plan.total_batch_size / dt)
        mfu = 100 * flops_per_step / dt / (dev.peak_flops * world_size)
        if step > 10:
            state.total_training_time += dt  # steps 0-10 (compile warm-up) excluded, as the leaderboard counter
            wait_s, wait_dt_s, wait_steps = wait_s + data_wait, wait_dt_s + dt, wait_steps + 1
        total_time = state.total_training_time
        eta = f" | eta: {(N - step) * total_time / (step - 10) / 60:.1f}m" if step > 10 else ""
        log(f"step {step:05d}/{N:05d} ({pct_done:.2f}%) | loss: {debiased:.6f} | lrm: {lrm:.2f} | "
            f"dt: {dt * 1000:.2f}ms | tok/sec: {tok_per_sec:,} | mfu: {mfu:.2f} | epoch: {streams.epoch} | "
            f"total time: {total_time / 60:.2f}m{eta} | workers: {world_size} | data wait: {data_wait * 1000:.1f}ms")
        state.history["train_loss"].append([step, debiased])
        if step % 100 == 0:
            wandb_run.log({"step": step, "total_training_flops": flops_so_far, "total_training_time": total_time,
                           "train/loss": debiased, "train/lrm": lrm, "train/dt": dt, "train/tok_per_sec": tok_per_sec,
                           "train/mfu": mfu, "train/epoch": streams.epoch, "train/data_wait": data_wait})

        # --- GC: freeze and disable after the first step, collect every 5000 ---
        first_step = state.first_step_of_process
        state.step += 1
        if first_step:
            saver.reserve_buffers(state.step, cfg.save_every, N)
            gc.collect()
            gc.freeze()
            gc.disable()
        elif state.step % 5000 == 0:
            gc.collect()
        faults.at(state.step, "exit")
        # A checkpoint written behind the last steps is reported as soon as every rank has it in storage.
        if (stopped_reason := saver.poll(state.step)) is not None:
            break

    stopped_reason = saver.close(state.step) or stopped_reason  # the last step's checkpoint, or the last good one
    if profiler is not None:
        profiler.stop()
    streams.close()
    gc.enable()
    peak_mem_mib = dev.peak_memory_mib()
    log(f"Peak memory usage{dev.memory_label}: {peak_mem_mib:.2f}MiB")
    log(f"Total training time: {state.total_training_time / 60:.2f}m")
    if state.val_bpb is not None:
        log(f"Minimum validation bpb: {state.min_val_bpb:.6f}")
    summary = {
        "step": state.step, "num_iterations": N, "val_bpb": state.val_bpb, "min_val_bpb": state.min_val_bpb,
        "core_metric": core_metric, "mfu": mfu, "device_type": dev.type,
        "total_training_time": state.total_training_time, "total_training_flops": flops_per_step * state.step,
        "peak_memory_mib": peak_mem_mib, "attention": attention, "stopped": stopped_reason, "resizes": state.resizes,
        "setting_changes": state.setting_changes,
        "data_wait": {"per_step_s": wait_s / wait_steps, "share": wait_s / wait_dt_s} if wait_steps else None,
    }
    if stopped_reason is not None:
        # A clean return (not an exception): Ray would retry an exception, and a NaN would come back.
        if master:
            from raychat.runs import write_stop

            write_stop(cfg, stopped_reason)
        session.report({"step": state.step, "stopped": stopped_reason}, None, state.step)
    elif master:
        write_run_report(cfg, plan, summary, state.history)
    wandb_run.finish()
    return summary


def train_loop_per_worker(config: dict) -> None:
    """The Ray Train entry point: `config` is plain data built by the driver (raychat.train)."""
    from raychat.session import RayTrainSession

    cfg = TrainConfig.from_dict(config["cfg"])
    train(cfg, RayTrainSession(), fit_id=config["fit_id"], tokenizer_files=config.get("tokenizer_files"),
          inputs=config.get("inputs"))
