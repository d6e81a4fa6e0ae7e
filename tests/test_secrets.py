"""Secrets stay out of every artefact, and reading a file never runs code (docs/RELIABILITY.md, "Security").

The cluster side (dashboard and job API private behind an SSH tunnel, Ray token authentication on) is
checked by tests/test_cluster.py::test_launcher_topology_image_and_security.
"""
import glob
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

from raychat import checkpoint as ckpt_files
from tests._s3 import BUCKET, s3, s3_run  # noqa: F401

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Distinct, greppable dummy values; none is a real credential.
SECRETS = {
    "WANDB_API_KEY": "dummywandbkey-raychat-0123456789abcdef0123456789abcdef",
    "AWS_ACCESS_KEY_ID": "AKIADUMMYRAYCHAT0001",
    "AWS_SECRET_ACCESS_KEY": "dummy-aws-secret-raychat/0123456789abcdefghij",
    "AWS_SESSION_TOKEN": "dummy-aws-session-token-raychat-zyxwvu",
    "GOOGLE_API_KEY": "dummy-gcp-api-key-raychat-AIzaSyDUMMY",
    "HF_TOKEN": "hf_dummyraychattoken0123456789",
    "RAY_AUTH_TOKEN": "dummy-ray-auth-token-raychat-5f5f5f5f5f",
}
GCP_KEY_CONTENT = "dummy-gcp-service-account-private-key-raychat"


class Payload:
    """A pickle that, when loaded by an unrestricted unpickler, creates the file `path`."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.slow
def test_no_secret_in_any_artefact_of_a_run(tiny_data_dir, tiny_tokenizer_dir, tmp_path):
    """A full `python -m raychat.train` run (2 workers, Ray Data streams, W&B code path in disabled mode, a
    sample, a report) started with dummy secrets in its environment: no secret appears in its console
    output, in any file of its run directory (checkpoints, meta.json, report, plots, markers), or in Ray's
    session logs of the run (driver, raylet, GCS, every worker)."""
    storage = str(tmp_path / "runs")
    key_file = tmp_path / "gcp-key.json"
    key_file.write_text('{"private_key": "%s"}' % GCP_KEY_CONTENT)
    ray_tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, PYTHONPATH=REPO, WANDB_MODE="disabled",
               GOOGLE_APPLICATION_CREDENTIALS=str(key_file), **SECRETS)
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "raychat.train", "--run", "secrets-check", "--depth", "2", "--aspect-ratio", "32",
           "--head-dim", "32", "--max-seq-len", "64", "--device-batch-size", "4", "--total-batch-size", "512",
           "--window-pattern", "SL", "--num-iterations", "4", "--eval-every", "2", "--eval-tokens", "1024",
           "--core-metric-every", "-1", "--sample-every", "4", "--save-every", "2", "--num-workers", "2",
           "--data-dir", tiny_data_dir, "--tokenizer-dir", tiny_tokenizer_dir, "--storage-path", storage,
           "--run-name", "secrets"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=300)  # its own Ray stops with it
    console = out.stdout + out.stderr
    assert out.returncode == 0, console.decode(errors="replace")[-4000:]

    artefacts = [p for p in glob.glob(os.path.join(storage, "**", "*"), recursive=True) + 
                 glob.glob(os.path.join(storage, "**", ".*"), recursive=True) if os.path.isfile(p)]
    ray_logs = [p for p in glob.glob(os.path.join(ray_tmp, "**", "*"), recursive=True)
                if os.path.isfile(p) and not os.path.islink(p) and "/logs/" in p]
    names = {os.path.basename(p) for p in artefacts}
    assert {"model.pt", "meta.json", "optim_rank0.pt", "optim_rank1.pt", "report.md"} <= names, names
    assert ray_logs and any("worker" in os.path.basename(p) for p in ray_logs), "no Ray worker logs to check"
    needles = [v.encode() for v in SECRETS.values()] + [GCP_KEY_CONTENT.encode()]
    leaks = [("console", n) for n in needles if n in console]
    for path in artefacts + ray_logs:
        with open(path, "rb") as f:
            data = f.read()
        leaks += [(path, n) for n in needles if n in data]
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not leaks, f"secrets leaked: {leaks}"
    # The run did log its configuration (so the check above had something to look at).
    meta = ckpt_files.read_meta(os.path.join(storage, "secrets", "step_000004"))
    assert meta["user_config"]["run"] == "secrets-check"


@pytest.mark.slow
def test_no_s3_secret_in_a_run_on_a_bucket(s3, s3_run):
    """The run of tests/_s3.py `s3_run` (2 workers, one SIGKILLed and restarted, shards, tokenizer and
    checkpoints on the S3 server) had the server's real secret key in the environment of its driver and,
    inherited, of every worker: the key appears in no console line, in no object the run wrote to the bucket
    (checkpoints, meta.json, report, Ray Train's checkpoint list, markers) and in no Ray session log."""
    assert s3_run.code == 0, s3_run.out[-4000:]
    keys = s3.keys("e2e/runs/e2e/")
    assert {"model.pt", "meta.json", "report.md", "checkpoint_manager_snapshot.json"} <= \
        {k.rsplit("/", 1)[-1] for k in keys}, keys
    assert s3_run.ray_logs and any("worker" in os.path.basename(p) for p in s3_run.ray_logs), "no worker logs"
    needle = s3.secret_key
    leaks = ["console"] if needle in s3_run.out else []
    leaks += [k for k in keys if needle.encode() in s3.client().get_object(Bucket=BUCKET, Key=k)["Body"].read()]
    for path in s3_run.ray_logs:
        with open(path, "rb") as f:
            leaks += [path] if needle.encode() in f.read() else []
    assert not leaks, f"the S3 secret key leaked into: {leaks}"


def _malicious_checkpoint(directory, marker):
    """A checkpoint that passes check_complete but whose .pt files are code-running pickles."""
    ckpt_files.save_rank_files(directory, 0, optim_state={"evil": Payload(marker)}, data_state=[None],
                               model_state={"evil": Payload(marker)}, meta={"step": 1, "world_size": 1})
    assert ckpt_files.check_complete(directory) is None


def test_malicious_pickle_in_a_checkpoint_is_refused(tmp_path):
    marker = str(tmp_path / "pwned")
    ckpt = str(tmp_path / "step_000001")
    _malicious_checkpoint(ckpt, marker)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        ckpt_files.load_rank_state(ckpt, 0, 1, "cpu")
    assert not os.path.exists(marker), "loading the checkpoint ran code"
    # The same file through an unrestricted loader does run it: the payload is live, the refusal is real.
    torch.load(os.path.join(ckpt, "model.pt"), weights_only=False)
    assert os.path.exists(marker)


def test_malicious_pickle_in_a_nanochat_checkpoint_is_refused(tmp_path):
    marker = str(tmp_path / "pwned")
    torch.save({"transformer.wte.weight": Payload(marker)}, tmp_path / "model_000010.pt")
    (tmp_path / "meta_000010.json").write_text('{"step": 10, "model_config": {"n_layer": 2}}')
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        ckpt_files.load_nanochat_model(str(tmp_path))
    assert not os.path.exists(marker)


def test_malicious_token_bytes_is_refused(tmp_path):
    from raychat.tokenizer import get_token_bytes

    marker = str(tmp_path / "pwned")
    os.makedirs(tmp_path / "tokenizer")
    torch.save(Payload(marker), tmp_path / "tokenizer" / "token_bytes.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        get_token_bytes(str(tmp_path))
    assert not os.path.exists(marker)


def test_malicious_tokenizer_pickle_is_refused(tmp_path):
    from raychat.tokenizer import Tokenizer

    marker = str(tmp_path / "pwned")
    with open(tmp_path / "tokenizer.pkl", "wb") as f:
        pickle.dump(Payload(marker), f)
    with pytest.raises(ValueError, match="not a tokenizer raychat will load"):
        Tokenizer.from_directory(str(tmp_path))
    assert not os.path.exists(marker), "loading tokenizer.pkl ran code"


def test_every_torch_load_in_raychat_is_weights_only():
    """A source check that keeps the rule for files added later: each torch.load call passes weights_only=True."""
    calls = []
    for path in glob.glob(os.path.join(REPO, "raychat", "**", "*.py"), recursive=True) + \
            glob.glob(os.path.join(REPO, "scripts", "*.py")):
        src = open(path).read()
        for m in re.finditer(r"torch\.load\(", src):
            depth, i = 1, m.end()
            while depth:
                depth += {"(": 1, ")": -1}.get(src[i], 0)
                i += 1
            calls.append((os.path.relpath(path, REPO), src[m.start():i]))
    assert len(calls) >= 4, calls
    unsafe = [(p, c) for p, c in calls if "weights_only=True" not in c]
    assert not unsafe, f"torch.load without weights_only=True: {unsafe}"
