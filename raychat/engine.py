"""KV-cached sampling from a GPT (docs/REFERENCE.md §9), as base_train uses it: greedy samples of a few tokens.

The reference's engine also runs a python-tool state machine (calculator calls forced into the stream,
with mask 0). That belongs to chat fine-tuning, not pretraining, so it is left out: every generated token
here is sampled and carries mask 1.
"""
import torch
import torch.nn.functional as F


class KVCache:
    """Per-layer key/value caches of shape (L, B, Tmax, Hkv, Dh) plus one position per row.

    The whole batch shares one position in practice (the SDPA path reads row 0). Layers write at the
    position; the model's last layer advances it after each forward pass. A model with smear also keeps here
    the normed embedding of the last token it saw, (B, 1, d), which the next token mixes in (None when empty).
    """

    def __init__(self, batch_size: int, num_heads: int, seq_len: int, head_dim: int, num_layers: int,
                 device, dtype: torch.dtype):
        for name, value in (("batch_size", batch_size), ("num_heads", num_heads), ("seq_len", seq_len),
                            ("head_dim", head_dim), ("num_layers", num_layers)):
            if value <= 0:
                raise ValueError(f"KVCache {name}={value}: must be positive")
        self.batch_size = batch_size
        self.max_seq_len = seq_len
        self.n_layers = num_layers
        self.n_heads = num_heads
        self.head_dim = head_dim
        shape = (num_layers, batch_size, seq_len, num_heads, head_dim)
        self.k_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.v_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.cache_seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.prev_embedding = None

    def get_pos(self) -> int:
        """The current position (row 0's); a host sync on GPUs."""
        return int(self.cache_seqlens[0].item())

    def get_layer_cache(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) views of shape (B, Tmax, Hkv, Dh) for one layer; attention writes into them in place."""
        return self.k_cache[layer_idx], self.v_cache[layer_idx]

    def advance(self, num_tokens: int) -> None:
        self.cache_seqlens += num_tokens

    def reset(self) -> None:
        self.cache_seqlens.zero_()
        self.prev_embedding = None

    def prefill(self, other: "KVCache") -> None:
        """Copy another cache's filled prefix into every row of this empty cache, and take its position.

        Used to prefill a prompt once with batch 1, then decode num_samples rows from it.
        """
        if self.get_pos() != 0:
            raise ValueError(f"prefill needs an empty cache, this one is at position {self.get_pos()}; call reset()")
        if (self.n_layers, self.n_heads, self.head_dim) != (other.n_layers, other.n_heads, other.head_dim):
            raise ValueError(f"prefill from a cache of (layers, heads, head_dim) = "
                             f"{(other.n_layers, other.n_heads, other.head_dim)} into "
                             f"{(self.n_layers, self.n_heads, self.head_dim)}: they must match")
        if self.max_seq_len < other.max_seq_len:
            raise ValueError(f"prefill from a cache of capacity {other.max_seq_len} into a smaller one "
                             f"({self.max_seq_len}); allocate at least as many positions")
        pos = other.get_pos()
        self.k_cache[:, :, :pos] = other.k_cache[:, :, :pos]
        self.v_cache[:, :, :pos] = other.v_cache[:, :, :pos]
        self.cache_seqlens.fill_(pos)
        if other.prev_embedding is not None:
            self.prev_embedding = other.prev_embedding.expand(self.batch_size, -1, -1).clone()


def sample_next_token(logits: torch.Tensor, rng: torch.Generator, temperature: float = 1.0,
                      top_k: int | None = None) -> torch.Tensor:
    """(B, V) logits → (B, 1) token ids. Temperature 0 is argmax (top_k ignored)."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature}: must be ≥ 0 (0 means greedy)")
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    if top_k is not None and top_k > 0:
        values, indices = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1)
        probs = F.softmax(values / temperature, dim=-1)
        return indices.gather(1, torch.multinomial(probs, num_samples=1, generator=rng))
    probs = F.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=rng)


class Engine:
    """Samples from `model` (a raychat.model.GPT). The tokenizer needs only get_bos_token_id() and
    encode_special("<|assistant_end|>"): those two tokens end a row."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    @torch.inference_mode()
    def generate(self, tokens: list[int], num_samples: int = 1, max_tokens: int | None = None,
                 temperature: float = 1.0, top_k: int | None = None, seed: int = 42):
        """Stream (token_column, mask_column): one list of num_samples ints per step, masks all 1.

        The prompt is prefilled once with batch 1; its last logits are repeated so each row samples its
        first token independently. Stops after max_tokens steps or when every row has produced
        <|assistant_end|> or <|bos|>. With max_tokens=None the decode cache holds sequence_len positions
        (as the reference) and generation stops when it is full, where the reference would fail.
        """
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, int) for t in tokens):
            raise ValueError(f"tokens must be a non-empty list of ints, got {type(tokens).__name__} {tokens!r:.80}")
        if num_samples < 1:
            raise ValueError(f"num_samples={num_samples}: must be ≥ 1")
        if max_tokens is not None and max_tokens < 0:
            raise ValueError(f"max_tokens={max_tokens}: must be ≥ 0 or None")
        device = self.model.get_device()
        # The dtype attention emits: the model's compute dtype, else the seed's (bf16 autocast on CUDA only).
        dtype = self.model.compute_dtype
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        rng = torch.Generator(device=device)
        rng.manual_seed(seed)
        stop_tokens = {self.tokenizer.encode_special("<|assistant_end|>"), self.tokenizer.get_bos_token_id()}

        cfg = self.model.config
        cache_kwargs = dict(num_heads=cfg.n_kv_head, head_dim=cfg.n_embd // cfg.n_head, num_layers=cfg.n_layer,
                            device=device, dtype=dtype)
        prefill_cache = KVCache(batch_size=1, seq_len=len(tokens), **cache_kwargs)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        logits = self.model(ids, kv_cache=prefill_cache)[:, -1, :].expand(num_samples, -1)
        capacity = len(tokens) + max_tokens if max_tokens is not None else max(cfg.sequence_len, len(tokens))
        cache = KVCache(batch_size=num_samples, seq_len=capacity, **cache_kwargs)
        cache.prefill(prefill_cache)
        del prefill_cache

        completed = [False] * num_samples
        num_generated = 0
        while max_tokens is None or num_generated < max_tokens:
            column = sample_next_token(logits, rng, temperature, top_k)[:, 0].tolist()
            for i, token in enumerate(column):
                completed[i] = completed[i] or token in stop_tokens
            yield column, [1] * num_samples
            num_generated += 1
            # Stop before the forward pass whose logits nobody would sample (the reference ran it).
            if all(completed) or num_generated == max_tokens or cache.get_pos() >= capacity:
                break
            ids = torch.tensor(column, dtype=torch.long, device=device).unsqueeze(1)
            logits = self.model(ids, kv_cache=cache)[:, -1, :]

    def generate_batch(self, tokens: list[int], num_samples: int = 1,
                       **kwargs) -> tuple[list[list[int]], list[list[int]]]:
        """Non-streaming generate: (sequences, masks), each sequence = prompt + its generated tokens.

        A stop token (<|assistant_end|>, <|bos|>) ends its row and is not appended. Prompt positions carry
        mask 0, generated ones mask 1. kwargs go to generate().
        """
        stop_tokens = {self.tokenizer.encode_special("<|assistant_end|>"), self.tokenizer.get_bos_token_id()}
        sequences = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        for column, mask_column in self.generate(tokens, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(column, mask_column)):
                if done[i]:
                    continue
                if token in stop_tokens:
                    done[i] = True
                else:
                    sequences[i].append(token)
                    masks[i].append(mask)
            if all(done):
                break
        return sequences, masks
