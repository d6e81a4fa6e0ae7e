"""The scaling study: the isoFLOP fit on synthetic points from known laws, degenerate grids, the study file, the
recommended command, and one tiny real study through Ray Tune (CSV rows, a rerun that skips finished points)."""
import csv
import math
import os
import shlex

import numpy as np
import pytest

from raychat.config import parse_args
from raychat.scaling import load_study, main, parse_study, point_plans, recommended_command
from raychat.scaling_fit import FitError, Point, fit_budget, fit_power_law, fit_scaling, recommend
from raychat.sweep_config import SweepConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "tune_configs", "scaling_cpu_tiny.yaml")
NANOCHAT = os.path.join(REPO, "tune_configs", "scaling_nanochat.yaml")
BUDGETS = [1e18, 2.15e18, 4.64e18, 1e19]


def parabola_points(a=0.45, b=0.55, n0=0.1, d0=1.7, k=0.08, noise=0.0, offsets=np.linspace(-0.6, 0.6, 7)):
    """isoFLOP parabolas with a known optimum: bpb = E(C) + k (log10 N - log10 N*(C))^2, N*(C) = n0 C^a, and
    tokens D = d0 C^b (N/N*)^(-b/a) so that D*(C) = d0 C^b exactly at the optimum."""
    rng = np.random.default_rng(0)
    pts = []
    for c in BUDGETS:
        n_star = n0 * c**a
        for i, off in enumerate(offsets):
            n = n_star * 10**off
            tokens = d0 * c**b * (n / n_star) ** (-b / a)
            bpb = 1.0 - 0.05 * math.log10(c / 1e18) + k * off**2 + noise * rng.standard_normal()
            pts.append(Point(budget=c, depth=8 + 2 * i, n=n, tokens=tokens, val_bpb=bpb))
    return pts


def test_exact_parabolas_recover_the_laws_and_optima():
    fit = fit_scaling(parabola_points())
    assert fit.n_law.exponent == pytest.approx(0.45, abs=1e-9)
    assert fit.d_law.exponent == pytest.approx(0.55, abs=1e-6)
    assert fit.n_law.exponent_se == pytest.approx(0, abs=1e-9)
    for b in fit.budgets:
        assert b.edge is None and b.n_opt == pytest.approx(0.1 * b.budget**0.45, rel=1e-9)
        assert b.tokens_opt == pytest.approx(1.7 * b.budget**0.55, rel=1e-9)
    c = 1e19
    assert fit.ratio_at(c) == pytest.approx(1.7 * c**0.55 / (0.1 * c**0.45), rel=1e-6)


def test_noisy_points_give_exponents_within_their_standard_errors():
    fit = fit_scaling(parabola_points(noise=0.002))
    assert 0 < fit.n_law.exponent_se < 0.1
    assert abs(fit.n_law.exponent - 0.45) < 3 * fit.n_law.exponent_se + 0.02


def test_chinchilla_loss_recovers_its_optimum():
    """L = E + A/N^alpha + B/D^beta at C = 6ND: the compute-optimal N grows as C^(beta/(alpha+beta))."""
    E, A, B, alpha, beta = 1.69, 406.4, 410.7, 0.34, 0.28
    G = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
    pts = []
    for c in [1e18, 1e19, 1e20, 1e21]:
        n_star = G * (c / 6) ** (beta / (alpha + beta))
        for i, off in enumerate(np.linspace(-0.5, 0.5, 9)):
            n = n_star * 10**off
            d = c / (6 * n)
            pts.append(Point(budget=c, depth=i + 1, n=n, tokens=d, val_bpb=E + A / n**alpha + B / d**beta))
    fit = fit_scaling(pts)
    assert fit.n_law.exponent == pytest.approx(beta / (alpha + beta), abs=0.01)
    assert fit.d_law.exponent == pytest.approx(alpha / (alpha + beta), abs=0.01)
    for b in fit.budgets:
        assert b.n_opt == pytest.approx(G * (b.budget / 6) ** (beta / (alpha + beta)), rel=0.05)


def test_a_minimum_at_the_edge_is_reported_not_invented():
    # The smallest budget's points all lie above its optimum: val bpb rises with N from the first point on.
    pts = [p for p in parabola_points() if not (p.budget == 1e18 and p.depth < 14)]
    fit = fit_scaling(pts)
    edge = fit.budgets[0]
    assert edge.budget == 1e18 and edge.n_opt is None and "smallest depth" in edge.edge
    assert all(b.n_opt is not None for b in fit.budgets[1:])
    assert fit.n_law.exponent == pytest.approx(0.45, abs=1e-9)  # fitted from the other three
    down = fit_budget(1e18, [Point(1e18, d, 10.0**d, 1.0, 2.0 - (d - 2) ** 2) for d in (1, 2, 3)])
    assert down.n_opt is None and "opens downward" in down.edge


def test_too_few_points_or_budgets_are_clear_errors():
    pts = parabola_points()
    with pytest.raises(FitError, match="at least 3"):
        fit_scaling([p for p in pts if p.depth <= 10])
    with pytest.raises(FitError, match="at least 2 budgets"):
        fit_scaling([p for p in pts if p.budget == 1e18])
    with pytest.raises(FitError, match="no finished point"):
        fit_scaling([])
    two = fit_power_law([1, 10], [2, 20])
    assert two.exponent == pytest.approx(1) and math.isnan(two.exponent_se)


def test_recommendation_picks_the_nearest_depth_and_its_command_parses(tmp_path):
    fit = fit_scaling(parabola_points())
    sizes = {d: int(1e6 * d**3) for d in range(1, 40)}
    fpt = {d: 6.0 * n for d, n in sizes.items()}
    rec = recommend(fit, 1e20, sizes, fpt, 524288)
    best = min(sizes, key=lambda d: abs(math.log(sizes[d] / rec.n_opt)))
    assert rec.depth == best and rec.n == sizes[best]
    assert rec.iterations == round(1e20 / (fpt[best] * 524288)) and rec.tokens == rec.iterations * 524288

    study = load_study(NANOCHAT, {"storage_path": str(tmp_path)})
    argv = shlex.split(recommended_command(study, 24, 1e20))
    assert argv[:3] == ["python", "-m", "raychat.train"]
    cfg = parse_args(argv[3:])
    assert cfg.depth == 24 and cfg.target_flops == 1e20 and cfg.target_param_data_ratio == -1
    assert cfg.total_batch_size == study.sweep.base_config().total_batch_size


def test_study_files_resolve_and_bad_ones_name_the_key(tmp_path):
    study = load_study(NANOCHAT, {"storage_path": str(tmp_path)})
    assert study.budgets == BUDGETS and study.depths == [8, 10, 12, 14, 16, 18, 20] and not study.in_process
    names = [study.point_config(p).run_name for p in study.points()]
    assert len(names) == 28 and "scaling_nanochat-2.15e18-d12" in names
    cfg = study.point_config({"budget": 2.15e18, "depth": 12})
    assert cfg.target_flops == 2.15e18 and cfg.target_param_data_ratio == -1 and cfg.depth == 12
    plans = point_plans(study, 32768)
    _, plan = plans["scaling_nanochat-1e18-d12"]
    assert plan.num_iterations == round(1e18 / (plan.num_flops_per_token * 524288))

    base = {"budgets": [1e10], "depths": [1, 2, 3], "train": {"eval_every": 10}}
    cases = [({**base, "budgets": None}, "exactly one of budgets"),
             ({**base, "ratio": 10}, "exactly one of budgets"),
             ({**base, "depths": [1, 1]}, "twice"),
             ({**base, "train": {"depth": 4}}, "each point sets this flag"),
             ({**base, "train": {"num_iterations": 4}}, "each point sets this flag"),
             ({**base, "resources": {"workers": 2}, "in_process": True}, "resources.workers 1"),
             ({**base, "budgets": [-1]}, "must be a number > 0"),
             ({**base, "train": {"recipe": "2026-07"}}, "train.total_batch_size: a study compares its points")]
    for data, fragment in cases:
        with pytest.raises(SweepConfigError, match=fragment):
            parse_study({k: v for k, v in data.items() if v is not None}, "x.yaml")
    # depth 1 x aspect 16 = 16 channels: the model would fail at its first forward; the study names the depths.
    with pytest.raises(SweepConfigError, match=r"n.yaml: depths: value 1 .*the model's gates read"):
        parse_study({**base, "train": {"eval_every": 10, "aspect_ratio": 16, "head_dim": 16}}, "n.yaml")
    parse_study({**base, "depths": [2, 3], "train": {"eval_every": 10, "aspect_ratio": 16, "head_dim": 16}}, "n.yaml")
    mini = parse_study({"ratio": 12, "depths": [2, 3], "train": {"eval_every": 10}}, "mini.yaml")
    cfg = mini.point_config(mini.points()[0])
    assert cfg.target_param_data_ratio == 12 and cfg.target_flops == -1 and cfg.run_name == "mini-r12-d2"


def test_a_model_narrower_than_the_value_embedding_gate_is_refused_naming_its_flags():
    import torch

    from raychat.model import GPT, GPTConfig

    with pytest.raises(ValueError, match=r"--aspect-ratio=16: model_dim = --depth 1 x --aspect-ratio 16, rounded up "
                                         r"to a multiple of --head-dim 16, is 16: below the 32 channels"):
        parse_args(["--depth", "1", "--aspect-ratio", "16", "--head-dim", "16"])
    assert parse_args(["--depth", "1", "--aspect-ratio", "16", "--head-dim", "32"]).model_dim == 32  # rounded up
    assert parse_args(["--depth", "2", "--aspect-ratio", "16", "--head-dim", "16"]).model_dim == 32
    # The rule is the model's: it refuses 16 channels, trains 32.
    def gpt(width):
        return GPT(GPTConfig(sequence_len=4, vocab_size=64, n_layer=1, n_head=1, n_kv_head=1, n_embd=width,
                             window_pattern="L"))

    with pytest.raises(ValueError, match="below the 32 channels the gates read"):
        gpt(16)
    model = gpt(32)
    model.init_weights()
    idx = torch.zeros(1, 4, dtype=torch.long)
    assert torch.isfinite(model(idx, idx))


@pytest.mark.parametrize("name", ["scaling_cpu_tiny.yaml", "scaling_nanochat.yaml", "scaling_miniseries.yaml"])
def test_shipped_studies_dry_run(name, tiny_data_dir, tiny_tokenizer_dir, tmp_path, capsys):
    assert main([os.path.join(REPO, "tune_configs", name), "--dry-run", "--storage-path", str(tmp_path),
                 "--set", f"train.data_dir={tiny_data_dir}", "--set", f"train.tokenizer_dir={tiny_tokenizer_dir}"]) == 0
    assert "point(s)" in capsys.readouterr().out


@pytest.mark.slow
def test_tiny_study_through_tune_writes_rows_and_a_rerun_skips_them(ray_local, tiny_data_dir, tiny_tokenizer_dir,
                                                                     tmp_path, capsys):
    # The least that proves the path: one budget x two depths of the tiny config's shapes (1-2 steps each, one
    # evaluation batch) as two concurrent Tune trials, their CSV rows, and a rerun that trains nothing. Two
    # points support no fit: the report says so.
    args = [TINY, "--storage-path", str(tmp_path), "--name", "t", "--set", f"train.data_dir={tiny_data_dir}",
            "--set", f"train.tokenizer_dir={tiny_tokenizer_dir}", "--set", "budgets=[1.5e9]",
            "--set", "depths=[2, 3]", "--set", "train.eval_tokens=2048"]
    batch = load_study(TINY, {"storage_path": str(tmp_path)}).sweep.base_config().total_batch_size
    assert main(args) == 0
    out = capsys.readouterr().out
    study_dir = os.path.join(tmp_path, "t")
    with open(os.path.join(study_dir, "results.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["run_name"] for r in rows) == ["t-1.5e9-d2", "t-1.5e9-d3"]
    for r in rows:
        assert math.isfinite(float(r["val_bpb"])) and int(r["num_iterations"]) >= 1
        assert int(r["tokens_trained"]) == int(r["num_iterations"]) * batch
        assert os.path.isfile(os.path.join(study_dir, "runs", r["run_name"], "report.md"))
    assert {r["depth"]: int(r["num_iterations"]) for r in rows} == {"2": 2, "3": 1}  # 1.5e9 / (FLOPs/token x batch)
    report = open(os.path.join(study_dir, "scaling_report.md")).read()
    assert report in out and "2 of 2 points finished" in report and "**No fit**" in report

    # A rerun finds every point in the CSV: no trial starts, nothing is retrained, the report is rewritten.
    before = {r["run_name"]: os.path.getmtime(os.path.join(study_dir, "runs", r["run_name"], "report.md"))
              for r in rows}
    assert main(args) == 0
    assert "2 of 2 points in" in capsys.readouterr().out
    assert len(os.listdir(os.path.join(study_dir, "tune"))) == 1  # no second Tune experiment
    for name, mtime in before.items():
        assert os.path.getmtime(os.path.join(study_dir, "runs", name, "report.md")) == mtime
