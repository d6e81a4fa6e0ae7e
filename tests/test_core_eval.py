"""CORE (docs/REFERENCE.md §9): prompt rendering, token spans, scoring of each task type, the bundle, distribution.

The scorer takes any callable `model(input_ids) -> logits`; the small "models" below build their logits from
rules, so each test knows which answer must win. They are inputs under test, not stand-ins for raychat code.
"""
import functools
import http.server
import json
import math
import os
import random
import shutil
import threading
import zipfile

import pytest
import torch
import torch.nn as nn
import yaml

from raychat.core_eval import (CORE_TASKS, CoreTask, centered_score, download_eval_bundle, evaluate_core,
                               evaluate_example, evaluate_task, load_bundle, load_task_data, render_prompts_lm,
                               render_prompts_mc, render_prompts_schema, token_spans)
from raychat.tokenizer import Tokenizer
from tests._gloo import run_gloo

MARGIN = 12.0


class FollowLM(nn.Module):
    """Predicts `preferred` token by token while the input row agrees with it; all-zero logits elsewhere.

    So a row equal to `preferred` gets a low cross-entropy on every position, and a row that leaves it pays
    ln V per token from the first disagreement on.
    """

    def __init__(self, vocab_size: int, preferred: list[int]):
        super().__init__()
        self.vocab_size, self.preferred = vocab_size, preferred

    def forward(self, input_ids):
        B, T = input_ids.shape
        logits = torch.zeros(B, T, self.vocab_size)
        for b, row in enumerate(input_ids.tolist()):
            for t in range(min(T, len(self.preferred) - 1)):
                if row[t] != self.preferred[t]:
                    break
                logits[b, t, self.preferred[t + 1]] = MARGIN
        return logits


class PositionLM(nn.Module):
    """Logits depend on the position only: position t puts MARGIN on script[t + 1] (nothing past the script)."""

    def __init__(self, vocab_size: int, script: list[int]):
        super().__init__()
        self.vocab_size, self.script = vocab_size, script

    def forward(self, input_ids):
        B, T = input_ids.shape
        logits = torch.zeros(B, T, self.vocab_size)
        for t in range(min(T, len(self.script) - 1)):
            logits[:, t, self.script[t + 1]] = MARGIN
        return logits


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return Tokenizer.from_directory(tiny_tokenizer_dir)


def encode(tok, text):
    return tok.encode(text, prepend=tok.get_bos_token_id())


def task(task_type, fewshot=0, delimiter=" ", baseline=25.0, label="t"):
    return CoreTask(label, task_type, fewshot, delimiter, baseline)


# ---- rendering and spans ---------------------------------------------------------------------------------

def test_render_mc_fewshot_blocks_and_choices():
    shots = [{"query": "Q1?", "choices": ["a", "b"], "gold": 1}, {"query": "Q2?", "choices": ["c"], "gold": 0}]
    item = {"query": "Q?", "choices": ["yes", "no"], "gold": 0}
    assert render_prompts_mc(item, "\nAnswer: ", shots) == [
        "Q1?\nAnswer: b\n\nQ2?\nAnswer: c\n\nQ?\nAnswer: yes",
        "Q1?\nAnswer: b\n\nQ2?\nAnswer: c\n\nQ?\nAnswer: no",
    ]
    assert render_prompts_mc(item, " ", []) == ["Q? yes", "Q? no"]


def test_render_schema_uses_gold_option_of_shots():
    shots = [{"context_options": ["A did", "B did"], "continuation": "it.", "gold": 1}]
    item = {"context_options": ["The cat", "The dog"], "continuation": "barked.", "gold": 1}
    assert render_prompts_schema(item, " ", shots) == ["B did it.\n\nThe cat barked.", "B did it.\n\nThe dog barked."]


def test_render_lm_trims_contexts_and_strips_the_prompt_without():
    shots = [{"context": "  one two ", "continuation": "three"}]
    item = {"context": "\nfour five  ", "continuation": "six"}
    without, with_ = render_prompts_lm(item, " ", shots)
    assert with_ == "one two three\n\nfour five six"
    assert without == "one two three\n\nfour five"  # the delimiter's trailing space is stripped
    # A delimiter ending in a newline+text keeps its visible part.
    assert render_prompts_lm(item, "\nAnswer: ", []) == ["four five\nAnswer:", "four five\nAnswer: six"]
    # The strip removes any surrounding whitespace, a newline delimiter included.
    assert render_prompts_lm(item, "\n", []) == ["four five", "four five\nsix"]


def test_token_spans_per_type():
    rows, starts, ends = token_spans([[9, 1, 2, 3], [9, 1, 5], [9, 1, 2, 7, 8]], "multiple_choice")
    assert starts == [2, 2, 2] and ends == [4, 3, 5] and len(rows) == 3
    rows, starts, ends = token_spans([[9, 1, 7, 8], [9, 2, 3, 4, 7, 8]], "schema")
    assert starts == [2, 4] and ends == [4, 6]
    rows, starts, ends = token_spans([[9, 1, 2], [9, 1, 2, 3, 4]], "language_modeling")
    assert rows == [[9, 1, 2, 3, 4]] and starts == [3] and ends == [5]
    with pytest.raises(ValueError, match="strict token prefix"):
        token_spans([[9, 1, 2], [9, 1, 5, 3]], "language_modeling")
    with pytest.raises(ValueError, match="strict token prefix"):
        token_spans([[9, 1, 2], [9, 1, 2]], "language_modeling")
    with pytest.raises(ValueError, match="unknown task type 'essay'"):
        token_spans([[1]], "essay")


# ---- scoring each task type --------------------------------------------------------------------------

def test_mc_picks_the_choice_the_model_prefers(tok):
    V = tok.get_vocab_size()
    item = {"query": "The king is", "choices": [" dead", " here", " gone away"], "gold": 1}
    for preferred, correct in ((1, True), (2, False), (0, False)):
        prompt = render_prompts_mc(item, " ", [])[preferred]
        model = FollowLM(V, encode(tok, prompt))
        assert evaluate_example(0, model, tok, [item], "cpu", task("multiple_choice")) is correct


def test_mc_scores_the_mean_not_the_sum_over_the_span(tok):
    """Choice 0 is long with one wrong token at its end; choice 1 is one short wrong span. Mean CE favours 0
    (sum would favour 1); scoring the span one position late or early would change the counts."""
    V = tok.get_vocab_size()
    item = {"query": "Speak", "choices": [" the king the queen the lord the lady", " no"], "gold": 0}
    rows = tok.encode(render_prompts_mc(item, " ", []), prepend=tok.get_bos_token_id())
    script = list(rows[0])
    script[-1] = (script[-1] + 1) % tok.get_bos_token_id()  # the last token of choice 0 is mispredicted
    _, (start, _), (end0, end1) = token_spans(rows, "multiple_choice")
    n0, n1 = end0 - start, end1 - start
    assert n0 >= 4 and n1 == 1 and rows[1][start] != script[start]  # preconditions of the design
    # Per-token CE is lse - MARGIN where the script is right and lse where it is wrong, so the sums rank the
    # choices the other way round from the means.
    lse = math.log(math.exp(MARGIN) + V - 1)
    sum0, sum1 = (n0 - 1) * (lse - MARGIN) + lse, lse
    assert sum0 / n0 < sum1 / n1 and sum0 > sum1
    assert evaluate_example(0, PositionLM(V, script), tok, [item], "cpu", task("multiple_choice"))


def test_mc_tie_goes_to_the_first_choice(tok):
    """With uniform logits every choice has mean CE ln V: the first (index 0) wins, as the reference."""
    V = tok.get_vocab_size()
    golds = [0, 1, 0, 2, 1]
    data = [{"query": f"Question {i}", "choices": [" a", " b", " c"], "gold": g} for i, g in enumerate(golds)]
    acc = evaluate_task(PositionLM(V, []), tok, data, "cpu", task("multiple_choice"))
    assert acc == pytest.approx(2 / 5)


def test_schema_scores_the_shared_continuation_under_each_option(tok):
    V = tok.get_vocab_size()
    item = {"context_options": ["The queen", "The old fool"], "continuation": "wept bitterly.", "gold": 0}
    prompts = render_prompts_schema(item, " ", [])
    assert evaluate_example(0, FollowLM(V, encode(tok, prompts[0])), tok, [item], "cpu", task("schema"))
    assert not evaluate_example(0, FollowLM(V, encode(tok, prompts[1])), tok, [item], "cpu", task("schema"))


def test_lm_needs_every_continuation_token_and_only_those(tok):
    V = tok.get_vocab_size()
    item = {"context": "My lord, the", "continuation": "king is dead"}
    without, with_ = tok.encode(render_prompts_lm(item, " ", []), prepend=tok.get_bos_token_id())
    s, e = len(without), len(with_)
    assert e - s >= 2
    lm = task("language_modeling")
    assert evaluate_example(0, PositionLM(V, with_), tok, [item], "cpu", lm)
    bad = (with_[s - 1] + 1) % tok.get_bos_token_id()
    # A wrong guess for the last context token (position s - 1) is outside the span: still correct.
    assert evaluate_example(0, PositionLM(V, with_[:s - 1] + [bad] + with_[s:]), tok, [item], "cpu", lm)
    for p in (s, e - 1):  # a wrong first or last continuation token fails the example
        script = list(with_)
        script[p] = (script[p] + 1) % tok.get_bos_token_id()
        assert not evaluate_example(0, PositionLM(V, script), tok, [item], "cpu", lm)


class Recorder(nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size, self.inputs = vocab_size, []

    def forward(self, input_ids):
        self.inputs.append(input_ids.clone())
        return torch.zeros(*input_ids.shape, self.vocab_size)


def test_fewshot_drawn_with_seed_1234_plus_idx_and_rows_padded_with_bos(tok):
    data = [{"query": f"Q{i}", "choices": [f" a{i}", f" bb{i} cc"], "gold": i % 2} for i in range(6)]
    model = Recorder(tok.get_vocab_size())
    evaluate_example(4, model, tok, data, "cpu", task("multiple_choice", fewshot=3, delimiter=" A: "))
    shots = [data[i] for i in random.Random(1234 + 4).sample([0, 1, 2, 3, 5], 3)]
    expected = tok.encode(render_prompts_mc(data[4], " A: ", shots), prepend=tok.get_bos_token_id())
    (ids,) = model.inputs
    width = max(len(r) for r in expected)
    assert ids.shape == (2, width)
    bos = tok.get_bos_token_id()
    for row, exp in zip(ids.tolist(), expected):
        assert row == exp + [bos] * (width - len(exp))


def test_sequence_beyond_rotary_length_is_a_clear_error(tok):
    model = Recorder(tok.get_vocab_size())
    model.rotary_seq_len = 4
    item = {"context": "one two three four five six", "continuation": "seven"}
    with pytest.raises(ValueError, match=r"task 'lm' example 0 is \d+ tokens, beyond the model's 4 rotary"):
        evaluate_example(0, model, tok, [item], "cpu", task("language_modeling", label="lm"))


def test_models_with_max_seq_len_see_the_last_tokens_only(tok):
    """The reference's path for fixed-context models (HF GPT-2): keep the last max_seq_len tokens."""
    item = {"query": "one two three four five six seven", "choices": [" eight", " nine"], "gold": 0}
    full = tok.encode(render_prompts_mc(item, " ", []), prepend=tok.get_bos_token_id())
    model = Recorder(tok.get_vocab_size())
    model.max_seq_len = 4
    evaluate_example(0, model, tok, [item], "cpu", task("multiple_choice"))
    assert [r[:4] for r in model.inputs[0].tolist()] == [r[-4:] for r in full] and model.inputs[0].shape[1] == 4
    model.max_seq_len = 1
    with pytest.raises(ValueError, match="max_seq_len=1 cuts into the scored tokens"):
        evaluate_example(0, model, tok, [item], "cpu", task("multiple_choice"))


def test_centered_score():
    assert centered_score(0.25, 25.0) == pytest.approx(0.0)
    assert centered_score(1.0, 62.0) == pytest.approx(1.0)
    assert centered_score(0.5, 20.0) == pytest.approx((0.5 - 0.2) / 0.8)
    assert centered_score(0.1, 0.0) == pytest.approx(0.1)
    assert centered_score(0.0, 50.0) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="below 100%"):
        centered_score(0.5, 100.0)


def test_documented_table_has_22_tasks_of_the_right_types():
    assert len(CORE_TASKS) == 22
    kinds = [t.task_type for t in CORE_TASKS]
    assert (kinds.count("multiple_choice"), kinds.count("schema"), kinds.count("language_modeling")) == (11, 2, 9)


# ---- a small bundle in the real layout -----------------------------------------------------------------

WORDS = "king queen lord lady sword crown night day love death heart blood fair foul sweet grace".split()


def _examples(task_type, n, seed):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        w = rng.sample(WORDS, 6)
        if task_type == "multiple_choice":
            out.append({"query": f"The {w[0]} and the {w[1]} speak of", "choices": [f" {x}" for x in w[2:5]],
                        "gold": rng.randrange(3)})
        elif task_type == "schema":
            out.append({"context_options": [f"The {w[0]}", f"My {w[1]} {w[2]}"], "continuation": f"loves {w[3]}.",
                        "gold": rng.randrange(2)})
        else:
            out.append({"context": f"O {w[0]}, {w[1]} and {w[2]} ", "continuation": f"{w[3]} {w[4]}"})
    return out


# label -> (core.yaml entry, number of examples); labels/types/shots/delimiters match the documented table.
SMALL_TASKS = {
    "copa": ({"icl_task_type": "multiple_choice", "num_fewshot": [0]}, 7),
    "agi_eval_lsat_ar": ({"icl_task_type": "multiple_choice", "num_fewshot": [3]}, 9),
    "winograd": ({"icl_task_type": "schema", "num_fewshot": [0]}, 5),
    "lambada_openai": ({"icl_task_type": "language_modeling", "num_fewshot": [0]}, 6),
    "jeopardy": ({"icl_task_type": "language_modeling", "num_fewshot": [10],
                  "continuation_delimiter": "\nAnswer: "}, 12),
}


def make_bundle(root: str) -> str:
    """Write `<root>/eval_bundle/` (core.yaml, eval_meta_data.csv, eval_data/*.jsonl); return its path."""
    bundle = os.path.join(root, "eval_bundle")
    os.makedirs(os.path.join(bundle, "eval_data", "sub"), exist_ok=True)
    documented = {t.label: t for t in CORE_TASKS}
    icl_tasks = []
    for k, (label, (entry, n)) in enumerate(SMALL_TASKS.items()):
        uri = f"sub/{label}.jsonl"
        icl_tasks.append({"label": label, "dataset_uri": uri, "icl_task_type": entry["icl_task_type"],
                          "num_fewshot": entry["num_fewshot"], "metric_names": ["InContextLearningAccuracy"],
                          **{key: v for key, v in entry.items() if key == "continuation_delimiter"}})
        with open(os.path.join(bundle, "eval_data", uri), "w") as f:
            for ex in _examples(entry["icl_task_type"], n, seed=k):
                f.write(json.dumps(ex) + "\n")
    with open(os.path.join(bundle, "core.yaml"), "w") as f:
        yaml.safe_dump({"icl_tasks": icl_tasks}, f, sort_keys=False)
    with open(os.path.join(bundle, "eval_meta_data.csv"), "w") as f:
        f.write("Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,Centered Metric?,Description\n")
        for label in SMALL_TASKS:
            f.write(f"{label},cat,type,0,0,{documented[label].random_baseline},Yes,\"a, description\"\n")
    return bundle


@pytest.fixture()
def bundle_dir(tmp_path):
    return make_bundle(str(tmp_path))


def test_load_bundle_reads_yaml_and_baselines(bundle_dir):
    with pytest.warns(UserWarning, match="lacks 17 of the 22"):
        tasks = load_bundle(bundle_dir)
    assert [t.label for t in tasks] == list(SMALL_TASKS)
    jeopardy = tasks[-1]
    assert (jeopardy.task_type, jeopardy.num_fewshot, jeopardy.delimiter) == ("language_modeling", 10, "\nAnswer: ")
    assert tasks[0].delimiter == " " and tasks[0].random_baseline == 50.0 and tasks[0].dataset_uri == "sub/copa.jsonl"


def test_bundle_differing_from_the_table_warns_and_wins(bundle_dir):
    path = os.path.join(bundle_dir, "core.yaml")
    config = yaml.safe_load(open(path))
    config["icl_tasks"][0]["num_fewshot"] = [2]
    yaml.safe_dump(config, open(path, "w"))
    with pytest.warns(UserWarning) as record:
        tasks = load_bundle(bundle_dir)
    messages = [str(w.message) for w in record]
    assert any("'copa' has num_fewshot=2, the documented table says 0; using the bundle's value" in m
               for m in messages), messages
    assert tasks[0].num_fewshot == 2


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["icl_tasks"][2].update(icl_task_type="essay"), "'winograd' has unknown icl_task_type 'essay'"),
    (lambda c: c["icl_tasks"][1].pop("dataset_uri"), r"icl_tasks\[1\] \(agi_eval_lsat_ar\) has no 'dataset_uri'"),
    (lambda c: c["icl_tasks"][0].update(num_fewshot=3), "'copa' has num_fewshot=3; expected a list"),
    (lambda c: c["icl_tasks"][0].update(label="mystery"), "no 'Random baseline' row for task 'mystery'"),
])
def test_malformed_core_yaml_names_the_task(bundle_dir, edit, message):
    path = os.path.join(bundle_dir, "core.yaml")
    config = yaml.safe_load(open(path))
    edit(config)
    yaml.safe_dump(config, open(path, "w"))
    with pytest.raises(ValueError, match=message):
        load_bundle(bundle_dir)


def test_missing_bundle_says_how_to_fetch_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no eval bundle at .*download_eval_bundle\(base_dir\)"):
        load_bundle(str(tmp_path / "eval_bundle"))


def test_unparseable_core_yaml_names_the_file(bundle_dir):
    with open(os.path.join(bundle_dir, "core.yaml"), "w") as f:
        f.write("icl_tasks:\n  - label: [unclosed\n")
    with pytest.raises(ValueError, match=r"(?s)core\.yaml is not valid YAML.*line 2"):
        load_bundle(bundle_dir)


def test_bad_baseline_csv_names_the_line(bundle_dir):
    with open(os.path.join(bundle_dir, "eval_meta_data.csv"), "a") as f:
        f.write("boolq,cat,type,0,0,sixty,Yes,x\n")
    with pytest.raises(ValueError, match=r"eval_meta_data\.csv line 7: 'Random baseline' = 'sixty'"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize("line, message", [
    ('{"query": "q", "choices": [" a"], "gold": 0\n', "line 3 is not valid JSON"),
    ('{"query": "q", "gold": 0}\n', "line 3 lacks the field 'choices'"),
    ('{"query": "q", "choices": [" a", " b"], "gold": 2}\n', "line 3: gold=2 is not an index into its 2 options"),
    ('[1, 2]\n', "line 3 is a JSON list"),
])
def test_malformed_jsonl_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "task.jsonl"
    good = json.dumps({"query": "q", "choices": [" a", " b"], "gold": 1}) + "\n"
    path.write_text(good + "\n" + line + good)  # line 2 is blank and skipped
    with pytest.raises(ValueError, match=f"task.jsonl {message}"):
        load_task_data(str(path), "multiple_choice")
    path.write_text(good + "\n" + good)
    assert len(load_task_data(str(path), "multiple_choice")) == 2


def _gpt(vocab_size: int, seed: int = 0):
    from raychat.model import GPT, GPTConfig

    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    with torch.no_grad():  # a fresh GPT's head is ~0 (std 0.001); widen it so answers differ between examples
        model.lm_head.weight.normal_(0.0, 0.5)
    return model.eval()


def test_evaluate_core_on_a_real_gpt_prints_and_centres(bundle_dir, tok, capsys):
    model = _gpt(tok.get_vocab_size())
    with pytest.warns(UserWarning):
        out = evaluate_core(model, tok, "cpu", max_per_task=-1, bundle_dir=bundle_dir)
    assert list(out["results"]) == list(SMALL_TASKS)
    baselines = {t.label: t.random_baseline for t in CORE_TASKS}
    for label, acc in out["results"].items():
        n = SMALL_TASKS[label][1]
        assert round(acc * n) == pytest.approx(acc * n)  # a fraction of the task's examples
        assert out["centered_results"][label] == pytest.approx(centered_score(acc, baselines[label]))
    assert out["core_metric"] == pytest.approx(sum(out["centered_results"].values()) / len(SMALL_TASKS))
    printed = capsys.readouterr().out
    assert "Evaluating: jeopardy (10-shot, type: language_modeling)... accuracy: " in printed
    assert printed.count("| centered: ") == len(SMALL_TASKS)


def test_max_per_task_shuffles_with_1337_then_truncates(bundle_dir, tok):
    """With max_per_task = 4, the scored examples are the first four of the seed-1337 shuffle."""
    model = Recorder(tok.get_vocab_size())
    # jeopardy (the last task) is 10-shot: 4 examples cannot supply 10 others, so the run ends there.
    with pytest.raises(ValueError, match="'jeopardy' asks for 10 few-shot examples but has only 4"):
        with pytest.warns(UserWarning):
            evaluate_core(model, tok, "cpu", max_per_task=4, bundle_dir=bundle_dir)
    copa = load_task_data(os.path.join(bundle_dir, "eval_data", "sub", "copa.jsonl"), "multiple_choice")
    random.Random(1337).shuffle(copa)
    bos = tok.get_bos_token_id()
    firsts = [ids[0].tolist() for ids in model.inputs[:4]]  # copa is the first task, 0-shot
    for row, ex in zip(firsts, copa[:4]):
        expected = tok.encode(render_prompts_mc(ex, " ", []), prepend=bos)[0]
        assert row[:len(expected)] == expected
    with pytest.raises(ValueError, match="max_per_task=0"):
        evaluate_core(model, tok, "cpu", max_per_task=0, bundle_dir=bundle_dir)


# ---- the download ---------------------------------------------------------------------------------------

@pytest.fixture()
def served_zip(tmp_path):
    """An http.server on 127.0.0.1 serving <tmp>/www/eval_bundle.zip (and 404 for anything else)."""
    src = make_bundle(str(tmp_path / "src"))
    www = tmp_path / "www"
    www.mkdir()
    with zipfile.ZipFile(www / "eval_bundle.zip", "w") as zf:
        for dirpath, _, files in os.walk(src):
            for name in files:
                full = os.path.join(dirpath, name)
                zf.write(full, os.path.relpath(full, os.path.dirname(src)))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", src
    server.shutdown()
    server.server_close()


def test_download_unpacks_into_base_and_skips_when_present(served_zip, tmp_path, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    url, src = served_zip
    base = tmp_path / "base"
    bundle = download_eval_bundle(str(base), url=f"{url}/eval_bundle.zip")
    assert bundle == str(base / "eval_bundle")
    for name in ("core.yaml", "eval_meta_data.csv", "eval_data/sub/copa.jsonl"):
        assert open(os.path.join(bundle, name)).read() == open(os.path.join(src, name)).read()
    assert (base / "eval_bundle.zip").is_file() and not (base / "eval_bundle.zip.tmp").exists()
    assert sorted(os.listdir(base)) == ["eval_bundle", "eval_bundle.zip", "eval_bundle.zip.lock"]
    # Present: no network needed, even with a dead URL.
    assert download_eval_bundle(str(base), url="http://127.0.0.1:9/none.zip", retries=0) == bundle
    # The zip present but the directory gone (a crash mid-unpack): unpack again without downloading.
    shutil.rmtree(bundle)
    assert download_eval_bundle(str(base), url="http://127.0.0.1:9/none.zip", retries=0) == bundle
    assert os.path.isfile(os.path.join(bundle, "core.yaml"))


def test_download_failure_is_retried_then_named(served_zip, tmp_path, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    url, _ = served_zip
    with pytest.raises(RuntimeError, match=r"from http://127\.0\.0\.1:\d+/missing\.zip after 3 attempts"):
        download_eval_bundle(str(tmp_path / "b"), url=f"{url}/missing.zip", retries=2, backoff_s=0.01)
    assert not (tmp_path / "b" / "eval_bundle").exists()


def test_zip_without_eval_bundle_dir_is_rejected(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    with zipfile.ZipFile(base / "eval_bundle.zip", "w") as zf:
        zf.writestr("bundle/core.yaml", "icl_tasks: []\n")
    with pytest.raises(ValueError, match=r"has no top-level eval_bundle/ directory \(found \['bundle'\]\)"):
        download_eval_bundle(str(base), url="http://127.0.0.1:9/none.zip", retries=0)


# ---- distributed == single worker ----------------------------------------------------------------------

def _core_worker(rank, world_size, tokenizer_dir, bundle_dir, out_dir):
    import warnings

    tok = Tokenizer.from_directory(tokenizer_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = evaluate_core(_gpt(tok.get_vocab_size()), tok, "cpu", max_per_task=-1, bundle_dir=bundle_dir)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_two_workers_equal_one(bundle_dir, tok, tiny_tokenizer_dir, tmp_path):
    single = evaluate_core(_gpt(tok.get_vocab_size()), tok, "cpu", max_per_task=-1, bundle_dir=bundle_dir)
    assert 0 < sum(single["results"].values()) < len(SMALL_TASKS)  # not all-wrong, not all-right
    run_gloo(_core_worker, 2, tiny_tokenizer_dir, bundle_dir, str(tmp_path))
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.json") as f:
            assert json.load(f) == single
