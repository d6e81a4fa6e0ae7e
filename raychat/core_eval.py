"""The CORE metric (DCLM): 22 in-context-learning tasks scored by a base model (docs/REFERENCE.md §9).

Three task types, each scored from one forward pass per example:
- multiple_choice: one prompt per choice (shared context, differing continuation); the choice whose
  continuation has the lowest mean cross-entropy wins;
- schema: one prompt per context option (differing context, shared continuation); the option under which
  the shared continuation has the lowest mean cross-entropy wins;
- language_modeling: the greedy (argmax) prediction must reproduce the continuation token for token.

accuracy per task is centred on its random baseline, (acc - b) / (1 - b), and CORE is the plain mean of the
centred values. Each worker scores a strided share of the examples and the 0/1 vectors are all-reduced.

The scorer takes any callable `model(input_ids) -> logits (B, T, V)`, so tests can dictate the
log-probabilities; raychat's GPT is one such callable. No Ray here: workers call this with
torch.distributed already initialised, and the eval CLI is a thin wrapper around `evaluate_core`.
"""
import contextlib
import csv
import json
import os
import random
import shutil
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from raychat import storage
from raychat.common import dist_info, get_base_dir, print0

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")

# Fields each task type reads from a JSONL line .
_ITEM_FIELDS = {
    "multiple_choice": ("query", "choices", "gold"),
    "schema": ("context_options", "continuation", "gold"),
    "language_modeling": ("context", "continuation"),
}

# Seeds of the reference: one shuffle of each task's lines, then per-example few-shot draws.
SHUFFLE_SEED = 1337
FEWSHOT_SEED = 1234


@dataclass(frozen=True)
class CoreTask:
    """One row of core.yaml joined with its random baseline from eval_meta_data.csv."""
    label: str
    task_type: str
    num_fewshot: int
    delimiter: str
    random_baseline: float  # percent, as in the csv
    dataset_uri: str = ""


# The documented expectation: DCLM's low-variance CORE configuration. The
# downloaded core.yaml / eval_meta_data.csv are authoritative; `load_bundle` warns where they differ.
_MC, _SCHEMA, _LM = TASK_TYPES
_ANS = "\nAnswer: "
CORE_TASKS = tuple(CoreTask(*row) for row in [
    ("hellaswag_zeroshot", _MC, 0, " ", 25.0),
    ("jeopardy", _LM, 10, _ANS, 0.0),
    ("bigbench_qa_wikidata", _LM, 10, " ", 0.0),
    ("arc_easy", _MC, 10, _ANS, 25.0),
    ("arc_challenge", _MC, 10, _ANS, 25.0),
    ("copa", _MC, 0, " ", 50.0),
    ("commonsense_qa", _MC, 10, " ", 20.0),
    ("piqa", _MC, 10, _ANS, 50.0),
    ("openbook_qa", _MC, 0, " ", 25.0),
    ("lambada_openai", _LM, 0, " ", 0.0),
    ("hellaswag", _MC, 10, " ", 25.0),
    ("winograd", _SCHEMA, 0, " ", 50.0),
    ("winogrande", _SCHEMA, 0, " ", 50.0),
    ("bigbench_dyck_languages", _LM, 10, " ", 0.0),
    ("agi_eval_lsat_ar", _MC, 3, " ", 20.0),
    ("bigbench_cs_algorithms", _LM, 10, " ", 0.0),
    ("bigbench_operators", _LM, 10, " ", 0.0),
    ("bigbench_repeat_copy_logic", _LM, 10, " ", 0.0),
    ("squad", _LM, 10, " ", 0.0),
    ("coqa", _LM, 0, " ", 0.0),
    ("boolq", _MC, 10, _ANS, 62.0),
    ("bigbench_language_identification", _MC, 10, " ", 9.1),
])


# ---- the bundle on disk -------------------------------------------------------------------------------

def download_eval_bundle(base_dir: str | None = None, url: str = EVAL_BUNDLE_URL, retries: int = 5,
                         backoff_s: float = 2.0) -> str:
    """Make sure `<base>/eval_bundle/` exists and return it; download and unpack the zip when it does not.

    The zip streams to `<base>/eval_bundle.zip.tmp` (with a progress bar) and is renamed when complete, so a
    killed download never leaves a zip that looks whole. Its top-level `eval_bundle/` is unpacked next to
    the target and renamed into place, so the directory appears whole or not at all. A file lock
    (`<base>/eval_bundle.zip.lock`) lets one process per node download while the others wait; they then
    find the directory and return. Network failures are retried `retries` times, waiting backoff_s * 2^k.
    """
    import requests
    from filelock import FileLock
    from tqdm import tqdm

    base_dir = get_base_dir(base_dir)
    if storage.is_remote(base_dir):
        raise ValueError(f"the eval bundle needs a local base dir, got {base_dir!r}; set RAYCHAT_BASE_DIR to a "
                         "local path on the evaluating node")
    bundle_dir = os.path.join(base_dir, "eval_bundle")
    if os.path.isdir(bundle_dir):
        return bundle_dir
    zip_path = os.path.join(base_dir, "eval_bundle.zip")
    with FileLock(zip_path + ".lock"):
        if os.path.isdir(bundle_dir):  # another process finished while we waited for the lock
            return bundle_dir
        if not (os.path.isfile(zip_path) and zipfile.is_zipfile(zip_path)):
            tmp_path = zip_path + ".tmp"
            for attempt in range(retries + 1):
                try:
                    with requests.get(url, stream=True, timeout=60) as resp:
                        resp.raise_for_status()
                        total = int(resp.headers.get("content-length", 0)) or None
                        with open(tmp_path, "wb") as f, tqdm(total=total, unit="B", unit_scale=True,
                                                             desc="eval_bundle.zip", disable=None) as bar:
                            for chunk in resp.iter_content(chunk_size=1 << 20):
                                f.write(chunk)
                                bar.update(len(chunk))
                    break
                except requests.RequestException as e:
                    if attempt == retries:
                        raise RuntimeError(f"could not download the CORE eval bundle from {url} after "
                                           f"{retries + 1} attempts ({e}); check the network, or place the "
                                           f"unpacked bundle at {bundle_dir} by hand") from e
                    wait = backoff_s * 2 ** attempt
                    print(f"eval bundle download failed ({e}); retrying in {wait:.1f}s", flush=True)
                    time.sleep(wait)
            if not zipfile.is_zipfile(tmp_path):
                raise ValueError(f"{url} did not return a zip archive (saved as {tmp_path}); check the URL")
            os.replace(tmp_path, zip_path)
        _unpack_bundle(zip_path, bundle_dir)
    return bundle_dir


def _unpack_bundle(zip_path: str, bundle_dir: str) -> None:
    # Unpack beside the target (same filesystem) so the final rename is atomic.
    with tempfile.TemporaryDirectory(dir=os.path.dirname(bundle_dir)) as tmp:
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(tmp)
        extracted = os.path.join(tmp, "eval_bundle")
        if not os.path.isdir(extracted):
            raise ValueError(f"{zip_path} has no top-level eval_bundle/ directory (found {sorted(os.listdir(tmp))}); "
                             "delete it and download the bundle again")
        shutil.move(extracted, bundle_dir)


def load_bundle(bundle_dir: str) -> list[CoreTask]:
    """The tasks of `<bundle_dir>/core.yaml`, in file order, each with its baseline from eval_meta_data.csv.

    Errors name the file, the task and the offending value. Differences from the documented 22-task table
    (`CORE_TASKS`) are warned about, and the bundle's values are used.
    """
    import yaml

    if not os.path.isdir(bundle_dir):
        raise FileNotFoundError(f"no eval bundle at {bundle_dir}: fetch it with download_eval_bundle(base_dir), "
                                "or call evaluate_core with bundle_dir=None to download on first use")
    config_path = os.path.join(bundle_dir, "core.yaml")
    meta_path = os.path.join(bundle_dir, "eval_meta_data.csv")
    for path in (config_path, meta_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: {bundle_dir} is not a complete eval bundle; delete it "
                                    "and let download_eval_bundle fetch it again")
    try:
        with open(config_path) as f:
            config = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ValueError(f"{config_path} is not valid YAML: {e}") from e
    if not isinstance(config, dict) or not isinstance(config.get("icl_tasks"), list):
        raise ValueError(f"{config_path} must be a mapping with a list under 'icl_tasks'")

    baselines = {}
    with open(meta_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"Eval Task", "Random baseline"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{meta_path} lacks the column(s) {sorted(missing)}; its header is {reader.fieldnames}")
        for line_no, row in enumerate(reader, start=2):
            try:
                baselines[row["Eval Task"]] = float(row["Random baseline"])
            except (TypeError, ValueError):
                raise ValueError(f"{meta_path} line {line_no}: 'Random baseline' = {row['Random baseline']!r} "
                                 f"for task {row['Eval Task']!r} is not a number (a percentage)") from None

    tasks = []
    for i, entry in enumerate(config["icl_tasks"]):
        where = f"{config_path} icl_tasks[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} is a {type(entry).__name__}, expected a mapping")
        for key in ("label", "dataset_uri", "num_fewshot", "icl_task_type"):
            if key not in entry:
                raise ValueError(f"{where} ({entry.get('label', '?')}) has no '{key}'")
        label, task_type, fewshot = entry["label"], entry["icl_task_type"], entry["num_fewshot"]
        if task_type not in TASK_TYPES:
            raise ValueError(f"{where}: task {label!r} has unknown icl_task_type {task_type!r}; "
                             f"CORE scores only {list(TASK_TYPES)}")
        if not (isinstance(fewshot, list) and fewshot and isinstance(fewshot[0], int) and fewshot[0] >= 0):
            raise ValueError(f"{where}: task {label!r} has num_fewshot={fewshot!r}; expected a list whose first "
                             "element is an int >= 0 (only the first element is used)")
        if label not in baselines:
            raise ValueError(f"{meta_path} has no 'Random baseline' row for task {label!r} of {config_path}")
        delimiter = entry.get("continuation_delimiter", " ")
        tasks.append(CoreTask(label, task_type, fewshot[0], str(delimiter), baselines[label],
                              str(entry["dataset_uri"])))
    if dist_info()[0] == 0:  # one warning per difference, not one per worker
        _check_against_table(tasks, config_path)
    return tasks


def _check_against_table(tasks: list[CoreTask], config_path: str) -> None:
    documented = {t.label: t for t in CORE_TASKS}
    for task in tasks:
        expected = documented.get(task.label)
        if expected is None:
            warnings.warn(f"{config_path}: task {task.label!r} is not one of the 22 documented CORE tasks; "
                          "it is scored and averaged in all the same")
            continue
        for field in ("task_type", "num_fewshot", "delimiter", "random_baseline"):
            got, want = getattr(task, field), getattr(expected, field)
            if got != want:
                warnings.warn(f"{config_path}: task {task.label!r} has {field}={got!r}, the documented table "
                              f"says {want!r}; using the bundle's value")
    absent = [label for label in documented if label not in {t.label for t in tasks}]
    if absent:
        warnings.warn(f"{config_path} lacks {len(absent)} of the 22 documented CORE tasks: {absent}; CORE will "
                      "average only the tasks present")


def load_task_data(path: str, task_type: str) -> list[dict]:
    """Every example of one task's JSONL file, checked for the fields its type reads.

    Blank lines are skipped (the reference would crash on them); anything else that is not a JSON object
    with the right fields is an error naming the file and the line.
    """
    if task_type not in TASK_TYPES:
        raise ValueError(f"unknown task type {task_type!r} for {path}; expected one of {list(TASK_TYPES)}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"task data {path} is missing from the eval bundle; delete the bundle directory "
                                "and download it again")
    data = []
    with open(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {line_no} is not valid JSON ({e}): {line[:80]!r}") from None
            _check_item(item, task_type, f"{path} line {line_no}")
            data.append(item)
    if not data:
        raise ValueError(f"{path} holds no examples")
    return data


def _check_item(item, task_type: str, where: str) -> None:
    if not isinstance(item, dict):
        raise ValueError(f"{where} is a JSON {type(item).__name__}, expected an object")
    for key in _ITEM_FIELDS[task_type]:
        if key not in item:
            raise ValueError(f"{where} lacks the field {key!r} that {task_type} items need "
                             f"({list(_ITEM_FIELDS[task_type])})")
    if task_type != "language_modeling":
        options = item["choices" if task_type == "multiple_choice" else "context_options"]
        if not isinstance(options, list) or not options:
            raise ValueError(f"{where}: the options must be a non-empty list, got {options!r}")
        gold = item["gold"]
        if not (isinstance(gold, int) and 0 <= gold < len(options)):
            raise ValueError(f"{where}: gold={gold!r} is not an index into its {len(options)} options")


# ---- prompts and token spans ------------------------------------------------------------------------
# Plain-Python equivalents of the reference's Jinja templates: every few-shot block ends with a blank line,
# values are rendered with str(), and Jinja's `trim` filter is str.strip().

def render_prompts_mc(item: dict, delimiter: str, fewshot: list[dict]) -> list[str]:
    """One prompt per choice: [few-shot query + delim + gold choice + blank line]* + query + delim + choice."""
    prefix = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
    return [f"{prefix}{item['query']}{delimiter}{choice}" for choice in item["choices"]]


def render_prompts_schema(item: dict, delimiter: str, fewshot: list[dict]) -> list[str]:
    """One prompt per context option, each followed by delim + the shared continuation."""
    prefix = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    return [f"{prefix}{option}{delimiter}{item['continuation']}" for option in item["context_options"]]


def render_prompts_lm(item: dict, delimiter: str, fewshot: list[dict]) -> list[str]:
    """[prompt without the continuation, prompt with it].

    The reference strips the "without" prompt: a trailing space would otherwise be its own token there but
    merge into the continuation's first token in "with", and "without" would not be a token prefix of "with".
    """
    prefix = "".join(f"{str(ex['context']).strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    without = f"{prefix}{str(item['context']).strip()}{delimiter}"
    return [without.strip(), f"{without}{item['continuation']}"]


def _common_length(rows: list[list[int]], from_end: bool) -> int:
    n = min(len(r) for r in rows)
    for i in range(n):
        pos = -1 - i if from_end else i
        if any(r[pos] != rows[0][pos] for r in rows):
            return i
    return n


def token_spans(tokens: list[list[int]], task_type: str) -> tuple[list[list[int]], list[int], list[int]]:
    """(rows to score, start, end) per row: positions [start, end) of each row are the scored tokens.

    MC: after the longest common token prefix. Schema: the longest common token suffix. LM: given
    [without, with], only the "with" row, from len(without); "without" must be a strict token prefix.
    """
    if task_type == "multiple_choice":
        start = _common_length(tokens, from_end=False)
        return tokens, [start] * len(tokens), [len(t) for t in tokens]
    if task_type == "schema":
        suffix = _common_length(tokens, from_end=True)
        return tokens, [len(t) - suffix for t in tokens], [len(t) for t in tokens]
    if task_type == "language_modeling":
        without, with_ = tokens
        start, end = len(without), len(with_)
        if not (start < end and with_[:start] == without):
            raise ValueError("LM prompt tokens: the prompt without the continuation is not a strict token prefix "
                             "of the prompt with it (the continuation is empty or the tokenizer merged across "
                             "the boundary)")
        return [with_], [start], [end]
    raise ValueError(f"unknown task type {task_type!r}; expected one of {list(TASK_TYPES)}")


_RENDER = {"multiple_choice": render_prompts_mc, "schema": render_prompts_schema,
           "language_modeling": render_prompts_lm}


def _max_positions(model) -> int | None:
    """How many positions the model can embed: raychat's GPT precomputes rotary tables for 10 x T."""
    if isinstance(getattr(model, "rotary_seq_len", None), int):
        return model.rotary_seq_len
    cos = getattr(model, "cos", None)
    if isinstance(cos, torch.Tensor) and cos.dim() >= 2:
        return cos.size(1)
    return None


# ---- scoring ------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate_example(idx: int, model, tokenizer, data: list[dict], device, task: CoreTask) -> bool:
    """Whether the model answers example `idx` of `data` (already shuffled and truncated) correctly."""
    item = data[idx]
    fewshot = []
    if task.num_fewshot > 0:
        # QUIRK, kept: few-shot examples come from the truncated list, drawn with a per-example seed.
        rng = random.Random(FEWSHOT_SEED + idx)
        others = [i for i in range(len(data)) if i != idx]
        fewshot = [data[i] for i in rng.sample(others, task.num_fewshot)]
    prompts = _RENDER[task.task_type](item, task.delimiter, fewshot)
    tokens = tokenizer.encode(prompts, prepend=tokenizer.get_bos_token_id())
    try:
        rows, starts, ends = token_spans(tokens, task.task_type)
    except ValueError as e:
        raise ValueError(f"task {task.label!r} example {idx}: {e}") from None

    max_len = getattr(model, "max_seq_len", None)
    if max_len is not None:
        # Models with a hard context (HF GPT-2) keep the last max_len tokens, shifting the spans. raychat's GPT
        # has no such attribute, so CORE sequences are not cropped.
        crop = [max(0, len(r) - max_len) for r in rows]
        rows = [r[c:] for r, c in zip(rows, crop)]
        starts = [s - c for s, c in zip(starts, crop)]
        ends = [e - c for e, c in zip(ends, crop)]
        if min(starts) < 1:
            raise ValueError(f"task {task.label!r} example {idx}: cropping to the model's max_seq_len={max_len} "
                             "cuts into the scored tokens; use a model with a longer context")
    longest = max(len(r) for r in rows)
    limit = _max_positions(model)
    if limit is not None and longest > limit:
        raise ValueError(f"task {task.label!r} example {idx} is {longest} tokens, beyond the model's {limit} "
                         "rotary positions (10 x sequence_len); score it with a model of longer sequence_len")

    # Right-pad with BOS: the padding sits after every scored position, so causal attention never sees it.
    bos = tokenizer.get_bos_token_id()
    input_ids = torch.full((len(rows), longest), bos, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    input_ids = input_ids.to(device)
    logits = model(input_ids).float()
    targets = torch.roll(input_ids, shifts=-1, dims=1)
    losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(input_ids.shape)
    losses[:, -1] = float("nan")
    predictions = logits.argmax(dim=-1)

    if task.task_type == "language_modeling":
        s, e = starts[0], ends[0]
        return bool(torch.equal(predictions[0, s - 1:e - 1], input_ids[0, s:e]))
    mean_losses = [losses[i, s - 1:e - 1].mean().item() for i, (s, e) in enumerate(zip(starts, ends))]
    return mean_losses.index(min(mean_losses)) == item["gold"]  # the first minimum wins, as the reference


def evaluate_task(model, tokenizer, data: list[dict], device, task: CoreTask) -> float:
    """Accuracy on `data`: rank r scores examples r, r + W, ...; the 0/1 vectors are summed across ranks."""
    rank, world_size = dist_info()
    correct = torch.zeros(len(data), dtype=torch.float32, device=device)
    for idx in range(rank, len(data), world_size):
        correct[idx] = float(evaluate_example(idx, model, tokenizer, data, device, task))
    if world_size > 1:
        dist.barrier()
        dist.all_reduce(correct, op=dist.ReduceOp.SUM)
    return correct.mean().item()


def centered_score(accuracy: float, random_baseline_pct: float) -> float:
    """Accuracy rescaled so chance scores 0 and perfect scores 1; the baseline is in percent."""
    b = 0.01 * random_baseline_pct
    if b >= 1.0:
        raise ValueError(f"random baseline {random_baseline_pct}% must be below 100% to centre on it")
    return (accuracy - b) / (1.0 - b)


def evaluate_core(model, tokenizer, device, max_per_task: int = -1, bundle_dir: str | None = None,
                  autocast_ctx=None) -> dict:
    """Score every task of the bundle; returns {"results", "centered_results", "core_metric"}.

    `bundle_dir` defaults to `<base>/eval_bundle`, downloaded on first use. `max_per_task > 0` keeps that many
    examples per task after the seed-1337 shuffle (training uses 500; leaderboard numbers use -1 = all).
    Call it on every rank with the same arguments; rank 0 prints one line per task.
    """
    if not isinstance(max_per_task, int) or max_per_task == 0 or max_per_task < -1:
        raise ValueError(f"max_per_task={max_per_task!r} must be -1 (all examples) or a positive int")
    if bundle_dir is None:
        bundle_dir = download_eval_bundle()
    tasks = load_bundle(bundle_dir)
    results, centered = {}, {}
    for task in tasks:
        t0 = time.time()
        print0(f"Evaluating: {task.label} ({task.num_fewshot}-shot, type: {task.task_type})... ", end="")
        data = load_task_data(os.path.join(bundle_dir, "eval_data", task.dataset_uri), task.task_type)
        random.Random(SHUFFLE_SEED).shuffle(data)
        if max_per_task > 0:
            data = data[:max_per_task]
        if task.num_fewshot >= len(data):
            raise ValueError(f"task {task.label!r} asks for {task.num_fewshot} few-shot examples but has only "
                             f"{len(data)} examples after max_per_task={max_per_task}; raise max_per_task")
        with autocast_ctx if autocast_ctx is not None else contextlib.nullcontext():
            accuracy = evaluate_task(model, tokenizer, data, device, task)
        results[task.label] = accuracy
        centered[task.label] = centered_score(accuracy, task.random_baseline)
        print0(f"accuracy: {accuracy:.4f} | centered: {centered[task.label]:.4f} | time: {time.time() - t0:.2f}s")
    core_metric = sum(centered.values()) / len(centered)
    return {"results": results, "centered_results": centered, "core_metric": core_metric}
