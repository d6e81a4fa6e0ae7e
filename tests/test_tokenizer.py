"""Tokenizer (docs/REFERENCE.md §7): training, encode/decode, specials, token_bytes (exact and the 07c4dd4 quirk), files."""
import os
import pickle
import sys

import pytest
import tiktoken
import torch

from raychat.tokenizer import (SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, compute_token_bytes, get_token_bytes,
                               get_tokenizer, iter_cropped)

# `scripts` is run as `python -m scripts.tok_train` from the repo root and is not an installed package: make
# the root importable when pytest is launched as `pytest` rather than `python -m pytest`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from scripts import tok_train  # noqa: E402

TEXTS = [
    "Hello, world!",
    "Ünïcödé: naïve café, 你好世界, Привет мир, مرحبا",
    "emoji 🚀🔥👩‍👩‍👧 and flags 🇫🇷",
    "whitespace    runs\t\t\tand\n\n\n\nnewlines      \n   trailing   ",
    "digits 1 12 123 1234 12345 3.14159 -42 1e10",
    "special text <|bos|><|user_start|> stays <|assistant_end|> plain",
    "",
    " ",
    "\x00\x01 control \x7f bytes",
]

# Text rich in multi-byte characters so BPE merges bytes inside characters (some merged tokens are then
# not valid UTF-8 on their own: exactly the tokens the 07c4dd4 token_bytes quirk miscounts).
UNICODE_CORPUS = ["héllo wörld ünïcödé déjà vu 你好世界 你们好 世界和平 ünter über ñandú " * 40]


def _valid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return Tokenizer.from_directory(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def unicode_tok():
    return Tokenizer.train_from_iterator(iter(UNICODE_CORPUS), 300)


def test_constants():
    assert SPECIAL_TOKENS[0] == "<|bos|>" and len(SPECIAL_TOKENS) == 9 and len(set(SPECIAL_TOKENS)) == 9
    assert SPECIAL_TOKENS[-1] == "<|output_end|>"
    assert r"\p{N}{1,2}" in SPLIT_PATTERN and r"\p{N}{1,3}" not in SPLIT_PATTERN


def test_trained_vocab_and_special_ids(tok):
    assert tok.get_vocab_size() == 512
    assert tok.enc.name == "rustbpe" and tok.enc._pat_str == SPLIT_PATTERN
    assert tok.get_bos_token_id() == 512 - 9
    assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(503, 512))
    assert tok.get_special_tokens() == set(SPECIAL_TOKENS)
    with pytest.raises(ValueError, match="not a special token"):
        tok.encode_special("<|eos|>")


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, unicode_tok, text):
    for t in (tok, unicode_tok):
        ids = t.encode(text)
        assert all(0 <= i < t.get_vocab_size() - 9 for i in ids)  # ordinary ids only
        assert t.decode(ids) == text


def test_special_text_is_plain_text(tok):
    ids = tok.encode("<|bos|>")
    assert tok.get_bos_token_id() not in ids and len(ids) > 1
    assert tok.decode(ids) == "<|bos|>"


def test_prepend_append(tok):
    bos = tok.get_bos_token_id()
    plain = tok.encode("to be or not")
    assert tok.encode("to be or not", prepend="<|bos|>") == [bos] + plain
    assert tok("to be or not", prepend=bos, append="<|output_end|>") == [bos] + plain + [511]
    rows = tok.encode(["to be", "or not"], prepend=bos, append=bos)
    assert rows == [[bos] + tok.encode("to be") + [bos], [bos] + tok.encode("or not") + [bos]]
    with pytest.raises(ValueError, match="prepend=9999"):
        tok.encode("x", prepend=9999)
    with pytest.raises(TypeError, match="str or a list"):
        tok.encode(b"bytes")


def test_batch_equals_single(tok, shakespeare_path):
    with open(shakespeare_path, encoding="utf-8") as f:
        docs = f.read().split("\n\n")[:300] + TEXTS
    assert tok.encode(docs, num_threads=4) == [tok.encode(d) for d in docs]
    assert tok.encode(docs, num_threads=1) == tok.encode(docs, num_threads=4)


def test_train_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="vocab_size=264"):
        Tokenizer.train_from_iterator(iter(["abc"]), 264)


def test_token_bytes_exact(tok, unicode_tok):
    for t in (tok, unicode_tok):
        tb = compute_token_bytes(t)
        assert tb.dtype == torch.int32 and tb.shape == (t.get_vocab_size(),)
        assert tb[ord("a")] == 1 and tb[0x80] == 1 and tb[0xFF] == 1  # byte tokens are 1 byte each
        assert all(tb[t.encode_special(s)] == 0 for s in SPECIAL_TOKENS)
        assert int((tb == 0).sum()) == len(SPECIAL_TOKENS)
        for text in TEXTS:  # the exact table counts every text's UTF-8 bytes
            ids = t.encode(text)
            assert int(tb[ids].sum()) == len(text.encode("utf-8"))
    # Merged tokens holding whole multi-byte characters count their true UTF-8 length.
    tb = compute_token_bytes(unicode_tok)
    multibyte = [i for i in range(256, unicode_tok.get_vocab_size() - 9)
                 if max(unicode_tok.id_to_bytes(i)) >= 0x80 and _valid_utf8(unicode_tok.id_to_bytes(i))]
    assert len(multibyte) >= 5 and all(tb[i] == len(unicode_tok.id_to_bytes(i)) for i in multibyte)


def test_token_bytes_quirk_differs_exactly_on_invalid_utf8(unicode_tok):
    exact, quirk = compute_token_bytes(unicode_tok), compute_token_bytes(unicode_tok, quirk=True)

    differing = {i for i in range(unicode_tok.get_vocab_size()) if exact[i] != quirk[i]}
    expected = {i for i in range(unicode_tok.get_vocab_size()) if not unicode_tok.is_special(i)
                and not _valid_utf8(unicode_tok.id_to_bytes(i))}
    assert differing == expected
    assert 128 in differing and exact[128] == 1 and quirk[128] == 3  # a lone byte >= 0x80 -> one U+FFFD
    assert any(i >= 256 for i in differing)  # some merged partial characters too
    assert all(quirk[unicode_tok.encode_special(s)] == 0 for s in SPECIAL_TOKENS)


def test_save_load_round_trip(unicode_tok, tmp_path):
    unicode_tok.save(str(tmp_path), token_bytes_quirk=True)
    with open(tmp_path / "tokenizer.pkl", "rb") as f:  # nanochat's format: a bare pickled tiktoken Encoding
        assert isinstance(pickle.load(f), tiktoken.Encoding)
    loaded = Tokenizer.from_directory(str(tmp_path))
    assert loaded.get_vocab_size() == unicode_tok.get_vocab_size()
    assert loaded.get_bos_token_id() == unicode_tok.get_bos_token_id()
    for text in TEXTS + UNICODE_CORPUS:
        assert loaded.encode(text) == unicode_tok.encode(text)
    tb = torch.load(tmp_path / "token_bytes.pt", weights_only=True)
    assert torch.equal(tb, compute_token_bytes(unicode_tok, quirk=True))


def test_get_tokenizer_and_token_bytes(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="scripts.tok_train"):
        get_tokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="scripts.tok_train"):
        get_token_bytes(str(tmp_path))
    tok.save(str(tmp_path / "tokenizer"))
    assert get_tokenizer(str(tmp_path)).encode("hello") == tok.encode("hello")
    assert torch.equal(get_token_bytes(str(tmp_path), device="cpu"), compute_token_bytes(tok))
    (tmp_path / "bad").mkdir()
    with open(tmp_path / "bad" / "tokenizer.pkl", "wb") as f:
        pickle.dump({"not": "an encoding"}, f)
    with pytest.raises(ValueError, match="not a pickled tiktoken Encoding"):
        Tokenizer.from_directory(str(tmp_path / "bad"))


def test_iter_cropped():
    docs = ["a" * 5, "b" * 20, "c" * 5, "d" * 5, "e"]
    assert list(iter_cropped(docs, max_chars=100, doc_cap=10)) == ["aaaaa", "b" * 10, "ccccc", "ddddd", "e"]
    # 5 + 10 = 15 > 12: the crossing document is still yielded, then it stops.
    assert list(iter_cropped(docs, max_chars=12, doc_cap=10)) == ["aaaaa", "b" * 10]
    assert list(iter_cropped(docs, max_chars=15, doc_cap=10)) == ["aaaaa", "b" * 10, "ccccc"]


def test_tok_train_cli(tiny_data_dir, tmp_path, capsys):
    base = str(tmp_path / "base")
    assert tok_train.main(["--data-dir", tiny_data_dir, "--base-dir", base, "--dry-run"]) == 0
    assert not os.path.exists(os.path.join(base, "tokenizer"))
    assert tok_train.main(["--data-dir", tiny_data_dir, "--base-dir", base, "--vocab-size", "300",
                           "--max-chars", "50000", "--doc-cap", "200"]) == 0
    out = capsys.readouterr().out
    assert "train time" in out and "token_bytes (non-special): min 1" in out
    t = get_tokenizer(base)
    assert t.get_vocab_size() == 300 and t.get_bos_token_id() == 291
    assert get_token_bytes(base).shape == (300,)
    with pytest.raises(SystemExit):
        tok_train.main(["--vocab-size", "100", "--dry-run"])

