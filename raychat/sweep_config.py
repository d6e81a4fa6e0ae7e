"""Sweep files (`tune_configs/*.yaml`): the schema, its validation, and the Tune search space it becomes.

A sweep file is plain data, no Python, so it can be checked whole before anything runs:

    name: d12_lr_wd                 # optional; default: the file's stem. Names the sweep directory
    storage_path: /data/sweeps      # optional; default <base>/sweeps; s3:// and gs:// work
    train:                          # base flags: any flag of `python -m raychat.train`, underscores or dashes
      depth: 12
      num_iterations: 2000
    search_space:                   # flag: {distribution: arguments}
      matrix_lr: {loguniform: [0.005, 0.05]}
      weight_decay: {uniform: [0.0, 0.4]}
      window_pattern: {choice: [SSSL, L]}
      warmdown_ratio: {grid: [0.3, 0.5]}
    num_samples: 8                  # samples per grid point (random), repeats of the grid (grid)
    search_alg: random              # random | grid | optuna (pip install 'raychat[optuna]')
    seed: 0
    scheduler: {type: asha, grace_period: 250, reduction_factor: 3}   # grace period in steps; or type: fifo
    max_concurrent_trials: 4
    resources: {workers: 8, cpus_per_worker: 4, gpus_per_worker: 1, driver_cpus: 1}
    max_failures: 2                 # Tune restarts of a failed trial; each resumes its Train run by name

Everything is checked by `load_sweep` before Ray starts: unknown keys and flags, values of the wrong type,
bad distributions, flags the sweep itself owns, impossible resources, and every sampled value's endpoints
through `TrainConfig.validate()`. Each error names the file, the line and the key, the rule and the fix.
"""
import copy
import dataclasses
import math
import os
import re
from dataclasses import dataclass, field

import yaml

from raychat.config import TrainConfig, as_number, coerce
from raychat.storage import absolute

TOP_KEYS = ("name", "storage_path", "train", "search_space", "num_samples", "search_alg", "seed", "scheduler",
            "max_concurrent_trials", "resources", "max_failures")
DISTRIBUTIONS = ("loguniform", "uniform", "choice", "grid")
SEARCH_ALGS = ("random", "grid", "optuna")
SCHEDULER_KEYS = ("type", "grace_period", "reduction_factor")
RESOURCE_KEYS = ("workers", "cpus_per_worker", "gpus_per_worker", "driver_cpus")
# Flags the sweep sets itself: each trial's run name and storage, and the per-trial resources (a trial's
# placement must be fixed before it is sampled, so these are not searchable either).
OWNED_FLAGS = {
    "run_name": "each trial's Train run is named <sweep>-<trial id> by the sweep",
    "storage_path": "trial runs go under <sweep dir>/runs; set the sweep's top-level storage_path instead",
    "num_workers": "set resources.workers instead",
    "cpus_per_worker": "set resources.cpus_per_worker instead",
    "use_gpu": "set resources.gpus_per_worker (0 or 1) instead",
    "dry_run": "pass --dry-run to `python -m raychat.tune` instead",
    "resume_from_step": "a trial resumes its own run by name; pass --resume to continue a sweep",
}
_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_NAME_RULE = re.compile(r"^[A-Za-z0-9_.-]+$")


class SweepConfigError(ValueError):
    """A sweep file that cannot run; the message names file:line, the key, the rule and the fix."""


@dataclass
class Sweep:
    """A validated sweep. `train` holds base flags (underscore names, typed), `search_space` the raw specs."""

    name: str
    path: str
    storage_path: str  # resolved: absolute local path or URI
    train: dict
    search_space: dict  # flag -> (distribution, args)
    num_samples: int = 1
    search_alg: str = "random"
    seed: int = 0
    scheduler: dict = field(default_factory=lambda: {"type": "asha", "grace_period": 1, "reduction_factor": 3})
    max_concurrent_trials: int | None = None
    resources: dict = field(default_factory=lambda: {"workers": 1, "cpus_per_worker": 1.0, "gpus_per_worker": 0,
                                                     "driver_cpus": 1.0})
    max_failures: int = 1

    @property
    def sweep_dir(self) -> str:
        return f"{self.storage_path.rstrip('/')}/{self.name}"

    @property
    def runs_dir(self) -> str:
        """Where the trials' Train runs (checkpoints, reports) live."""
        return f"{self.sweep_dir}/runs"

    def trial_config(self, sampled: dict, trial_id: str) -> TrainConfig:
        """The TrainConfig of one trial: base flags + sampled values + what the sweep owns."""
        values = {**self.train, **sampled}
        res = self.resources
        values.update(run_name=f"{self.name}-{trial_id}", storage_path=self.runs_dir, num_workers=res["workers"],
                      cpus_per_worker=res["cpus_per_worker"], use_gpu="true" if res["gpus_per_worker"] else "false")
        if values.get("run", "dummy") != "dummy":
            values["run"] = f"{values['run']}-{trial_id}"  # one wandb run per trial
        return TrainConfig.from_dict(values)

    def base_config(self) -> TrainConfig:
        """The base flags with each searched flag at a representative value (for planning and printing)."""
        return self.trial_config({k: _representative(d, a) for k, (d, a) in self.search_space.items()}, "plan")

    def num_trials(self) -> int:
        grid = math.prod(len(a) for d, a in self.search_space.values() if d == "grid")
        return self.num_samples * grid

    @property
    def in_process(self) -> bool:
        """A trial of one CPU worker trains in the Tune trial's own process (raychat.tune.run_trial): no Train
        controller and worker group to start. Larger trials drive a Ray Train job."""
        return self.resources["workers"] == 1 and self.resources["gpus_per_worker"] == 0

    def per_trial_resources(self, in_process: bool | None = None) -> dict:
        """Logical resources one trial holds: its Tune driver plus its Train workers (and Ray Data actors).
        `in_process` (None: `self.in_process`) says how the trial trains (a scaling study may choose)."""
        res = self.resources
        backend = self.train.get("data_backend", TrainConfig.data_backend)
        actors = self.train.get("data_actors", TrainConfig.data_actors)  # 1 CPU each
        if self.in_process if in_process is None else in_process:
            # the trial's process is the worker, and there `auto` tokenizes inline
            return {"CPU": res["cpus_per_worker"] + (actors if backend == "ray" else 0), "GPU": 0}
        cpus = res["driver_cpus"] + res["workers"] * res["cpus_per_worker"]
        # `auto` may resolve to Ray Data in a trial (local_ray.resolve_auto): reserve its actors' CPUs too.
        if backend != "inline":
            cpus += res["workers"] * actors
        return {"CPU": cpus, "GPU": res["workers"] * res["gpus_per_worker"]}

    def trial_process_resources(self, in_process: bool | None = None) -> dict:
        """What Tune reserves for a trial's own process: the worker it runs, or the driver of its Train job."""
        in_process = self.in_process if in_process is None else in_process
        return {"CPU": self.resources["cpus_per_worker"] if in_process else self.resources["driver_cpus"]}

    @classmethod
    def from_dict(cls, d: dict) -> "Sweep":
        d = dict(d)
        d["search_space"] = {k: next(iter(v.items())) for k, v in d["search_space"].items()}
        return cls(**d)

    def to_dict(self) -> dict:
        """Plain data (JSON-able): saved in the sweep directory and compared on --resume."""
        d = dataclasses.asdict(self)
        d["search_space"] = {k: {dist: list(args)} for k, (dist, args) in self.search_space.items()}
        return d


def _representative(dist: str, args: list):
    if dist == "loguniform":
        return math.sqrt(args[0] * args[1])
    if dist == "uniform":
        return (args[0] + args[1]) / 2
    return args[0]


# ----------------------------------------------------------------------------------------------------
# Line numbers: compose the YAML once more to map each key path to the line where it is written.


def _key_lines(text: str) -> dict:
    lines = {}

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                p = path + (str(k.value),)
                lines[p] = k.start_mark.line + 1
                walk(v, p)

    try:
        walk(yaml.compose(text, Loader=yaml.SafeLoader), ())
    except yaml.YAMLError:
        pass
    return lines


class _Checker:
    def __init__(self, path: str, text: str):
        self.path, self.lines = path, _key_lines(text)

    def fail(self, keys: tuple, msg: str):
        line = None
        for n in range(len(keys), 0, -1):  # the deepest key that has a line
            line = self.lines.get(tuple(keys[:n]))
            if line is not None:
                break
        where = f"{self.path}:{line}" if line else self.path
        raise SweepConfigError(f"{where}: {'.'.join(keys) or '(top level)'}: {msg}")

    def mapping(self, value, keys: tuple, allowed=None) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(keys, f"must be a mapping (key: value lines), got {type(value).__name__} {value!r}")
        if allowed is not None:
            for k in value:
                if k not in allowed:
                    self.fail(keys + (str(k),), f"unknown key; valid keys here are {', '.join(allowed)}")
        return value

    def integer(self, value, keys, minimum):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.fail(keys, f"{value!r} must be an integer >= {minimum}")
        return value

    def number(self, value, keys, minimum, strict=False):
        value = as_number(value)
        if value is None or not math.isfinite(value) or value < minimum or (strict and value == minimum):
            self.fail(keys, f"must be a number {'>' if strict else '>='} {minimum}")
        return value


def _flag_value(chk: _Checker, flag: str, value, keys: tuple):
    """One flag's value as its TrainConfig type (the command line's conversion), or fail naming the flag's type."""
    try:
        return coerce(flag, value)
    except ValueError as e:
        chk.fail(keys, str(e))


def _flag_name(chk: _Checker, key, keys: tuple) -> str:
    flag = str(key).replace("-", "_")
    if flag not in _FIELDS:
        close = [f for f in _FIELDS if f.split("_")[0] == flag.split("_")[0]][:4]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        chk.fail(keys, f"unknown training flag{hint}; valid flags are those of `python -m raychat.train --help`")
    if flag in OWNED_FLAGS:
        chk.fail(keys, f"the sweep sets this flag itself: {OWNED_FLAGS[flag]}")
    return flag


def _check_with_train_rules(chk: _Checker, train: dict, flag: str, value, keys: tuple):
    """Run TrainConfig.validate() on the base flags with `flag` = `value`; report a failure at `keys`."""
    try:
        TrainConfig.from_dict({**train, flag: value}).validate()
    except ValueError as e:
        chk.fail(keys, f"value {value!r} is not a valid training setting: {e}")


def parse_sweep(data, path: str, text: str = "", overrides: dict | None = None) -> Sweep:
    """Validate a loaded sweep mapping. `overrides` (from --set) are applied first, as if written in the file."""
    from raychat.common import get_base_dir

    chk = _Checker(path, text)
    data = chk.mapping(copy.deepcopy(data), (), TOP_KEYS)
    for dotted, value in (overrides or {}).items():
        parts = dotted.split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                chk.fail(tuple(parts), "--set names a key inside a value that is not a mapping")
        node[parts[-1]] = value
    data = chk.mapping(data, (), TOP_KEYS)

    name = data.get("name") or os.path.splitext(os.path.basename(path))[0]
    if not isinstance(name, str) or not _NAME_RULE.match(name):
        chk.fail(("name",), f"{name!r} must be letters, digits, '_', '.' or '-' (it names directories)")
    storage = data.get("storage_path")
    if storage is not None and (not isinstance(storage, str) or not storage):
        chk.fail(("storage_path",), f"{storage!r} must be a directory path or URI")
    if storage is None:
        storage = os.path.join(get_base_dir(data.get("train", {}).get("base_dir")
                                            if isinstance(data.get("train"), dict) else None, create=False),
                               "sweeps")  # not created here: a dry run loads the sweep too
    else:
        storage = absolute(storage)

    # --- base flags ---
    train = {}
    for key, value in chk.mapping(data.get("train"), ("train",)).items():
        flag = _flag_name(chk, key, ("train", str(key)))
        train[flag] = _flag_value(chk, flag, value, ("train", str(key)))
    try:
        TrainConfig.from_dict(train).validate()
    except ValueError as e:
        chk.fail(("train",), f"the base flags are not a valid training configuration: {e}")
    if train.get("eval_every", TrainConfig.eval_every) <= 0:
        chk.fail(("train", "eval_every"), "must be > 0: trials are compared (and ASHA stops them) on val bpb")
    # Resolve data/tokenizer/base paths once here, on the driver: a trial runs in another working directory (and
    # maybe on another node), where a relative path would name something else.
    resolved = TrainConfig.from_dict(train).resolve_paths()
    for flag in ("base_dir", "data_dir", "tokenizer_dir", "init_from_nanochat"):
        if getattr(resolved, flag) is not None:
            train[flag] = getattr(resolved, flag)

    # --- search space ---
    space = chk.mapping(data.get("search_space"), ("search_space",))
    if not space:
        chk.fail(("search_space",), "is empty; give at least one flag to search, e.g. matrix_lr: {loguniform: [0.005, 0.05]}")
    search_space = {}
    for key, spec in space.items():
        keys = ("search_space", str(key))
        flag = _flag_name(chk, key, keys)
        if flag in train:
            chk.fail(keys, f"is also a base flag under train (line {chk.lines.get(('train', str(key)))}); "
                           "keep it in one place")
        if not isinstance(spec, dict) or len(spec) != 1:
            chk.fail(keys, f"{spec!r} must be one distribution, e.g. {{loguniform: [1e-3, 1e-1]}}; "
                           f"known: {', '.join(DISTRIBUTIONS)}")
        (dist, args), = spec.items()
        if dist not in DISTRIBUTIONS:
            chk.fail(keys, f"unknown distribution {dist!r}; use one of {', '.join(DISTRIBUTIONS)}")
        if not isinstance(args, list) or not args:
            chk.fail(keys, f"{dist} needs a non-empty list, got {args!r}")
        if dist in ("loguniform", "uniform"):
            if _FIELDS[flag].type not in (float, float | None):
                chk.fail(keys, f"{dist} samples real numbers but --{flag.replace('_', '-')} is not a float flag; "
                               "use choice or grid")
            if len(args) != 2 or any(as_number(a) is None for a in args):
                chk.fail(keys, f"{dist} needs [low, high] numbers, got {args!r}")
            lo, hi = (as_number(a) for a in args)
            if not lo < hi:
                chk.fail(keys, f"{dist} needs low < high, got [{lo}, {hi}]")
            if dist == "loguniform" and lo <= 0:
                chk.fail(keys, f"loguniform needs low > 0 (it samples the logarithm), got {lo}")
            args = [lo, hi]
        else:
            args = [_flag_value(chk, flag, a, keys) for a in args]
            if len(set(map(repr, args))) != len(args):
                chk.fail(keys, f"{dist} lists a value twice: {args!r}")
        for value in args:  # endpoints and every listed value must be valid training settings
            _check_with_train_rules(chk, train, flag, value, keys)
        search_space[flag] = (dist, args)

    # --- search ---
    num_samples = chk.integer(data.get("num_samples", 1), ("num_samples",), 1)
    search_alg = data.get("search_alg", "random")
    if search_alg not in SEARCH_ALGS:
        chk.fail(("search_alg",), f"{search_alg!r} must be one of {', '.join(SEARCH_ALGS)}")
    seed = chk.integer(data.get("seed", 0), ("seed",), 0)
    for flag, (dist, _) in search_space.items():
        if search_alg == "grid" and dist in ("loguniform", "uniform"):
            chk.fail(("search_space", flag), f"search_alg grid needs listed values (grid or choice), not {dist}")
        if search_alg == "optuna" and dist == "grid":
            chk.fail(("search_space", flag), "search_alg optuna does not take grid dimensions; use choice")
    if search_alg == "grid":  # a grid search crosses every listed dimension
        search_space = {k: ("grid", a) for k, (_, a) in search_space.items()}

    sched = chk.mapping(data.get("scheduler", {"type": "asha"}), ("scheduler",), SCHEDULER_KEYS)
    stype = sched.get("type", "asha")
    if stype not in ("asha", "fifo"):
        chk.fail(("scheduler", "type"), f"{stype!r} must be asha (early stopping on val bpb) or fifo (none)")
    scheduler = {"type": stype}
    if stype == "asha":
        if "grace_period" not in sched:
            chk.fail(("scheduler",), "asha needs grace_period: the steps every trial runs before it can be stopped")
        scheduler["grace_period"] = chk.integer(sched["grace_period"], ("scheduler", "grace_period"), 1)
        scheduler["reduction_factor"] = chk.number(sched.get("reduction_factor", 3), ("scheduler", "reduction_factor"),
                                                   1, strict=True)
    elif len(sched) > 1:
        chk.fail(("scheduler",), "fifo takes no other keys (grace_period and reduction_factor are asha's)")

    mct = data.get("max_concurrent_trials")
    if mct is not None:
        mct = chk.integer(mct, ("max_concurrent_trials",), 1)
    max_failures = chk.integer(data.get("max_failures", 1), ("max_failures",), 0)

    res_in = chk.mapping(data.get("resources", {}), ("resources",), RESOURCE_KEYS)
    resources = {
        "workers": chk.integer(res_in.get("workers", 1), ("resources", "workers"), 1),
        "cpus_per_worker": chk.number(res_in.get("cpus_per_worker", 1), ("resources", "cpus_per_worker"), 0, strict=True),
        "gpus_per_worker": res_in.get("gpus_per_worker", 0),
        # > 0: Tune places each trial driver in a placement group, and an all-zero bundle is refused.
        "driver_cpus": chk.number(res_in.get("driver_cpus", 1), ("resources", "driver_cpus"), 0, strict=True),
    }
    if resources["gpus_per_worker"] not in (0, 1) or isinstance(resources["gpus_per_worker"], bool):
        chk.fail(("resources", "gpus_per_worker"), f"{resources['gpus_per_worker']!r} must be 0 (CPU training) or 1 "
                 "(raychat runs one Train worker per GPU; use more workers for more GPUs)")
    if resources["gpus_per_worker"] == 0 and train.get("device_type") == "cuda":
        chk.fail(("resources", "gpus_per_worker"), "is 0 but train.device_type is cuda; set gpus_per_worker: 1")

    sweep = Sweep(name=name, path=path, storage_path=storage, train=train, search_space=search_space,
                  num_samples=num_samples, search_alg=search_alg, seed=seed, scheduler=scheduler,
                  max_concurrent_trials=mct, resources=resources, max_failures=max_failures)
    try:
        sweep.base_config().validate()
    except ValueError as e:
        chk.fail(("train",), f"the trial configuration is invalid: {e}")
    return sweep


def read_yaml(path: str, what: str = "sweep file") -> tuple:
    """(parsed data, text) of a YAML file; SweepConfigError naming the file when it cannot be read or parsed."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise SweepConfigError(f"{path}: cannot read the {what}: {e}") from e
    try:
        return yaml.safe_load(text), text
    except yaml.YAMLError as e:
        raise SweepConfigError(f"{path}: not valid YAML: {e}") from e


def load_sweep(path: str, overrides: dict | None = None) -> Sweep:
    """Read and validate a sweep file; raises SweepConfigError naming the line and key at fault."""
    data, text = read_yaml(path)
    return parse_sweep(data, path, text, overrides)


def check_plan(sweep: Sweep, vocab_size: int):
    """Derive the base trial's plan (`config.derive`) and check ASHA's grace period against its horizon.

    Returns the plan. Errors (e.g. a batch that does not divide) name the sweep's keys.
    """
    from raychat.config import derive

    chk = _Checker(sweep.path, open(sweep.path, encoding="utf-8").read() if os.path.exists(sweep.path) else "")
    try:
        plan = derive(sweep.base_config(), vocab_size, sweep.resources["workers"])
    except ValueError as e:
        chk.fail(("train",), str(e))
    grace = sweep.scheduler.get("grace_period")
    if grace is not None and grace >= plan.num_iterations:
        chk.fail(("scheduler", "grace_period"), f"{grace} must be below the trials' {plan.num_iterations} steps, "
                 "or ASHA can never stop a trial early")
    return plan


def check_cluster(sweep: Sweep, cluster: dict, in_process: bool | None = None):
    """Fail when one trial cannot fit on the cluster at all (it would wait forever)."""
    chk = _Checker(sweep.path, open(sweep.path, encoding="utf-8").read() if os.path.exists(sweep.path) else "")
    need = sweep.per_trial_resources(in_process)
    have_cpu, have_gpu = cluster.get("CPU", 0), cluster.get("GPU", 0)
    if need["GPU"] > have_gpu:
        chk.fail(("resources", "gpus_per_worker"), f"one trial needs {need['GPU']:g} GPUs (workers x gpus_per_worker) "
                 f"but the Ray cluster has {have_gpu:g}; lower resources.workers or add GPU nodes")
    if need["CPU"] > have_cpu:
        chk.fail(("resources", "workers"), f"one trial needs {need['CPU']:g} CPUs (driver_cpus + workers x "
                 f"(cpus_per_worker + data actors)) but the Ray cluster has {have_cpu:g}; lower resources or add nodes")
