"""The repository stands alone: a clone has nothing beside it, so no file in it may send a reader elsewhere."""
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Spelled in pieces so that this file does not match itself.
OUTSIDE = re.compile("|".join([r"\.\./" + "shared", "spec " + "§", "RAY_" + "PRACTICE", "STYLE" + r"(\.md| §)",
                               "NANOCHAT_" + "BASE_TRAIN"]))
# Benchmarks run the reference beside raychat and may name where its checkout lives; nothing else may.
ALLOWED_UNDER = ("bench/",)


def tracked_text_files() -> list[str]:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [f for f in files if not f.startswith(ALLOWED_UNDER) and not f.endswith((".gz", ".parquet", ".pt", ".png"))
            and os.path.isfile(os.path.join(ROOT, f))]  # a tracked file deleted in the working tree is gone


def test_no_file_refers_outside_the_repository():
    found = []
    for rel in tracked_text_files():
        with open(os.path.join(ROOT, rel), encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if OUTSIDE.search(line):
                    found.append(f"{rel}:{n}: {line.strip()[:100]}")
    assert not found, "references to files a clone does not have:\n" + "\n".join(found)


def test_the_pattern_catches_what_it_should():
    assert OUTSIDE.search("see ../" + "shared/spec") and OUTSIDE.search("(spec " + "§3.2)")
    assert not OUTSIDE.search("docs/REFERENCE.md §5")
