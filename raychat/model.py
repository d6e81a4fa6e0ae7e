"""The GPT of nanochat, as of 07c4dd4 (the "seed" recipe) and, through GPTConfig options, of 92d63d4
("2026-07"), with its parameter grouping for MuonAdamW (docs/REFERENCE.md).

Architecture in one breath: token embedding → RMSNorm (kept as x0) → L pre-norm blocks, each preceded by
x ← resid_λ·x + x0_λ·x0 → RMSNorm → untied lm_head → fp32 softcap 15. A block is causal attention with
rotary embeddings ("split halves", rotating by −θ), QK-norm after rotary, GQA, a per-layer sliding window,
and on every other layer a gated value embedding; then a relu² MLP of width 4d. Norms have no parameters and
no Linear has a bias.

The architecture options of GPTConfig default to the seed's values; RECIPE_OPTIONS["2026-07"] holds 92d63d4's:
- `short_window`: an S layer's window, "half" of T or a "quarter" of T rounded up to a multiple of 128
  (so every T ≤ 512 gives S layers a window of 128);
- `rope_base` (10000 → 100000), `qk_scale` (q and k × 1.2 after QK-norm: sharper attention);
- `ve_gate_channels` / `ve_gate_range`: the value-embedding gate reads 12 channels, not 32, with range (0, 3);
- `smear`: each position adds λ·sigmoid(gate(its first 24 channels)) times the previous token's normed
  embedding (a cheap bigram); with a KV cache the previous embedding is kept in the cache;
- `backout`: before the final norm, subtract λ × the residual stream as it left layer n_layer // 2;
- `init` "2026-07": wte std 0.8, c_fc bound 0.4×, resid/x0 lambdas graded over depth (1.15 → 1.05 and
  0.20 → 0.05), value-embedding gates uniform(0, 0.02) (slightly open) instead of zero.
Smear's gate is a Linear(24, 1) with smear_lambda (init 0), backout has backout_lambda (init 0.2).

Compute dtype, a property of the run, not of the checkpoint: `init_weights(compute_dtype=None)` keeps the
seed's rule (fp32 weights, bf16 embeddings on CUDA only, bf16 rotary tables, bf16 autocast by the caller);
`init_weights(compute_dtype=dtype)` applies 92d63d4's: no autocast; the activations are cast to the dtype
after the embedding lookup, every Linear casts its fp32 weight to its input's dtype, and the embeddings (except
for fp16, whose gradients must stay fp32) and the rotary tables are stored in it.

State-dict keys, shapes, dtypes and registration order equal the reference's of the same recipe, so
checkpoints interchange, and init draws the RNG in the reference's order. Build on the meta device, then
`to_empty(device=...)` and `init_weights()`:

    with torch.device("meta"):
        model = GPT(GPTConfig(..., **RECIPE_OPTIONS["2026-07"]))
    model.to_empty(device=device)
    model.init_weights(compute_dtype=torch.bfloat16)

No Ray here: the model knows nothing of how it is launched.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from raychat.attention import flash_attn_func, flash_attn_with_kvcache
from raychat.common import print0

VE_GATE_CHANNELS = 32   # the seed's value-embedding gate reads the first 32 channels of the block input
SMEAR_CHANNELS = 24     # the smear gate reads the first 24 channels of the normed embedding
SOFTCAP = 15.0          # logits ← 15·tanh(logits/15), in fp32
ROPE_OVERALLOC = 10     # cos/sin cover 10 × sequence_len positions
VOCAB_PAD = 64          # the embedding and head rows are padded to a multiple of 64
WINDOW_TILE = 128       # "quarter" short windows round up to FA3's tile

# The architecture options of each recipe, for GPTConfig(..., **RECIPE_OPTIONS[recipe]).
RECIPE_OPTIONS = {
    "seed": dict(short_window="half", rope_base=10000.0, qk_scale=1.0, ve_gate_channels=VE_GATE_CHANNELS,
                 ve_gate_range=2.0, smear=False, backout=False, init="seed"),
    "2026-07": dict(short_window="quarter", rope_base=100000.0, qk_scale=1.2, ve_gate_channels=12,
                    ve_gate_range=3.0, smear=True, backout=True, init="2026-07"),
}


def min_n_embd(options: dict) -> int:
    """The narrowest model width a set of options (RECIPE_OPTIONS[...]) supports: its gates read that many
    channels."""
    return max(options.get("ve_gate_channels", VE_GATE_CHANNELS), SMEAR_CHANNELS if options.get("smear") else 0)


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "SSSL"
    # Architecture options (module docstring); the defaults are the seed's.
    short_window: str = "half"
    rope_base: float = 10000.0
    qk_scale: float = 1.0
    ve_gate_channels: int = VE_GATE_CHANNELS
    ve_gate_range: float = 2.0
    smear: bool = False
    backout: bool = False
    init: str = "seed"

    def __post_init__(self):
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "ve_gate_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name}={value!r}: must be a positive integer")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"GPTConfig.n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                             "choose n_embd as a multiple of n_head")
        if self.n_kv_head > self.n_head or self.n_head % self.n_kv_head != 0:
            raise ValueError(f"GPTConfig.n_kv_head={self.n_kv_head} must divide n_head={self.n_head} "
                             "(and so be ≤ it): each kv head serves n_head / n_kv_head query heads")
        head_dim = self.n_embd // self.n_head
        if head_dim % 2 != 0:
            raise ValueError(f"GPTConfig.n_embd / n_head = {head_dim} is odd: rotary embeddings need an even "
                             "head dimension")
        if not isinstance(self.window_pattern, str) or not self.window_pattern \
                or set(self.window_pattern.upper()) - {"S", "L"}:
            raise ValueError(f"GPTConfig.window_pattern={self.window_pattern!r}: must be a non-empty string of "
                             "'S' (short window) and 'L' (full context) letters, e.g. 'SSSL'")
        for name, allowed in (("short_window", ("half", "quarter")), ("init", ("seed", "2026-07"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"GPTConfig.{name}={getattr(self, name)!r}: must be one of {allowed}")
        for name in ("rope_base", "qk_scale", "ve_gate_range"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"GPTConfig.{name}={value!r}: must be a positive number")
        for name in ("smear", "backout"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPTConfig.{name}={getattr(self, name)!r}: must be True or False")
        need = min_n_embd({"ve_gate_channels": self.ve_gate_channels, "smear": self.smear})
        if self.n_embd < need:
            raise ValueError(f"GPTConfig.n_embd={self.n_embd} is below the {need} channels the gates read "
                             f"(ve_gate_channels={self.ve_gate_channels}, smear={self.smear}); widen the model")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMSNorm over the last dimension, default eps, output in the input's dtype.

    torch ≥ 2.12 runs rms_norm in fp32 under CUDA autocast; casting back keeps
    the reference's bf16 residual stream and bf16 q/k for attention. Outside autocast this cast is a no-op.
    """
    return F.rms_norm(x, (x.size(-1),)).to(x.dtype)


class Linear(nn.Linear):
    """An nn.Linear whose weight is cast to its input's dtype: with a compute dtype the master weights stay fp32
    for the optimizer while the matmul runs in the activations' dtype. The cast is a no-op when the dtypes
    agree, and under the seed's autocast it is the cast autocast makes anyway. Every matmul of the model is
    one of these: num_matmul_params counts them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(dtype=x.dtype))


def has_ve(layer_idx: int, n_layer: int) -> bool:
    """Value embeddings on every other layer, counting back from the last, which always has one."""
    return layer_idx % 2 == (n_layer - 1) % 2


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, T, H, D) by the "split halves" convention; this rotates by −θ.

    The sign is the transpose of the textbook one. Attention only sees relative rotations, so it is
    equivalent, but trained checkpoints depend on it: keep it.
    """
    half = x.size(3) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos], dim=3)


def window_sizes(config: GPTConfig) -> list[tuple[int, int]]:
    """Per-layer (left, right) attention windows.

    'L' → (T, 0) and 'S' → (short, 0), the pattern tiled over layers, the last layer forced to (T, 0); short
    is T // 2, or with short_window "quarter" T / 4 rounded up to a multiple of 128 (2048 → 512).
    QUIRK kept: "full" is the finite window T, not −1, so on rows longer than T (CORE evaluation) the
    L layers also slide.
    """
    pattern = config.window_pattern.upper()
    T = config.sequence_len
    if config.short_window == "half":
        short = T // 2
    else:
        short = -(-T // (4 * WINDOW_TILE)) * WINDOW_TILE
    by_letter = {"L": (T, 0), "S": (short, 0)}
    sizes = [by_letter[pattern[i % len(pattern)]] for i in range(config.n_layer)]
    sizes[-1] = (T, 0)
    return sizes


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        self.qk_scale = config.qk_scale
        self.ve_gate_channels = config.ve_gate_channels
        self.ve_gate_range = config.ve_gate_range
        d = config.n_embd
        # Registration order matters for optimizer grouping and init RNG order.
        self.c_q = Linear(d, self.n_head * self.head_dim, bias=False)
        self.c_k = Linear(d, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = Linear(d, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = Linear(d, d, bias=False)
        self.ve_gate = Linear(self.ve_gate_channels, self.n_kv_head, bias=False) \
            if has_ve(layer_idx, config.n_layer) else None

    def forward(self, x, ve, cos_sin, window_size, kv_cache):
        B, T, _ = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            # A per-head gate in (0, ve_gate_range): exactly 1 at the seed's init (zero weights, range 2).
            gate = self.ve_gate_range * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)  # QK-norm after rotary, softmax scale stays 1/sqrt(Dh)
        if self.qk_scale != 1.0:  # the scale shared by q and k: logits × qk_scale²
            q, k = q * self.qk_scale, k * self.qk_scale
        if kv_cache is None:
            y = flash_attn_func(q, k, v, causal=True, window_size=window_size)
        else:
            k_cache, v_cache = kv_cache.get_layer_cache(self.layer_idx)
            y = flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=kv_cache.cache_seqlens,
                                        causal=True, window_size=window_size)
            if self.layer_idx == kv_cache.n_layers - 1:
                kv_cache.advance(T)  # every layer wrote at the same position; move on once, after the last
        return self.c_proj(y.contiguous().view(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos_sin, window_size, kv_cache):
        x = x + self.attn(norm(x), ve, cos_sin, window_size, kv_cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.window_sizes = window_sizes(config)
        vocab = math.ceil(config.vocab_size / VOCAB_PAD) * VOCAB_PAD
        if vocab != config.vocab_size:
            print0(f"Padding vocab_size from {config.vocab_size} to {vocab} (a multiple of {VOCAB_PAD})")
        self.padded_vocab_size = vocab
        kv_dim = config.n_kv_head * config.head_dim
        L = config.n_layer
        # Attribute order = state-dict order of the reference.
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(vocab, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(L)]),
        })
        self.lm_head = Linear(config.n_embd, vocab, bias=False)  # untied from wte
        self.resid_lambdas = nn.Parameter(torch.ones(L))
        self.x0_lambdas = nn.Parameter(torch.zeros(L))
        self.smear_gate = Linear(SMEAR_CHANNELS, 1, bias=False) if config.smear else None
        self.smear_lambda = nn.Parameter(torch.zeros(1)) if config.smear else None
        self.backout_lambda = nn.Parameter(torch.zeros(1)) if config.backout else None
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(vocab, kv_dim) for i in range(L) if has_ve(i, L)})
        self.rotary_seq_len = ROPE_OVERALLOC * config.sequence_len
        # None: the seed's precision rule; a dtype: the compute-dtype rule (module docstring). Set by init_weights.
        self.compute_dtype = None
        cos, sin = self._rotary_tables(self.transformer.wte.weight.device, torch.bfloat16)
        # Non-persistent: not in the state dict, recomputed on the real device by init_weights.
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _rotary_tables(self, device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of shape (1, rotary_seq_len, 1, Dh/2): angles in fp32, stored in `dtype`."""
        dim = self.config.head_dim
        base = self.config.rope_base
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
        t = torch.arange(self.rotary_seq_len, dtype=torch.float32, device=device)
        angles = torch.outer(t, inv_freq)
        return angles.cos().to(dtype)[None, :, None, :], angles.sin().to(dtype)[None, :, None, :]

    @torch.no_grad()
    def init_weights(self, compute_dtype: torch.dtype | None = None) -> None:
        """Initialise every parameter as the reference of config.init does, drawing in its order, and set
        the precision rule (module docstring).

        compute_dtype None (the seed's rule): on CUDA only, wte and the value embeddings are then stored in
        bf16 (their grads and AdamW states follow); everything else stays fp32; rotary tables are bf16.
        A dtype: wte and the value embeddings in it (fp16: kept fp32), rotary tables in it, and forward casts
        the activations to it.
        """
        cfg = self.config
        new_init = cfg.init == "2026-07"
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=0.8 if new_init else 1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        s = math.sqrt(3) / math.sqrt(cfg.n_embd)  # uniform(−s, s) has std 1/sqrt(d), fan-in d for all
        fc = s * 0.4 if new_init else s
        for block in self.transformer.h:
            nn.init.uniform_(block.attn.c_q.weight, -s, s)
            nn.init.uniform_(block.attn.c_k.weight, -s, s)
            nn.init.uniform_(block.attn.c_v.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.uniform_(block.mlp.c_fc.weight, -fc, fc)
            nn.init.zeros_(block.mlp.c_proj.weight)
        if new_init:
            # Graded over depth: early layers keep more of their residual and of the input embedding.
            L = cfg.n_layer
            for i in range(L):
                self.resid_lambdas[i] = 1.15 - (0.10 * i / max(L - 1, 1))
                self.x0_lambdas[i] = 0.20 - (0.15 * i / max(L - 1, 1))
        else:
            self.resid_lambdas.fill_(1.0)
            self.x0_lambdas.fill_(0.1)  # 0.1, not the 0.0 a reference comment suggests
        if self.smear_lambda is not None:
            nn.init.zeros_(self.smear_lambda)  # smear starts off; its gate starts slightly open
        if self.backout_lambda is not None:
            nn.init.constant_(self.backout_lambda, 0.2)
        if self.smear_gate is not None:
            nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s)
        for block in self.transformer.h:
            if block.attn.ve_gate is not None:
                if new_init:
                    nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)
                else:
                    nn.init.zeros_(block.attn.ve_gate.weight)  # gate = 2·sigmoid(0) = 1: neutral
        device = self.transformer.wte.weight.device
        self.compute_dtype = compute_dtype
        self.cos, self.sin = self._rotary_tables(device, torch.bfloat16 if compute_dtype is None else compute_dtype)
        if compute_dtype is None:
            embed_dtype = torch.bfloat16 if device.type == "cuda" else None
        else:
            embed_dtype = None if compute_dtype == torch.float16 else compute_dtype  # fp16 grads could not be unscaled
        if embed_dtype is not None:
            self.transformer.wte.to(dtype=embed_dtype)
            for ve in self.value_embeds.values():
                ve.to(dtype=embed_dtype)

    def get_device(self) -> torch.device:
        return self.transformer.wte.weight.device

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache=None,
                loss_reduction: str = "mean") -> torch.Tensor:
        """idx (B, T) int64 → fp32 logits (B, T, vocab_size), or the cross-entropy loss when targets are given
        (ignore_index −1; reduction 'mean' gives a scalar, 'none' a flat (B·T,) vector).

        With a kv_cache (raychat.engine.KVCache), the tokens continue the cached prefix: rotary positions
        start at the cache position, smear reads the cached previous embedding, and the pass advances the
        cache by T.
        """
        B, T = idx.size()
        T0 = 0 if kv_cache is None else kv_cache.get_pos()
        if T0 + T > self.cos.size(1):
            raise ValueError(f"sequence too long: positions {T0}..{T0 + T} exceed the {self.cos.size(1)} rotary "
                             f"positions (10 × sequence_len={self.config.sequence_len}); raise sequence_len")
        assert idx.device == self.cos.device, f"idx on {idx.device} but the model is on {self.cos.device}"
        rotary_dtype = torch.bfloat16 if self.compute_dtype is None else self.compute_dtype
        assert self.cos.dtype == rotary_dtype, \
            f"rotary tables are {self.cos.dtype}, not {rotary_dtype}; call init_weights() after to_empty()"
        cos_sin = self.cos[:, T0:T0 + T], self.sin[:, T0:T0 + T]

        x = self.transformer.wte(idx)
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        x = norm(x)
        if self.smear_gate is not None:
            x = self._smear(x, kv_cache)
        x0 = x
        backout_layer = self.config.n_layer // 2 if self.backout_lambda is not None else -1
        for i, block in enumerate(self.transformer.h):
            # 0-d lambdas do not promote a bf16 x to fp32 (type promotion treats them as scalars).
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx).to(x.dtype) if str(i) in self.value_embeds else None
            x = block(x, ve, cos_sin, self.window_sizes[i], kv_cache)
            if i == backout_layer:
                x_mid = x
        if self.backout_lambda is not None:
            x = x - self.backout_lambda.to(x.dtype) * x_mid  # drop the mid-depth (low-level) features
        x = norm(x)
        logits = self.lm_head(x)[..., :self.config.vocab_size].float()
        logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)

    def _smear(self, x: torch.Tensor, kv_cache) -> torch.Tensor:
        """x_t ← x_t + smear_λ·sigmoid(smear_gate(x_t[:24]))·x_{t−1} for every position with a predecessor: the
        first token of the sequence has none. With a KV cache, the predecessor of the chunk's first token is
        the cache's `prev_embedding` (None at position 0), and the chunk's last embedding replaces it.
        (The reference uses the cached one only when decoding a single token; for a chunk after a prefix it
        would drop it. Here a chunk gives what the full forward gives.)"""
        prev = None
        if kv_cache is not None:
            prev, kv_cache.prev_embedding = kv_cache.prev_embedding, x[:, -1:]
        lam = self.smear_lambda.to(x.dtype)
        if prev is None:
            gate = lam * torch.sigmoid(self.smear_gate(x[:, 1:, :SMEAR_CHANNELS]))
            return torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
        before = prev if x.size(1) == 1 else torch.cat([prev, x[:, :-1]], dim=1)
        gate = lam * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]))
        return x + gate * before

    # ---- sizes -------------------------------------------------------------------------------------------

    def num_scaling_params(self) -> dict[str, int]:
        """Parameter counts by part. The horizon uses transformer_matrices + lm_head. As the reference,
        "scalars" holds the smear gate's 24 weights beside the lambdas (estimate_flops counts them as a matmul)."""
        scalars = [self.resid_lambdas, self.x0_lambdas, self.smear_lambda, self.backout_lambda]
        if self.smear_gate is not None:
            scalars.append(self.smear_gate.weight)
        counts = {
            "wte": self.transformer.wte.weight.numel(),
            "value_embeds": sum(p.numel() for p in self.value_embeds.parameters()),
            "lm_head": self.lm_head.weight.numel(),
            "transformer_matrices": sum(p.numel() for p in self.transformer.h.parameters()),  # incl. ve_gate
            "scalars": sum(p.numel() for p in scalars if p is not None),
        }
        counts["total"] = sum(counts.values())
        assert counts["total"] == sum(p.numel() for p in self.parameters()), "parameter parts do not sum up"
        return counts

    def num_matmul_params(self) -> int:
        """The weights that multiply the token stream (2 FLOPs each per token forward): every Linear, so the
        blocks', the gates' and lm_head's; not the embeddings (lookups) nor the lambdas."""
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, Linear))

    def estimate_flops(self) -> int:
        """Training FLOPs per token, forward + backward: 6 × num_matmul_params, plus 12·H·Dh·min(window, T)
        per layer for the score and value matmuls."""
        cfg = self.config
        T = cfg.sequence_len
        attn = sum(12 * cfg.n_head * cfg.head_dim * (T if left < 0 else min(left, T))
                   for left, _ in self.window_sizes)
        return 6 * self.num_matmul_params() + attn

    # ---- optimizer ---------------------------------------------------------------------------------------

    def optimizer_groups(self, unembedding_lr: float = 0.004, embedding_lr: float = 0.2, matrix_lr: float = 0.02,
                         weight_decay: float = 0.0, adam_betas: tuple[float, float] | None = None,
                         scalar_lr: float = 0.5, recipe: str = "seed") -> list[dict]:
        """The reference's parameter groups of `recipe`, in order, each with `initial_lr` set.

        AdamW: lm_head, wte, value embeddings, resid_lambdas, x0_lambdas (betas (0.96, 0.95), lr scalar_lr),
        then, when the model has them, [smear_gate, smear_lambda, backout_lambda] (lr 0.2, not scaled, betas
        (0.8, 0.95), no decay). Muon: every block parameter, one group per distinct shape in sorted shape
        order, module order within, weight decay `weight_decay`. Embedding and unembedding lrs scale by
        (d/768)^-0.5; resid's lr is 0.01 × scalar_lr.
        - "seed": the other AdamW groups take `adam_betas` (None: (0.8, 0.95)) and no weight decay; Muon beta2 0.95.
        - "2026-07": betas and decay per group, so `adam_betas` must stay None: lm_head (0.8, 0.96) wd 0.01,
          wte (0.8, 0.995) wd 0.001, value embeddings half the embedding lr, (0.8, 0.995) wd 0.01, resid
          (0.8, 0.95) wd 0.05; Muon beta2 0.9.
        """
        if recipe not in RECIPE_OPTIONS:
            raise ValueError(f"optimizer recipe {recipe!r}: must be one of {', '.join(map(repr, RECIPE_OPTIONS))}")
        if recipe != "seed" and adam_betas is not None:
            raise ValueError(f"adam_betas={adam_betas!r} with recipe {recipe!r}: that recipe sets the betas of each "
                             "parameter group itself; pass adam_betas only with recipe 'seed'")
        dmodel_lr_scale = (self.config.n_embd / 768) ** -0.5
        print0(f"Scaling the AdamW embedding/unembedding lrs by (d/768)^-0.5 = {dmodel_lr_scale:.6f}")

        def adamw(params, lr, betas, weight_decay=0.0):
            return {"kind": "adamw", "params": params, "lr": lr, "betas": tuple(betas), "eps": 1e-10,
                    "weight_decay": weight_decay}

        value_embeds = list(self.value_embeds.parameters())
        if recipe == "seed":
            betas = (0.8, 0.95) if adam_betas is None else adam_betas
            groups = [
                adamw([self.lm_head.weight], unembedding_lr * dmodel_lr_scale, betas),
                adamw([self.transformer.wte.weight], embedding_lr * dmodel_lr_scale, betas),
                adamw(value_embeds, embedding_lr * dmodel_lr_scale, betas),
                adamw([self.resid_lambdas], scalar_lr * 0.01, betas),
            ]
            muon_beta2 = 0.95
        else:
            groups = [
                adamw([self.lm_head.weight], unembedding_lr * dmodel_lr_scale, (0.8, 0.96), 0.01),
                adamw([self.transformer.wte.weight], embedding_lr * dmodel_lr_scale, (0.8, 0.995), 0.001),
                adamw(value_embeds, embedding_lr * dmodel_lr_scale * 0.5, (0.8, 0.995), 0.01),
                adamw([self.resid_lambdas], scalar_lr * 0.01, (0.8, 0.95), 0.05),
            ]
            muon_beta2 = 0.9
        groups.append(adamw([self.x0_lambdas], scalar_lr, (0.96, 0.95)))
        smear = [p for p in (self.smear_gate.weight if self.smear_gate is not None else None, self.smear_lambda,
                             self.backout_lambda) if p is not None]
        if smear:
            groups.append(adamw(smear, 0.2, (0.8, 0.95)))
        matrices = list(self.transformer.h.parameters())
        for shape in sorted({tuple(p.shape) for p in matrices}):
            groups.append({"kind": "muon", "params": [p for p in matrices if tuple(p.shape) == shape],
                           "lr": matrix_lr, "momentum": 0.95, "ns_steps": 5, "beta2": muon_beta2,
                           "weight_decay": weight_decay})
        grouped = sum(len(g["params"]) for g in groups)
        total = len(list(self.parameters()))
        assert grouped == total, f"optimizer groups hold {grouped} of {total} parameter tensors"
        for g in groups:
            g["initial_lr"] = g["lr"]
        return groups

    # ---- naive sampling, for cross-checks only -----------------------------------------------------------

    @torch.inference_mode()
    def generate(self, tokens: list[int], max_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 seed: int = 42):
        """Batch-1 streaming sampler without a KV cache (full forward per token). Cross-checks only; use
        raychat.engine.Engine for real sampling."""
        device = self.get_device()
        rng = torch.Generator(device=device)
        rng.manual_seed(seed)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self.forward(ids)[:, -1, :]
            if top_k is not None and top_k > 0:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, -float("inf"))
            if temperature > 0:
                probs = F.softmax(logits / temperature, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=rng)
            else:
                next_id = torch.argmax(logits, dim=-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
            yield next_id.item()
