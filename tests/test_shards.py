"""Shards (docs/REFERENCE.md §8): listing, the val rule, validation, row groups, download (local HTTP) of
FineWeb-Edu and ClimbMix, and prepare."""
import http.server
import json
import os
import re
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raychat import storage
from raychat.data import __main__ as data_cli
from raychat.data.shards import (SOURCES, ShardError, download, download_indices, iter_texts, list_parquet,
                                 num_row_groups, open_shard, prepare, read_row_group_texts,
                                 row_group_texts, source_files, split_shards, validate_shard)


def write_shard(path, docs, rows_per_group=4):
    pq.write_table(pa.table({"text": pa.array(docs, pa.string())}), path, row_group_size=rows_per_group)


def paragraphs(text):
    """An independent statement of the paragraph rule: docs split on runs of blank lines, no empty docs."""
    docs = re.split(r"\n[ \t\r\f\v]*\n(?:[ \t\r\f\v]*\n)*", text)
    return [d.strip("\r\n") for d in docs if d.strip()]


# ---- listing, split, validation ---------------------------------------------------------------------

def test_list_and_split(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    for name in ["shard_00001.parquet", "shard_00000.parquet", "shard_01822.parquet"]:
        write_shard(d / name, [name])
    (d / "shard_00002.parquet.tmp").write_bytes(b"partial")
    (d / "notes.txt").write_text("x")
    (d / "sub").mkdir()
    write_shard(d / "sub" / "shard_00003.parquet", ["nested files do not count"])
    names = [os.path.basename(p) for p in list_parquet(str(d))]
    assert names == ["shard_00000.parquet", "shard_00001.parquet", "shard_01822.parquet"]
    train, val = split_shards(str(d))
    assert [os.path.basename(p) for p in train] == ["shard_00000.parquet", "shard_00001.parquet"]
    assert os.path.basename(val) == "shard_01822.parquet"
    # val.parquet (what prepare writes) wins; the FineWeb val shard then counts as train.
    write_shard(d / "val.parquet", ["held out"])
    train, val = split_shards(str(d))
    assert os.path.basename(val) == "val.parquet" and len(train) == 3
    # file:// URIs go through pyarrow.fs and come back as URIs.
    uri = (d / "x").as_uri()[:-2]
    train_uri, val_uri = split_shards(uri)
    assert val_uri == uri + "/val.parquet" and train_uri[0] == uri + "/shard_00000.parquet"
    assert read_row_group_texts(val_uri, 0) == ["held out"]
    fs, inner = storage.filesystem(uri)
    assert inner == str(d) and type(fs).__name__ == "LocalFileSystem"


def test_split_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*download"):
        split_shards(str(tmp_path / "missing"))
    write_shard(tmp_path / "shard_00000.parquet", ["a"])
    with pytest.raises(ShardError, match=f"{tmp_path} has no validation shard.*val.parquet.*shard_01822"):
        split_shards(str(tmp_path))
    os.remove(tmp_path / "shard_00000.parquet")
    write_shard(tmp_path / "val.parquet", ["a"])
    with pytest.raises(ShardError, match="no training shard"):
        split_shards(str(tmp_path))


def test_validate_shard_and_row_groups(tmp_path):
    good = tmp_path / "good.parquet"
    write_shard(good, [f"doc {i}" for i in range(10)], rows_per_group=4)
    assert validate_shard(str(good)) == 10
    assert num_row_groups(str(good)) == 3
    assert read_row_group_texts(str(good), 1) == ["doc 4", "doc 5", "doc 6", "doc 7"]
    assert read_row_group_texts(str(good), 2) == ["doc 8", "doc 9"]
    assert list(iter_texts([str(good), str(good)])) == [f"doc {i}" for i in range(10)] * 2
    with pytest.raises(IndexError, match="good.parquet: the shard has 3 row groups"):
        read_row_group_texts(str(good), 3)
    with open_shard(str(good)) as pf:  # one open, many row groups (what the data stream does)
        assert [row_group_texts(pf, g)[0] for g in range(pf.num_row_groups)] == ["doc 0", "doc 4", "doc 8"]

    no_text = tmp_path / "no_text.parquet"
    pq.write_table(pa.table({"content": ["a"]}), no_text)
    with pytest.raises(ShardError, match=r"no_text.parquet has no `text` column.*content"):
        validate_shard(str(no_text))
    wrong_type = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), wrong_type)
    with pytest.raises(ShardError, match="ints.parquet: column `text` has type int64"):
        validate_shard(str(wrong_type))
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(os.urandom(1000))
    with pytest.raises(ShardError, match="corrupt.parquet is not a readable parquet"):
        validate_shard(str(corrupt))
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ShardError, match="truncated.parquet is not a readable parquet"):
        validate_shard(str(truncated))
    with pytest.raises(ShardError, match="missing.parquet does not exist"):
        validate_shard(str(tmp_path / "missing.parquet"))


# ---- download -----------------------------------------------------------------------------------------

class ShardServer:
    """Serves generated shards on 127.0.0.1; `behaviour[i]` makes shard i misbehave:
    "fail2" (HTTP 500 twice, then the file), "drop" (closes the connection half-way, always),
    "garbage" (a 200 with bytes that are not parquet), 404."""

    def __init__(self, root):
        self.root, self.behaviour, self.requests, self.paths = root, {}, {}, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                m = re.fullmatch(r"(?:/[\w.-]+)*/shard_(\d{5})\.parquet", self.path)
                index = int(m.group(1)) if m else -1
                with threading.Lock():
                    n = server.requests[index] = server.requests.get(index, 0) + 1
                    server.paths.append(self.path)
                mode = server.behaviour.get(index)
                if mode == 404 or not m:
                    self.send_error(404)
                    return
                if mode == "fail2" and n <= 2:
                    self.send_error(500)
                    return
                body = server.body(index) if mode != "garbage" else b"this is not parquet" * 100
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if mode == "drop":
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.root_url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.url = f"{self.root_url}/shard_{{i:05d}}.parquet"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def body(self, index):
        path = os.path.join(self.root, f"src_{index}.parquet")
        if not os.path.exists(path):
            write_shard(path, [f"shard {index} doc {j}" for j in range(5)])
        with open(path, "rb") as f:
            return f.read()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path):
    s = ShardServer(str(tmp_path / "served"))
    os.makedirs(s.root)
    yield s
    s.close()


def fetch(server, data_dir, n=3, **kw):
    kw.setdefault("max_attempts", 5)
    return download(n, workers=2, data_dir=str(data_dir), base_url=server.url, base_delay=0.01, timeout=5,
                    progress=False, **kw)


def test_download_indices():
    assert download_indices(3) == [0, 1, 2, 1822]
    assert download_indices(-1) == list(range(1823)) == download_indices(5000)
    with pytest.raises(ValueError, match="num_shards=0"):
        download_indices(0)


def test_download_ok_retry_and_skip(server, tmp_path, capsys):
    server.behaviour = {1: "fail2"}
    data = tmp_path / "data"
    summary = fetch(server, data)
    assert summary.failed == {} and summary.fetched == [0, 1, 2, 1822]
    assert server.requests[1] == 3 and server.requests[0] == 1  # two 500s, then the file
    assert "Done! Downloaded: 4/4 shards" in capsys.readouterr().out
    assert sorted(os.listdir(data)) == [f"shard_{i:05d}.parquet" for i in (0, 1, 2, 1822)]
    assert read_row_group_texts(str(data / "shard_01822.parquet"), 0)[0] == "shard 1822 doc 0"
    train, val = split_shards(str(data))
    assert len(train) == 3 and val.endswith("shard_01822.parquet")
    before = dict(server.requests)
    again = fetch(server, data)
    assert again.skipped == [0, 1, 2, 1822] and again.fetched == [] and server.requests == before


def test_download_dropped_connection_leaves_nothing(server, tmp_path):
    server.behaviour = {1: "drop", 2: "garbage"}
    data = tmp_path / "data"
    summary = fetch(server, data, max_attempts=3)
    assert set(summary.failed) == {1, 2} and summary.fetched == [0, 1822]
    assert "shard_00001.parquet: 3 attempts failed" in summary.failed[1], summary.failed[1]
    assert "not a readable parquet" in summary.failed[2]  # bad files are validated, deleted, retried
    assert server.requests[1] == 3 and server.requests[2] == 3
    assert sorted(os.listdir(data)) == ["shard_00000.parquet", "shard_01822.parquet"]  # no .tmp, no partial


def test_download_404_is_clear_and_not_retried(server, tmp_path, capsys):
    server.behaviour = {2: 404}
    data = tmp_path / "data"
    rc = data_cli.main(["download", "-n", "3", "-w", "2", "--data-dir", str(data), "--base-url", server.url])
    captured = capsys.readouterr()
    assert rc == 1
    assert "Done! Downloaded: 3/4 shards" in captured.out
    assert "shard_00002.parquet: HTTP 404" in captured.err
    assert server.requests[2] == 1
    assert not os.path.exists(data / "shard_00002.parquet")


def test_download_dry_run(tmp_path, capsys):
    assert data_cli.main(["download", "-n", "2", "--data-dir", str(tmp_path / "d"), "--dry-run"]) == 0
    assert "download 3 fineweb-edu shards (train 0..1 + val 1822)" in capsys.readouterr().out
    assert not os.path.exists(tmp_path / "d")
    assert data_cli.main(["download", "-n", "2", "--source", "climbmix", "--base-dir", str(tmp_path / "b"),
                          "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"{SOURCES['climbmix'].base_url}\nto {tmp_path / 'b' / 'base_data_climbmix'}" in out
    assert "download 3 climbmix shards (train 0..1 + val 6542)" in out and not os.path.exists(tmp_path / "b")
    with pytest.raises(SystemExit):
        data_cli.main(["download", "-n", "0", "--dry-run"])
    with pytest.raises(SystemExit):
        data_cli.main(["download", "--base-url", "http://x/no-index.parquet", "--dry-run"])



# ---- ClimbMix: the 2026-07 recipe's data ------------------------------------------------------------------

def peer_split(data_dir):
    """nanochat's own rule, stated independently: every .parquet in the folder sorted, the last one is val."""
    names = sorted(n for n in os.listdir(data_dir) if n.endswith(".parquet"))
    return names[:-1], names[-1]


def test_download_indices_per_source():
    assert download_indices(3, "climbmix") == [0, 1, 2, 6542]
    assert download_indices(-1, "climbmix") == list(range(6543)) == download_indices(10_000, "climbmix")
    assert download_indices(6542, "climbmix") == list(range(6543))  # -n counts train shards: 6542 of them
    assert download_indices(3, "fineweb-edu") == download_indices(3) == [0, 1, 2, 1822]
    with pytest.raises(ValueError, match="source='fineweb'.*fineweb-edu, climbmix"):
        download_indices(3, "fineweb")


def test_climbmix_download_from_a_local_mirror(server, tmp_path, capsys):
    """The CLI with --source climbmix against a local copy of the real URL's layout: n train shards plus shard
    6542, in <base>/base_data_climbmix, with a progress bar; the folder splits as nanochat's loader splits it."""
    base = tmp_path / "base"
    mirror = SOURCES["climbmix"].base_url.replace("https://huggingface.co", server.root_url)
    assert mirror.startswith("http://127.0.0.1:")
    rc = data_cli.main(["download", "--source", "climbmix", "-n", "3", "-w", "2", "--base-dir", str(base),
                        "--base-url", mirror])
    out, err = capsys.readouterr()
    assert rc == 0
    data = base / "base_data_climbmix"
    assert f"download 4 climbmix shards (train 0..2 + val 6542) with 2 workers\nfrom {mirror}\nto {data}" in out
    assert "Done! Downloaded: 4/4 shards" in out
    assert re.search(r"shards: 100%.*\| 4/4 ", err), err  # tqdm's bar on stderr
    assert sorted(server.paths) == [f"/datasets/karpathy/climbmix-400b-shuffle/resolve/main/shard_{i:05d}.parquet"
                                    for i in (0, 1, 2, 6542)]
    assert sorted(os.listdir(base)) == ["base_data_climbmix"]
    assert sorted(os.listdir(data)) == [f"shard_{i:05d}.parquet" for i in (0, 1, 2, 6542)]
    train, val = split_shards(str(data))
    assert ([os.path.basename(f) for f in train], os.path.basename(val)) == peer_split(data)
    assert os.path.basename(val) == "shard_06542.parquet" and len(train) == 3
    assert {t.split(" doc ")[0] for t in iter_texts(train)} == {"shard 0", "shard 1", "shard 2"}
    assert read_row_group_texts(val, 0)[0] == "shard 6542 doc 0"


def test_climbmix_val_shard_is_validated_and_never_replaced_by_a_train_shard(server, tmp_path):
    """A val shard that fails validation is deleted; the folder then has no val (shard_00002 is not taken for it,
    as nanochat would) until a rerun fetches just the missing file."""
    server.behaviour = {6542: "garbage"}
    data = tmp_path / "climbmix"
    summary = fetch(server, data, max_attempts=2, source="climbmix")
    assert summary.fetched == [0, 1, 2] and list(summary.failed) == [6542]
    assert "not a readable parquet" in summary.failed[6542] and server.requests[6542] == 2
    assert sorted(os.listdir(data)) == [f"shard_{i:05d}.parquet" for i in (0, 1, 2)]
    with pytest.raises(ShardError, match="no validation shard.*shard_06542.parquet \\(climbmix\\).*highest-numbered "
                                         "being shard_00002"):
        split_shards(str(data))
    server.behaviour = {}
    again = fetch(server, data, source="climbmix")
    assert again.skipped == [0, 1, 2] and again.fetched == [6542]
    assert os.path.basename(split_shards(str(data))[1]) == "shard_06542.parquet"


def test_split_a_large_climbmix_download(tmp_path):
    """Past 1822 train shards a ClimbMix folder holds FineWeb-Edu's val shard number as a train shard: the highest
    number decides (names only: the split reads no file)."""
    for i in (0, 1821, 1822, 1823, 6542):
        (tmp_path / f"shard_{i:05d}.parquet").touch()
    train, val = split_shards(str(tmp_path))
    assert os.path.basename(val) == "shard_06542.parquet" and len(train) == 4
    assert ([os.path.basename(f) for f in train], os.path.basename(val)) == peer_split(tmp_path)
    os.remove(tmp_path / "shard_06542.parquet")  # its val shard failed to download
    with pytest.raises(ShardError, match="highest-numbered being shard_01823"):
        split_shards(str(tmp_path))
    assert data_cli.parse_args(["download"]).source == "fineweb-edu"  # the seed recipe's data stays the default


# ---- prepare ------------------------------------------------------------------------------------------

def test_prepare_shakespeare(tiny_data_dir, shakespeare_path):
    with open(shakespeare_path, encoding="utf-8") as f:
        docs = paragraphs(f.read())
    train, val = split_shards(tiny_data_dir)
    assert len(train) >= 3 and os.path.basename(val) == "val.parquet"
    assert [os.path.basename(p) for p in train] == [f"shard_{i:05d}.parquet" for i in range(len(train))]
    for i, path in enumerate(train):
        pf = pq.ParquetFile(path)
        assert pf.schema_arrow == pa.schema([("text", pa.string())])
        rows = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
        assert all(r == 64 for r in rows[:-1]) and 0 < rows[-1] <= 64
        assert pf.metadata.row_group(0).column(0).compression == "ZSTD"
        if i < len(train) - 1:  # cut rule: >= shard_chars and a whole number of row groups
            assert rows[-1] == 64 and sum(map(len, pq.read_table(path)["text"].to_pylist())) >= 200_000
    # Every 10th document is held out; the rest are the train shards in source order.
    assert list(iter_texts([val])) == docs[0::10]
    assert list(iter_texts(train)) == [d for i, d in enumerate(docs) if i % 10]


def test_prepare_mixed_folder(tmp_path):
    src = tmp_path / "src"
    (src / "b" / "deeper").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"first para\nstill first\n\n  \n\nsecond \xff para\n\n\n")
    (src / "b" / "c.jsonl").write_text(json.dumps({"text": "json one", "id": 1}) + "\n\n"
                                       + json.dumps({"text": "   "}) + "\n" + json.dumps({"text": "json two"}) + "\n")
    write_shard(src / "b" / "deeper" / "d.parquet", ["pq one", "", "pq two"])
    (src / "b" / "skip.csv").write_text("text\nnot read\n")
    out = tmp_path / "out"
    with pytest.warns(UserWarning) as record:
        s = prepare(str(src), str(out), rows_per_group=2, shard_chars=10, val_fraction=0.5, progress=False)
    messages = " ".join(str(w.message) for w in record)
    assert "skipped 1 files" in messages and "1 invalid UTF-8" in messages
    expected = ["first para\nstill first", "second \ufffd para", "json one", "json two", "pq one", "pq two"]
    assert list(iter_texts([s.val_file])) == expected[0::2]
    assert list(iter_texts(s.train_files)) == expected[1::2]
    assert s.dropped_empty == 2 and s.replaced_chars == 1 and s.source_files == 3
    # shard_chars=10 with 2-doc row groups: every shard but the last holds exactly one full row group here.
    assert [num_row_groups(p) for p in s.train_files] == [1, 1]
    assert [pq.ParquetFile(p).metadata.num_rows for p in s.train_files] == [2, 1]
    # Re-running into a non-empty --out is refused unless asked to overwrite.
    with pytest.raises(ShardError, match="already holds 3 .parquet files.*--overwrite"):
        prepare(str(src / "a.txt"), str(out), progress=False, val_fraction=0.5)
    with pytest.warns(UserWarning, match="1 invalid UTF-8"):
        s2 = prepare(str(src / "a.txt"), str(out), txt_docs="line", val_fraction=0.5, overwrite=True,
                     progress=False)
    assert list(iter_texts([s2.val_file])) == ["first para", "second \ufffd para"]
    assert list(iter_texts(s2.train_files)) == ["still first"]
    assert sorted(os.listdir(out)) == ["shard_00000.parquet", "val.parquet"]


def test_prepare_bad_inputs(tmp_path):
    out = str(tmp_path / "out")
    no_text = tmp_path / "no_text.parquet"
    pq.write_table(pa.table({"body": ["a"]}), no_text)
    with pytest.raises(ShardError, match="no_text.parquet has no `text` column"):
        prepare(str(no_text), out, progress=False)
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 garbage")
    with pytest.raises(ShardError, match="corrupt.parquet is not a readable parquet"):
        prepare(str(corrupt), out, progress=False)
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ShardError, match=r"bad.jsonl:2 has no string `text` field"):
        prepare(str(bad_json), out, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("\n  \n\t\n")
    with pytest.raises(ShardError, match="holds no non-empty documents"):
        prepare(str(empty), out, progress=False)
    with pytest.raises(FileNotFoundError, match="missing.txt does not exist"):
        prepare(str(tmp_path / "missing.txt"), out, progress=False)
    with pytest.raises(ValueError, match="txt_docs='words'"):
        prepare(str(empty), out, txt_docs="words", progress=False)
    # No failure above left any file behind in the output directory.
    assert os.listdir(out) == []


@pytest.mark.filterwarnings("ignore:prepare.*invalid UTF-8")  # a few stdlib test files are not UTF-8
def test_prepare_stdlib(tmp_path, capsys):
    files = source_files("stdlib")
    assert len(files) > 100 and all(f.endswith(".py") for f in files)
    assert not any("site-packages" in f or "dist-packages" in f for f in files)
    assert any(f.endswith(os.sep + "os.py") for f in files)
    out = tmp_path / "std"
    assert data_cli.main(["prepare", "--from", "stdlib", "--out", str(out), "--dry-run"]) == 0
    assert not out.exists()
    rc = data_cli.main(["prepare", "--from", "stdlib", "--out", str(out), "--shard-chars", "5000000",
                        "--rows-per-group", "128"])
    assert rc == 0 and "Done!" in capsys.readouterr().out
    train, val = split_shards(str(out))
    assert len(train) >= 2 and validate_shard(val) > 0
    assert any("import" in t for t in read_row_group_texts(train[0], 0))
