"""Shared fixtures. Every test runs on loopback with a real local Ray; see RAY_PRACTICE §8."""
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
}
for _k, _v in _TEST_ENV.items():
    os.environ.setdefault(_k, _v)
os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="raytmp"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
SHAKESPEARE = os.path.abspath(os.path.join(SHARED_DATA, "tinyshakespeare.txt"))


@pytest.fixture(scope="session")
def shakespeare_path():
    if not os.path.exists(SHAKESPEARE):
        pytest.skip(f"../shared/data/tinyshakespeare.txt is absent ({SHAKESPEARE}); CI has it")
    return SHAKESPEARE


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
