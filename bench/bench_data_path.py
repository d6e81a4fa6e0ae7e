"""Does the data path keep a GPU node fed? The training thread's wait for batches at an H100's pace.

    python -m bench.bench_data_path [--paces d12,d20,d24] [--backends inline,ray] [--cpus 4] [--steps 128]
                                    [--files 2] [--groups-per-file 4] [--docs-per-group 1000] [--doc-tokens 1000]

A GPU worker spends a micro-batch's compute between two batches; here a timed sleep stands in for it, so the
measured wait is what the data path alone costs. The pace of each depth comes from raychat.config.derive's
FLOPs per token (vocab 32768, T 2048, SSSL) at --mfu of an H100's dense BF16 peak (989 TFLOP/s); the defaults
are an 8-GPU node at the reference's batch: B 32 x T 2048 per micro-batch, 524,288 tokens per step, so one
micro-batch per worker per step (d12: ~90 ms).

The row groups are FineWeb-like in size: --docs-per-group documents of ~--doc-tokens tokens (slices of
tinyshakespeare of random length, tokenized with a 4k-vocab tokenizer trained on it: fast to build, and
tiktoken's speed per token is the same order as with the reference's 32k vocabulary). A worker's slot walks
them in order and wraps into further epochs, as a run does.

Each (backend, pace) case builds a fresh raychat.data.stream.SlotStreams, as the loop does (its first batch,
start-up, is not counted), then runs --steps steps and reads the data wait the loop reports per step
(SlotStreams.take_data_wait: what the training thread waits for packed batches, which a background thread
packs a step ahead): mean, median, p99 and max, and the mean as a share of the step.
The process is pinned to --cpus CPUs (what a GPU node gives one worker; Ray's own processes, started after
pinning, share them too): inline tokenizes on its read-ahead thread with --cpus tiktoken threads; ray runs
--cpus - 1 single-CPU tokenizer actors (the training process keeps one).
Target: data wait <= 1% of step time at d12 with 4 CPUs per worker, both backends.
"""
import argparse
import gzip
import logging
import os
import random
import re
import statistics
import tempfile
import time

for _k, _v in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
               "RAY_DATA_USE_DATASOURCE_V2": "0", "OMP_NUM_THREADS": "1"}.items():
    os.environ.setdefault(_k, _v)

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from bench.machine import cpu_description  # noqa: E402
from raychat.config import TrainConfig, derive  # noqa: E402
from raychat.data.stream import SlotStreams  # noqa: E402
from raychat.tokenizer import Tokenizer  # noqa: E402

H100_BF16_FLOPS = 989e12
REFERENCE_VOCAB = 32768
SHAKESPEARE_GZ = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data",
                              "tinyshakespeare.txt.gz")


def micro_batch_seconds(depth: int, B: int, T: int, mfu: float) -> tuple[float, float]:
    """(seconds per B x T micro-batch on one H100 at `mfu`, FLOPs per token) for a model of `depth`."""
    cfg = TrainConfig(depth=depth, max_seq_len=T, device_batch_size=B, total_batch_size=B * T, num_iterations=1)
    flops = derive(cfg, REFERENCE_VOCAB, 1).num_flops_per_token
    return flops * B * T / (mfu * H100_BF16_FLOPS), flops


def make_corpus(out: str, files: int, groups_per_file: int, docs_per_group: int, doc_tokens: int,
                vocab_size: int) -> tuple[list[str], str]:
    """(shard paths, tokenizer dir): FineWeb-sized row groups of tinyshakespeare slices."""
    text = gzip.open(SHAKESPEARE_GZ, "rt", encoding="utf-8").read()
    tok = Tokenizer.train_from_iterator(iter(re.split(r"\n\s*\n", text)), vocab_size)
    tok_dir = os.path.join(out, "tokenizer")
    tok.save(tok_dir)
    chars_per_token = len(text[:200_000]) / len(tok.encode(text[:200_000]))
    rng = random.Random(0)
    paths = []
    for f in range(files):
        paths.append(os.path.join(out, f"shard_{f:05d}.parquet"))
        write_slices(paths[-1], text, groups_per_file * docs_per_group, doc_tokens * chars_per_token, docs_per_group,
                     rng)
    return paths, tok_dir


def write_slices(path: str, text: str, docs: int, chars: float, rows_per_group: int, rng: random.Random) -> None:
    """A parquet shard of `docs` random slices of `text`, each 0.5-1.5 x `chars` characters long (FineWeb-sized
    documents when `chars` is ~1,000 tokens' worth), `rows_per_group` to a row group."""
    rows = []
    for _ in range(docs):
        n = int(rng.uniform(0.5, 1.5) * chars)
        start = rng.randrange(len(text) - n)
        rows.append(text[start:start + n])
    pq.write_table(pa.table({"text": pa.array(rows, pa.string())}), path, row_group_size=rows_per_group)


def measure(streams: SlotStreams, steps: int, pace_s: float) -> list[tuple[float, float]]:
    """[(data wait, step time)] per step, each micro-batch taking `pace_s`: what the loop reports."""
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        for _ in streams.step_batches():
            time.sleep(pace_s)  # the GPU's forward + backward
        out.append((streams.take_data_wait(), time.perf_counter() - t0))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--paces", default="d12,d20,d24", help="depths whose H100 pace the consumer keeps")
    p.add_argument("--backends", default="inline,ray")
    p.add_argument("--cpus", type=int, default=4, help="CPUs per worker (pinned; capped at what this machine has)")
    p.add_argument("--steps", type=int, default=128, help="steps per case (16 at d12 consume one row group)")
    p.add_argument("--micro-batches", type=int, default=1, help="micro-batches per step per worker (grad accum)")
    p.add_argument("--B", type=int, default=32)
    p.add_argument("--T", type=int, default=2048)
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--files", type=int, default=2)
    p.add_argument("--groups-per-file", type=int, default=4)
    p.add_argument("--docs-per-group", type=int, default=1000)
    p.add_argument("--doc-tokens", type=int, default=1000)
    p.add_argument("--vocab-size", type=int, default=4096)
    args = p.parse_args()

    available = sorted(os.sched_getaffinity(0))
    cpus = min(args.cpus, len(available))
    os.sched_setaffinity(0, available[:cpus])
    print(f"CPU: {cpu_description()}")
    print(f"pinned to {cpus} CPU(s){'' if cpus == args.cpus else f' (asked for {args.cpus}: this machine has fewer)'}")
    print(f"pace: derive()'s FLOPs/token (vocab {REFERENCE_VOCAB}, T {args.T}) x B {args.B} x T {args.T} / "
          f"({args.mfu:.0%} MFU x {H100_BF16_FLOPS / 1e12:.0f} TFLOP/s H100 BF16); {args.micro_batches} "
          f"micro-batch(es) per step")
    paces = {}
    for name in args.paces.split(","):
        paces[name], flops = micro_batch_seconds(int(name.lstrip("d")), args.B, args.T, args.mfu)
        need = args.B * args.T / paces[name]
        print(f"  {name}: {flops:.3e} FLOPs/token -> {paces[name] * 1000:.1f} ms per micro-batch, "
              f"{need / 1e6:.2f}M tokens/s to tokenize per worker")

    with tempfile.TemporaryDirectory(prefix="bench-data-path-") as tmp:
        t = time.perf_counter()
        files, tok_dir = make_corpus(tmp, args.files, args.groups_per_file, args.docs_per_group, args.doc_tokens,
                                     args.vocab_size)
        rg = pq.ParquetFile(files[0]).read_row_group(0).column("text").to_pylist()
        tok = Tokenizer.from_directory(tok_dir)
        rg_tokens = sum(map(len, tok.encode(rg, num_threads=cpus)))
        t_tok = time.perf_counter()
        tok.encode(rg, num_threads=cpus)
        t_tok = time.perf_counter() - t_tok
        print(f"corpus: {args.files} files x {args.groups_per_file} row groups x {args.docs_per_group} documents, "
              f"{rg_tokens / 1e6:.2f}M tokens per row group (vocab {tok.get_vocab_size()}), built in "
              f"{time.perf_counter() - t:.1f}s; one row group tokenizes in {t_tok:.2f}s on {cpus} thread(s)")
        if "ray" in args.backends.split(","):
            import ray
            import ray.data  # configures its loggers: quieten them after

            ray.init(num_cpus=cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
            logging.getLogger("ray.data").setLevel(logging.ERROR)  # no per-dataset start/finish lines
        actors = max(1, cpus - 1)
        print(f"{'backend':<8} {'pace':<5} {'step ms':>8} {'wait mean ms':>13} {'median':>7} {'p99 ms':>8} "
              f"{'max ms':>8} {'% of step':>10}")
        for backend in args.backends.split(","):
            for name, pace in paces.items():
                kwargs = dict(actors=1, tokenizer_threads=cpus) if backend == "inline" else dict(actors=actors)
                # One worker of an 8-GPU node: its own data slot(s), fetched as the loop does (the first batch,
                # at construction, is start-up: the thread or the actor pool and the first row group).
                streams = SlotStreams(files, tok_dir, args.B, args.T, range(args.micro_batches), args.micro_batches,
                                      None, backend=backend, to_device=lambda *t: t, **kwargs)
                try:
                    rows = measure(streams, args.steps, pace)
                finally:
                    streams.close()
                waits = sorted(w for w, _ in rows)
                mean_wait = statistics.fmean(waits)
                mean_step = statistics.fmean(s for _, s in rows)
                p99 = waits[min(len(waits) - 1, int(0.99 * len(waits)))]
                label = backend if backend == "inline" else f"ray({actors})"
                print(f"{label:<8} {name:<5} {mean_step * 1000:8.1f} {mean_wait * 1000:13.2f} "
                      f"{statistics.median(waits) * 1000:7.2f} {p99 * 1000:8.2f} "
                      f"{waits[-1] * 1000:8.2f} {100 * mean_wait / mean_step:9.2f}%", flush=True)


if __name__ == "__main__":
    main()
