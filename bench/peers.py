"""The peers: nanochat checkouts that bench scripts run beside raychat, in their own venv, never imported by the
`raychat` package. Where a script finds one and what it checks before running it.

This project's workspace keeps them in ../shared/peers/nanochat-<commit> (not part of a clone): 07c4dd4, the
reference of the seed recipe, and 92d63d4, of `--recipe 2026-07`; 92d63d4 is told apart by the file it added.
"""
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_PYTHON = "/tmp/nanochat-venv/bin/python"
PEER_VENV_HINT = ("python3 -m venv /tmp/nanochat-venv && /tmp/nanochat-venv/bin/pip install torch==2.13.0 tiktoken "
                  "rustbpe pyarrow numpy wandb requests filelock psutil tokenizers regex")


def default_dir(commit: str) -> str:
    return os.path.join(REPO, "..", "shared", "peers", f"nanochat-{commit}")


def version_of(nanochat_dir: str) -> str:
    """"92d63d4" or "07c4dd4": 92d63d4 added nanochat/fp8.py."""
    return "92d63d4" if os.path.exists(os.path.join(nanochat_dir, "nanochat", "fp8.py")) else "07c4dd4"


def add_arguments(parser, commit: str) -> None:
    """--nanochat-dir (default: the workspace's checkout of `commit`) and --peer-python."""
    parser.add_argument("--nanochat-dir", default=default_dir(commit),
                        help=f"a nanochat checkout (default: this project's workspace copy of {commit})")
    parser.add_argument("--peer-python", default=PEER_PYTHON, help="python of the peer's own venv")


def problem(nanochat_dir: str, needs: str, peer_python: str | None = None, commit: str | None = None) -> str | None:
    """Why the peer at `nanochat_dir` cannot run here (a message naming the fix), or None: the file `needs` must be
    in the checkout, the checkout must be `commit` if given, and `peer_python` must exist if given."""
    if not os.path.exists(os.path.join(nanochat_dir, needs)):
        return (f"--nanochat-dir {nanochat_dir} has no {needs}: point it at a nanochat {commit or '07c4dd4 or 92d63d4'} "
                "checkout (this project's workspace keeps them in ../shared/peers)")
    if commit is not None and version_of(nanochat_dir) != commit:
        return f"--nanochat-dir {nanochat_dir} is nanochat {version_of(nanochat_dir)}, this script needs {commit}"
    if peer_python is not None and not os.path.exists(peer_python):
        return f"--peer-python {peer_python} does not exist: create the peer's venv with\n  {PEER_VENV_HINT}"
    return None
