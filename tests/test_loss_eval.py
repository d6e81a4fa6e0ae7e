"""Bits per byte (docs/REFERENCE.md §9) on a tiny real GPT with a real tokenizer's token_bytes table."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from raychat.loss_eval import evaluate_bpb
from raychat.model import GPT, GPTConfig
from raychat.tokenizer import TOKEN_BYTES_FILE, Tokenizer
from tests._gloo import run_gloo

B, T = 3, 16


def _gpt(vocab_size: int):
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=T, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.3)  # a fresh head is ~0; make the losses differ per token
    return model.eval()


def _batches(vocab_size: int, bos: int, n: int = 4, seed: int = 1):
    """n (x, y) pairs of random tokens, with BOS as a target at a few places (as at document starts)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        row = torch.randint(0, bos, (B, T + 1), generator=g)
        row[:, 0] = bos
        row[:, 7] = bos
        out.append((row[:, :-1].contiguous(), row[:, 1:].contiguous()))
    return out


@pytest.fixture(scope="module")
def setup(tiny_tokenizer_dir):
    tok = Tokenizer.from_directory(tiny_tokenizer_dir)
    token_bytes = torch.load(os.path.join(tiny_tokenizer_dir, TOKEN_BYTES_FILE), weights_only=True)
    V = tok.get_vocab_size()
    return _gpt(V), token_bytes, tok.get_bos_token_id(), V


def _direct(model, batches, token_bytes, mask=True):
    """bpb written out plainly, in float64: the loss of targets with bytes over the bytes they stand for."""
    nats, nbytes = 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            logits = model(x)
            ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)).double(), y.reshape(-1), reduction="none")
            nb = token_bytes[y.reshape(-1)]
            keep = nb > 0 if mask else torch.ones_like(nb, dtype=torch.bool)
            nats += ce[keep].sum().item()
            nbytes += nb.sum().item()
    return nats / (math.log(2) * nbytes)


def test_bpb_equals_a_direct_computation_and_masks_zero_byte_targets(setup):
    model, token_bytes, bos, V = setup
    assert token_bytes[bos] == 0 and (token_bytes[:bos] > 0).all()  # premise: BOS is the 0-byte target
    batches = _batches(V, bos)
    got = evaluate_bpb(model, iter(batches), 4, token_bytes)
    assert got == pytest.approx(_direct(model, batches, token_bytes), rel=1e-6)
    # The BOS targets carry real loss: counting it would change the figure noticeably.
    assert abs(got - _direct(model, batches, token_bytes, mask=False)) > 1e-3
    # Only the first `steps` batches count.
    assert evaluate_bpb(model, iter(batches), 2, token_bytes) == pytest.approx(
        _direct(model, batches[:2], token_bytes), rel=1e-6)


def test_ignored_targets_count_neither_nats_nor_bytes(setup):
    model, token_bytes, bos, V = setup
    (x, y), = _batches(V, bos, n=1)
    y_ignored = y.clone()
    y_ignored[:, 10:] = -1
    expected = _direct(model, [(x[:, :10], y[:, :10])], token_bytes)  # causal: the first 10 positions alone
    assert evaluate_bpb(model, [(x, y_ignored)], 1, token_bytes) == pytest.approx(expected, rel=1e-5)


def test_no_bytes_gives_inf_and_bad_arguments_are_named(setup):
    model, token_bytes, bos, V = setup
    x = torch.full((1, T), bos)
    assert evaluate_bpb(model, [(x, x.clone())], 1, token_bytes) == float("inf")  # only BOS targets
    assert evaluate_bpb(model, [], 0, token_bytes) == float("inf")
    with pytest.raises(ValueError, match="batches ran out after 1 of steps=2"):
        evaluate_bpb(model, [(x, x)], 2, token_bytes)
    with pytest.raises(ValueError, match="steps=-1 must be an int >= 0"):
        evaluate_bpb(model, [], -1, token_bytes)
    with pytest.raises(ValueError, match=r"token_bytes has shape \(2, 3\)"):
        evaluate_bpb(model, [], 1, torch.zeros(2, 3))


def _bpb_worker(rank, world_size, tokenizer_dir, out_dir):
    tok = Tokenizer.from_directory(tokenizer_dir)
    token_bytes = torch.load(os.path.join(tokenizer_dir, TOKEN_BYTES_FILE), weights_only=True)
    V = tok.get_vocab_size()
    mine = _batches(V, tok.get_bos_token_id())[rank::world_size]  # each rank its own share of the data
    bpb = evaluate_bpb(_gpt(V), iter(mine), len(mine), token_bytes)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(bpb, f)


def test_two_workers_reduce_to_the_single_worker_figure(setup, tiny_tokenizer_dir, tmp_path):
    model, token_bytes, bos, V = setup
    single = evaluate_bpb(model, iter(_batches(V, bos)), 4, token_bytes)
    half = evaluate_bpb(model, iter(_batches(V, bos)[0::2]), 2, token_bytes)
    assert abs(half - single) > 1e-4  # a rank's own share alone would not do
    run_gloo(_bpb_worker, 2, tiny_tokenizer_dir, str(tmp_path))
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.json") as f:
            assert json.load(f) == pytest.approx(single, rel=1e-6)
