"""nanochat interchange and the evaluation CLI, on the checkpoints of the shared baseline run."""
import json
import os
import shutil

import pytest
import torch

from conftest import STEPS
from raychat import checkpoint as ckpt_files
from raychat.eval import main as eval_main
from raychat.export import main as export_main

pytestmark = pytest.mark.slow


def test_export_to_nanochat_round_trips(baseline, tiny_tokenizer_dir, storage, tmp_path):
    out = str(tmp_path / "nanochat")
    assert export_main(["--run-name", "baseline", "--storage-path", storage, "--tokenizer-dir", tiny_tokenizer_dir,
                        "--to-nanochat", out]) == 0
    assert sorted(os.listdir(out)) == [f"meta_{STEPS:06d}.json", f"model_{STEPS:06d}.pt", "tokenizer"]
    assert sorted(os.listdir(os.path.join(out, "tokenizer"))) == ["token_bytes.pt", "tokenizer.pkl"]
    src = os.path.join(baseline, ckpt_files.step_dir_name(STEPS))
    ref = torch.load(os.path.join(src, "model.pt"), weights_only=True)
    state, meta = ckpt_files.load_nanochat_model(out)
    assert state.keys() == ref.keys()
    for k in ref:
        assert state[k].dtype == ref[k].dtype and torch.equal(state[k], ref[k]), k
    ref_meta = ckpt_files.read_meta(src)
    for key in ("step", "val_bpb", "model_config", "user_config", "device_batch_size", "max_seq_len", "loop_state"):
        assert meta[key] == ref_meta[key], key


def test_eval_cli_scores_raychat_and_nanochat_checkpoints_alike(baseline, tiny_data_dir, tiny_tokenizer_dir,
                                                                storage, tmp_path):
    common = ["--eval", "bpb,sample", "--tokenizer-dir", tiny_tokenizer_dir, "--data-dir", tiny_data_dir,
              "--split-tokens", "1024", "--device-batch-size", "4"]
    out_a, out_b = str(tmp_path / "a"), str(tmp_path / "b")
    assert eval_main(["--run-name", "baseline", "--storage-path", storage, "--out-dir", out_a, *common]) == 0
    nanochat_dir = str(tmp_path / "nc")
    export_main(["--run-name", "baseline", "--storage-path", storage, "--tokenizer-dir", tiny_tokenizer_dir,
                 "--to-nanochat", nanochat_dir])
    assert eval_main(["--nanochat", nanochat_dir, "--out-dir", out_b, *common]) == 0
    a, b = (json.load(open(os.path.join(d, "eval.json"))) for d in (out_a, out_b))
    assert a["step"] == b["step"] == STEPS
    assert a["bpb"] == b["bpb"] and 0 < a["bpb"]["val"] < 10
    assert a["samples"]["prompted"] == b["samples"]["prompted"]
    assert a["samples"]["prompted"][0].startswith("<|bos|>The capital of France is")
    assert "val bpb" in open(os.path.join(out_a, "eval.md")).read()


def test_eval_cli_errors_name_the_problem(storage, tiny_tokenizer_dir, capsys):
    assert eval_main(["--run-name", "no-such-run", "--storage-path", storage]) == 2
    assert "no run named no-such-run" in capsys.readouterr().err
    assert eval_main(["--run-name", "baseline", "--eval", "bpb,perplexity", "--storage-path", storage]) == 2
    assert "perplexity" in capsys.readouterr().err


def test_eval_and_export_skip_a_corrupt_newest_checkpoint(baseline, tiny_data_dir, tiny_tokenizer_dir, tmp_path,
                                                         capsys):
    """8 bytes flipped in the newest model.pt (same size, torch.load reads it): eval and export warn naming the
    file and use step 12, on 2 Ray Train workers for the eval; asked for that step explicitly, both refuse."""
    from conftest import flip_bytes

    storage = str(tmp_path / "runs")
    for step in (12, STEPS):
        name = ckpt_files.step_dir_name(step)
        shutil.copytree(os.path.join(baseline, name), os.path.join(storage, "rot", name))
    flip_bytes(os.path.join(storage, "rot", ckpt_files.step_dir_name(STEPS), "model.pt"))
    warning = f"{ckpt_files.step_dir_name(STEPS)}/model.pt does not match its checksum"
    common = ["--run-name", "rot", "--storage-path", storage, "--tokenizer-dir", tiny_tokenizer_dir]
    evals = [*common, "--eval", "bpb", "--data-dir", tiny_data_dir, "--split-tokens", "1024",
             "--device-batch-size", "4", "--num-workers", "2", "--out-dir", str(tmp_path / "e")]
    assert eval_main(evals) == 0
    assert warning in capsys.readouterr().err
    assert json.load(open(tmp_path / "e" / "eval.json"))["step"] == 12
    assert export_main([*common, "--to-nanochat", str(tmp_path / "nc")]) == 0
    assert warning in capsys.readouterr().err
    assert os.path.exists(tmp_path / "nc" / "model_000012.pt")
    assert eval_main([*evals, "--step", str(STEPS)]) == 2
    assert warning in capsys.readouterr().err
    assert export_main([*common, "--step", str(STEPS), "--to-nanochat", str(tmp_path / "nc2")]) == 2
    assert warning in capsys.readouterr().err and not os.path.exists(tmp_path / "nc2")


def test_train_from_nanochat_checkpoint(baseline, tiny_data_dir, tiny_tokenizer_dir, storage, tmp_path):
    """--init-from-nanochat: with every learning rate 0, one step leaves the nanochat weights untouched."""
    from conftest import tiny_args
    from raychat.config import parse_args
    from raychat.loop import train
    from raychat.session import LocalSession

    nanochat_dir = str(tmp_path / "nc")
    export_main(["--run-name", "baseline", "--storage-path", storage, "--tokenizer-dir", tiny_tokenizer_dir,
                 "--to-nanochat", nanochat_dir])
    args = tiny_args(tiny_data_dir, tiny_tokenizer_dir, str(tmp_path / "runs"), "fromnc", "--data-backend", "inline",
                     "--init-from-nanochat", nanochat_dir, "--eval-every", "-1")
    zero_lrs = ["--embedding-lr", "0", "--unembedding-lr", "0", "--matrix-lr", "0", "--scalar-lr", "0"]
    cfg = parse_args([*args, "--num-iterations", "1", *zero_lrs]).resolve_paths()
    train(cfg, LocalSession(cfg))
    saved = torch.load(str(tmp_path / "runs" / "fromnc" / "step_000001" / "model.pt"), weights_only=True)
    ref = torch.load(os.path.join(baseline, ckpt_files.step_dir_name(STEPS), "model.pt"), weights_only=True)
    for k in ref:
        assert torch.equal(saved[k], ref[k]), k
