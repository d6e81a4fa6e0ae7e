"""TrainConfig's validation, the derived quantities (model shape, batch split, LR scaling, horizon) and the
schedules. The command-line surface itself is tests/test_cli.py."""
import dataclasses
import math

import pytest

from raychat.config import TrainConfig, derive, parse_args
from raychat.schedules import lr_multiplier, muon_momentum, muon_weight_decay


@pytest.mark.parametrize("argv, needle", [
    (["--depth", "0"], "--depth=0"),
    (["--window-pattern", "SXL"], "--window-pattern='SXL'"),
    (["--num-iterations", "-1", "--target-flops", "-1", "--target-param-data-ratio", "-1"], "no training horizon"),
    (["--warmup-ratio", "0.6", "--warmdown-ratio", "0.6"], "must not exceed 1"),
    (["--num-workers", "0"], "--num-workers=0"),
    (["--use-gpu", "maybe"], "auto, true or false"),
    (["--matrix-lr", "-0.1"], "--matrix-lr"),
    (["--adam-beta2", "1.0"], "--adam-beta2"),
    (["--data-backend", "spark"], "ray or inline"),
    (["--run-name", "a/b"], "without '/'"),
])
def test_bad_flags_name_the_flag(argv, needle):
    with pytest.raises(ValueError, match=None) as e:
        parse_args(argv)
    assert needle in str(e.value)


def test_derived_quantities_of_the_speedrun():
    """d24 at ratio 12, B=16 on 8 ranks (nanochat's leaderboard entry #1)."""
    cfg = parse_args(["--depth", "24", "--target-param-data-ratio", "12", "--device-batch-size", "16"])
    plan = derive(cfg, 32768, world_size=8)
    assert plan.model_config["n_embd"] == 1536 and plan.model_config["n_head"] == 12
    assert plan.grad_accum_steps == 2 and plan.batch_lr_scale == 1.0
    assert plan.weight_decay_scaled == pytest.approx(0.05)
    assert plan.num_scaling_params == 729_813_504 and plan.num_params == 1_384_124_976
    assert plan.num_iterations == 16704
    assert plan.num_flops_per_token * plan.total_tokens == pytest.approx(4.3308e19, rel=1e-4)


@pytest.mark.parametrize("depth, ratio, n", [(12, 10.5, 2205), (20, 10.5, 8715), (24, 10.5, 14616), (26, 10.5, 18393)])
def test_horizons_match_the_reference_table(depth, ratio, n):
    cfg = parse_args(["--depth", str(depth), "--target-param-data-ratio", str(ratio)])
    assert derive(cfg, 32768, world_size=8).num_iterations == n


def test_horizon_precedence_and_rounding():
    base = ["--depth", "12"]
    assert derive(parse_args(base + ["--num-iterations", "7", "--target-flops", "1e18"]), 32768, 1).num_iterations == 7
    plan = derive(parse_args(base + ["--target-flops", "1e18"]), 32768, 1)
    assert plan.num_iterations == round(1e18 / (plan.num_flops_per_token * 524288))


def test_model_width_is_nudged_up_to_a_multiple_of_head_dim_and_lr_scaled_by_batch():
    cfg = parse_args(["--depth", "6", "--head-dim", "64", "--max-seq-len", "512", "--total-batch-size", "16384",
                      "--device-batch-size", "32", "--num-iterations", "5000"])
    plan = derive(cfg, 32768, 1)
    assert plan.model_config["n_embd"] == 384 and plan.model_config["n_head"] == 6
    assert plan.batch_lr_scale == pytest.approx(math.sqrt(1 / 32))
    assert plan.weight_decay_scaled == pytest.approx(0.8)
    assert plan.num_params == 73_531_980 and plan.num_scaling_params == 23_200_320  # nanochat's counts
    odd = derive(parse_args(["--depth", "5", "--num-iterations", "1"]), 32768, 1)
    assert odd.model_config["n_embd"] == 384  # 320 rounded up to 3 heads of 128


def test_total_batch_must_divide_by_world_tokens():
    cfg = parse_args(["--depth", "4", "--max-seq-len", "64", "--device-batch-size", "4", "--total-batch-size", "640"])
    with pytest.raises(ValueError, match="must be divisible by"):
        derive(cfg, 512, world_size=2)


def test_lr_schedule_uses_round_half_even_and_never_reaches_zero():
    n = 8715
    warmdown = round(0.5 * n)
    assert warmdown == 4358
    assert lr_multiplier(n - warmdown, n, 0, 0.5, 0.0) == 1.0
    assert lr_multiplier(n - 1, n, 0, 0.5, 0.0) == pytest.approx(1 / warmdown)
    assert lr_multiplier(n - 1, n, 0, 0.5, 0.1) == pytest.approx(1 / warmdown + (1 - 1 / warmdown) * 0.1)
    assert lr_multiplier(0, 100, 10, 0.5, 0.0) == pytest.approx(0.1)
    assert lr_multiplier(9, 100, 10, 0.5, 0.0) == 1.0


def test_muon_momentum_and_weight_decay_schedules():
    assert muon_momentum(0) == 0.85 and muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(300) == pytest.approx(0.95) and muon_momentum(5000) == pytest.approx(0.95)
    assert muon_weight_decay(0, 100, 0.2) == 0.2 and muon_weight_decay(99, 100, 0.2) == pytest.approx(0.002)


def test_auto_cpus_and_data_backend_follow_where_the_run_goes():
    from raychat.local_ray import resolve_auto

    cfg = TrainConfig()  # --cpus-per-worker 0, --data-backend auto
    alone = resolve_auto(cfg, local=True, cpus=2)  # the embedded Ray on 2 cores: the worker takes both
    assert (alone.cpus_per_worker, alone.data_backend) == (2.0, "inline")
    two = resolve_auto(dataclasses.replace(cfg, num_workers=2), local=True, cpus=2)
    assert (two.cpus_per_worker, two.data_backend) == (1.0, "inline")
    spare = resolve_auto(dataclasses.replace(cfg, cpus_per_worker=2.0), local=True, cpus=8)
    assert (spare.cpus_per_worker, spare.data_backend) == (2.0, "ray")  # 6 CPUs left for Ray Data's actors
    cluster = resolve_auto(cfg, local=False, cpus=2)
    assert (cluster.cpus_per_worker, cluster.data_backend) == (1.0, "ray")
    chosen = resolve_auto(dataclasses.replace(cfg, data_backend="ray"), local=True, cpus=2)
    assert chosen.data_backend == "ray"  # a value the user typed is kept
