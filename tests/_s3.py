"""A real S3-compatible server for the tests: moto's standalone server (`python -m moto.server`, from the `dev`
extra), on 127.0.0.1 and a free port, with authentication on: it knows one IAM user whose key may use S3, and
refuses any other key. raychat reaches it as a user reaches any S3-compatible store, through the standard
environment variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION).

Clients talk to it through `Proxy`, a TCP relay a test can take down and bring back (moto keeps its objects in
memory, so stopping the server itself would lose them): `fail_on(pattern)` takes the endpoint down the moment
a request containing `pattern` (an object key) arrives, as if the store went away in the middle of an upload.

`s3_run` is the first run of tests/test_s3.py's end-to-end test, shared with the same file's secrets check (which
greps its output, objects and Ray logs for the secret key): a Ray start is the dearest thing in these tests.

Import the fixtures into a test module: `from tests._s3 import s3, s3_env  # noqa: F401`.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
import urllib.request
from unittest import mock

import pytest
from conftest import reap_ray

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BUCKET = "raychat-test"
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proxy:
    """A TCP relay from 127.0.0.1:`port` to `target`. `down()` closes the listening socket and every open
    connection (clients see connection refused); `up()` listens again on the same port."""

    def __init__(self, target_port: int):
        self.target_port, self.port = target_port, free_port()
        self._lock = threading.Lock()
        self._conns, self._listener, self._trigger = [], None, None
        self.up()

    def up(self) -> None:
        with self._lock:
            if self._listener is not None:
                return
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(64)
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            listener.close()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    @property
    def is_up(self) -> bool:
        return self._listener is not None

    def fail_on(self, pattern: bytes, back_after_s: float | None = None) -> threading.Event:
        """Take the endpoint down when a request containing `pattern` arrives (that request is dropped), and
        bring it back `back_after_s` later (None: when the test calls up()). Returns an event set at the fault."""
        fired = threading.Event()
        self._trigger = (pattern, back_after_s, fired)
        return fired

    def _accept(self, listener) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # down()
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src, dst, from_client: bool) -> None:
        try:
            while data := src.recv(65536):
                if from_client and self._trigger is not None and self._trigger[0] in data:
                    pattern, back_after_s, fired = self._trigger
                    self._trigger = None
                    self.down()
                    fired.set()
                    if back_after_s is not None:
                        threading.Timer(back_after_s, self.up).start()
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class S3Server:
    """moto's server in a subprocess, one IAM user with S3 rights, one bucket, and a Proxy in front."""

    def __init__(self):
        port = free_port()
        # The first 3 requests (creating the user, its key and its policy) go unauthenticated; every later one
        # must be signed with that key.
        env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="3")
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.server_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{self.server_url}/moto-api/", timeout=2)
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto's server did not start (is the `dev` extra installed?)") from None
                time.sleep(0.1)
        import boto3

        iam = boto3.client("iam", endpoint_url=self.server_url, region_name=REGION, aws_access_key_id="setup",
                           aws_secret_access_key="setup")
        iam.create_user(UserName="raychat")
        key = iam.create_access_key(UserName="raychat")["AccessKey"]
        iam.put_user_policy(UserName="raychat", PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        self.access_key, self.secret_key = key["AccessKeyId"], key["SecretAccessKey"]
        self.proxy = Proxy(port)
        self.endpoint = f"http://127.0.0.1:{self.proxy.port}"
        self.client().create_bucket(Bucket=BUCKET)

    @property
    def env(self) -> dict:
        """What a user sets to reach this store. AWS_EC2_METADATA_DISABLED: the SDK never asks the cloud's
        metadata address for credentials, so no request leaves this machine."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.server_url, region_name=REGION,
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key)

    def keys(self, prefix: str) -> list[str]:
        """Every object key under `prefix` in the bucket, sorted."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def steps(self, run_prefix: str) -> list[int]:
        """The step_XXXXXX directories under a run's prefix."""
        import re

        return sorted({int(m.group(1)) for k in self.keys(run_prefix + "/")
                       if (m := re.search(r"/step_(\d{6,})/", k))})

    def upload_dir(self, local_dir: str, prefix: str) -> str:
        """Copy a local directory's files to s3://BUCKET/prefix/; returns that URI."""
        for name in sorted(os.listdir(local_dir)):
            self.client().upload_file(os.path.join(local_dir, name), BUCKET, f"{prefix}/{name}")
        return f"s3://{BUCKET}/{prefix}"

    def close(self) -> None:
        self.proxy.down()
        self.process.terminate()
        self.process.wait(timeout=10)


# pytest makes a fixture imported into several test modules a separate fixture in each: what must exist once
# per session (the server, the shared run) is kept here, in this module's one namespace.
_ONCE = {}


def _once(key, make):
    if key not in _ONCE:
        _ONCE[key] = make()
    return _ONCE[key]


@pytest.fixture(scope="session")
def s3():
    """The session's S3 server; tests use their own prefixes in its bucket."""
    yield _once("server", S3Server)
    if (server := _ONCE.pop("server", None)) is not None:
        server.close()


@pytest.fixture
def s3_env(s3, monkeypatch):
    """This process configured for the server as a user would (environment variables), the endpoint up, and
    quick storage retries: 3 tries, waits of 0.5 s then 1 s."""
    for k, v in dict(s3.env, RAYCHAT_STORAGE_TRIES="3", RAYCHAT_STORAGE_RETRY_S="0.5").items():
        monkeypatch.setenv(k, v)
    s3.proxy.up()
    yield s3
    s3.proxy.up()


# ----------------------------------------------------------------------------------------------------
# Drivers in their own processes, as a user starts them


def driver(args: list, env: dict, ray_tmp: str | None = None) -> tuple[int, str]:
    """`python -m raychat.train ARGS` in a fresh process with `env` added: its own embedded Ray, whose workers
    inherit that environment. Returns (exit code, output). Ray's session directory is `ray_tmp` if given (kept
    for its logs), else a temporary one removed after."""
    own = ray_tmp is None
    ray_tmp = ray_tmp or tempfile.mkdtemp(prefix="rs3", dir="/tmp")  # short: Ray's socket paths have a limit
    full = dict(os.environ, RAY_TMPDIR=ray_tmp, PYTHONPATH=REPO, PYTHONUNBUFFERED="1", **env)
    full.pop("RAY_ADDRESS", None)
    try:
        done = subprocess.run([sys.executable, "-m", "raychat.train", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=400, env=full)
    finally:
        reap_ray(ray_tmp)  # the driver's Ray goes with it; stragglers of this run are killed
        if own:
            shutil.rmtree(ray_tmp, ignore_errors=True)
    return done.returncode, done.stdout + done.stderr


@pytest.fixture(scope="session")
def s3_run(s3, shakespeare_path, tiny_tokenizer_dir):
    """Shards prepared straight into the bucket (conftest's tiny_data_dir, written to s3://), the tokenizer
    uploaded, then the tiny 2-worker run (conftest.tiny_args) with --keep-checkpoints 2 and rank 1 SIGKILLed
    in step 10, samples at the end, everything in the bucket, dummy secrets of other services in its
    environment. A namespace: root (the URI of it all), tok, args (without the worker, fault and sample flags),
    env (the storage settings), code, out, ray_logs (the files of its Ray session's logs), ray_tmp."""
    yield _once("run", lambda: _first_run(s3, shakespeare_path, tiny_tokenizer_dir))
    if (run := _ONCE.pop("run", None)) is not None:
        shutil.rmtree(run.ray_tmp, ignore_errors=True)


# Dummy credentials of the other services a run may see in its environment (none is real): the shared run
# carries them, and test_s3's secrets check shows that none of them, nor the S3 key, reaches an artefact or a log.
DUMMY_SECRETS = {
    "WANDB_API_KEY": "dummywandbkey-raychat-0123456789abcdef0123456789abcdef",
    "GOOGLE_API_KEY": "dummy-gcp-api-key-raychat-AIzaSyDUMMY",
    "HF_TOKEN": "hf_dummyraychattoken0123456789",
    "RAY_AUTH_TOKEN": "dummy-ray-auth-token-raychat-5f5f5f5f5f",
}
GCP_KEY_CONTENT = "dummy-gcp-service-account-private-key-raychat"


def _first_run(s3, shakespeare_path, tiny_tokenizer_dir):
    from conftest import tiny_args
    from raychat.data.shards import prepare

    root = f"s3://{BUCKET}/e2e"
    env = dict(s3.env, RAYCHAT_STORAGE_TRIES="3", RAYCHAT_STORAGE_RETRY_S="0.5")
    with mock.patch.dict(os.environ, env):
        prepare(shakespeare_path, f"{root}/data", rows_per_group=64, shard_chars=200_000, val_fraction=0.1,
                progress=False)
    tok = s3.upload_dir(tiny_tokenizer_dir, "e2e/tokenizer")
    args = tiny_args(f"{root}/data", tok, f"{root}/runs", "e2e", "--data-backend", "inline", "--keep-checkpoints", "2")
    ray_tmp = tempfile.mkdtemp(prefix="rs3", dir="/tmp")
    key_file = os.path.join(ray_tmp, "gcp-key.json")
    with open(key_file, "w") as f:
        json.dump({"private_key": GCP_KEY_CONTENT}, f)
    secrets = dict(DUMMY_SECRETS, GOOGLE_APPLICATION_CREDENTIALS=key_file)
    # --run takes the W&B code path (in disabled mode, WANDB_MODE), which reads WANDB_API_KEY; the samples at the
    # end (as the baseline's) put generated text in the console and the logs the secrets check reads.
    code, out = driver([*args, "--num-workers", "2", "--max-failures", "1", "--debug-fail-at-step", "10",
                        "--debug-fail-kind", "kill", "--debug-fail-rank", "1", "--run", "e2e-secrets",
                        "--sample-every", "16"],
                       dict(env, **secrets), ray_tmp)
    logs = [os.path.join(d, f) for d, _, files in os.walk(ray_tmp) for f in files
            if "/logs" in d and not os.path.islink(os.path.join(d, f))]
    return types.SimpleNamespace(root=root, tok=tok, args=args, env=env, code=code, out=out, ray_logs=logs,
                                 ray_tmp=ray_tmp)


def complete_checkpoint(run_dir: str, world_size: int) -> int:
    """The step of the newest complete checkpoint of a run in the bucket, checked for `world_size` ranks (each
    rank wrote its own optimizer shard)."""
    from raychat import checkpoint as ckpt_files
    from raychat import runs

    with runs.find_checkpoint(run_dir, log=lambda m: None) as found:
        assert ckpt_files.check_complete(found.local_dir) is None
        assert ckpt_files.read_meta(found.local_dir)["world_size"] == world_size
        for rank in range(world_size):
            assert os.path.exists(os.path.join(found.local_dir, f"optim_rank{rank}.pt"))
        return found.step
