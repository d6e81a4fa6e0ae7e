"""A --recipe 2026-07 run end to end, in this process without Ray (the tiny run of conftest.py with the recipe):
it trains, records its recipe, resumes exactly, refuses a recipe change, runs on two gloo ranks, and its
checkpoints convert both ways with nanochat 92d63d4's layout."""
import json
import os
import shutil

import pytest
import torch

from conftest import STEPS, assert_same_run, final_state, tiny_config, train_gloo, train_local
from raychat import checkpoint as ckpt_files
from raychat.eval import load_model

pytestmark = pytest.mark.slow

# The tiny run's batch (512 tokens) is far below the automatic one; warm up over a quarter of its 16 steps.
RECIPE = ["--recipe", "2026-07", "--total-batch-size", "512", "--warmup-steps", "4"]


@pytest.fixture(scope="module")
def config(tiny_data_dir, tiny_tokenizer_dir, storage):
    return lambda name, *extra: tiny_config(tiny_data_dir, tiny_tokenizer_dir, storage, name, *RECIPE, *extra)


@pytest.fixture(scope="module")
def recipe_run(config):
    cfg = config("recipe-2026-07")
    summary, _ = train_local(cfg)
    assert summary["stopped"] is None and summary["step"] == STEPS
    return os.path.join(cfg.storage_path, "recipe-2026-07")


def test_the_recipe_trains_and_is_recorded(recipe_run, local_baseline, capfd):
    state, meta = final_state(recipe_run)
    assert meta["user_config"]["recipe"] == "2026-07" and meta["user_config"]["warmdown_ratio"] == 0.65
    assert meta["model_config"]["smear"] and meta["model_config"]["backout"] and meta["total_batch_size"] == 512
    assert {"smear_gate.weight", "smear_lambda", "backout_lambda"} <= set(state)
    val = [v for _, v in meta["history"]["val_bpb"]]
    assert val[-1] < val[0], f"val bpb did not fall: {val}"
    # Another model and trajectory than the seed's on the same data.
    _, seed_meta = final_state(local_baseline)
    assert meta["history"]["train_loss"] != seed_meta["history"]["train_loss"]


def test_the_recipe_resumes_exactly_and_refuses_a_recipe_change(recipe_run, config, capfd):
    cfg = config("recipe-resume", "--resume-from-step", "8")
    run = os.path.join(cfg.storage_path, "recipe-resume")
    os.makedirs(run)
    shutil.copytree(os.path.join(recipe_run, "step_000008"), os.path.join(run, "step_000008"))
    summary, _ = train_local(cfg)
    assert "Resuming from step 8" in capfd.readouterr().out
    assert_same_run(run, recipe_run)
    seed = tiny_config(cfg.data_dir, cfg.tokenizer_dir, cfg.storage_path, "recipe-resume")
    with pytest.raises(ValueError, match="is a --recipe 2026-07 model, this run trains --recipe seed"):
        train_local(seed)


def test_two_gloo_ranks_train_what_one_rank_trains(recipe_run, config):
    """ZeRO-2 DistMuonAdamW over 2 ranks, 1 micro-batch each, against 1 rank x 2 micro-batches: the same run up
    to the order of the gradient sums (a few ulps)."""
    cfg = config("recipe-gloo", "--num-workers", "2", "--eval-every", "-1", "--save-every", "-1")
    train_gloo(cfg)
    state, _ = final_state(os.path.join(cfg.storage_path, "recipe-gloo"))
    ref, _ = final_state(recipe_run)
    assert state.keys() == ref.keys()
    for k in ref:  # (the logged losses differ by design: each run logs rank 0's last micro-batch)
        assert torch.allclose(state[k], ref[k], rtol=1e-4, atol=1e-5), k


def test_checkpoints_convert_both_ways_with_92d63d4s_layout(recipe_run, config, tmp_path, capfd):
    """Export writes nanochat's 7 config fields (its GPTConfig takes no others) and the state dict; reading it
    back infers the 2026-07 architecture from the smear parameters. A run initialised from it evaluates, at
    step 0, exactly what the exported run evaluated last; a seed run refuses it as another model."""
    src = os.path.join(recipe_run, ckpt_files.step_dir_name(STEPS))
    state, meta = final_state(recipe_run)
    out = str(tmp_path / "nc")
    ckpt_files.export_nanochat(out, STEPS, state, meta)
    with open(os.path.join(out, f"meta_{STEPS:06d}.json")) as f:
        exported = json.load(f)
    assert sorted(exported["model_config"]) == sorted(ckpt_files.NANOCHAT_CONFIG_KEYS)
    back, back_meta = ckpt_files.load_nanochat_model(out)
    assert back_meta["model_config"] == meta["model_config"]
    assert all(torch.equal(back[k], state[k]) for k in state)

    a, _ = load_model("raychat", src, None, "cpu")
    b, _ = load_model("nanochat", out, None, "cpu")
    assert a.compute_dtype == b.compute_dtype == torch.float32
    idx = torch.randint(0, a.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a(idx), b(idx))

    cfg = config("recipe-from-nc", "--init-from-nanochat", out, "--num-iterations", "1", "--eval-every", "1")
    summary, session = train_local(cfg)
    assert "Initialised from nanochat checkpoint" in capfd.readouterr().out
    step0 = [r for r in session.reports if r["step"] == 0][0]
    assert step0["val_bpb"] == meta["val_bpb"]
    seed = tiny_config(cfg.data_dir, cfg.tokenizer_dir, cfg.storage_path, "seed-from-nc", "--init-from-nanochat", out)
    with pytest.raises(ValueError, match="is a --recipe 2026-07 model"):
        train_local(seed)
