"""`python -m raychat.train`: nanochat's base_train as a Ray Train job.

    python -m raychat.train --depth 4 ...                  # a local Ray started here (the embedded default)
    ray job submit --working-dir . -- python -m raychat.train --run-name d24-speedrun ...   # on a cluster

The driver parses one TrainConfig, checks everything it can before any worker starts (flags, tokenizer,
shards, batch divisibility, GPUs, a checkpoint it would resume), then hands the per-worker loop
(raychat.loop) to a TorchTrainer. Rerunning with the same --run-name resumes the run.
"""
import dataclasses
import datetime
import os
import sys
import uuid

from raychat.config import TrainConfig, derive, parse_args

# What workers need in their environment; forwarded only when set, never secrets (those travel through the
# job's runtime_env, see docs/CLUSTER.md).
_FORWARD_ENV = ("RAYCHAT_BASE_DIR", "WANDB_MODE", "WANDB_PROJECT", "TORCHINDUCTOR_CACHE_DIR", "OMP_NUM_THREADS",
                "RAY_DATA_USE_DATASOURCE_V2")


def preflight(cfg: TrainConfig):
    """Everything that can fail cheaply fails here, before the cluster does any work. Returns the plan."""
    from raychat import checkpoint as ckpt_files
    from raychat.data.shards import split_shards, validate_shard
    from raychat.data.stream import inspect_files
    from raychat.session import resume_checkpoint
    from raychat.tokenizer import TOKENIZER_FILE, Tokenizer

    # Both tokenizer files must load here: missing or corrupt, every worker would fail and be retried.
    files = read_tokenizer_files(cfg.tokenizer_dir)
    where = f"{cfg.tokenizer_dir}/{TOKENIZER_FILE}"
    try:
        tokenizer = Tokenizer.from_bytes(files[TOKENIZER_FILE], where=where)
    except ValueError:
        raise
    except Exception as e:  # a truncated or foreign pickle raises UnpicklingError, EOFError, ...
        raise ValueError(f"{where} cannot be loaded ({type(e).__name__}: {e}): it is corrupt or not a tokenizer; "
                         "retrain it with `python -m scripts.tok_train`") from e
    train_files, val_file = split_shards(cfg.data_dir)
    for path in train_files[:1] + [val_file]:
        validate_shard(path)
    plan = derive(cfg, tokenizer.get_vocab_size(), cfg.num_workers)
    num_slots = cfg.num_workers * plan.grad_accum_steps
    most = max(inspect_files(train_files))
    if most < num_slots:
        raise ValueError(f"the training shards in {cfg.data_dir} have at most {most} row group(s) per file, fewer "
                         f"than the {num_slots} data slots (workers x accumulation steps) that each need their "
                         "own: use fewer workers or accumulation steps, or prepare the shards with a smaller "
                         "--rows-per-group")
    if cfg.init_from_nanochat:
        ckpt_files.find_nanochat_step(cfg.init_from_nanochat)
    with resume_checkpoint(cfg) as d:  # the checkpoint the workers will resume, checked against this run
        if d is not None:
            ckpt_files.check_compatible(ckpt_files.read_meta(d), plan.model_config, cfg.num_workers,
                                        plan.grad_accum_steps, d)
    if cfg.core_metric_every > 0:
        from raychat.core_eval import download_eval_bundle

        download_eval_bundle(base_dir=cfg.base_dir)
    return plan


def _vocab_size_if_present(cfg: TrainConfig) -> int:
    from raychat.tokenizer import Tokenizer

    try:
        return Tokenizer.from_directory(cfg.tokenizer_dir).get_vocab_size()
    except (FileNotFoundError, OSError):
        return 32768  # the reference tokenizer's size


def _print_plan(cfg: TrainConfig, plan) -> int:
    print(f"Run {cfg.run_name}: {plan.num_iterations} steps, {cfg.num_workers} worker(s) x "
          f"{plan.grad_accum_steps} accumulation step(s), storage {cfg.storage_path}")
    for line in plan.lines:
        print("  " + line)
    return 0


def init_ray(cfg: TrainConfig):
    """Attach to the cluster when RAY_ADDRESS is set (ray job submit sets it), else start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()  # no resource arguments: they raise against an existing cluster (RAY_PRACTICE §4)
        return
    # The embedded default: size the local Ray to the machine, with room for the data actors. Logical CPUs
    # may exceed cores; the workers' torch threads are capped by --cpus-per-worker.
    # The dashboard (on 127.0.0.1 only) serves the Train view and the state API, which Ray Train's placement
    # group cleaner polls: without it every poll logs a warning.
    needed = cfg.num_workers * cfg.cpus_per_worker + (cfg.num_workers * cfg.data_actors + 1)
    ray.init(num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)), include_dashboard=True,
             dashboard_host="127.0.0.1")


def resolve_device(cfg: TrainConfig) -> TrainConfig:
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if cfg.use_gpu == "true" and gpus < cfg.num_workers:
        raise ValueError(f"--use-gpu true asks for {cfg.num_workers} GPUs but the Ray cluster has {gpus:g}; "
                         "use --use-gpu false to train on CPUs or add GPU nodes")
    use_gpu = cfg.use_gpu == "true" or (cfg.use_gpu == "auto" and gpus >= cfg.num_workers and gpus > 0)
    if cfg.device_type == "cuda" and not use_gpu:
        raise ValueError(f"--device-type cuda needs GPUs, and the Ray cluster has {gpus:g} for "
                         f"{cfg.num_workers} workers")
    return dataclasses.replace(cfg, use_gpu="true" if use_gpu else "false",
                               device_type="cuda" if use_gpu else (cfg.device_type or "cpu"))


def read_tokenizer_files(tokenizer_dir: str) -> dict:
    """The tokenizer's two small files as bytes (local path or s3://, gs://): workers and data actors on any
    node get the tokenizer with their config, so no node needs the directory."""
    import pyarrow.fs as pafs

    from raychat.tokenizer import TOKEN_BYTES_FILE, TOKENIZER_FILE

    fs, root = pafs.FileSystem.from_uri(tokenizer_dir if "://" in tokenizer_dir else os.path.abspath(tokenizer_dir))
    files = {}
    for name in (TOKENIZER_FILE, TOKEN_BYTES_FILE):
        try:
            with fs.open_input_stream(f"{root}/{name}") as f:
                files[name] = f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"{tokenizer_dir}/{name} is missing: train a tokenizer with "
                                    "`python -m scripts.tok_train` or pass --tokenizer-dir") from None
    return files


def build_trainer(cfg: TrainConfig, fit_id: str | None = None, run_config_extra: dict | None = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raychat.loop import train_loop_per_worker

    use_gpu = cfg.use_gpu == "true"
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    env = {k: os.environ[k] for k in _FORWARD_ENV if k in os.environ}
    # Worker prints go straight to stdout (Train's print patch would echo every line twice here), and the
    # step line is the progress report: no Ray Data progress bars for the internal token streams.
    env.update(RAY_TRAIN_ENABLE_PRINT_PATCH="0", RAY_DATA_DISABLE_PROGRESS_BARS="1",
               PYTORCH_ALLOC_CONF="expandable_segments:True")  # as the reference sets before importing torch
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": dataclasses.asdict(cfg), "fit_id": fit_id or uuid.uuid4().hex,
                           "tokenizer_files": read_tokenizer_files(cfg.tokenizer_dir)},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.run_name, storage_path=cfg.storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            worker_runtime_env={"env_vars": env}, **(run_config_extra or {})),
        # A hung collective should fail (and be retried) in minutes, not the default 30 (RAY_PRACTICE §1).
        torch_config=TorchConfig(timeout_s=600),
    )


def main(argv=None) -> int:
    try:
        cfg = parse_args(argv).resolve_paths()
        if cfg.run_name is None:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            cfg = dataclasses.replace(cfg, run_name=f"{cfg.tag}-{stamp}")
        if cfg.dry_run:
            # Parse and plan only: no data, tokenizer, storage or cluster is touched (the docs' commands are
            # checked this way). The vocabulary comes from the tokenizer when one is present.
            return _print_plan(cfg, derive(cfg, _vocab_size_if_present(cfg), cfg.num_workers))
        plan = preflight(cfg)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _print_plan(cfg, plan)

    init_ray(cfg)
    try:
        cfg = resolve_device(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from ray.train import TrainingFailedError

    from raychat.session import read_stop

    read_stop(cfg, remove=True)  # a rerun continues the run: an earlier stop no longer applies
    try:
        build_trainer(cfg).fit()
    except TrainingFailedError as e:
        print(f"error: training failed after {cfg.max_failures} automatic restart(s): {e}\n"
              f"Checkpoints are kept: rerun the same command (--run-name {cfg.run_name}) to resume.", file=sys.stderr)
        return 1
    stopped = read_stop(cfg)
    if stopped:
        print(f"error: training stopped: {stopped}", file=sys.stderr)
        return 1
    print(f"Done. Checkpoints and report in {cfg.storage_path.rstrip('/')}/{cfg.run_name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
