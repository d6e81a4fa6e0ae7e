"""raychat.engine: the KV cache and KV-cached sampling, with a real tiny GPT and a real trained tokenizer."""
import pytest
import torch

from raychat.engine import Engine, KVCache
from raychat.model import GPT, GPTConfig
from raychat.tokenizer import Tokenizer

CORPUS = ["the quick brown fox jumps over the lazy dog. " * 20, "a stitch in time saves nine; " * 20,
          "to be or not to be, that is the question. " * 20]


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer.train_from_iterator(iter(CORPUS), 300)
    # The tests below need the special tokens above the 256 byte tokens.
    assert tok.get_bos_token_id() >= 256 and tok.encode_special("<|assistant_end|>") >= 256
    return tok


def build_model(vocab_size, randomize=True, seed=0, sequence_len=32):
    torch.manual_seed(seed)
    cfg = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=3, n_head=4, n_kv_head=2, n_embd=64,
                    window_pattern="SL")
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    if randomize:  # init zeroes the projections; random weights make every layer matter
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p) * (0.3 if p.dim() == 1 else 2 / p.size(-1) ** 0.5) + (p.dim() == 1))
    return model.eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_model(tokenizer.get_vocab_size())


@pytest.fixture(scope="module")
def byte_model():
    """A model over the 256 byte tokens only: it can never emit a stop token, so lengths are exact."""
    return build_model(256, seed=1)


def prompt(tokenizer):
    return tokenizer.encode("the quick brown", prepend="<|bos|>")


# ---- KVCache ---------------------------------------------------------------------------------------------

def test_kv_cache_basics():
    cache = KVCache(batch_size=2, num_heads=3, seq_len=10, head_dim=4, num_layers=5, device="cpu",
                    dtype=torch.float32)
    assert cache.k_cache.shape == cache.v_cache.shape == (5, 2, 10, 3, 4)
    assert cache.cache_seqlens.dtype == torch.int32 and cache.get_pos() == 0
    k, v = cache.get_layer_cache(2)
    assert k.shape == v.shape == (2, 10, 3, 4)
    k.fill_(1.0)  # a view: writes land in the cache
    assert cache.k_cache[2].sum() == 2 * 10 * 3 * 4 and cache.k_cache[1].sum() == 0
    cache.advance(3)
    cache.advance(4)
    assert cache.get_pos() == 7 and cache.cache_seqlens.tolist() == [7, 7]
    cache.reset()
    assert cache.get_pos() == 0


def test_kv_cache_prefill_and_its_checks():
    small = KVCache(batch_size=1, num_heads=2, seq_len=4, head_dim=3, num_layers=2, device="cpu", dtype=torch.float32)
    small.k_cache.normal_()
    small.v_cache.normal_()
    small.advance(3)
    big = KVCache(batch_size=5, num_heads=2, seq_len=9, head_dim=3, num_layers=2, device="cpu", dtype=torch.float32)
    big.prefill(small)
    assert big.cache_seqlens.tolist() == [3] * 5
    for row in range(5):
        assert torch.equal(big.k_cache[:, row, :3], small.k_cache[:, 0, :3])
        assert torch.equal(big.v_cache[:, row, :3], small.v_cache[:, 0, :3])
    assert big.k_cache[:, :, 3:].abs().sum() == 0  # only the filled prefix is copied
    with pytest.raises(ValueError, match="empty cache"):
        big.prefill(small)
    with pytest.raises(ValueError, match="smaller"):
        KVCache(1, 2, 3, 3, 2, "cpu", torch.float32).prefill(small)
    with pytest.raises(ValueError, match="must match"):
        KVCache(1, 1, 9, 3, 2, "cpu", torch.float32).prefill(small)


# ---- Engine ----------------------------------------------------------------------------------------------

def greedy_by_full_forward(model, tokens, max_tokens, stop_ids):
    ids = list(tokens)
    with torch.no_grad():
        for _ in range(max_tokens):
            nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
            if nxt in stop_ids:
                break
            ids.append(nxt)
    return ids


def test_greedy_equals_argmax_of_full_forward(model, tokenizer):
    tokens = prompt(tokenizer)
    stops = {tokenizer.get_bos_token_id(), tokenizer.encode_special("<|assistant_end|>")}
    expected = greedy_by_full_forward(model, tokens, 12, stops)
    assert len(expected) > len(tokens) + 3  # the comparison covers several cached decode steps
    engine = Engine(model, tokenizer)
    sequences, masks = engine.generate_batch(tokens, num_samples=3, max_tokens=12, temperature=0.0, seed=5)
    assert sequences == [expected] * 3
    assert masks == [[0] * len(tokens) + [1] * (len(expected) - len(tokens))] * 3
    naive = list(model.generate(tokens, max_tokens=len(expected) - len(tokens), temperature=0.0))
    assert tokens + naive == expected


def test_temperature_zero_ignores_seed_and_top_k(byte_model, tokenizer):
    engine = Engine(byte_model, tokenizer)
    tokens = [65, 66, 67]
    outs = [engine.generate_batch(tokens, max_tokens=8, temperature=0.0, top_k=k, seed=s)[0]
            for s, k in [(0, None), (1, 5), (2, 1)]]
    assert outs[0] == outs[1] == outs[2]
    # top_k=1 at any temperature is greedy too
    assert engine.generate_batch(tokens, max_tokens=8, temperature=1.0, top_k=1, seed=3)[0] == outs[0]


def test_top_k_sampling_reproducible_and_restricted(byte_model, tokenizer):
    engine = Engine(byte_model, tokenizer)
    tokens = [70, 71, 72, 73]
    run = lambda seed: engine.generate_batch(tokens, num_samples=4, max_tokens=10, temperature=1.0, top_k=5,
                                             seed=seed)[0]
    assert run(7) == run(7)
    assert len({str(run(s)) for s in range(6)}) > 1
    # Every sample's first token is among the prompt's top 5 next tokens.
    with torch.no_grad():
        top5 = set(torch.topk(byte_model(torch.tensor([tokens]))[0, -1], 5).indices.tolist())
    column, masks = next(engine.generate(tokens, num_samples=64, max_tokens=1, temperature=1.0, top_k=5, seed=0))
    assert set(column) <= top5 and len(set(column)) > 1 and masks == [1] * 64


@pytest.mark.parametrize("num_samples", [1, 4, 16])
@pytest.mark.parametrize("max_tokens", [1, 5, 17])
def test_num_samples_and_max_tokens(byte_model, tokenizer, num_samples, max_tokens):
    engine = Engine(byte_model, tokenizer)
    tokens = [10, 20, 30]
    sequences, masks = engine.generate_batch(tokens, num_samples=num_samples, max_tokens=max_tokens, seed=1)
    assert len(sequences) == len(masks) == num_samples
    for seq, mask in zip(sequences, masks):
        assert seq[:3] == tokens and len(seq) == 3 + max_tokens and len(mask) == len(seq)
        assert all(0 <= t < 256 for t in seq[3:])


def test_first_tokens_differ_across_samples(tokenizer):
    # At init the head is nearly uniform: 16 independent first draws cannot all agree.
    engine = Engine(build_model(256, randomize=False), tokenizer)
    column, _ = next(engine.generate([1, 2, 3], num_samples=16, max_tokens=1, temperature=1.0, seed=0))
    assert len(set(column)) > 1


def test_unbounded_generation_stops_when_cache_is_full(tokenizer):
    model = build_model(256, sequence_len=16, seed=2)
    steps = list(Engine(model, tokenizer).generate([5, 6, 7, 8], max_tokens=None, temperature=1.0, seed=0))
    assert len(steps) == 16 - 4 + 1  # the last token is sampled from the last position's logits


@pytest.mark.parametrize("stop", ["<|bos|>", "<|assistant_end|>"])
def test_stop_tokens_end_rows(tokenizer, stop):
    model = build_model(tokenizer.get_vocab_size(), randomize=False)
    stop_id = tokenizer.encode_special(stop)
    tokens = [40, 41, 42]
    with torch.no_grad():
        # At init the blocks add nothing, so the last hidden state is norm(wte[42]); point the head at it.
        model.lm_head.weight.zero_()
        model.lm_head.weight[stop_id] = model.transformer.wte.weight[42]
    engine = Engine(model, tokenizer)
    steps = list(engine.generate(tokens, num_samples=2, max_tokens=10, temperature=0.0))
    assert steps == [([stop_id, stop_id], [1, 1])]
    assert engine.generate_batch(tokens, num_samples=2, max_tokens=10, temperature=0.0) == ([tokens] * 2,
                                                                                               [[0, 0, 0]] * 2)


def test_bad_arguments_raise(byte_model, tokenizer):
    engine = Engine(byte_model, tokenizer)
    with pytest.raises(ValueError, match="tokens"):
        next(engine.generate([], max_tokens=3))
    with pytest.raises(ValueError, match="num_samples"):
        next(engine.generate([1], num_samples=0, max_tokens=3))
    with pytest.raises(ValueError, match="temperature"):
        next(engine.generate([1], max_tokens=3, temperature=-1.0))
