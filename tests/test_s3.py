"""raychat on s3:// as a cluster user runs it, against a real S3-compatible server (moto's, tests/_s3.py): shards,
tokenizer and checkpoints in the bucket, nothing shared on local disk between the workers, the endpoint and
credentials in the standard AWS environment variables.

The end-to-end test shares two Ray Train runs between many checks (each run costs a Ray start); the storage
faults run the loop without Ray (raychat.session.LocalSession), which persists through the same code.
"""
import json
import os

import pytest
import torch

from conftest import STEPS, assert_same_run, load_step, tiny_args, tiny_config, train_local
from raychat import checkpoint as ckpt_files
from raychat import runs
from raychat.loop import SAMPLE_PROMPTS
from tests._s3 import BUCKET, DUMMY_SECRETS, GCP_KEY_CONTENT, driver, s3, s3_env, s3_run  # noqa: F401


def _download_run(s3, prefix, dest):
    """A bucket's run directory (its step directories) copied to a local directory, for assert_same_run."""
    for key in s3.keys(prefix + "/"):
        if "/step_" in key and not key.endswith("/"):
            path = os.path.join(dest, key[len(prefix) + 1:])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            s3.client().download_file(BUCKET, key, path)
    return dest


def _flip_object(s3, key):
    """Bit rot in an object: 8 bytes in its middle inverted, its size kept."""
    body = bytearray(s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read())
    mid = len(body) // 2
    body[mid:mid + 8] = bytes(b ^ 0xFF for b in body[mid:mid + 8])
    s3.client().put_object(Bucket=BUCKET, Key=key, Body=bytes(body))


@pytest.mark.slow
def test_a_run_on_s3_end_to_end(baseline, s3_run, s3_env, tmp_path):
    """Shards prepared straight into the bucket, the tokenizer uploaded; then, with nothing on local disk:

    1. (s3_run) 2 workers, checkpoints every 4 steps, --keep-checkpoints 2, rank 1 SIGKILLed in step 10: Ray
       Train restarts the group from the bucket's step 8; the run ends with steps 12 and 16 left in the bucket,
       bit-identical to the uninterrupted local run, its lease gone.
    2. step 16's model.pt damaged in the bucket: eval and export skip it (checksum) and read step 12.
    3. step 16 deleted (distrusted): the same command on 1 worker resumes from step 12 (resharded), with Ray
       Train's checkpoint list repaired, and ends with the same weights again."""
    from raychat.eval import main as eval_main
    from raychat.export import main as export_main

    s3, root, tok = s3_env, s3_run.root, s3_run.tok
    assert s3_run.code == 0, s3_run.out[-4000:]
    assert "Injected failure: rank 1 dies (kill) at step 10" in s3_run.out
    assert s3.keys("e2e/runs/e2e/.injected_failure_step10") and not s3.keys("e2e/runs/e2e/driver_lease.json")
    assert s3.steps("e2e/runs/e2e") == [12, 16]  # --keep-checkpoints 2 deleted steps 4 and 8 in the bucket
    assert_same_run(_download_run(s3, "e2e/runs/e2e", str(tmp_path / "first")), baseline)

    _flip_object(s3, "e2e/runs/e2e/step_000016/model.pt")
    common = ["--run-name", "e2e", "--storage-path", f"{root}/runs", "--tokenizer-dir", tok]
    out_dir = str(tmp_path / "nanochat")
    assert export_main([*common, "--to-nanochat", out_dir]) == 0
    ref, _ = load_step(baseline, 12)
    exported = torch.load(os.path.join(out_dir, "model_000012.pt"), weights_only=True)
    assert all(torch.equal(exported[k], ref[k]) for k in ref)
    assert eval_main([*common, "--data-dir", f"{root}/data", "--eval", "bpb", "--split-tokens", "2048"]) == 0
    assert s3.keys("e2e/runs/e2e/step_000012/eval.json")  # the results beside the checkpoint, in the bucket

    s3.client().delete_objects(Bucket=BUCKET, Delete={"Objects": [
        {"Key": k} for k in s3.keys("e2e/runs/e2e/step_000016/")]})
    code, out = driver([*s3_run.args, "--num-workers", "1"], s3_run.env)
    assert code == 0, out[-4000:]
    assert "step_000016 no longer exist; dropped from Ray Train's checkpoint list" in out
    assert "Run e2e resumes from step 12" in out and "Resized from 2 to 1 workers at step 12" in out
    assert s3.steps("e2e/runs/e2e") == [12, 16]
    # The weights equal the uninterrupted 2-worker run's, and so do the val bpb entries the 2 workers measured
    # (steps 0, 8); at step 16 one worker measures other documents (each rank reads its own val stream), and
    # the logged train loss is rank 0's last micro-batch (the reference's quirk), another one on 1 worker.
    state, meta = load_step(_download_run(s3, "e2e/runs/e2e", str(tmp_path / "second")), STEPS)
    ref, ref_meta = load_step(baseline, STEPS)
    assert state.keys() == ref.keys() and all(torch.equal(state[k], ref[k]) for k in ref)
    assert meta["history"]["val_bpb"][:2] == ref_meta["history"]["val_bpb"][:2]


@pytest.mark.slow
def test_no_secret_in_any_artefact_of_a_run(s3, s3_run):
    """The run of tests/_s3.py `s3_run` (2 workers, one SIGKILLed and restarted, shards, tokenizer and
    checkpoints on the S3 server, the W&B code path in disabled mode, samples generated) had the server's real
    secret key and dummy credentials of other services (W&B, Google, Hugging Face, Ray, a service-account key
    file) in the environment of its driver and, inherited, of every worker: none appears in a console line, in
    an object the run wrote to the bucket (checkpoints, meta.json, report, Ray Train's checkpoint list, markers)
    or in a Ray session log (driver, raylet, GCS, every worker)."""
    assert s3_run.code == 0, s3_run.out[-4000:]
    keys = s3.keys("e2e/runs/e2e/")
    assert {"model.pt", "meta.json", "report.md", "checkpoint_manager_snapshot.json"} <= \
        {k.rsplit("/", 1)[-1] for k in keys}, keys
    assert s3_run.ray_logs and any("worker" in os.path.basename(p) for p in s3_run.ray_logs), "no worker logs"
    needles = [s3.secret_key, GCP_KEY_CONTENT, *DUMMY_SECRETS.values()]
    leaks = [("console", n) for n in needles if n in s3_run.out]
    for key in keys:
        data = s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()
        leaks += [(key, n) for n in needles if n.encode() in data]
    for path in s3_run.ray_logs:
        with open(path, "rb") as f:
            data = f.read()
        leaks += [(path, n) for n in needles if n.encode() in data]
    assert not leaks, f"secrets leaked: {leaks}"
    # The run did record its configuration (so the check above had something to look at). Step 12 is this run's
    # in any test order: the end-to-end test's resume from step 12 rewrites only step 16.
    meta = json.loads(s3.client().get_object(Bucket=BUCKET, Key="e2e/runs/e2e/step_000012/meta.json")["Body"].read())
    assert meta["user_config"]["run"] == "e2e-secrets"
    assert SAMPLE_PROMPTS[0] in s3_run.out, "the run generated no samples"


# ----------------------------------------------------------------------------------------------------
# Storage faults, each on the real server


def test_wrong_credentials_and_a_missing_bucket_are_reported_before_ray_starts(tiny_data_dir, tiny_tokenizer_dir,
                                                                                s3_env, monkeypatch, capsys):
    """The driver checks every bucket it will use before anything starts: each problem names the URI and the
    fix, and no credential appears in what it prints."""
    from raychat.train import main

    s3 = s3_env
    data = s3.upload_dir(tiny_data_dir, "creds/data")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-raychat-0123456789")
    assert main(tiny_args(data, tiny_tokenizer_dir, f"s3://{BUCKET}/creds/runs", "c")) == 2
    err = capsys.readouterr().err
    assert f"--storage-path s3://{BUCKET}/creds/runs: the storage refused the credentials" in err
    assert f"--data-dir {data}: the storage refused the credentials" in err
    assert "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in err
    assert "not-the-secret-raychat" not in err and s3.secret_key not in err

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    assert main(tiny_args(tiny_data_dir, tiny_tokenizer_dir, "s3://no-such-bucket/runs", "c")) == 2
    err = capsys.readouterr().err
    assert "--storage-path s3://no-such-bucket/runs: the bucket no-such-bucket does not exist" in err
    assert "create it (`aws s3 mb s3://no-such-bucket`) or fix the URI" in err


def _steps_complete(run):
    """{step: None or the reason it is not a checkpoint} of a run directory in the bucket."""
    from raychat import storage

    found = {}
    for step, path in runs.list_run_steps(run):
        with storage.materialise(path) as d:
            found[step] = ckpt_files.check_complete(d)
    return found


def test_store_down_through_every_retry_stops_the_run_cleanly(local_baseline, tiny_data_dir, tiny_tokenizer_dir,
                                                               s3_env, monkeypatch, tmp_path):
    """The endpoint goes away in the middle of the step-8 upload (at model.pt) and stays away: the upload is
    tried twice (RAYCHAT_STORAGE_TRIES=2), then the run stops with one reason naming the storage; step 4 is intact
    in the bucket, and the part of step 8 that reached it is never taken for a checkpoint."""
    s3 = s3_env
    monkeypatch.setenv("RAYCHAT_STORAGE_TRIES", "2")
    cfg = tiny_config(tiny_data_dir, tiny_tokenizer_dir, f"s3://{BUCKET}/down/runs", "down")
    fault = s3.proxy.fail_on(b"step_000008/model.pt")  # after data_rank0.json and meta.json reached the bucket
    summary, _ = train_local(cfg)
    assert fault.is_set() and not s3.proxy.is_up
    reason = summary["stopped"]
    assert reason.startswith(f"the checkpoint of step 8 could not be saved to s3://{BUCKET}/down/runs/down: "
                             f"s3://{BUCKET}/down/runs/down/step_000008: the storage failed 2 time(s) over"), reason
    assert "the endpoint" not in reason and "NETWORK_CONNECTION" in reason and "rerun to resume" in reason
    assert summary["step"] == 12  # steps 9-11 trained while step 8 was retried; the save at 12 waited and stopped
    s3.proxy.up()
    complete = _steps_complete(cfg.storage_path + "/down")
    assert complete[4] is None and set(complete) == {4, 8}, complete
    assert complete[8].endswith("done_rank0.json is missing or unreadable: rank 0 never finished writing"), complete
    with runs.resume_checkpoint(cfg, log=lambda m: None) as d:
        assert ckpt_files.read_meta(d)["step"] == 4
    assert_same_run(_download_run(s3, "down/runs/down", str(tmp_path / "down")), local_baseline, step=4)


def test_store_back_before_the_retries_run_out_loses_nothing(local_baseline, tiny_data_dir, tiny_tokenizer_dir,
                                                               s3_env, tmp_path, capfd):
    """The endpoint goes away at the step-8 upload and comes back 8 s later, within the retries (3 tries, 0.5 s
    and 1 s apart, each ~6 s of the SDK's own retries): the upload is retried, the run goes on and ends equal to
    the uninterrupted one."""
    s3 = s3_env
    cfg = tiny_config(tiny_data_dir, tiny_tokenizer_dir, f"s3://{BUCKET}/back/runs", "back")
    fault = s3.proxy.fail_on(b"step_000008/", back_after_s=8)
    summary, _ = train_local(cfg)
    assert fault.is_set() and summary["stopped"] is None and summary["step"] == STEPS
    err = capfd.readouterr().err
    assert f"WARNING: writing s3://{BUCKET}/back/runs/back/step_000008 failed (try 1 of 3" in err
    assert s3.steps("back/runs/back") == [4, 8, 12, 16]
    assert_same_run(_download_run(s3, "back/runs/back", str(tmp_path / "back")), local_baseline)
