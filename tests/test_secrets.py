"""Reading a file never runs code (docs/RELIABILITY.md, "Security"). That no secret reaches an artefact is checked
on the shared S3 run, in tests/test_s3.py.

The cluster side (dashboard and job API private behind an SSH tunnel, Ray token authentication on) is
checked by tests/test_cluster.py::test_launcher_topology_image_and_security.
"""
import glob
import os
import pickle
import re

import pytest
import torch

from raychat import checkpoint as ckpt_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Payload:
    """A pickle that, when loaded by an unrestricted unpickler, creates the file `path`."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _malicious_checkpoint(directory, marker):
    """A checkpoint that passes check_complete but whose .pt files are code-running pickles."""
    ckpt_files.save_rank_files(directory, 0, optim_state={"evil": Payload(marker)}, data_state=[None],
                               model_state={"evil": Payload(marker)}, meta={"step": 1, "world_size": 1})
    assert ckpt_files.check_complete(directory) is None


def test_malicious_pickle_in_a_checkpoint_is_refused(tmp_path):
    marker = str(tmp_path / "pwned")
    ckpt = str(tmp_path / "step_000001")
    _malicious_checkpoint(ckpt, marker)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        ckpt_files.load_rank_state(ckpt, 0, 1, "cpu")
    assert not os.path.exists(marker), "loading the checkpoint ran code"
    # The same file through an unrestricted loader does run it: the payload is live, the refusal is real.
    torch.load(os.path.join(ckpt, "model.pt"), weights_only=False)
    assert os.path.exists(marker)


def test_malicious_pickle_in_a_nanochat_checkpoint_is_refused(tmp_path):
    marker = str(tmp_path / "pwned")
    torch.save({"transformer.wte.weight": Payload(marker)}, tmp_path / "model_000010.pt")
    (tmp_path / "meta_000010.json").write_text('{"step": 10, "model_config": {"n_layer": 2}}')
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        ckpt_files.load_nanochat_model(str(tmp_path))
    assert not os.path.exists(marker)


def test_malicious_token_bytes_is_refused(tmp_path):
    from raychat.tokenizer import get_token_bytes

    marker = str(tmp_path / "pwned")
    os.makedirs(tmp_path / "tokenizer")
    torch.save(Payload(marker), tmp_path / "tokenizer" / "token_bytes.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        get_token_bytes(str(tmp_path))
    assert not os.path.exists(marker)


def test_malicious_tokenizer_pickle_is_refused(tmp_path):
    from raychat.tokenizer import Tokenizer

    marker = str(tmp_path / "pwned")
    with open(tmp_path / "tokenizer.pkl", "wb") as f:
        pickle.dump(Payload(marker), f)
    with pytest.raises(ValueError, match="not a tokenizer raychat will load"):
        Tokenizer.from_directory(str(tmp_path))
    assert not os.path.exists(marker), "loading tokenizer.pkl ran code"


def test_every_torch_load_in_raychat_is_weights_only():
    """A source check that keeps the rule for files added later: each torch.load call passes weights_only=True."""
    calls = []
    for path in glob.glob(os.path.join(REPO, "raychat", "**", "*.py"), recursive=True) + \
            glob.glob(os.path.join(REPO, "scripts", "*.py")):
        src = open(path).read()
        for m in re.finditer(r"torch\.load\(", src):
            depth, i = 1, m.end()
            while depth:
                depth += {"(": 1, ")": -1}.get(src[i], 0)
                i += 1
            calls.append((os.path.relpath(path, REPO), src[m.start():i]))
    assert len(calls) >= 4, calls
    unsafe = [(p, c) for p, c in calls if "weights_only=True" not in c]
    assert not unsafe, f"torch.load without weights_only=True: {unsafe}"
