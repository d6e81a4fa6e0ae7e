"""The GPT of nanochat at 07c4dd4, with its parameter grouping for MuonAdamW (docs/REFERENCE.md).

Architecture in one breath: token embedding → RMSNorm (kept as x0) → L pre-norm blocks, each preceded by
x ← resid_λ·x + x0_λ·x0 → RMSNorm → untied lm_head → fp32 softcap 15. A block is causal attention with
rotary embeddings (base 10000, "split halves", rotating by −θ), QK-norm after rotary, GQA, a per-layer
sliding window, and on every other layer a gated value embedding; then a relu² MLP of width 4d. Norms have
no parameters and no Linear has a bias.

State-dict keys, shapes, dtypes and registration order equal the reference's, so checkpoints interchange.
Build on the meta device, then `to_empty(device=...)` and `init_weights()`:

    with torch.device("meta"):
        model = GPT(GPTConfig(...))
    model.to_empty(device=device)
    model.init_weights()

No Ray here: the model knows nothing of how it is launched.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from raychat.attention import flash_attn_func, flash_attn_with_kvcache
from raychat.common import print0

VE_GATE_CHANNELS = 32  # the value-embedding gate reads the first 32 channels of the block input
SOFTCAP = 15.0          # logits ← 15·tanh(logits/15), in fp32
ROPE_BASE = 10000.0     # the seed's value (later nanochat uses 100000)
ROPE_OVERALLOC = 10     # cos/sin cover 10 × sequence_len positions
VOCAB_PAD = 64          # the embedding and head rows are padded to a multiple of 64


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "SSSL"

    def __post_init__(self):
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
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
                             "'S' (half-context window) and 'L' (full context) letters, e.g. 'SSSL'")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMSNorm over the last dimension, default eps, output in the input's dtype.

    torch ≥ 2.12 runs rms_norm in fp32 under CUDA autocast; casting back keeps
    the reference's bf16 residual stream and bf16 q/k for attention. Outside autocast this cast is a no-op.
    """
    return F.rms_norm(x, (x.size(-1),)).to(x.dtype)


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

    'L' → (T, 0) and 'S' → (T // 2, 0), the pattern tiled over layers, the last layer forced to (T, 0).
    QUIRK kept: "full" is the finite window T, not −1, so on rows longer than T (CORE evaluation) the
    L layers also slide.
    """
    pattern = config.window_pattern.upper()
    T = config.sequence_len
    by_letter = {"L": (T, 0), "S": (T // 2, 0)}
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
        d = config.n_embd
        # Registration order matters for optimizer grouping and init RNG order.
        self.c_q = nn.Linear(d, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(d, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(d, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)
        self.ve_gate = nn.Linear(VE_GATE_CHANNELS, self.n_kv_head, bias=False) \
            if has_ve(layer_idx, config.n_layer) else None

    def forward(self, x, ve, cos_sin, window_size, kv_cache):
        B, T, _ = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            # Gate in (0, 2), exactly 1 at init (ve_gate is zero-initialised).
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)  # QK-norm after rotary, softmax scale stays 1/sqrt(Dh)
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
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

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
        self.lm_head = nn.Linear(config.n_embd, vocab, bias=False)  # untied from wte
        self.resid_lambdas = nn.Parameter(torch.ones(L))
        self.x0_lambdas = nn.Parameter(torch.zeros(L))
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(vocab, kv_dim) for i in range(L) if has_ve(i, L)})
        self.rotary_seq_len = ROPE_OVERALLOC * config.sequence_len
        cos, sin = self._rotary_tables(self.transformer.wte.weight.device)
        # Non-persistent: not in the state dict, recomputed on the real device by init_weights.
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _rotary_tables(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of shape (1, rotary_seq_len, 1, Dh/2): angles in fp32, stored bf16 on every device."""
        dim = self.config.head_dim
        inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
        t = torch.arange(self.rotary_seq_len, dtype=torch.float32, device=device)
        angles = torch.outer(t, inv_freq)
        return angles.cos().bfloat16()[None, :, None, :], angles.sin().bfloat16()[None, :, None, :]

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter as the reference does, drawing in its order.

        On CUDA only, wte and the value embeddings are then stored in bf16 (their grads and AdamW states
        follow); everything else stays fp32.
        """
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        s = math.sqrt(3) / math.sqrt(self.config.n_embd)  # uniform(−s, s) has std 1/sqrt(d), fan-in d for all
        for block in self.transformer.h:
            nn.init.uniform_(block.attn.c_q.weight, -s, s)
            nn.init.uniform_(block.attn.c_k.weight, -s, s)
            nn.init.uniform_(block.attn.c_v.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.uniform_(block.mlp.c_fc.weight, -s, s)
            nn.init.zeros_(block.mlp.c_proj.weight)
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)  # 0.1, not the 0.0 a reference comment suggests
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s)
        for block in self.transformer.h:
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)  # gate = 2·sigmoid(0) = 1: neutral
        self.cos, self.sin = self._rotary_tables(self.transformer.wte.weight.device)
        if self.transformer.wte.weight.device.type == "cuda":
            self.transformer.wte.to(dtype=torch.bfloat16)
            for ve in self.value_embeds.values():
                ve.to(dtype=torch.bfloat16)

    def get_device(self) -> torch.device:
        return self.transformer.wte.weight.device

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache=None,
                loss_reduction: str = "mean") -> torch.Tensor:
        """idx (B, T) int64 → fp32 logits (B, T, vocab_size), or the cross-entropy loss when targets are given
        (ignore_index −1; reduction 'mean' gives a scalar, 'none' a flat (B·T,) vector).

        With a kv_cache (raychat.engine.KVCache), the tokens continue the cached prefix: rotary positions
        start at the cache position, and the pass advances the cache by T.
        """
        B, T = idx.size()
        T0 = 0 if kv_cache is None else kv_cache.get_pos()
        if T0 + T > self.cos.size(1):
            raise ValueError(f"sequence too long: positions {T0}..{T0 + T} exceed the {self.cos.size(1)} rotary "
                             f"positions (10 × sequence_len={self.config.sequence_len}); raise sequence_len")
        assert idx.device == self.cos.device, f"idx on {idx.device} but the model is on {self.cos.device}"
        assert self.cos.dtype == torch.bfloat16, "rotary tables must be bf16; call init_weights() after to_empty()"
        cos_sin = self.cos[:, T0:T0 + T], self.sin[:, T0:T0 + T]

        x = norm(self.transformer.wte(idx))
        x0 = x
        for i, block in enumerate(self.transformer.h):
            # 0-d lambdas do not promote a bf16 x to fp32 (type promotion treats them as scalars).
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos_sin, self.window_sizes[i], kv_cache)
        x = norm(x)
        logits = self.lm_head(x)[..., :self.config.vocab_size].float()
        logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)

    # ---- sizes -------------------------------------------------------------------------------------------

    def num_scaling_params(self) -> dict[str, int]:
        """Parameter counts by part. The horizon uses transformer_matrices + lm_head."""
        counts = {
            "wte": self.transformer.wte.weight.numel(),
            "value_embeds": sum(p.numel() for p in self.value_embeds.parameters()),
            "lm_head": self.lm_head.weight.numel(),
            "transformer_matrices": sum(p.numel() for p in self.transformer.h.parameters()),  # incl. ve_gate
            "scalars": self.resid_lambdas.numel() + self.x0_lambdas.numel(),
        }
        counts["total"] = sum(counts.values())
        assert counts["total"] == sum(p.numel() for p in self.parameters()), "parameter parts do not sum up"
        return counts

    def estimate_flops(self) -> int:
        """Training FLOPs per token, forward + backward.

        6 × every matmul weight (lm_head and ve_gates included; embeddings and lambdas excluded), plus
        12·H·Dh·min(window, T) per layer for the score and value matmuls.
        """
        counts = self.num_scaling_params()
        matmul_params = counts["total"] - counts["wte"] - counts["value_embeds"] - counts["scalars"]
        cfg = self.config
        T = cfg.sequence_len
        attn = sum(12 * cfg.n_head * cfg.head_dim * (T if left < 0 else min(left, T))
                   for left, _ in self.window_sizes)
        return 6 * matmul_params + attn

    # ---- optimizer ---------------------------------------------------------------------------------------

    def optimizer_groups(self, unembedding_lr: float = 0.004, embedding_lr: float = 0.2, matrix_lr: float = 0.02,
                         weight_decay: float = 0.0, adam_betas: tuple[float, float] = (0.8, 0.95),
                         scalar_lr: float = 0.5) -> list[dict]:
        """The reference's parameter groups, in order, each with `initial_lr` set.

        AdamW: lm_head, wte, value embeddings, resid_lambdas, x0_lambdas (betas hard-coded to (0.96, 0.95)).
        Muon: every block parameter, one group per distinct shape in sorted shape order, module order within.
        Embedding and unembedding lrs scale by (d/768)^-0.5; resid's lr is 0.01 × scalar_lr.
        """
        dmodel_lr_scale = (self.config.n_embd / 768) ** -0.5
        print0(f"Scaling the AdamW embedding/unembedding lrs by (d/768)^-0.5 = {dmodel_lr_scale:.6f}")

        def adamw(params, lr, betas=tuple(adam_betas)):
            return {"kind": "adamw", "params": params, "lr": lr, "betas": betas, "eps": 1e-10, "weight_decay": 0.0}

        groups = [
            adamw([self.lm_head.weight], unembedding_lr * dmodel_lr_scale),
            adamw([self.transformer.wte.weight], embedding_lr * dmodel_lr_scale),
            adamw(list(self.value_embeds.parameters()), embedding_lr * dmodel_lr_scale),
            adamw([self.resid_lambdas], scalar_lr * 0.01),
            adamw([self.x0_lambdas], scalar_lr, betas=(0.96, 0.95)),
        ]
        matrices = list(self.transformer.h.parameters())
        for shape in sorted({tuple(p.shape) for p in matrices}):
            groups.append({"kind": "muon", "params": [p for p in matrices if tuple(p.shape) == shape],
                           "lr": matrix_lr, "momentum": 0.95, "ns_steps": 5, "beta2": 0.95,
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
