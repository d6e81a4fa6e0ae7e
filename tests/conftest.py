"""Shared fixtures. Every test runs with a real local Ray whose traffic stays on 127.0.0.1 (the settings below)."""
import hashlib
import os
import tempfile

# Ray reads these when it starts: keep all traffic on 127.0.0.1, no token prompts, quick failure detection.
_TEST_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_DATA_USE_DATASOURCE_V2": "0",
    "OMP_NUM_THREADS": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",  # one machine: nothing to watch (raychat.local_ray.start)
}
for _k, _v in _TEST_ENV.items():
    os.environ.setdefault(_k, _v)
os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="raytmp"))
# Tests write only under tmp: the default base dir (~/.cache/raychat) is never touched, whatever is set.
os.environ["RAYCHAT_BASE_DIR"] = tempfile.mkdtemp(prefix="raychat-base-")

import pytest  # noqa: E402
import torch  # noqa: E402

from raychat import checkpoint as ckpt_files  # noqa: E402

torch.set_num_threads(1)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What pytest itself may add to the checkout's top level (its cache, bytecode).
_PYTEST_OWN = {".pytest_cache", "__pycache__"}


# The suite runs on two pytest-xdist workers (`-n 2 --dist loadfile`, pyproject), each with its own local Ray:
# about half of a Ray test's time is waiting (starts, health checks, restarts), which the other worker fills.
# A file's tests stay on one worker, so its module fixtures are built once (a session fixture, once per worker:
# tests sharing an expensive one live in one file). Files go out in collection order, so the longest (a minute
# or more each on 2 cores) go first: neither worker is then left alone with one of them at the end.
_LONGEST_FIRST = ["test_elastic.py", "test_reliability.py", "test_s3.py", "test_tune.py", "test_integrity.py",
                  "test_multinode.py", "test_s3_cluster.py", "test_export_eval.py"]


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return _LONGEST_FIRST.index(name) if name in _LONGEST_FIRST else len(_LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file keeps its own order


@pytest.fixture(scope="session", autouse=True)
def nothing_written_into_the_checkout():
    """Tests write only under tmp: the checkout's top level gains no entry during the session (a test that
    ran a documented command in the repository once left an empty `example/` there)."""
    before = set(os.listdir(REPO_ROOT))
    yield
    new = set(os.listdir(REPO_ROOT)) - before - _PYTEST_OWN
    assert not new, f"the tests wrote {sorted(new)} into the checkout {REPO_ROOT}; tests must write only under tmp"


# tinyshakespeare (public domain; 1.1 MB, shipped gzipped) is the test corpus: every test runs on a clone.
SHAKESPEARE_GZ = os.path.join(os.path.dirname(__file__), "data", "tinyshakespeare.txt.gz")


@pytest.fixture(scope="session")
def shakespeare_path(tmp_path_factory):
    """tinyshakespeare.txt, unpacked once per session into a temp dir (read-only by convention)."""
    import gzip

    path = tmp_path_factory.mktemp("corpus") / "tinyshakespeare.txt"
    with gzip.open(SHAKESPEARE_GZ, "rb") as f:
        path.write_bytes(f.read())
    return str(path)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (starting Ray costs ~5 s)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, object_store_memory=512 * 1024**2,
                 log_to_driver=True, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_data_dir(shakespeare_path, tmp_path_factory):
    """tinyshakespeare as shards (one paragraph per doc, 64-doc row groups): shard_00000..00004.parquet
    (~200k chars each) plus val.parquet (every 10th doc, 723 docs). Treat it as read-only."""
    from raychat.data.shards import prepare

    out = str(tmp_path_factory.mktemp("tiny_data"))
    prepare(shakespeare_path, out, rows_per_group=64, shard_chars=200_000, val_fraction=0.1, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(shakespeare_path, tmp_path_factory):
    """A tokenizer trained on all of tinyshakespeare to vocab 512 (<|bos|> = 503), saved with `save()`
    (tokenizer.pkl + exact token_bytes.pt). Load it with `Tokenizer.from_directory(dir)`; read-only."""
    from raychat.tokenizer import Tokenizer

    with open(shakespeare_path, encoding="utf-8") as f:
        text = f.read()
    tokenizer = Tokenizer.train_from_iterator(iter([text]), 512)
    out = str(tmp_path_factory.mktemp("tiny_tokenizer"))
    tokenizer.save(out)
    return out


# ----------------------------------------------------------------------------------------------------
# A tiny training run shared by the loop, training, reliability and export tests: depth 2, 16 steps, 2
# micro-batches (data slots) per step, evaluation every 8 steps, checkpoints every 4. A baseline is the
# uninterrupted run every resumed run must equal.

STEPS = 16


def tiny_args(data_dir, tok_dir, storage, name, *extra):
    return ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "64",
            "--device-batch-size", "4", "--total-batch-size", "512", "--window-pattern", "SL",
            "--num-iterations", str(STEPS), "--eval-every", "8", "--eval-tokens", "1024",
            "--core-metric-every", "-1", "--sample-every", "-1", "--save-every", "4",
            "--data-dir", data_dir, "--tokenizer-dir", tok_dir, "--storage-path", storage,
            "--run-name", name, *extra]


def tiny_config(data_dir, tok_dir, storage, name, *extra):
    """The TrainConfig of `tiny_args`, as the driver hands it over (paths resolved), for a run without Ray: tokens
    packed inline (with a CPU to spare, `auto` would pick Ray Data and start a Ray), one thread per worker (a
    step is milliseconds, and several threads per process on a busy 2-core machine mostly wait for each other)."""
    from raychat.config import parse_args

    flags = ["--cpus-per-worker", "1", "--data-backend", "inline", *extra]
    return parse_args(tiny_args(data_dir, tok_dir, storage, name, *flags)).resolve_paths()


def train_local(cfg):
    """The training loop in this process, without Ray (one worker): (summary, session)."""
    from raychat.loop import train
    from raychat.session import LocalSession

    session = LocalSession(cfg)
    summary = train(cfg, session)
    return summary, session


def _gloo_train(rank, world_size, cfg_dict, out_dir):
    import json

    from raychat.config import TrainConfig
    from raychat.loop import train
    from raychat.session import LocalSession

    cfg = TrainConfig.from_dict(cfg_dict)
    session = LocalSession(cfg)
    session.rank, session.world_size = rank, world_size  # the process group is _gloo's
    summary = train(cfg, session)
    with open(os.path.join(out_dir, f"summary_rank{rank}.json"), "w") as f:
        json.dump(summary, f, default=str)


def train_gloo(cfg, world_size=2):
    """The training loop on `world_size` real processes joined by gloo, without Ray (each rank persists its
    files into the same step directories, as Ray Train workers do): every rank's summary."""
    import dataclasses
    import json

    from tests._gloo import run_gloo

    assert cfg.num_workers == world_size, "the config's --num-workers sizes the run (threads, fault rank)"
    with tempfile.TemporaryDirectory(prefix="gloo-summaries-") as out:
        run_gloo(_gloo_train, world_size, dataclasses.asdict(cfg), out)
        summaries = []
        for r in range(world_size):
            with open(os.path.join(out, f"summary_rank{r}.json")) as f:
                summaries.append(json.load(f))
    return summaries


def load_step(run_dir, step):
    """(model state, meta) of a complete checkpoint."""
    path = os.path.join(run_dir, ckpt_files.step_dir_name(step))
    assert ckpt_files.check_complete(path) is None, f"{path}: {ckpt_files.check_complete(path)}"
    return torch.load(os.path.join(path, "model.pt"), weights_only=True), ckpt_files.read_meta(path)


def final_state(run_dir):
    assert ckpt_files.list_step_dirs(run_dir)[-1][0] == STEPS
    return load_step(run_dir, STEPS)


def assert_same_run(run_dir, baseline_dir, step=STEPS):
    """Weights, train-loss and val-bpb history at `step` equal the uninterrupted run's, exactly."""
    state, meta = load_step(run_dir, step)
    ref_state, ref_meta = load_step(baseline_dir, step)
    assert state.keys() == ref_state.keys()
    for k in ref_state:
        assert torch.equal(state[k], ref_state[k]), f"step {step}: {k} differs from the uninterrupted run"
    assert meta["history"]["train_loss"] == ref_meta["history"]["train_loss"]
    assert meta["history"]["val_bpb"] == ref_meta["history"]["val_bpb"]


def flip_bytes(path, n=8):
    """Bit rot: invert `n` bytes in the middle of a file, keeping its size (torch.load still succeeds)."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        data = f.read(n)
        f.seek(os.path.getsize(path) // 2)
        f.write(bytes(b ^ 0xFF for b in data))


def tree_hashes(root):
    """sha256 of every file under root: to show that nothing saved was touched."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="session")
def storage(tmp_path_factory):
    return str(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="session")
def local_baseline(tiny_data_dir, tiny_tokenizer_dir, storage):
    """The uninterrupted run in this process without Ray: 1 worker x 2 micro-batches, tokens packed inline."""
    summary, _ = train_local(tiny_config(tiny_data_dir, tiny_tokenizer_dir, storage, "local-baseline"))
    assert summary["stopped"] is None and summary["step"] == STEPS
    return os.path.join(storage, "local-baseline")


@pytest.fixture(scope="session")
def baseline(ray_local, tiny_data_dir, tiny_tokenizer_dir, storage):
    """The uninterrupted 2-worker run, streaming tokens through Ray Data, with samples at the end."""
    args = tiny_args(tiny_data_dir, tiny_tokenizer_dir, storage, "baseline", "--num-workers", "2",
                     "--data-backend", "ray", "--sample-every", str(STEPS))
    from raychat.train import main

    assert main(args) == 0
    return os.path.join(storage, "baseline")


def ray_processes(ray_tmp: str) -> list[int]:
    """Pids whose command line names a Ray session directory (its raylet, GCS, workers and helpers)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if ray_tmp.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def reap_ray(ray_tmp: str, timeout: float = 30) -> int:
    """Wait until no process of a Ray session under `ray_tmp` is left (a driver's Ray goes with it); SIGKILL the
    stragglers, found by their session directory, after `timeout` seconds. Returns how many had to be killed."""
    import signal
    import time

    deadline = time.time() + timeout
    while ray_processes(ray_tmp) and time.time() < deadline:
        time.sleep(0.5)
    left = ray_processes(ray_tmp)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(left)
