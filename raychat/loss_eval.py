"""Bits per byte: the tokenizer-independent validation loss (docs/REFERENCE.md §9).

Cross-entropy per token depends on the vocabulary; dividing the summed loss by the number of UTF-8 bytes the
targets stand for does not, so runs with different tokenizers compare. No Ray here: the training loop and the
eval CLI call this from inside Ray Train workers, where torch.distributed is already initialised.
"""
import math
from collections.abc import Iterable

import torch
import torch.distributed as dist

from raychat.common import dist_info


def _model_device(model) -> torch.device:
    # GPT may not expose get_device(); its parameters always know where they live.
    return next(model.parameters()).device


@torch.no_grad()
def evaluate_bpb(model, batches: Iterable, steps: int, token_bytes: torch.Tensor) -> float:
    """Bits per byte of `model` over the first `steps` (x, y) pairs of `batches`, summed over every worker.

    Contract (the reference's):
    - `model(x, y, loss_reduction='none')` returns the per-token natural-log cross-entropy, any shape with
      x.numel() elements; `token_bytes` is the (V,) table of UTF-8 byte counts, 0 for special tokens.
    - A target contributes its loss only when its byte count is > 0: the specials (BOS appearing as a
      target) are left out of both sums. Ignored targets (y < 0) count 0 bytes and so 0 nats too.
    - total_nats (fp32) and total_bytes (int64) live on the model's device; when a process group exists both
      are all-reduced with SUM, so every rank returns the same global figure.
    - Returns total_nats / (ln 2 * total_bytes), or +inf when no byte was seen.
    """
    return bpb_from_sums(*bpb_sums(model, batches, steps, token_bytes))


@torch.no_grad()
def bpb_sums(model, batches: Iterable, steps: int, token_bytes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(total_nats fp32, total_bytes int64) of this process's `steps` batches, before any reduction:
    evaluate_bpb's sums, for a caller that adds several streams' sums itself (raychat.eval)."""
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"evaluate_bpb: steps={steps!r} must be an int >= 0 (the number of (x, y) batches)")
    if token_bytes.dim() != 1:
        raise ValueError(f"evaluate_bpb: token_bytes has shape {tuple(token_bytes.shape)}; it must be the (V,) "
                         "table from raychat.tokenizer.get_token_bytes")
    device = _model_device(model)
    token_bytes = token_bytes.to(device)
    total_nats = torch.zeros((), dtype=torch.float32, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    batch_iter = iter(batches)
    for step in range(steps):
        try:
            x, y = next(batch_iter)
        except StopIteration:
            raise ValueError(f"evaluate_bpb: the batches ran out after {step} of steps={steps}; "
                             "pass fewer steps or a longer iterator") from None
        loss = model(x, y, loss_reduction="none").reshape(-1)
        y = y.reshape(-1)
        if loss.numel() != y.numel():
            raise ValueError(f"evaluate_bpb: the model returned {loss.numel()} losses for {y.numel()} targets; "
                             "it must return one loss per target with loss_reduction='none'")
        # The reference branches on (y < 0).any(), a host sync per batch; the masked form gives the same
        # sums without it (pretraining batches have no ignored targets anyway).
        valid = y >= 0
        nb = torch.where(valid, token_bytes[torch.where(valid, y, 0)], 0)
        total_nats += (loss.float() * (nb > 0)).sum()
        total_bytes += nb.sum(dtype=torch.int64)
    return total_nats, total_bytes


def bpb_from_sums(total_nats: torch.Tensor, total_bytes: torch.Tensor) -> float:
    """Bits per byte of the sums, all-reduced (SUM) over the process group when there is one."""
    _, world_size = dist_info()
    if world_size > 1:
        dist.all_reduce(total_nats, op=dist.ReduceOp.SUM)
        dist.all_reduce(total_bytes, op=dist.ReduceOp.SUM)
    nats, nbytes = total_nats.item(), total_bytes.item()
    if nbytes == 0:
        return float("inf")
    return nats / (math.log(2) * nbytes)
