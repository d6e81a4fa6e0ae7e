"""--recipe: how a recipe resolves the flags, what it derives, and its schedules, against nanochat 92d63d4.

tests/data/peer_92d63d4_sizes.json was computed by the peer's own base_train code (bench/peer_fixtures_sizes.py):
for depths 4 to 26, its auto batch size, iterations, LR and weight-decay scales, parameter counts and FLOPs, and at
d4 and d6 every step's LR multiplier, Muon momentum and weight decay.
"""
import json
import os

import pytest

from raychat.config import RECIPES, TrainConfig, changed_settings, derive, parse_args
from raychat.schedules import lr_multiplier, muon_momentum, muon_weight_decay, warmup_iters

PEER = json.load(open(os.path.join(os.path.dirname(__file__), "data", "peer_92d63d4_sizes.json")))


def test_a_recipe_fills_the_flags_left_unset_and_explicit_flags_win():
    seed = parse_args([])
    assert seed.recipe == "seed"
    assert {k: getattr(seed, k) for k in RECIPES["seed"]} == RECIPES["seed"]
    new = parse_args(["--recipe", "2026-07", "--weight-decay", "0.1"])
    assert new.weight_decay == 0.1 and new.unembedding_lr == 0.008 and new.total_batch_size == -1
    assert new.warmup_steps == 40 and new.warmdown_ratio == 0.65 and new.final_lr_frac == 0.05
    assert new.adam_beta1 is None  # betas are per parameter group in 2026-07
    # An explicit ratio replaces the recipe's warmup in steps.
    assert parse_args(["--recipe", "2026-07", "--warmup-ratio", "0.1"]).warmup_steps == -1
    # The peer's own defaults, read from its parser by the fixture script.
    for name in ("target_param_data_ratio", "total_batch_size", "unembedding_lr", "weight_decay", "warmup_steps",
                 "warmdown_ratio", "final_lr_frac", "eval_tokens", "embedding_lr", "matrix_lr", "scalar_lr",
                 "device_batch_size", "max_seq_len", "aspect_ratio", "head_dim", "window_pattern", "depth"):
        assert getattr(parse_args(["--recipe", "2026-07"]), name) == PEER["defaults"][name], name
    # Resolved values travel as plain data (a checkpoint's user_config, a Ray worker's config).
    assert TrainConfig.from_dict(new.user_config()) == new


@pytest.mark.parametrize("argv, needle", [
    (["--recipe", "2025"], "--recipe='2025': must be one of seed, 2026-07"),
    (["--recipe", "2026-07", "--adam-beta1", "0.9"], "sets betas per parameter group"),
    (["--compute-dtype", "bf16"], "the compute dtype is a --recipe 2026-07 setting"),
    (["--recipe", "2026-07", "--compute-dtype", "fp16"], "must be auto, bf16 or fp32"),
    (["--fp8"], "FP8 training is a --recipe 2026-07 option"),
    (["--recipe", "2026-07", "--fp8", "--device-type", "cpu"], "FP8 matmuls need a CUDA GPU, not --device-type cpu"),
    (["--recipe", "2026-07", "--fp8", "--compute-dtype", "fp32"], "computes everything else in bf16"),
    (["--recipe", "2026-07", "--fp8", "--fp8-recipe", "blockwise"], "must be one of tensorwise, rowwise"),
    (["--recipe", "2026-07", "--target-param-data-ratio", "-1", "--num-iterations", "5"], "-1 (auto) derives"),
    (["--total-batch-size", "0"], "or -1 for auto"),
])
def test_bad_recipe_flags_name_the_flag(argv, needle):
    with pytest.raises(ValueError) as e:
        parse_args(argv)
    assert needle in str(e.value)


def test_a_recipe_change_is_a_trajectory_change():
    saved = parse_args([]).user_config()
    changes = changed_settings(saved, parse_args(["--recipe", "2026-07"]))
    assert changes["recipe"] == ["seed", "2026-07"] and "warmdown_ratio" in changes


@pytest.mark.parametrize("row", PEER["rows"], ids=lambda r: f"d{r['depth']}")
def test_derived_sizes_equal_the_peers(row):
    cfg = parse_args(["--recipe", "2026-07", "--depth", str(row["depth"])])
    plan = derive(cfg, PEER["vocab_size"], world_size=1)
    assert plan.param_counts == row["param_counts"]
    assert plan.num_flops_per_token == row["flops_per_token"]
    assert plan.num_scaling_params == row["num_scaling_params"]
    assert plan.total_batch_size == row["total_batch_size"]
    assert plan.num_iterations == row["num_iterations"]
    assert plan.batch_lr_scale == pytest.approx(row["batch_lr_scale"], rel=1e-15)
    assert plan.weight_decay_scaled == pytest.approx(row["weight_decay_scaled"], rel=1e-12)
    assert f"Auto-computed optimal batch size: {row['total_batch_size']:,} tokens" in plan.lines
    assert plan.lines[0].startswith("Recipe: 2026-07 |")


@pytest.mark.parametrize("row", [r for r in PEER["rows"] if "schedules" in r], ids=lambda r: f"d{r['depth']}")
def test_schedules_equal_the_peers_at_every_step(row):
    cfg = parse_args(["--recipe", "2026-07", "--depth", str(row["depth"])])
    n = row["num_iterations"]
    plan = derive(cfg, PEER["vocab_size"], world_size=1)
    warmup = warmup_iters(cfg, n)
    for it, (lrm, momentum, wd) in enumerate(row["schedules"]):
        assert lr_multiplier(it, n, warmup, cfg.warmdown_ratio, cfg.final_lr_frac) == pytest.approx(lrm, abs=1e-15)
        assert muon_momentum(it, n, cfg.warmdown_ratio, "2026-07") == pytest.approx(momentum, abs=1e-15)
        assert muon_weight_decay(it, n, plan.weight_decay_scaled, "2026-07") == pytest.approx(wd, abs=1e-15)
    # Not the seed's: a recipe switch that changed nothing would pass the loop above only by accident.
    assert muon_momentum(1000, n, cfg.warmdown_ratio, "seed") == 0.95 != row["schedules"][min(n, 300)][1]


def test_explicit_batch_overrides_auto_and_rescales_lr_and_weight_decay():
    base = ["--recipe", "2026-07", "--depth", "4", "--max-seq-len", "256", "--device-batch-size", "4"]
    auto = derive(parse_args(base), 32768, 1)
    fixed = derive(parse_args(base + ["--total-batch-size", "4096"]), 32768, 1)
    assert fixed.total_batch_size == 4096 and auto.total_batch_size != 4096
    assert fixed.batch_lr_scale == pytest.approx((4096 / 2**19) ** 0.5)
    assert fixed.weight_decay_scaled == pytest.approx(
        auto.weight_decay_scaled * (4096 / auto.total_batch_size) ** 0.5)
    assert fixed.num_iterations == int(12 * fixed.num_scaling_params) // 4096
