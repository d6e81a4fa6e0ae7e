"""The BPE tokenizer (docs/REFERENCE.md §7): trained with rustbpe, run with tiktoken.

A `Tokenizer` wraps one tiktoken `Encoding` named "rustbpe": 256 byte tokens plus the learned merges
(ranks 0 .. V-10), then the 9 special tokens of `SPECIAL_TOKENS` numbered after them in list order, so
`<|bos|>` = V - 9. On disk a tokenizer directory holds

- `tokenizer.pkl`: the pickled tiktoken Encoding, the same file nanochat writes, so a nanochat tokenizer
  directory loads here and a raychat one loads in nanochat;
- `token_bytes.pt`: int32 (V,) byte length of every token, 0 for special tokens (used by bits per byte).

No Ray imports here: the tokenizer runs inside Ray Data actors, training workers and plain scripts alike.
"""
import io
import os
import pickle
from collections.abc import Iterable, Iterator

import tiktoken
import torch

from raychat.common import get_base_dir

SPECIAL_TOKENS = [
    "<|bos|>",  # every document starts with it; the only one pretraining uses
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
]

# GPT-4's split pattern with digits grouped 1-2 instead of 1-3: the reference's dev log measured val bpb
# 0.969 / 0.965 / 0.972 at d12 for groups of 1 / 2 / 3.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|"""
    r"""\s+(?!\S)|\s+"""
)

TOKENIZER_FILE = "tokenizer.pkl"
TOKEN_BYTES_FILE = "token_bytes.pt"
_HOW_TO_TRAIN = "train one with `python -m scripts.tok_train` (it needs shards: `python -m raychat.data download -n 8`)"


class _EncodingUnpickler(pickle.Unpickler):
    """Unpickles a tiktoken Encoding and nothing else: a tokenizer.pkl must not be able to run code.

    A pickled Encoding refers to exactly one global, `tiktoken.core.Encoding` (its state is plain str, bytes,
    int and dict); any other global (os.system, builtins.eval, ...) is refused before it is resolved."""

    def find_class(self, module, name):
        if (module, name) == ("tiktoken.core", "Encoding"):
            return tiktoken.core.Encoding
        raise pickle.UnpicklingError(f"it references {module}.{name}, and only tiktoken.core.Encoding is allowed")


class Tokenizer:
    """Encode/decode text with a tiktoken Encoding that carries `SPECIAL_TOKENS`."""

    def __init__(self, enc: tiktoken.Encoding, bos_token: str = "<|bos|>"):
        if bos_token not in enc.special_tokens_set:
            raise ValueError(f"the encoding {enc.name!r} has no special token {bos_token!r}; a raychat/nanochat "
                             f"tokenizer carries {SPECIAL_TOKENS}. Retrain it: {_HOW_TO_TRAIN}")
        self.enc = enc
        self._special_cache: dict[str, int] = {}
        self._special_ids = frozenset(enc.encode_single_token(name) for name in enc.special_tokens_set)
        self.bos_token_id = self.encode_special(bos_token)

    # ---- construction -------------------------------------------------------------------------------

    @classmethod
    def train_from_iterator(cls, text_iterator: Iterable[str], vocab_size: int) -> "Tokenizer":
        """Train byte-level BPE on the texts to `vocab_size` tokens including the 9 specials.

        The corpus may hold fewer distinct pairs than merges asked for; rustbpe then stops early and the
        vocabulary is smaller than `vocab_size` (as in the reference).
        """
        import rustbpe  # training-only dependency; loading a tokenizer needs tiktoken alone

        vocab_size_no_special = vocab_size - len(SPECIAL_TOKENS)
        if vocab_size_no_special < 256:
            raise ValueError(f"vocab_size={vocab_size} leaves {vocab_size_no_special} non-special tokens, but "
                             f"byte-level BPE needs at least the 256 byte tokens: use vocab_size >= "
                             f"{256 + len(SPECIAL_TOKENS)}")
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(iter(text_iterator), vocab_size_no_special, pattern=SPLIT_PATTERN)
        mergeable_ranks = {bytes(token): rank for token, rank in bpe.get_mergeable_ranks()}
        offset = len(mergeable_ranks)
        special_tokens = {name: offset + i for i, name in enumerate(SPECIAL_TOKENS)}
        enc = tiktoken.Encoding(name="rustbpe", pat_str=bpe.get_pattern(), mergeable_ranks=mergeable_ranks,
                                special_tokens=special_tokens)
        return cls(enc)

    @classmethod
    def from_directory(cls, tokenizer_dir: str) -> "Tokenizer":
        """Load `<tokenizer_dir>/tokenizer.pkl` (a pickled tiktoken Encoding, nanochat's format)."""
        path = os.path.join(tokenizer_dir, TOKENIZER_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer at {path}: {_HOW_TO_TRAIN}")
        with open(path, "rb") as f:
            return cls.from_bytes(f.read(), where=path)

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "tokenizer bytes") -> "Tokenizer":
        """The tokenizer from the bytes of a tokenizer.pkl (how the driver ships it to workers on other nodes)."""
        try:
            enc = _EncodingUnpickler(io.BytesIO(data)).load()
        except (pickle.UnpicklingError, EOFError) as e:
            raise ValueError(f"{where} is not a tokenizer raychat will load: {e}. {_HOW_TO_TRAIN}") from e
        if not isinstance(enc, tiktoken.Encoding):
            raise ValueError(f"{where} holds a {type(enc).__name__}, not a pickled tiktoken Encoding; "
                             f"{_HOW_TO_TRAIN}")
        return cls(enc)

    def save(self, tokenizer_dir: str, token_bytes_quirk: bool = False) -> None:
        """Write `tokenizer.pkl` and `token_bytes.pt` (see `compute_token_bytes` for the quirk flag)."""
        os.makedirs(tokenizer_dir, exist_ok=True)
        with open(os.path.join(tokenizer_dir, TOKENIZER_FILE), "wb") as f:
            pickle.dump(self.enc, f)
        torch.save(compute_token_bytes(self, quirk=token_bytes_quirk), os.path.join(tokenizer_dir, TOKEN_BYTES_FILE))

    # ---- vocabulary ---------------------------------------------------------------------------------

    def get_vocab_size(self) -> int:
        return self.enc.n_vocab

    def get_special_tokens(self) -> set[str]:
        return set(self.enc.special_tokens_set)

    def get_bos_token_id(self) -> int:
        return self.bos_token_id

    def encode_special(self, text: str) -> int:
        """The id of one special token, e.g. "<|bos|>" (cached: the packer asks once per document)."""
        token_id = self._special_cache.get(text)
        if token_id is None:
            if text not in self.enc.special_tokens_set:
                raise ValueError(f"{text!r} is not a special token of this tokenizer; it has {SPECIAL_TOKENS}")
            token_id = self.enc.encode_single_token(text)
            self._special_cache[text] = token_id
        return token_id

    def id_to_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (a special token gives its UTF-8 name)."""
        return self.enc.decode_single_token_bytes(token_id)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    # ---- encode / decode ----------------------------------------------------------------------------

    def _special_id(self, token: str | int | None, what: str) -> int | None:
        if token is None:
            return None
        if isinstance(token, str):
            return self.encode_special(token)
        if isinstance(token, int) and 0 <= token < self.get_vocab_size():
            return token
        raise ValueError(f"{what}={token!r} must be a special-token string or an id in [0, {self.get_vocab_size()})")

    def encode(self, text: str | list[str], prepend: str | int | None = None, append: str | int | None = None,
               num_threads: int = 8) -> list[int] | list[list[int]]:
        """Token ids of one string, or of each string of a list (in parallel with `num_threads` threads).

        Ordinary encoding: special-token text inside the input is plain text, never a special id, so data
        cannot inject a `<|bos|>`. `prepend`/`append` (a special-token string or an id) go at the start/end
        of every row.
        """
        prepend_id = self._special_id(prepend, "prepend")
        append_id = self._special_id(append, "append")
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            if prepend_id is not None:
                ids.insert(0, prepend_id)
            if append_id is not None:
                ids.append(append_id)
            return ids
        if isinstance(text, list):
            rows = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
            for ids in rows:
                if prepend_id is not None:
                    ids.insert(0, prepend_id)
                if append_id is not None:
                    ids.append(append_id)
            return rows
        raise TypeError(f"encode() takes a str or a list[str], got {type(text).__name__}")

    __call__ = encode

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids; bytes that are not valid UTF-8 decode to U+FFFD (tiktoken's behaviour)."""
        return self.enc.decode(list(ids))


def compute_token_bytes(tokenizer: Tokenizer, quirk: bool = False) -> torch.Tensor:
    """int32 (V,): how many bytes of text each token stands for; 0 for the special tokens.

    `quirk=False` (default, nanochat HEAD 2ce972a): the exact length of the token's raw bytes.

    `quirk=True` reproduces the reference's 07c4dd4 table (docs/REFERENCE.md §7): each token is decoded to a str
    *with replacement* and re-encoded as UTF-8, so a token whose bytes are not valid UTF-8 on their own
    (e.g. a lone byte >= 0x80, or half of a multi-byte character) counts 3 bytes per U+FFFD instead of its
    true length. The two tables differ exactly on those tokens (193 of 32768 in the reference's tokenizer;
    bpb ~0.05% lower with the quirk). Use it only to compare bpb with the reference's published numbers.
    """
    vocab_size = tokenizer.get_vocab_size()
    out = torch.zeros(vocab_size, dtype=torch.int32)
    for token_id in range(vocab_size):
        if tokenizer.is_special(token_id):
            continue
        raw = tokenizer.id_to_bytes(token_id)
        out[token_id] = len(raw.decode("utf-8", errors="replace").encode("utf-8")) if quirk else len(raw)
    return out


def tokenizer_dir(base_dir: str | None = None) -> str:
    """`<base>/tokenizer`, where tok_train saves and training loads."""
    return os.path.join(get_base_dir(base_dir), "tokenizer")


def get_tokenizer(base_dir: str | None = None) -> Tokenizer:
    """The tokenizer saved under `<base>/tokenizer` (FileNotFoundError with the fix when absent)."""
    return Tokenizer.from_directory(tokenizer_dir(base_dir))


def get_token_bytes(base_dir: str | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
    """`<base>/tokenizer/token_bytes.pt` on `device` (FileNotFoundError with the fix when absent)."""
    path = os.path.join(tokenizer_dir(base_dir), TOKEN_BYTES_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no token_bytes at {path}: {_HOW_TO_TRAIN}")
    return torch.load(path, map_location=device, weights_only=True)


def iter_cropped(texts: Iterable[str], max_chars: int, doc_cap: int) -> Iterator[str]:
    """Crop each text to `doc_cap` chars; stop right after the running total exceeds `max_chars`.

    The document that crosses the limit is still yielded, as in the reference's tok_train.
    """
    total = 0
    for text in texts:
        doc = text[:doc_cap]
        total += len(doc)
        yield doc
        if total > max_chars:
            return
