"""The command line of `python -m raychat.train`, a frozen surface, and `coerce`, the one conversion of a flag's
value that the command line and sweep files share."""
import dataclasses

import pytest

from raychat.config import TrainConfig, build_parser, coerce, parse_args

# Every option with its default (as resolved by the default recipe, seed) and kind: nanochat's base_train flags
# first, then raychat's own. A rename, a new flag, a changed default or a changed type must be a deliberate edit
# here. Kinds ending in "?" left unset take their value from --recipe.
SURFACE = {
    "--recipe": ("seed", "str"),
    "--run": ("dummy", "str"),
    "--device-type": ("", "str"),
    "--compute-dtype": ("auto", "str"),
    "--fp8": (False, "bool"),
    "--fp8-recipe": ("tensorwise", "str"),
    "--depth": (20, "int"),
    "--aspect-ratio": (64, "int"),
    "--head-dim": (128, "int"),
    "--max-seq-len": (2048, "int"),
    "--window-pattern": ("SSSL", "str"),
    "--num-iterations": (-1, "int"),
    "--target-flops": (-1.0, "float"),
    "--target-param-data-ratio": (10.5, "float?"),
    "--device-batch-size": (32, "int"),
    "--total-batch-size": (524288, "int?"),
    "--embedding-lr": (0.3, "float"),
    "--unembedding-lr": (0.004, "float?"),
    "--weight-decay": (0.2, "float?"),
    "--matrix-lr": (0.02, "float"),
    "--scalar-lr": (0.5, "float"),
    "--adam-beta1": (0.8, "float?"),
    "--adam-beta2": (0.95, "float?"),
    "--warmup-ratio": (0.0, "float?"),
    "--warmup-steps": (-1, "int?"),
    "--warmdown-ratio": (0.5, "float?"),
    "--final-lr-frac": (0.0, "float?"),
    "--resume-from-step": (-1, "int"),
    "--eval-every": (250, "int"),
    "--eval-tokens": (10485760, "int?"),
    "--core-metric-every": (2000, "int"),
    "--core-metric-max-per-task": (500, "int"),
    "--sample-every": (2000, "int"),
    "--save-every": (-1, "int"),
    "--model-tag": (None, "str?"),
    # Ray
    "--num-workers": (1, "workers"),
    "--use-gpu": ("auto", "str"),
    "--cpus-per-worker": (0.0, "float"),
    "--storage-path": (None, "str?"),
    "--run-name": (None, "str?"),
    "--max-failures": (3, "int"),
    "--keep-checkpoints": (None, "int?"),
    "--base-dir": (None, "str?"),
    "--data-dir": (None, "str?"),
    "--tokenizer-dir": (None, "str?"),
    "--data-backend": ("auto", "str"),
    "--data-actors": (1, "int"),
    "--init-from-nanochat": (None, "str?"),
    "--nan-policy": ("stop", "str"),
    "--compile": ("auto", "str"),
    "--ortho-dtype": ("auto", "str"),
    "--allow-changed": ("", "str"),
    "--profile": (False, "bool"),
    "--dry-run": (False, "bool"),
    "--debug-fail-at-step": (-1, "int"),
    "--debug-fail-kind": ("exit", "str"),
    "--debug-fail-rank": (0, "int"),
}

# kind: (the TrainConfig field's type, [(typed text, parsed value)], (a bad text, argparse's error) or None)
KINDS = {
    "int": (int, [("7", 7), ("-3", -3)], ("1.5", "invalid int value: '1.5'")),
    "int?": (int | None, [("7", 7), ("none", None), ("", None)], ("x", "invalid int value: 'x'")),
    "float": (float, [("1e-3", 0.001), ("2", 2.0)], ("x", "invalid float value: 'x'")),
    "float?": (float | None, [("1e-3", 0.001), ("none", None)], ("x", "invalid float value: 'x'")),
    "str": (str, [("none", "none"), ("", "")], None),
    "str?": (str | None, [("none", "none"), ("a b", "a b")], None),  # typed text is kept; only unset is None
    "workers": (int, [("3", 3), ("2:4", (2, 4))], ("two", "'two' is not a worker count N or an elastic range MIN:MAX")),
}


def options():
    return {a.option_strings[0]: a for a in build_parser()._actions if a.option_strings and a.dest != "help"}


def test_options_and_defaults_are_the_frozen_surface():
    assert set(options()) == set(SURFACE)
    defaults = {f.name: getattr(parse_args([]), f.name) for f in dataclasses.fields(TrainConfig) if f.name != "min_workers"}
    assert {"--" + k.replace("_", "-"): v for k, v in defaults.items()} == {k: d for k, (d, _) in SURFACE.items()}
    assert all(type(defaults[o[2:].replace("-", "_")]) is type(d) for o, (d, _) in SURFACE.items())


def test_every_flag_has_help(capsys):
    for option, action in options().items():
        assert action.help and action.help.strip(), option
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--help"])
    assert e.value.code == 0
    shown = capsys.readouterr().out
    assert all(option in shown for option in SURFACE)


@pytest.mark.parametrize("option", SURFACE)
def test_each_flag_parses_as_its_kind(option, capsys):
    kind = SURFACE[option][1]
    field = {f.name: f for f in dataclasses.fields(TrainConfig)}[option[2:].replace("-", "_")]
    dest = field.name
    if kind == "bool":
        assert field.type is bool
        assert getattr(build_parser().parse_args([option]), dest) is True
        return
    ftype, good, bad = KINDS[kind]
    assert field.type == ftype
    for text, value in good:
        parsed = getattr(build_parser().parse_args([option, text]), dest)
        assert parsed == value and type(parsed) is type(value), (option, text, parsed)
    if bad:
        text, error = bad
        with pytest.raises(SystemExit):
            build_parser().parse_args([option, text])
        assert f"argument {option}: {error}" in capsys.readouterr().err


def test_min_workers_is_set_by_an_elastic_num_workers_only():
    assert parse_args(["--num-workers", "2:4"]).min_workers == 2 and parse_args([]).min_workers is None
    assert "--min-workers" not in options()


def test_flags_parse_with_types():
    cfg = parse_args(["--depth", "4", "--target-flops", "1e18", "--keep-checkpoints", "2", "--profile",
                      "--model-tag", "mine"])
    assert (cfg.depth, cfg.target_flops, cfg.keep_checkpoints, cfg.profile, cfg.tag) == (4, 1e18, 2, True, "mine")
    assert TrainConfig.from_dict(dataclasses.asdict(cfg)) == cfg


@pytest.mark.parametrize("name, value, expected", [
    ("depth", 4, 4), ("depth", "4", 4), ("keep_checkpoints", None, None), ("matrix_lr", 1, 1.0),
    ("matrix_lr", "1e-3", 0.001),  # YAML 1.1 reads 1e-3 (no dot) as a string
    ("profile", True, True), ("window_pattern", 12, "12"), ("model_tag", None, None),
])
def test_coerce_takes_yaml_values(name, value, expected):
    got = coerce(name, value)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("name, value, error", [
    ("depth", True, "True must be an integer (--depth is an int flag)"),
    ("depth", 4.0, "4.0 must be an integer (--depth is an int flag)"),
    ("depth", "two", "'two' must be an integer (--depth is an int flag)"),
    ("matrix_lr", False, "False must be a number (--matrix-lr is a float flag)"),
    ("matrix_lr", None, "None must be a number (--matrix-lr is a float flag)"),
    ("profile", "true", "'true' must be true or false"),
    ("run", None, "None must be a string"),
    ("window_pattern", ["S"], "['S'] must be a string"),
])
def test_coerce_says_what_a_value_must_be(name, value, error):
    with pytest.raises(ValueError) as e:
        coerce(name, value)
    assert str(e.value) == error
