"""`python -m raychat.train`: nanochat's base_train as a Ray Train job.

    python -m raychat.train --depth 4 ...                  # a local Ray started here (the embedded default)
    ray job submit --working-dir . -- python -m raychat.train --run-name d24-speedrun ...   # on a cluster

The driver parses one TrainConfig, checks everything it can before any worker starts (flags, buckets,
tokenizer, shards, batch divisibility, GPUs, a checkpoint it would resume and the inputs it was trained on),
holds the run's lease (raychat.lease: one driver per run), then hands the per-worker loop (raychat.loop) to
a TorchTrainer. Rerunning with the same --run-name resumes the run.
"""
import dataclasses
import datetime
import os
import sys
import uuid

from raychat.config import TrainConfig, changed_settings, derive, describe_changes, parse_args
from raychat.inputs import read_tokenizer_files

# What workers need in their environment; forwarded only when set, never secrets (those travel through the
# job's runtime_env, see docs/CLUSTER.md). The storage endpoint and region go along so that the workers write
# to the very store the driver checked; credentials come from each node (its role) or the job's runtime_env.
_FORWARD_ENV = ("RAYCHAT_BASE_DIR", "WANDB_MODE", "WANDB_PROJECT", "TORCHINDUCTOR_CACHE_DIR", "OMP_NUM_THREADS",
                "RAY_DATA_USE_DATASOURCE_V2", "RAYCHAT_STORAGE_TRIES", "RAYCHAT_STORAGE_RETRY_S",
                "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
                "AWS_EC2_METADATA_DISABLED")


class PreflightError(ValueError):
    """Every problem preflight found, one per line: a dry run on a fresh machine names all that is missing."""

    def __init__(self, problems: list):
        self.problems = problems
        super().__init__(problems[0] if len(problems) == 1 else
                         f"{len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems))


def load_tokenizer(cfg: TrainConfig):
    """The run's tokenizer; both files must load here: missing or corrupt, every worker would fail and retry."""
    from raychat.tokenizer import TOKENIZER_FILE, Tokenizer

    files = read_tokenizer_files(cfg.tokenizer_dir)
    where = f"{cfg.tokenizer_dir}/{TOKENIZER_FILE}"
    try:
        return Tokenizer.from_bytes(files[TOKENIZER_FILE], where=where)
    except ValueError:
        raise
    except Exception as e:  # a truncated or foreign pickle raises UnpicklingError, EOFError, ...
        raise ValueError(f"{where} cannot be loaded ({type(e).__name__}: {e}): it is corrupt or not a tokenizer; "
                         "retrain it with `python -m scripts.tok_train`") from e


def check_shards(cfg: TrainConfig) -> list:
    """The training shards (the first and the validation shard read as parquet)."""
    from raychat.data.shards import split_shards, validate_shard

    train_files, val_file = split_shards(cfg.data_dir)
    for path in train_files[:1] + [val_file]:
        validate_shard(path)
    return train_files


def check_slots(cfg: TrainConfig, plan, train_files: list) -> None:
    from raychat.data.stream import inspect_files

    most = max(inspect_files(train_files))
    if most < plan.num_slots:
        raise ValueError(f"the training shards in {cfg.data_dir} have at most {most} row group(s) per file, fewer "
                         f"than the {plan.num_slots} data slots (workers x accumulation steps) that each need their "
                         "own: use fewer workers or accumulation steps, or prepare the shards with a smaller "
                         "--rows-per-group")


def check_storage(cfg: TrainConfig) -> None:
    """Each bucket the run reads or writes exists and takes these credentials (a local path is not checked)."""
    from raychat import storage

    problems = []
    for flag, path in (("--storage-path", cfg.storage_path), ("--data-dir", cfg.data_dir),
                       ("--tokenizer-dir", cfg.tokenizer_dir)):
        try:
            storage.check_access(path, flag)
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise PreflightError(problems)


def check_resume(cfg: TrainConfig, plan) -> None:
    """The checkpoint the workers will resume (if any), checked against this run: its model, data slots,
    trajectory settings and inputs (raychat.inputs)."""
    from raychat import checkpoint as ckpt_files
    from raychat.inputs import check_unchanged, fingerprint
    from raychat.runs import resume_checkpoint

    with resume_checkpoint(cfg) as d:
        if d is not None:
            meta = ckpt_files.read_meta(d)
            ckpt_files.check_compatible(meta, plan.model_config, plan.num_slots, d)
            check_settings_kept(cfg, meta, d)
            now = fingerprint(cfg.data_dir, read_tokenizer_files(cfg.tokenizer_dir))
            allowed = check_unchanged(meta, now, cfg.allowed_changes(), cfg.run_name, d)
            if allowed:
                print(f"Changed inputs from step {meta['step']} on (--allow-changed): {'; '.join(allowed.values())}")
            print(f"Run {cfg.run_name} resumes from step {meta['step']}")


def preflight(cfg: TrainConfig, resume: bool = True):
    """Everything that can fail cheaply fails here, before the cluster does any work: the tokenizer, the
    shards, the data slots, a nanochat checkpoint to start from and the checkpoint a rerun resumes
    (`resume=False` skips that: a sweep's trials are new runs). Collects every problem and raises them
    together as a PreflightError; returns the plan. --dry-run runs exactly this, and only this."""
    from raychat import checkpoint as ckpt_files

    check_storage(cfg)  # an unreachable bucket fails every check below, each after the SDK's retries
    problems = []

    def check(fn, *args):
        try:
            return fn(*args)
        except (ValueError, OSError, RuntimeError) as e:  # OSError: a missing file, an unreachable bucket
            problems.append(str(e))
            return None

    tokenizer = check(load_tokenizer, cfg)
    train_files = check(check_shards, cfg)
    # Without a tokenizer, plan with the reference's vocabulary so the batch and slot checks still run.
    vocab_size = tokenizer.get_vocab_size() if tokenizer is not None else 32768
    try:
        plan = derive(cfg, vocab_size, cfg.num_workers)
        for world_size in range(cfg.min_workers or cfg.num_workers, cfg.num_workers):
            derive(cfg, vocab_size, world_size)  # an elastic run may resize to any of these
    except ValueError as e:  # the flags themselves: the checks below need a plan
        raise PreflightError(problems + [str(e)]) from None
    if train_files is not None:
        check(check_slots, cfg, plan, train_files)
    if cfg.init_from_nanochat:
        check(ckpt_files.find_nanochat_step, cfg.init_from_nanochat)
    if resume:
        check(check_resume, cfg, plan)
    if cfg.core_metric_every > 0 and not cfg.dry_run:  # a dry run touches no network: the run downloads it
        from raychat.core_eval import download_eval_bundle

        check(download_eval_bundle, cfg.base_dir)
    if problems:
        raise PreflightError(problems)
    return plan


def check_settings_kept(cfg: TrainConfig, meta: dict, where: str) -> None:
    """A resumed run keeps the settings that define its trajectory (config.TRAJECTORY_SETTINGS), unless the
    user names the change with --allow-changed; the loop then records it in the run's history."""
    changes = changed_settings(meta.get("user_config", {}), cfg)
    refused = {k: v for k, v in changes.items() if k not in cfg.allowed_changes()}
    if refused:
        raise ValueError(f"run {cfg.run_name} would resume from step {meta['step']} ({where}) with other settings "
                         f"than it was trained with: {describe_changes(refused)}; rerun with the run's settings, or "
                         f"add --allow-changed {','.join(refused)} if the change is intended (it is recorded in the "
                         "run's history), or start a new --run-name")
    if changes:
        print(f"Changed settings from step {meta['step']} on (--allow-changed): {describe_changes(changes)}")


def _vocab_size_if_present(cfg: TrainConfig) -> int:
    from raychat.tokenizer import Tokenizer

    try:
        return Tokenizer.from_directory(cfg.tokenizer_dir).get_vocab_size()
    except (FileNotFoundError, OSError):
        return 32768  # the reference tokenizer's size


def _print_plan(cfg: TrainConfig, plan) -> int:
    workers = f"{cfg.min_workers}-{cfg.num_workers} worker(s) (elastic; at the most)" if cfg.min_workers else \
        f"{cfg.num_workers} worker(s)"
    print(f"Run {cfg.run_name}: {plan.num_iterations} steps, {workers} x "
          f"{plan.grad_accum_steps} accumulation step(s), storage {cfg.storage_path}")
    for line in plan.lines:
        print("  " + line)
    return 0


def cpus_needed(cfg: TrainConfig) -> float:
    """The logical CPUs a run holds: its workers, their Ray Data actors and the Train controller."""
    return cfg.num_workers * cfg.cpus_per_worker + (cfg.num_workers * cfg.data_actors + 1)


def resolve_device(cfg: TrainConfig) -> TrainConfig:
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    fewest = cfg.min_workers or cfg.num_workers  # an elastic run starts with as many as fit, at least MIN
    if cfg.use_gpu == "true" and gpus < fewest:
        raise ValueError(f"--use-gpu true asks for {fewest} GPUs but the Ray cluster has {gpus:g}; "
                         "use --use-gpu false to train on CPUs or add GPU nodes")
    use_gpu = cfg.use_gpu == "true" or (cfg.use_gpu == "auto" and gpus >= fewest and gpus > 0)
    if cfg.device_type == "cuda" and not use_gpu:
        raise ValueError(f"--device-type cuda needs GPUs, and the Ray cluster has {gpus:g} for "
                         f"{cfg.num_workers} workers")
    return dataclasses.replace(cfg, use_gpu="true" if use_gpu else "false",
                               device_type="cuda" if use_gpu else (cfg.device_type or "cpu"))


def build_trainer(cfg: TrainConfig, fit_id: str | None = None, run_config_extra: dict | None = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raychat import local_ray
    from raychat.device import process_env
    from raychat.inputs import fingerprint
    from raychat.loop import train_loop_per_worker

    use_gpu = cfg.use_gpu == "true"
    resources = {"CPU": cfg.cpus_per_worker or 1.0, **({"GPU": 1} if use_gpu else {})}  # 0 = auto: main resolves it
    env = {k: os.environ[k] for k in _FORWARD_ENV if k in os.environ}
    if cfg.min_workers:
        # Elastic (--num-workers MIN:MAX): Ray Train starts as many workers as the cluster holds (at least MIN),
        # restarts with fewer after a failure, and every RAYCHAT_RESIZE_CHECK_S seconds (Ray's default 60)
        # restarts a healthy group with more if more fit. Each restart resumes the newest checkpoint, resharded.
        scaling_config = ScalingConfig(num_workers=(cfg.min_workers, cfg.num_workers), use_gpu=use_gpu,
                                       resources_per_worker=resources,
                                       elastic_resize_monitor_interval_s=float(
                                           os.environ.get("RAYCHAT_RESIZE_CHECK_S", 60)))
    else:
        scaling_config = ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu, resources_per_worker=resources)
    # Worker prints go straight to stdout (Train's print patch would echo every line twice here), and the
    # step line is the progress report: no Ray Data progress bars for the internal token streams.
    env.update(RAY_TRAIN_ENABLE_PRINT_PATCH="0", RAY_DATA_DISABLE_PROGRESS_BARS="1")
    env.update(process_env(gpu_worker=use_gpu))  # the CUDA allocator's setting, one OpenMP thread per GPU worker
    tokenizer_files = read_tokenizer_files(cfg.tokenizer_dir)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": dataclasses.asdict(cfg), "fit_id": fit_id or uuid.uuid4().hex,
                           "tokenizer_files": tokenizer_files,
                           "inputs": fingerprint(cfg.data_dir, tokenizer_files)},
        scaling_config=scaling_config,
        run_config=RunConfig(
            name=cfg.run_name, storage_path=cfg.storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            worker_runtime_env={"env_vars": env}, **(run_config_extra or {})),
        # A hung collective should fail (and be retried) in minutes, not the default 30.
        torch_config=local_ray.torch_config(timeout_s=600),
    )


def main(argv=None) -> int:
    from raychat.lease import Lease
    from raychat.runs import run_dir

    lease = None
    try:
        try:
            cfg = parse_args(argv).resolve_paths()
            if cfg.run_name is None:
                stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
                cfg = dataclasses.replace(cfg, run_name=f"{cfg.tag}-{stamp}")
            if not cfg.dry_run:  # one driver per run, before anything reads the run's checkpoints
                check_storage(cfg)
                lease = Lease.acquire(run_dir(cfg), cfg.run_name)
            plan = preflight(cfg)
            if cfg.dry_run:  # the real launch's checks, all of them, and no cluster
                _print_plan(cfg, plan)
                print("Dry run: flags, tokenizer, shards, data slots and the checkpoint to resume are fine; "
                      "nothing was started.")
                return 0
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return run(cfg, plan)
    finally:
        if lease is not None:
            lease.release()


def run(cfg: TrainConfig, plan) -> int:
    """Start (or attach to) Ray and run the checked config to its end: the driver's exit code."""
    _print_plan(cfg, plan)
    from raychat import local_ray
    from raychat.common import available_cpus

    cfg = local_ray.resolve_auto(cfg, local=local_ray.is_embedded(), cpus=available_cpus())
    local_ray.init(cpus_needed(cfg))
    try:
        cfg = resolve_device(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from ray.train import TrainingFailedError

    from raychat.runs import prune_unreported, read_stop, repair_ray_snapshot, run_dir

    read_stop(cfg, remove=True)  # a rerun continues the run: an earlier stop no longer applies
    repair_ray_snapshot(cfg)  # Ray Train would refuse a run whose newest checkpoints were deleted
    try:
        build_trainer(cfg).fit()
    except (KeyboardInterrupt, SystemExit):
        # Ctrl-C: Ray Train's own SIGINT handler aborts the worker group and exits through SystemExit(0).
        print(f"error: interrupted; the checkpoints written so far are kept: rerun the same command (--run-name "
              f"{cfg.run_name}) to resume.", file=sys.stderr)
        return 130
    except TrainingFailedError as e:
        prune_unreported(cfg)
        print(f"error: training failed after {cfg.max_failures} automatic restart(s): {e}\n"
              f"Checkpoints are kept: rerun the same command (--run-name {cfg.run_name}) to resume.", file=sys.stderr)
        return 1
    prune_unreported(cfg)
    stopped = read_stop(cfg)
    if stopped:
        print(f"error: training stopped: {stopped}", file=sys.stderr)
        return 1
    print(f"Done. Checkpoints and report in {run_dir(cfg)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
