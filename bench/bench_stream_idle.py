"""The CPU a Ray Data token stream takes in the training process while the trainer computes (docs/LOG.md).

    python bench/bench_stream_idle.py [--idle-s 3] [--pause-s 0.05]

Once the stream's look-ahead is full, backpressure stops every Ray Data task, and Ray Data's scheduling loop (a
thread of the consuming process) spun without waiting, holding the GIL: measured at 93% of a CPU with a small
look-ahead. raychat pauses it at each step (raychat.data.stream.SCHEDULER_PAUSE_S). This prints the share of a
CPU the consuming process uses while it only waits, with the pause as set (`--pause-s 0` shows the spin).
Corpus: tinyshakespeare (tests/data), tokenizer trained on it to vocab 512.
"""
import argparse
import gzip
import os
import tempfile
import time

for _k, _v in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
               "RAY_DATA_USE_DATASOURCE_V2": "0", "OMP_NUM_THREADS": "1"}.items():
    os.environ.setdefault(_k, _v)

CORPUS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data",
                      "tinyshakespeare.txt.gz")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--idle-s", type=float, default=3.0, help="seconds measured while the consumer waits")
    p.add_argument("--pause-s", type=float, default=None, help="SCHEDULER_PAUSE_S (default: raychat's)")
    args = p.parse_args()

    import ray

    from raychat.data import stream
    from raychat.data.shards import prepare, split_shards
    from raychat.tokenizer import Tokenizer

    if args.pause_s is not None:
        stream.SCHEDULER_PAUSE_S = args.pause_s
    stream.LOOKAHEAD_BYTES = 64 * 1024  # a small look-ahead fills in a moment
    with tempfile.TemporaryDirectory() as out:
        text = gzip.open(CORPUS, "rt", encoding="utf-8").read()
        src = os.path.join(out, "corpus.txt")
        with open(src, "w", encoding="utf-8") as f:
            f.write(text)
        prepare(src, os.path.join(out, "data"), rows_per_group=64, shard_chars=200_000, val_fraction=0.1,
                progress=False)
        train, _ = split_shards(os.path.join(out, "data"))
        tok_dir = os.path.join(out, "tokenizer")
        Tokenizer.train_from_iterator(iter([text]), 512).save(tok_dir)
        ray.init(num_cpus=4, include_dashboard=False, object_store_memory=512 * 1024**2, log_to_driver=False,
                 configure_logging=False)
        try:
            with stream.PackedStream(train, tok_dir, 2, 32, slot=0, num_slots=2, backend="ray") as s:
                for _ in range(3):
                    next(s)
                time.sleep(3.0)  # the look-ahead fills and backpressure stops every task
                cpu0, wall0 = time.process_time(), time.perf_counter()
                time.sleep(args.idle_s)
                share = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
            print(f"scheduler pause {stream.SCHEDULER_PAUSE_S:g} s: the consuming process used {share:.0%} of a "
                  f"CPU while it waited {args.idle_s:g} s", flush=True)
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
