"""The one configuration object of training, evaluation and sweeps: its flags, their parsing, what they derive.

`TrainConfig` holds every flag of nanochat's base_train with the same name, default and meaning, plus the Ray
flags; each field declared with `flag` is a command-line flag, its help text beside its default. `coerce` turns a
command-line string or a sweep file's YAML value into a field's type (`build_parser` and `raychat.sweep_config`
both use it). `derive()` computes the derived quantities (model shape, batch split, LR scaling, horizon) once,
in the reference's order, and returns them with the lines the reference prints. Both the driver (to fail before
the cluster does any work) and every worker (to build the same model) call it.
"""
import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field

# Fault-injection kinds for the reliability tests (docs/RELIABILITY.md, raychat.loop._inject_failure).
DEBUG_FAIL_KINDS = ("exit", "kill", "kill-in-checkpoint", "nan")

# The batch size (tokens) at which the reference tuned its learning rates: other batches scale them by sqrt.
REFERENCE_BATCH = 2**19
# The depth at which the 2026-07 recipe's batch size and weight decay are tuned; other depths scale from it.
REFERENCE_DEPTH = 12

# A recipe is the defaults of the flags below plus model and optimizer options (raychat.model's
# RECIPE_OPTIONS, raychat.optim's recipe keyword, the schedules). "seed" is nanochat 07c4dd4 (February 2026),
# "2026-07" nanochat 92d63d4 (July 2026, 1.65 h to GPT-2 on 8xH100 against 3.04 h: docs/DIFFERENCES.md).
# A flag left unset takes its recipe's value; a flag given explicitly wins. adam_beta1/2 are the seed's only:
# the 2026-07 recipe sets betas per parameter group. warmup_steps -1 means "use warmup_ratio". Each recipe
# trains on its reference's data by default (`python -m raychat.data download --source ...`).
RECIPE_DATA = {"seed": "fineweb-edu", "2026-07": "climbmix"}
RECIPES = {
    "seed": dict(target_param_data_ratio=10.5, total_batch_size=524288, unembedding_lr=0.004, weight_decay=0.2,
                 adam_beta1=0.8, adam_beta2=0.95, warmup_ratio=0.0, warmup_steps=-1, warmdown_ratio=0.5,
                 final_lr_frac=0.0, eval_tokens=20 * 524288),
    "2026-07": dict(target_param_data_ratio=12.0, total_batch_size=-1, unembedding_lr=0.008, weight_decay=0.28,
                    adam_beta1=None, adam_beta2=None, warmup_ratio=0.0, warmup_steps=40, warmdown_ratio=0.65,
                    final_lr_frac=0.05, eval_tokens=80 * 524288),
}

# The settings that define a run's trajectory (model, horizon, batch, optimizer, schedules, data): a resumed
# run must keep them, or say with --allow-changed that it means to change them (changed_settings). Everything
# else may change on resume: logging and eval/sample/save cadence, storage and paths of the run itself, the
# worker count (checked by checkpoint.check_compatible), failure handling, the data pipeline's backend and
# actors (same tokens either way), debug flags. --data-dir and --tokenizer-dir are paths, which move (a copied
# workspace, another mount point, an s3:// mirror), so they are not compared: what they hold is, through the
# inputs' fingerprint in every checkpoint (raychat.inputs), which --allow-changed names as INPUT_NAMES.
INPUT_NAMES = ("data", "tokenizer")
TRAJECTORY_SETTINGS = (
    "depth", "aspect_ratio", "head_dim", "max_seq_len", "window_pattern",
    "num_iterations", "target_flops", "target_param_data_ratio", "device_batch_size", "total_batch_size",
    "embedding_lr", "unembedding_lr", "weight_decay", "matrix_lr", "scalar_lr", "adam_beta1", "adam_beta2",
    "warmup_ratio", "warmdown_ratio", "final_lr_frac", "recipe", "warmup_steps", "compute_dtype", "fp8",
    "fp8_recipe",
)


def flag(default, help: str):
    """A TrainConfig field that is a command-line flag (`--name-with-dashes`), its help text beside its default."""
    return field(default=default, metadata={"help": help})


def recipe_flag(name: str, help: str):
    """A flag whose default comes from --recipe: None until TrainConfig resolves it."""
    defaults = ", ".join(f"{recipe} {values[name]!r}" for recipe, values in RECIPES.items())
    return field(default=None, metadata={"help": f"{help} (recipe defaults: {defaults})"})


@dataclass
class TrainConfig:
    # --- nanochat base_train flags: same names, defaults and meaning ---
    recipe: str = flag("seed", "seed|2026-07: the training recipe, a set of defaults and model/optimizer options. "
                               "seed = nanochat 07c4dd4 (Feb 2026), 2026-07 = nanochat 92d63d4 (Jul 2026: smear, "
                               "backout, MuonEq/Muon+, auto batch size, ratio 12; docs/DIFFERENCES.md). Flags given "
                               "explicitly override the recipe's values")
    run: str = flag("dummy", "wandb run name ('dummy' disables wandb logging)")
    device_type: str = flag("", "cuda|cpu|mps (empty = autodetect)")
    compute_dtype: str = flag("auto", "auto|bf16|fp32: the 2026-07 recipe's compute dtype (weights stay fp32 and "
                                      "are cast in forward; auto = bf16 on CUDA from sm80, fp32 elsewhere, like "
                                      "nanochat's NANOCHAT_DTYPE); the seed recipe uses bf16 autocast on CUDA")
    fp8: bool = flag(False, "FP8 matmuls in training (--recipe 2026-07 on CUDA GPUs of compute capability 8.9+, "
                     "H100 and later); evaluation and sampling stay bf16")
    fp8_recipe: str = flag("tensorwise", "tensorwise (the reference's: one scale per tensor) | rowwise (one per "
                           "row, power-of-two scales): FP8 scaling")
    depth: int = flag(20, "depth of the Transformer model")
    aspect_ratio: int = flag(64, "model_dim = depth * aspect_ratio")
    head_dim: int = flag(128, "target head dimension for attention")
    max_seq_len: int = flag(2048, "max context length")
    window_pattern: str = flag("SSSL", "sliding window pattern tiled across layers: L=full, S=half context "
                                       "(a quarter in --recipe 2026-07) (e.g. 'SSL')")
    num_iterations: int = flag(-1, "explicit number of optimization steps (-1 = disable)")
    target_flops: float = flag(-1.0, "calculate num_iterations to reach target_flops (-1 = disable)")
    target_param_data_ratio: float | None = recipe_flag("target_param_data_ratio", "calculate num_iterations to "
                                                        "maintain data:param ratio (-1 = disable)")
    device_batch_size: int = flag(32, "per-device batch size (rows)")
    total_batch_size: int | None = recipe_flag("total_batch_size", "total batch size in tokens (-1 = auto: 2^19 at "
                                                                  "d12 scaled by (D / D_d12)^0.383, D the horizon in "
                                                                  "tokens, rounded to a power of 2)")
    embedding_lr: float = flag(0.3, "learning rate for embedding parameters (Adam)")
    unembedding_lr: float | None = recipe_flag("unembedding_lr", "learning rate for unembedding parameters (Adam)")
    weight_decay: float | None = recipe_flag("weight_decay", "cautious weight decay for the Muon optimizer (for "
                                                          "weights), quoted at depth 12")
    matrix_lr: float = flag(0.02, "learning rate for matrix parameters (Muon)")
    scalar_lr: float = flag(0.5, "learning rate for scalars (resid_lambdas, x0_lambdas)")
    adam_beta1: float | None = recipe_flag("adam_beta1", "Adam beta1 for embedding/unembedding (seed recipe only)")
    adam_beta2: float | None = recipe_flag("adam_beta2", "Adam beta2 for embedding/unembedding (seed recipe only)")
    warmup_ratio: float | None = recipe_flag("warmup_ratio", "ratio of iterations for LR warmup (when --warmup-steps "
                                                          "is -1)")
    warmup_steps: int | None = recipe_flag("warmup_steps", "steps of LR warmup (-1 = use --warmup-ratio)")
    warmdown_ratio: float | None = recipe_flag("warmdown_ratio", "ratio of iterations for LR warmdown")
    final_lr_frac: float | None = recipe_flag("final_lr_frac", "final LR as fraction of initial LR")
    resume_from_step: int = flag(-1, "resume training from this checkpoint step (-1 = latest checkpoint of --run-name)")
    eval_every: int = flag(250, "evaluate val bpb every N steps (-1 = disable)")
    eval_tokens: int | None = recipe_flag("eval_tokens", "number of tokens to evaluate val loss on")
    core_metric_every: int = flag(2000, "evaluate CORE metric every N steps (-1 = disable)")
    core_metric_max_per_task: int = flag(500, "examples per task for CORE metric (-1 = all)")
    sample_every: int = flag(2000, "sample from model every N steps (-1 = disable)")
    save_every: int = flag(-1, "save checkpoints every N steps (-1 = only at end)")
    model_tag: str | None = flag(None, "override model tag for checkpoint directory name (default d<depth>)")
    # --- Ray ---
    num_workers: int = flag(1, "Ray Train workers (one per GPU, or CPU processes); MIN:MAX (e.g. 4:8) makes the run "
                               "elastic: it starts with as many as fit, shrinks when nodes go (down to MIN) and grows "
                               "back when they return, resuming exactly from the newest checkpoint at each resize "
                               "(docs/ARCHITECTURE.md)")
    min_workers: int | None = None  # not a flag: the MIN of --num-workers MIN:MAX in an elastic run (parse_args)
    use_gpu: str = flag("auto", "auto|true|false: train on GPUs (auto = when the cluster has any)")
    cpus_per_worker: float = flag(0.0, "CPUs reserved for each training worker, and its torch threads (0 = auto: the "
                                       "local machine's CPUs / --num-workers when raychat starts its own Ray, 1 on a "
                                       "cluster)")
    storage_path: str | None = flag(None, "where checkpoints and reports go: a local dir, s3://, gs:// "
                                          "(default <base>/runs)")
    run_name: str | None = flag(None, "the run's identity: rerunning with the same name resumes it "
                                      "(default <tag>-<timestamp>)")
    max_failures: int = flag(3, "worker/node failures to recover from automatically (-1 = unlimited)")
    keep_checkpoints: int | None = flag(None, "keep only the newest N checkpoints (default: all)")
    # --- where things live ---
    base_dir: str | None = flag(None, "base directory (default $RAYCHAT_BASE_DIR or ~/.cache/raychat)")
    data_dir: str | None = flag(None, "shard directory (default <base>/base_data, or <base>/base_data_climbmix for "
                                      "--recipe 2026-07; s3://, gs:// work)")
    tokenizer_dir: str | None = flag(None, "tokenizer directory (default <base>/tokenizer)")
    # --- data stream ---
    data_backend: str = flag("auto", "ray: tokenize in a Ray Data actor pool; inline: in the training worker; auto: "
                                     "inline when raychat starts its own Ray and the workers take every CPU (nothing "
                                     "to spare for actors), else ray. The batches are the same either way")
    data_actors: int = flag(1, "Ray Data tokenizer actors per data slot")
    # --- extras beyond the reference ---
    init_from_nanochat: str | None = flag(None, "initialise the model from a nanochat base checkpoint directory")
    nan_policy: str = flag("stop", "stop|skip: on a non-finite loss, stop naming the step, or skip that update")
    compile: str = flag("auto", "auto|true|false: torch.compile the model and the optimizer kernels (auto = on CUDA, "
                                "and on CPU when a micro-batch's forward+backward is at least 20 GFLOP, i.e. d4 at B 8 "
                                "x T 256 and up: the first run compiles for ~100 s, later runs read the inductor cache "
                                "in seconds)")
    ortho_dtype: str = flag("auto", "auto|bf16|fp32: dtype of Muon's Polar Express (auto = the reference's bf16 where "
                                    "its kernels are compiled and bf16 matmuls are native: CUDA, CPUs with "
                                    "avx512_bf16/AMX/ARM bf16; fp32 otherwise, closer to the reference than eager bf16)")
    allow_changed: str = flag("", "on resume, settings that may differ from the run's (e.g. matrix_lr,num_iterations), "
                                  "or the inputs data (the shards) and tokenizer; any other changed training setting "
                                  "or input is refused. A setting's change and its step go into the run's history")
    profile: bool = flag(False, "write a PyTorch profiler trace of a few steps into the run directory")
    dry_run: bool = flag(False, "validate flags and data, print the plan, and exit without training")
    # --- debug: fault injection for the reliability tests (docs/RELIABILITY.md) ---
    debug_fail_at_step: int = flag(-1, "testing only: inject a fault (--debug-fail-kind) at this step")
    debug_fail_kind: str = flag("exit", "testing only: exit = os._exit(1) at the start of the step; kill = SIGKILL "
                                        "between backward and optimizer step; kill-in-checkpoint = SIGKILL after "
                                        "writing the step's checkpoint files locally, before they are persisted; "
                                        "nan = that step's loss becomes NaN (every run)")
    debug_fail_rank: int = flag(0, "testing only: the rank the fault happens on")

    # ------------------------------------------------------------------------------------------------
    def __post_init__(self):
        """Fill the flags left unset (None) from the recipe. An unknown recipe leaves them for validate() to
        refuse. A config is resolved once, when built: dataclasses.replace(cfg, recipe=...) keeps its values."""
        values = RECIPES.get(self.recipe)
        if values is None:
            return
        given = {name for name in values if getattr(self, name) is not None}
        if "warmup_ratio" in given and "warmup_steps" not in given:
            self.warmup_steps = -1  # an explicit ratio replaces the recipe's warmup in steps
        for name, value in values.items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def recipe_lines(self) -> list[str]:
        """What the recipe resolved, as printed at start: each of its flags, "(flag)" where a flag changed it."""
        values = RECIPES[self.recipe]
        shown = ", ".join(f"{name}={getattr(self, name)!r}" + ("" if getattr(self, name) == value else " (flag)")
                          for name, value in values.items() if not (value is None and getattr(self, name) is None))
        return [f"Recipe: {self.recipe} | {shown}"]

    def validate(self) -> None:
        """Reject impossible values with a message naming the flag, the rule and the fix."""
        def need(cond, flag, msg):
            if not cond:
                raise ValueError(f"--{flag.replace('_', '-')}={getattr(self, flag)!r}: {msg}")

        need(self.recipe in RECIPES, "recipe", f"must be one of {', '.join(RECIPES)}")
        if self.recipe != "seed":
            need(self.adam_beta1 is None and self.adam_beta2 is None, "adam_beta1",
                 f"--adam-beta1/--adam-beta2 are the seed recipe's; --recipe {self.recipe} sets betas per "
                 "parameter group (docs/DIFFERENCES.md)")
        need(self.compute_dtype in ("auto", "bf16", "fp32"), "compute_dtype", "must be auto, bf16 or fp32")
        need(self.compute_dtype == "auto" or self.recipe != "seed", "compute_dtype",
             "the seed recipe computes as nanochat 07c4dd4 did (bf16 autocast on CUDA, fp32 elsewhere); the "
             "compute dtype is a --recipe 2026-07 setting")
        from raychat.fp8 import RECIPES as FP8_RECIPES

        need(self.fp8_recipe in FP8_RECIPES, "fp8_recipe", f"must be one of {', '.join(FP8_RECIPES)}")
        if self.fp8:
            need(self.recipe != "seed", "fp8", "FP8 training is a --recipe 2026-07 option (nanochat 07c4dd4 had none)")
            need(self.device_type in ("", "cuda"), "fp8", f"FP8 matmuls need a CUDA GPU, not --device-type "
                 f"{self.device_type}: leave --fp8 off")
            need(self.compute_dtype in ("auto", "bf16"), "fp8", "FP8 training computes everything else in bf16: "
                 "leave --compute-dtype auto or set bf16")
        need(self.total_batch_size == -1 or self.total_batch_size > 0, "total_batch_size",
             "must be a positive number of tokens, or -1 for auto")
        need(self.total_batch_size != -1 or self.target_param_data_ratio > 0, "total_batch_size",
             "-1 (auto) derives the batch from the horizon --target-param-data-ratio x params: set that ratio "
             "positive, or give the batch size")
        need(self.warmup_steps >= -1, "warmup_steps", "must be >= 0, or -1 to use --warmup-ratio")

        for name in ("depth", "aspect_ratio", "head_dim", "max_seq_len", "device_batch_size"):
            need(getattr(self, name) > 0, name, "must be a positive integer")
        from raychat.model import RECIPE_OPTIONS, min_n_embd

        narrowest = min_n_embd(RECIPE_OPTIONS[self.recipe])  # the channels the model's gates read
        need(self.model_dim >= narrowest, "aspect_ratio",
             f"model_dim = --depth {self.depth} x --aspect-ratio {self.aspect_ratio}, rounded up to a multiple of "
             f"--head-dim {self.head_dim}, is {self.model_dim}: below the {narrowest} channels the model's gates "
             "read; raise --aspect-ratio or --depth (or --head-dim)")
        need(self.window_pattern != "" and set(self.window_pattern.upper()) <= {"S", "L"}, "window_pattern",
             "may contain only the letters S (short window: half the context, a quarter in --recipe 2026-07) "
             "and L (full context)")
        need(self.num_iterations > 0 or self.target_flops > 0 or self.target_param_data_ratio > 0,
             "num_iterations", "no training horizon: set --num-iterations, --target-flops or "
             "--target-param-data-ratio to a positive value")
        for name in ("warmup_ratio", "warmdown_ratio", "final_lr_frac"):
            need(0.0 <= getattr(self, name) <= 1.0, name, "must lie in [0, 1]")
        need(self.warmup_steps != -1 or self.warmup_ratio + self.warmdown_ratio <= 1.0, "warmdown_ratio",
             f"warmup ({self.warmup_ratio}) + warmdown must not exceed 1")
        for name in ("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr", "weight_decay"):
            need(getattr(self, name) >= 0 and math.isfinite(getattr(self, name)), name, "must be a finite number >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            need(getattr(self, name) is None or 0.0 <= getattr(self, name) < 1.0, name, "must lie in [0, 1)")
        need(self.eval_every <= 0 or self.eval_tokens > 0, "eval_tokens", "must be positive when --eval-every > 0")
        need(self.num_workers >= 1, "num_workers", "must be at least 1 (one Ray Train worker per GPU or CPU slot)")
        if self.min_workers is not None and not 1 <= self.min_workers <= self.num_workers:
            raise ValueError(f"--num-workers={self.min_workers}:{self.num_workers}: an elastic range MIN:MAX needs "
                             "1 <= MIN <= MAX")
        need(self.cpus_per_worker >= 0, "cpus_per_worker", "must be positive, or 0 for auto")
        need(self.compile in ("auto", "true", "false"), "compile", "must be auto, true or false")
        need(self.ortho_dtype in ("auto", "bf16", "fp32"), "ortho_dtype", "must be auto, bf16 or fp32")
        need(self.use_gpu in ("auto", "true", "false"), "use_gpu", "must be auto, true or false")
        need(self.device_type in ("", "cuda", "cpu", "mps"), "device_type", "must be cuda, cpu, mps or empty (auto)")
        need(self.max_failures >= -1, "max_failures", "must be -1 (retry forever) or >= 0")
        need(self.keep_checkpoints is None or self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        need(self.data_backend in ("auto", "ray", "inline"), "data_backend", "must be auto, ray or inline")
        need(self.data_actors >= 1, "data_actors", "must be >= 1")
        need(self.nan_policy in ("stop", "skip"), "nan_policy", "must be stop or skip")
        unknown = [n for n in self.allowed_changes() if n not in TRAJECTORY_SETTINGS + INPUT_NAMES]
        need(not unknown, "allow_changed", f"{', '.join(unknown)}: not a setting that defines a run's trajectory; "
             f"name flags among {', '.join(TRAJECTORY_SETTINGS)} (others may change freely), or the inputs "
             f"{' and '.join(INPUT_NAMES)}")
        need(self.debug_fail_kind in DEBUG_FAIL_KINDS, "debug_fail_kind", f"must be one of {DEBUG_FAIL_KINDS}")
        need(0 <= self.debug_fail_rank < self.num_workers, "debug_fail_rank",
             f"must name a rank in [0, --num-workers={self.num_workers})")
        need(self.run_name is None or (self.run_name and "/" not in self.run_name), "run_name",
             "must be a non-empty name without '/'")

    def resolve_paths(self) -> "TrainConfig":
        """Absolute paths and URIs resolved on the driver: Ray workers chdir into their run directory."""
        from raychat.common import get_base_dir
        from raychat.data.shards import default_data_dir
        from raychat.storage import absolute

        # Only names it: whatever is written there creates its own directory, and a dry run creates none.
        base = get_base_dir(self.base_dir, create=False)
        return dataclasses.replace(
            self,
            base_dir=base,
            data_dir=absolute(self.data_dir) or default_data_dir(base, create=False, source=RECIPE_DATA[self.recipe]),
            tokenizer_dir=absolute(self.tokenizer_dir) or os.path.join(base, "tokenizer"),
            storage_path=absolute(self.storage_path) or os.path.join(base, "runs"),
            init_from_nanochat=absolute(self.init_from_nanochat),
        )

    def allowed_changes(self) -> list[str]:
        """--allow-changed as setting names (dashes or underscores, commas between)."""
        return [n.strip().lstrip("-").replace("-", "_") for n in self.allow_changed.split(",") if n.strip()]

    @property
    def model_dim(self) -> int:
        """depth x aspect_ratio rounded UP to a multiple of head_dim, so that head_dim stays exact."""
        return math.ceil(self.depth * self.aspect_ratio / self.head_dim) * self.head_dim

    @property
    def tag(self) -> str:
        return self.model_tag or f"d{self.depth}"

    def user_config(self) -> dict:
        """The flags as a plain dict (the reference's user_config): logged to wandb, meta.json, the report."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown training settings {sorted(unknown)}; valid names are the flags of "
                             "`python -m raychat.train --help` with underscores")
        return cls(**d)


def changed_settings(saved: dict, cfg: TrainConfig) -> dict:
    """{name: [old, new]} for each trajectory setting `cfg` changes from a checkpoint's user_config (a setting
    the checkpoint does not record, from an older raychat, counts as unchanged)."""
    now = cfg.user_config()
    return {k: [saved[k], now[k]] for k in TRAJECTORY_SETTINGS if k in saved and saved[k] != now[k]}


def describe_changes(changes: dict) -> str:
    return ", ".join(f"--{k.replace('_', '-')} {old!r} -> {new!r}" for k, (old, new) in changes.items())


# ----------------------------------------------------------------------------------------------------
# Command line

def _is_flag(f: dataclasses.Field) -> bool:
    """Whether a TrainConfig field is a command-line flag (declared with `flag`); min_workers is not."""
    return "help" in f.metadata


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def coerce(name: str, value):
    """`value` as the type of setting `name`, from a command-line string or a value read from YAML.

    The one conversion of the command line (argparse's `type=`) and of sweep files. Strings are read as the
    command line reads them; YAML's typed values must already be of the field's kind (a YAML bool is not an
    int). Raises ValueError saying what the value must be.
    """
    kind = _FIELDS[name].type
    if value is None and kind in (int | None, float | None, str | None):
        return None
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{value!r} must be true or false")
        return value
    if kind in (int, int | None):
        if isinstance(value, str):
            if kind is not int and value.lower() in ("none", ""):  # --keep-checkpoints none
                return None
            try:
                return int(value)
            except ValueError:
                pass
        elif isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{value!r} must be an integer (--{name.replace('_', '-')} is an int flag)")
    if kind in (float, float | None):
        if kind is not float and isinstance(value, str) and value.lower() in ("none", ""):  # the recipe's value
            return None
        number = as_number(value)
        if number is None:
            raise ValueError(f"{value!r} must be a number (--{name.replace('_', '-')} is a float flag)")
        return number
    if isinstance(value, (bool, dict, list)) or value is None:
        raise ValueError(f"{value!r} must be a string")
    return str(value)


def as_number(value) -> float | None:
    """A number, or a string that reads as one, as a float; None for anything else (a bool is not a number).
    Strings count because YAML 1.1 reads `1e-3` (no dot) as a string."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def build_parser(description: str = "Pretrain a raychat (nanochat) base model on Ray Train") -> argparse.ArgumentParser:
    from raychat.common import cli_parser

    parser = cli_parser("raychat.train", description)
    for f in filter(_is_flag, dataclasses.fields(TrainConfig)):
        option = "--" + f.name.replace("_", "-")
        if f.type is bool:
            parser.add_argument(option, action="store_true", help=f.metadata["help"])
        else:
            kind = _parse_workers if f.name == "num_workers" else _argparse_type(f)
            parser.add_argument(option, type=kind, default=f.default, help=f.metadata["help"])
    return parser


def _argparse_type(f: dataclasses.Field):
    """`coerce` for one flag, named for its kind so that argparse reports `invalid int value: 'x'`."""
    def parse(text: str):
        return coerce(f.name, text)
    parse.__name__ = {int: "int", int | None: "int", float: "float", float | None: "float"}.get(f.type, "str")
    return parse


def _parse_workers(s: str):
    """--num-workers: N, or MIN:MAX for an elastic run (returned as the tuple (MIN, MAX))."""
    lo, sep, hi = s.partition(":")
    try:
        return (int(lo), int(hi)) if sep else int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a worker count N or an elastic range MIN:MAX "
                                         "(e.g. 2 or 1:4)") from None


def parse_args(argv=None) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    if isinstance(args["num_workers"], tuple):  # MIN:MAX
        args["min_workers"], args["num_workers"] = args["num_workers"]
    cfg = TrainConfig(**args)
    cfg.validate()
    return cfg


# ----------------------------------------------------------------------------------------------------
# Derived quantities, computed once, with the lines the reference prints


@dataclass
class Plan:
    model_config: dict
    num_params: int
    num_scaling_params: int
    param_counts: dict
    num_flops_per_token: float
    total_batch_size: int  # tokens per step: the flag's, or the 2026-07 recipe's automatic one
    tokens_per_fwdbwd: int
    world_tokens_per_fwdbwd: int
    grad_accum_steps: int  # micro-batches per step on the busiest rank (ceil(num_slots / world_size))
    num_slots: int  # micro-batches (data slots) per step, over all ranks: total_batch_size / (B x T)
    batch_lr_scale: float
    weight_decay_scaled: float
    num_iterations: int
    total_tokens: int
    world_size: int
    lines: list = field(default_factory=list)


def model_config(cfg: TrainConfig, vocab_size: int, depth: int | None = None):
    """The GPTConfig of `cfg` (at another depth if given: the 2026-07 recipe sizes from d12's), with its recipe's
    architecture options."""
    from raychat.model import RECIPE_OPTIONS, GPTConfig

    depth = depth or cfg.depth
    dim = math.ceil(depth * cfg.aspect_ratio / cfg.head_dim) * cfg.head_dim
    heads = dim // cfg.head_dim
    return GPTConfig(sequence_len=cfg.max_seq_len, vocab_size=vocab_size, n_layer=depth, n_head=heads,
                     n_kv_head=heads, n_embd=dim, window_pattern=cfg.window_pattern, **RECIPE_OPTIONS[cfg.recipe])


def _scaling_params(config) -> tuple[dict, int, float]:
    """(parameter counts, the horizon's parameters = transformer matrices + lm_head, FLOPs per token) of a model
    built on the meta device."""
    from raychat.model import GPT

    import torch

    with torch.device("meta"):
        model = GPT(config)
    counts = model.num_scaling_params()
    return counts, counts["transformer_matrices"] + counts["lm_head"], model.estimate_flops()


def auto_batch_size(target_tokens: int, reference_tokens: float) -> int:
    """The 2026-07 recipe's batch size: 2^19 tokens at d12's horizon, growing as horizon^0.383 (the "Power
    Lines" fit nanochat follows), rounded to the nearest power of 2 (in log space)."""
    predicted = REFERENCE_BATCH * (target_tokens / reference_tokens) ** 0.383
    return 2 ** round(math.log2(predicted))


def derive(cfg: TrainConfig, vocab_size: int, world_size: int) -> Plan:
    """Everything derived from the flags, in the order the recipe's reference computes it; `lines` are what it
    prints (the seed prints the batch split first, the 2026-07 recipe after sizing the batch from the model)."""
    base_dim = cfg.depth * cfg.aspect_ratio
    model_dim = cfg.model_dim
    num_heads = model_dim // cfg.head_dim
    shape_lines = [f"num_layers: {cfg.depth}",
                   f"model_dim: {model_dim} (base: {base_dim}, nudge: {model_dim - base_dim:+d})",
                   f"num_heads: {num_heads}", f"head_dim: {cfg.head_dim}", f"num_kv_heads: {num_heads}"]

    config = model_config(cfg, vocab_size)
    counts, num_scaling_params, num_flops_per_token = _scaling_params(config)
    model_lines = ["Parameter counts:", *(f"{k:24s}: {v:,}" for k, v in counts.items()),
                   f"Estimated FLOPs per token: {num_flops_per_token:e}"]

    # Batch size, and the learning-rate and weight-decay scales that follow from it.
    scale_lines = []
    total_batch_size = cfg.total_batch_size
    if cfg.recipe == "seed":
        weight_decay_scaled = cfg.weight_decay * (REFERENCE_DEPTH / cfg.depth) ** 2
    else:
        # Horizon D = ratio x params; weight decay keeps B / (lr x wd x D) at d12's value, with lr ~ sqrt(B).
        target_tokens = int(cfg.target_param_data_ratio * num_scaling_params)
        reference_tokens = cfg.target_param_data_ratio * _scaling_params(
            model_config(cfg, vocab_size, REFERENCE_DEPTH))[1]
        if total_batch_size == -1:
            total_batch_size = auto_batch_size(target_tokens, reference_tokens)
            scale_lines.append(f"Auto-computed optimal batch size: {total_batch_size:,} tokens")
        weight_decay_scaled = (cfg.weight_decay * math.sqrt(total_batch_size / REFERENCE_BATCH)
                               * (reference_tokens / target_tokens))
    ratio = total_batch_size / REFERENCE_BATCH
    batch_lr_scale = 1.0 if ratio == 1.0 else ratio**0.5
    if batch_lr_scale != 1.0:
        scale_lines.append(f"Scaling LRs by {batch_lr_scale:.4f} for batch size {total_batch_size:,} "
                           f"(reference: {REFERENCE_BATCH:,})")
    if (cfg.depth != REFERENCE_DEPTH) if cfg.recipe == "seed" else (weight_decay_scaled != cfg.weight_decay):
        scale_lines.append(f"Scaling weight decay from {cfg.weight_decay:.6f} to {weight_decay_scaled:.6f} for "
                           f"depth {cfg.depth}")

    # The split of a step into micro-batches.
    tokens_per_fwdbwd = cfg.device_batch_size * cfg.max_seq_len
    world_tokens = tokens_per_fwdbwd * world_size
    # A step is num_slots micro-batches (data slots) whatever the world size; rank r runs those of
    # common.slot_range (docs/ARCHITECTURE.md "slots"). With world_size dividing num_slots every rank runs
    # num_slots / world_size of them (the reference's grad_accum_steps); otherwise some run one fewer, and
    # grad_accum_steps is the most any rank runs.
    given = "" if total_batch_size == cfg.total_batch_size else " (auto)"
    if total_batch_size % tokens_per_fwdbwd != 0:
        raise ValueError(
            f"--total-batch-size={total_batch_size}{given} must be divisible by device_batch_size x max_seq_len = "
            f"{cfg.device_batch_size} x {cfg.max_seq_len} = {tokens_per_fwdbwd} (one micro-batch); "
            f"change --total-batch-size or --device-batch-size")
    num_slots = total_batch_size // tokens_per_fwdbwd
    if world_size > num_slots:
        raise ValueError(
            f"--num-workers={world_size} is more than the {num_slots} micro-batches of a step (--total-batch-size "
            f"{total_batch_size}{given} / ({cfg.device_batch_size} x {cfg.max_seq_len})): every worker needs at "
            f"least one; use at most {num_slots} workers or a larger --total-batch-size")
    grad_accum_steps = -(-num_slots // world_size)
    batch_lines = [f"Tokens / micro-batch / rank: {cfg.device_batch_size} x {cfg.max_seq_len} = {tokens_per_fwdbwd:,}",
                   f"Tokens / micro-batch: {world_tokens:,}"]
    if num_slots % world_size == 0:
        batch_lines.append(f"Total batch size {total_batch_size:,} => gradient accumulation steps: "
                           f"{grad_accum_steps}")
    else:
        batch_lines.append(f"Total batch size {total_batch_size:,} => {num_slots} micro-batches over {world_size} "
                           f"workers: gradient accumulation steps {num_slots // world_size}-{grad_accum_steps} "
                           "per rank")

    # The horizon.
    if cfg.num_iterations > 0:
        num_iterations = cfg.num_iterations
        iteration_lines = [f"Using user-provided number of iterations: {num_iterations:,}"]
    elif cfg.target_flops > 0:
        num_iterations = round(cfg.target_flops / (num_flops_per_token * total_batch_size))
        iteration_lines = [f"Calculated number of iterations from target FLOPs: {num_iterations:,}"]
    elif cfg.target_param_data_ratio > 0:
        num_iterations = int(cfg.target_param_data_ratio * num_scaling_params) // total_batch_size
        iteration_lines = [f"Calculated number of iterations from target data:param ratio: {num_iterations:,}"]
    else:
        raise ValueError("No training horizon specified")
    if num_iterations < 1:
        raise ValueError(f"the horizon is {num_iterations} steps of {total_batch_size:,} tokens: raise "
                         "--target-param-data-ratio or --target-flops, or give --num-iterations")
    total_tokens = total_batch_size * num_iterations
    iteration_lines += [f"Total number of training tokens: {total_tokens:,}",
                        f"Tokens : Scaling params ratio: {total_tokens / num_scaling_params:.2f}",
                        f"Total training FLOPs estimate: {num_flops_per_token * total_tokens:e}"]

    if cfg.recipe == "seed":
        lines = shape_lines + batch_lines + scale_lines + model_lines + iteration_lines
    else:
        lines = cfg.recipe_lines() + shape_lines + model_lines + scale_lines + iteration_lines + batch_lines
    return Plan(model_config=dataclasses.asdict(config), num_params=counts["total"],
                num_scaling_params=num_scaling_params, param_counts=counts,
                num_flops_per_token=num_flops_per_token, total_batch_size=total_batch_size,
                tokens_per_fwdbwd=tokens_per_fwdbwd, world_tokens_per_fwdbwd=world_tokens,
                grad_accum_steps=grad_accum_steps, num_slots=num_slots, batch_lr_scale=batch_lr_scale,
                weight_decay_scaled=weight_decay_scaled, num_iterations=num_iterations, total_tokens=total_tokens,
                world_size=world_size, lines=lines)
