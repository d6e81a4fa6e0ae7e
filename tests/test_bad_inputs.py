"""The bad-input catalogue of docs/RELIABILITY.md: one test per row.

Every row gives a raychat CLI (or the file reader/validator behind it) one wrong input and checks three
things: it fails (exit code 2, or the named exception for readers), the message names the problem *and* the
fix (two fragments per row), and nothing on disk changed: shards, tokenizer and saved checkpoints hash the
same before and after. The training CLI is called for real (not --dry-run): the refusal must come from the
preflight, before any Ray work; no row starts Ray except the GPU one (which needs a cluster to ask, and is
slow for it).
"""
import dataclasses
import os
import pickle
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import flip_bytes, tree_hashes
from raychat.train import main as train_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_args(ws, name="ckpt", *extra):
    """One worker x 2 accumulation steps, the shapes of conftest.tiny_args."""
    return ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "64",
            "--device-batch-size", "4", "--total-batch-size", "512", "--window-pattern", "SL",
            "--num-iterations", "2", "--eval-every", "-1", "--core-metric-every", "-1", "--sample-every", "-1",
            "--save-every", "1", "--data-backend", "inline", "--num-workers", "1",
            "--data-dir", ws.data, "--tokenizer-dir", ws.tok, "--storage-path", ws.runs, "--run-name", name, *extra]


@dataclasses.dataclass
class Workspace:
    root: str

    @property
    def data(self):
        return os.path.join(self.root, "data")

    @property
    def tok(self):
        return os.path.join(self.root, "tokenizer")

    @property
    def runs(self):
        return os.path.join(self.root, "runs")

    def step(self, n):
        return os.path.join(self.runs, "ckpt", f"step_{n:06d}")


@pytest.fixture(scope="module")
def pristine(tiny_data_dir, tiny_tokenizer_dir, tmp_path_factory):
    """Shards, tokenizer and a real 2-step run `ckpt` (checkpoints at steps 1 and 2, 1 worker), trained in
    this process by the same loop Ray runs (LocalSession), so no Ray is needed."""
    from raychat.config import parse_args
    from raychat.loop import train
    from raychat.session import LocalSession

    ws = Workspace(str(tmp_path_factory.mktemp("pristine")))
    shutil.copytree(tiny_data_dir, ws.data)
    shutil.copytree(tiny_tokenizer_dir, ws.tok)
    cfg = parse_args(tiny_args(ws)).resolve_paths()
    train(cfg, LocalSession(cfg))
    assert os.path.isdir(ws.step(1)) and os.path.isdir(ws.step(2))
    return ws


@pytest.fixture
def ws(pristine, tmp_path):
    """A private copy each row may damage."""
    root = str(tmp_path / "ws")
    shutil.copytree(pristine.root, root)
    return Workspace(root)


def write_text_shard(path, texts):
    pq.write_table(pa.table({"text": texts}), path)


# ----------------------------------------------------------------------------------------------------
# The catalogue. Each row: id -> (damage(ws) -> command, the fragments the message must contain).
# A command is ("train"|"data"|"tok", argv) for a CLI, or a zero-argument callable for a file reader.


def _train(*extra, name="ckpt"):
    return lambda ws: ("train", tiny_args(ws, name, *extra))


def _then(damage, command):
    def run(ws):
        damage(ws)
        return command(ws)
    return run


def _rm(*parts):
    return lambda ws: os.remove(os.path.join(ws.root, *parts))


def _write(rel, data: bytes):
    def damage(ws):
        with open(os.path.join(ws.root, rel), "wb") as f:
            f.write(data)
    return damage


def _truncate(rel_fn):
    def damage(ws):
        path = rel_fn(ws)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    return damage


def _flip(rel_fn):
    return lambda ws: flip_bytes(rel_fn(ws))


def _ckpt_cli(kind, *extra):
    """`python -m raychat.eval` or `raychat.export` on the workspace's run `ckpt`."""
    def command(ws):
        common = ["--run-name", "ckpt", "--storage-path", ws.runs, "--tokenizer-dir", ws.tok, *extra]
        if kind == "eval":
            return ("eval", [*common, "--eval", "bpb", "--data-dir", ws.data, "--out-dir", os.path.join(ws.root, "o")])
        return ("export", [*common, "--to-nanochat", os.path.join(ws.root, "nc")])
    return command


def _empty_data_dir(ws):
    for name in os.listdir(ws.data):
        os.remove(os.path.join(ws.data, name))


def _only_val(ws):
    for name in os.listdir(ws.data):
        if name != "val.parquet":
            os.remove(os.path.join(ws.data, name))


def _cluster_yaml(mutate):
    def command(ws):
        from ray.autoscaler._private.util import prepare_config, validate_config

        with open(os.path.join(REPO, "cluster.yaml")) as f:
            config = yaml.safe_load(f)
        mutate(config)
        return lambda: validate_config(prepare_config(config))
    return command


def _misspell_max_workers(config):
    config["max_worker"] = config.pop("max_workers")


def _max_workers_text(config):
    config["max_workers"] = "two"


def _nanochat_dir(ws):
    os.makedirs(os.path.join(ws.root, "nanochat_empty"))
    return ("train", tiny_args(ws, "fresh", "--init-from-nanochat", os.path.join(ws.root, "nanochat_empty")))


def _sweep(mutate=None, text=None):
    """`python -m raychat.tune FILE --dry-run` on tune_configs/cpu_smoke.yaml changed by `mutate`, or on `text`.
    --dry-run is the same file check a real launch runs first (load_sweep), without a sweep behind it."""
    def command(ws):
        if text is None:
            with open(os.path.join(REPO, "tune_configs", "cpu_smoke.yaml")) as f:
                config = yaml.safe_load(f)
            mutate(config)
            body = yaml.safe_dump(config)
        else:
            body = text
        path = os.path.join(ws.root, "sweep.yaml")
        with open(path, "w") as f:
            f.write(body)
        return ("tune", [path, "--dry-run", "--set", f"train.data_dir={ws.data}", "--set",
                         f"train.tokenizer_dir={ws.tok}"])
    return command


def _load_rank_files(step):
    def command(ws):
        from raychat import checkpoint as ckpt_files

        return lambda: ckpt_files.load_rank_state(ws.step(step), 0, 1, "cpu")
    return command


ROWS = {
    # --- CLI flags: python -m raychat.train ---
    "train-depth-zero": (_train("--depth", "0"), ["--depth=0", "must be a positive integer"]),
    "train-window-pattern-letter": (_train("--window-pattern", "SXL"), ["--window-pattern='SXL'", "only the letters S"]),
    "train-no-horizon": (_train("--num-iterations", "-1", "--target-param-data-ratio", "-1"),
                         ["no training horizon", "set --num-iterations"]),
    "train-warmup-plus-warmdown": (_train("--warmup-ratio", "0.6", "--warmdown-ratio", "0.6"),
                                   ["--warmdown-ratio=0.6", "must not exceed 1"]),
    "train-batch-not-divisible": (_train("--total-batch-size", "500"),
                                  ["--total-batch-size=500 must be divisible", "change --total-batch-size"]),
    "train-lr-nan": (_train("--matrix-lr", "nan"), ["--matrix-lr=nan", "finite number"]),
    "train-nan-policy": (_train("--nan-policy", "ignore"), ["--nan-policy='ignore'", "must be stop or skip"]),
    "train-run-name-slash": (_train(name="a/b"), ["--run-name='a/b'", "without '/'"]),
    "train-not-an-int": (_train("--depth", "two"), ["--depth", "invalid int value: 'two'"]),
    "train-unknown-flag": (_train("--depht", "4"), ["unrecognized arguments", "--depht"]),
    "train-debug-rank-out-of-range": (_train("--debug-fail-rank", "1"),
                                      ["--debug-fail-rank=1", "[0, --num-workers=1)"]),
    # --- CLI flags: python -m raychat.data and python -m scripts.tok_train ---
    "data-download-zero-shards": (lambda ws: ("data", ["download", "-n", "0", "--data-dir", ws.data]),
                                  ["-n=0", "at least 1 shard"]),
    "data-prepare-val-fraction": (lambda ws: ("data", ["prepare", "--from", "stdlib", "--out", ws.data,
                                                       "--val-fraction", "0.9"]),
                                  ["--val-fraction=0.9", "must be in (0, 0.5]"]),
    "data-prepare-missing-source": (lambda ws: ("data", ["prepare", "--from", os.path.join(ws.root, "nope.txt"),
                                                         "--out", os.path.join(ws.root, "new")]),
                                    ["nope.txt does not exist", "pass a .txt/.jsonl/.parquet file"]),
    "data-prepare-over-existing-shards": (lambda ws: ("data", ["prepare", "--from", "stdlib", "--out", ws.data]),
                                          ["already holds", "choose an empty --out"]),
    "tok-vocab-too-small": (lambda ws: ("tok", ["--vocab-size", "100", "--data-dir", ws.data]),
                            ["--vocab-size=100", "must be >= 265"]),
    "tok-no-shards": (_then(_empty_data_dir, lambda ws: ("tok", ["--data-dir", ws.data, "--base-dir", ws.root])),
                      ["has no validation shard", "python -m raychat.data"]),
    # --- shard files ---
    "shards-dir-missing": (_train("--data-dir", "/nonexistent/raychat-shards"),
                           ["/nonexistent/raychat-shards does not exist", "python -m raychat.data download"]),
    "shards-dir-empty": (_then(_empty_data_dir, _train()), ["has no validation shard", "python -m raychat.data"]),
    "shards-no-val": (_then(_rm("data", "val.parquet"), _train()), ["has no validation shard", "val.parquet"]),
    "shards-only-val": (_then(_only_val, _train()), ["no training shard", "python -m raychat.data download"]),
    "shards-corrupt": (_then(_write("data/shard_00000.parquet", b"PAR1 this is not parquet at all"), _train()),
                       ["shard_00000.parquet is not a readable parquet file", "download or prepare it again"]),
    "shards-truncated": (_then(_truncate(lambda ws: os.path.join(ws.data, "val.parquet")), _train()),
                         ["val.parquet is not a readable parquet file", "download or prepare it again"]),
    "shards-no-text-column": (
        _then(lambda ws: pq.write_table(pa.table({"content": ["a", "b"]}), os.path.join(ws.data, "shard_00000.parquet")),
              _train()), ["has no `text` column", "string column named `text`"]),
    "shards-text-not-string": (
        _then(lambda ws: pq.write_table(pa.table({"text": [1, 2]}), os.path.join(ws.data, "shard_00000.parquet")),
              _train()), ["column `text` has type int64", "expected string"]),
    # --- tokenizer files ---
    "tokenizer-missing": (_then(_rm("tokenizer", "tokenizer.pkl"), _train()), ["tokenizer.pkl is missing", "scripts.tok_train"]),
    "tokenizer-truncated-pickle": (_then(_truncate(lambda ws: os.path.join(ws.tok, "tokenizer.pkl")), _train()),
                                   ["tokenizer.pkl is not a tokenizer raychat will load: pickle data was truncated", "scripts.tok_train"]),
    "tokenizer-not-an-encoding": (_then(_write("tokenizer/tokenizer.pkl", pickle.dumps({"vocab": 1})), _train()),
                                  ["holds a dict, not a pickled tiktoken Encoding", "scripts.tok_train"]),
    "tokenizer-token-bytes-missing": (_then(_rm("tokenizer", "token_bytes.pt"), _train()),
                                      ["token_bytes.pt is missing", "scripts.tok_train"]),
    # --- checkpoints ---
    "ckpt-other-model": (_train("--depth", "3"), ["from another model", "use the same model flags or a new --run-name"]),
    "ckpt-other-data-slots": (_train("--device-batch-size", "2"),
                              ["read 2 micro-batches (data slots) per step, this run 4",
                               "keep --total-batch-size, --device-batch-size and --max-seq-len"]),
    "ckpt-resume-step-missing": (_train("--resume-from-step", "7"), ["--resume-from-step 7", "found steps [1, 2]"]),
    "ckpt-resume-step-truncated": (_then(_truncate(lambda ws: os.path.join(ws.step(1), "optim_rank0.pt")),
                                         _train("--resume-from-step", "1")),
                                   ["optim_rank0.pt has", "pick another step"]),
    "ckpt-reader-truncated": (_then(_truncate(lambda ws: os.path.join(ws.step(2), "model.pt")), _load_rank_files(2)),
                              ["is incomplete", "were written: truncated"]),
    "ckpt-resume-step-corrupt": (_then(_flip(lambda ws: os.path.join(ws.step(1), "optim_rank0.pt")),
                                       _train("--resume-from-step", "1")),
                                 ["optim_rank0.pt does not match its checksum", "pick another step"]),
    "ckpt-reader-corrupt": (_then(_flip(lambda ws: os.path.join(ws.step(2), "model.pt")), _load_rank_files(2)),
                            ["model.pt does not match its checksum", "corrupt"]),
    "ckpt-eval-step-corrupt": (_then(_flip(lambda ws: os.path.join(ws.step(2), "model.pt")),
                                     _ckpt_cli("eval", "--step", "2")),
                               ["model.pt does not match its checksum", "pick another step"]),
    "ckpt-export-step-corrupt": (_then(_flip(lambda ws: os.path.join(ws.step(2), "model.pt")),
                                       _ckpt_cli("export", "--step", "2")),
                                 ["model.pt does not match its checksum", "pick another step"]),
    "ckpt-changed-settings": (_train("--matrix-lr", "0.05", "--num-iterations", "3"),
                              ["--num-iterations 2 -> 3, --matrix-lr 0.02 -> 0.05",
                               "--allow-changed num_iterations,matrix_lr"]),
    "ckpt-changed-settings-partly-allowed": (_train("--matrix-lr", "0.05", "--num-iterations", "3",
                                                    "--allow-changed", "num-iterations"),
                                             ["with other settings than it was trained with: --matrix-lr 0.02 -> 0.05;",
                                              "--allow-changed matrix_lr"]),
    "train-allow-changed-not-trajectory": (_train("--allow-changed", "eval_every"),
                                           ["--allow-changed='eval_every'",
                                            "not a setting that defines a run's trajectory"]),
    "ckpt-nanochat-dir-without-model": (_nanochat_dir, ["no nanochat checkpoint (model_XXXXXX.pt)", "nanochat_empty"]),
    # --- sweep YAML: python -m raychat.tune ---
    "sweep-not-yaml": (_sweep(text="train: [unclosed\n"), ["sweep.yaml: not valid YAML", "expected ',' or ']'"]),
    "sweep-unknown-train-flag": (_sweep(lambda c: c["train"].update(depht=3)),
                                 ["train.depht: unknown training flag", "python -m raychat.train --help"]),
    "sweep-unknown-key": (_sweep(lambda c: c.update(num_sampels=3)),
                          ["num_sampels: unknown key", "valid keys here are"]),
    "sweep-unknown-distribution": (_sweep(lambda c: c.update(search_space={"matrix_lr": {"gaussian": [0.1, 0.2]}})),
                                   ["unknown distribution 'gaussian'", "use one of loguniform, uniform"]),
    "sweep-loguniform-from-zero": (_sweep(lambda c: c.update(search_space={"matrix_lr": {"loguniform": [0.0, 0.1]}})),
                                   ["loguniform needs low > 0", "got 0.0"]),
    # --- cluster files (the autoscaler's own validator, as `ray up` runs it) ---
    "cluster-misspelt-key": (_cluster_yaml(_misspell_max_workers), ["'max_worker' was unexpected", "Additional properties"]),
    "cluster-wrong-type": (_cluster_yaml(_max_workers_text), ["'two' is not of type 'integer'", "max_workers"]),
}


def run_command(command, capsys):
    """(failed, message) of one row's command: a CLI's exit code and output, or a reader's exception."""
    if callable(command):
        try:
            command()
        except Exception as e:  # noqa: BLE001 - the row names what it expects in the message
            return True, f"{type(e).__name__}: {e}"
        return False, "no error"
    kind, argv = command
    if kind == "train":
        fn = train_main
    elif kind == "data":
        from raychat.data.__main__ import main as fn
    elif kind == "tune":
        from raychat.tune import main as fn
    elif kind == "eval":
        from raychat.eval import main as fn
    elif kind == "export":
        from raychat.export import main as fn
    else:
        from scripts.tok_train import main as fn
    try:
        rc = fn(argv)
        error = None
    except SystemExit as e:  # argparse: exit 2 with usage on stderr
        rc, error = e.code, None
    except (ValueError, FileNotFoundError, OSError) as e:  # readers behind the data/tokenizer CLIs
        rc, error = 1, f"{type(e).__name__}: {e}"
    out = capsys.readouterr()
    return rc not in (0, None), "\n".join(filter(None, [out.err, out.out, error]))


@pytest.mark.parametrize("row", list(ROWS))
def test_bad_input(row, ws, capsys):
    damage_and_command, fragments = ROWS[row]
    command = damage_and_command(ws)
    before = tree_hashes(ws.root)
    failed, message = run_command(command, capsys)
    assert failed, f"{row}: accepted ({message})"
    for fragment in fragments:
        assert fragment in message, f"{row}: {fragment!r} not in the message:\n{message}"
    assert tree_hashes(ws.root) == before, f"{row}: files changed"


def test_train_cli_refusals_exit_2_before_ray(ws, capsys):
    """The training CLI's refusals are exit code 2 with one `error:` line, and none of them started Ray (checked
    when this test runs in a process where Ray is not up yet, as when this file runs alone)."""
    import ray

    ray_was_up = ray.is_initialized()
    for row in ("train-depth-zero", "shards-no-val", "tokenizer-missing", "ckpt-other-model"):
        damage_and_command, _ = ROWS[row]
        _, argv = damage_and_command(ws)
        assert train_main(argv) == 2, row
        assert capsys.readouterr().err.startswith("error: "), row
    assert ray.is_initialized() == ray_was_up


@pytest.mark.slow
def test_gpu_asked_on_a_cpu_cluster(ws, ray_local, capsys):
    """--use-gpu true against a cluster without GPUs: refused once the cluster is known, before any worker."""
    before = tree_hashes(ws.root)
    assert train_main(tiny_args(ws, "gpu", "--use-gpu", "true")) == 2
    err = capsys.readouterr().err
    assert "--use-gpu true asks for 1 GPUs but the Ray cluster has 0" in err
    assert "use --use-gpu false" in err
    assert tree_hashes(ws.root) == before
    assert not os.path.exists(os.path.join(ws.runs, "gpu"))


def test_catalogue_is_documented():
    """docs/RELIABILITY.md's catalogue table lists exactly the rows tested here."""
    doc = open(os.path.join(REPO, "docs", "RELIABILITY.md")).read()
    section = doc.split("## Bad-input catalogue", 1)[1].split("\n## ", 1)[0]
    documented = {line.split("`")[1] for line in section.splitlines() if line.startswith("| `")}
    expected = set(ROWS) | {"train-gpu-on-cpu-cluster"}
    assert documented == expected, (f"undocumented: {sorted(expected - documented)}; "
                                    f"documented but untested: {sorted(documented - expected)}")
    assert len(expected) >= 25
