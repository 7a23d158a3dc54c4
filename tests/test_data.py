"""Data pipeline: reading, packing, the train/eval split and the resumable batch iterator."""

import importlib
import json
import sys

import numpy as np
import pytest

from lorajax.data import (
    BatchIterator,
    PackedDataset,
    default_corpus,
    eval_batches,
    make_datasets,
    pack,
    read_texts,
    tokenize,
)

EOS = 256


class Bytes:
    """One token per UTF-8 byte; end-of-text is 256."""

    eos_id = EOS

    def encode(self, text):
        return list(text.encode("utf-8"))


def _stream(docs, eos):
    """The packed stream, built with plain lists: each document then eos."""
    out = []
    for doc in docs:
        out.extend(int(t) for t in doc)
        out.append(eos)
    return out


def _split_docs(flat):
    """Pieces of a flattened stream between eos tokens (the last may be cut short)."""
    pieces, current = [], []
    for token in flat:
        if token == EOS:
            pieces.append(bytes(current).decode())
            current = []
        else:
            current.append(token)
    return pieces, bytes(current)


def _rows_dataset(rows, width=3):
    """Row i is [i * width, ..., i * width + width - 1], so row ids are recoverable."""
    return PackedDataset(np.arange(rows * width).reshape(rows, width))


def _row_ids(batch, width=3):
    return (batch[:, 0] // width).tolist()


# ------------------------------------------------------------------------------------ pack


@pytest.mark.parametrize("seq_len", [1, 4, 7, 50])
def test_pack_reproduces_the_concatenated_stream(seq_len):
    rng = np.random.default_rng(seq_len)
    docs = [rng.integers(0, 256, rng.integers(0, 30)).tolist() for _ in range(25)]
    stream = _stream(docs, eos=300)
    width = seq_len + 1
    data = pack(docs, seq_len=seq_len, eos_id=300)

    rows = len(stream) // width
    assert data.tokens.dtype == np.int32
    assert data.tokens.shape == (rows, width) and len(data) == rows
    assert data.seq_len == seq_len and data.num_tokens == rows * width
    assert data.tokens.reshape(-1).tolist() == stream[: rows * width]
    # Each example predicts the next stream token at every position.
    inputs, targets = data.tokens[:, :-1], data.tokens[:, 1:]
    for i in range(rows):
        for t in range(seq_len):
            assert inputs[i, t] == stream[i * width + t]
            assert targets[i, t] == stream[i * width + t + 1]
    assert len(stream) - rows * width < width  # only a short tail is dropped


def test_pack_accepts_arrays_and_handles_no_rows():
    docs = [np.array([1, 2, 3], np.int64), np.array([], np.int64), (4, 5)]
    assert pack(docs, seq_len=2, eos_id=0).tokens.tolist() == [[1, 2, 3], [0, 0, 4]]
    empty = pack([[1]], seq_len=5, eos_id=0)
    assert empty.tokens.shape == (0, 6) and len(empty) == 0
    assert pack([], seq_len=3, eos_id=0).tokens.shape == (0, 4)


@pytest.mark.parametrize("seq_len", [0, -3, 1.5, True, "8", None])
def test_pack_rejects_bad_seq_len(seq_len):
    with pytest.raises(ValueError, match="`seq_len` must be a positive int"):
        pack([[1, 2, 3]], seq_len=seq_len, eos_id=0)


def test_pack_rejects_bad_eos_and_documents():
    with pytest.raises(ValueError, match="`eos_id` must be a non-negative int"):
        pack([[1, 2]], seq_len=1, eos_id=-1)
    with pytest.raises(ValueError, match=r"`eos_id` must fit in int32"):
        pack([[1, 2]], seq_len=1, eos_id=2**40)
    with pytest.raises(ValueError, match=r"documents\[1\] must be a flat sequence of int"):
        pack([[1], [1.5, 2.0]], seq_len=1, eos_id=0)
    with pytest.raises(ValueError, match=r"documents\[0\] must be a flat sequence"):
        pack([[[1, 2]]], seq_len=1, eos_id=0)
    with pytest.raises(ValueError, match=r"documents\[0\] holds token ids outside"):
        pack([[1, -2]], seq_len=1, eos_id=0)
    with pytest.raises(TypeError, match="tokenise text first"):
        pack("some text", seq_len=1, eos_id=0)


def test_packed_dataset_is_read_only_int32_and_validated():
    source = np.arange(8, dtype=np.int64).reshape(2, 4)
    data = PackedDataset(source)
    assert data.tokens.dtype == np.int32 and not data.tokens.flags.writeable
    source[0, 0] = 99  # the dataset owns a copy
    assert data.tokens[0, 0] == 0
    assert repr(data) == "PackedDataset(rows=2, seq_len=3)"
    with pytest.raises(ValueError, match=r"shape \(rows, seq_len \+ 1\)"):
        PackedDataset(np.zeros(5, np.int32))
    with pytest.raises(ValueError, match=r"shape \(rows, seq_len \+ 1\)"):
        PackedDataset(np.zeros((3, 1), np.int32))
    with pytest.raises(ValueError, match="integer token ids"):
        PackedDataset(np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match=r"token ids in \[0, 2\*\*31\)"):
        PackedDataset(-np.ones((3, 2), np.int64))


# ------------------------------------------------------------------------------- tokenize


def test_tokenize_matches_encode_and_validates():
    texts = ["héllo", "", "wörld"]
    assert tokenize(texts, Bytes()) == [list(t.encode()) for t in texts]

    class NoEos:
        def encode(self, text):
            return [1]

    class FloatIds(Bytes):
        def encode(self, text):
            return [0.5]

    class BadEos(Bytes):
        eos_id = -1

    with pytest.raises(TypeError, match="a single str. Wrap it in a list"):
        tokenize("just one text", Bytes())
    with pytest.raises(ValueError, match="`texts` is empty"):
        tokenize([], Bytes())
    with pytest.raises(TypeError, match=r"`texts\[1\]` must be a str"):
        tokenize(["a", 3], Bytes())
    with pytest.raises(TypeError, match="must have a method `encode"):
        tokenize(["a"], object())
    with pytest.raises(TypeError, match="attribute `eos_id`"):
        tokenize(["a"], NoEos())
    with pytest.raises(ValueError, match=r"`tokenizer.eos_id` must be a non-negative int"):
        tokenize(["a"], BadEos())
    with pytest.raises(ValueError, match=r"tokenizer.encode\(texts\[0\]\) must be a flat"):
        tokenize(["a"], FloatIds())


# ------------------------------------------------------------------------------ the split


def _marked_texts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [f"<{i}>" + "x" * int(rng.integers(20, 60)) for i in range(n)]


def _doc_ids(dataset, texts):
    """Indices of the documents wholly inside `dataset`, in stream order; the cut-off tail."""
    pieces, tail = _split_docs(dataset.tokens.reshape(-1).tolist())
    index = {text: i for i, text in enumerate(texts)}
    first = pieces[0] if pieces else ""
    # The first piece is a whole document (each set's stream starts at a document).
    assert first in index, first
    return [index[p] for p in pieces], tail


@pytest.mark.parametrize(("fraction", "seed"), [(0.1, 0), (0.25, 1), (0.5, 2)])
def test_split_is_by_document_with_about_the_requested_fraction(fraction, seed):
    texts = _marked_texts(120, seed)
    seq_len = 15
    train, evals = make_datasets(texts, Bytes(), seq_len=seq_len, eval_fraction=fraction, seed=seed)
    train_ids, train_tail = _doc_ids(train, texts)
    eval_ids, eval_tail = _doc_ids(evals, texts)

    assert not set(train_ids) & set(eval_ids)
    # Every document is in a set; at most one per set is cut off by the dropped tail.
    missing = set(range(len(texts))) - set(train_ids) - set(eval_ids)
    assert len(missing) <= 2
    for tail in (train_tail, eval_tail):
        if tail:  # the cut-off document continues a document of the same set's order
            assert any(texts[i].encode().startswith(tail) for i in missing)
    # Each set packs its documents in their original order.
    assert train_ids == sorted(train_ids) and eval_ids == sorted(eval_ids)

    total = sum(len(t.encode()) + 1 for t in texts)
    longest = max(len(t.encode()) + 1 for t in texts)
    held = len(evals) * (seq_len + 1)
    assert abs(held / total - fraction) <= (longest + seq_len + 2) / total
    assert len(train) * (seq_len + 1) + held > total - 2 * (seq_len + 1)


@pytest.mark.parametrize(("fraction", "docs"), [(0.1, 1), (0.22, 2), (0.28, 3), (0.5, 5)])
def test_eval_takes_the_number_of_documents_closest_to_the_fraction(fraction, docs):
    # Ten documents of 100 tokens each (99 bytes + eos): rows of 10 tile them exactly.
    texts = [chr(ord("a") + i) * 99 for i in range(10)]
    train, evals = make_datasets(texts, Bytes(), seq_len=9, eval_fraction=fraction, seed=5)
    assert (len(train), len(evals)) == (10 * (10 - docs), 10 * docs)
    letters = {chr(t) for t in evals.tokens.reshape(-1) if t != EOS}
    assert len(letters) == docs
    assert not letters & {chr(t) for t in train.tokens.reshape(-1) if t != EOS}


def test_split_is_deterministic_and_depends_on_the_seed():
    texts = _marked_texts(60)
    a = make_datasets(texts, Bytes(), seq_len=8, seed=3)
    b = make_datasets(texts, Bytes(), seq_len=8, seed=3)
    c = make_datasets(texts, Bytes(), seq_len=8, seed=4)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.tokens, y.tokens)
    assert sorted(_doc_ids(a[1], texts)[0]) != sorted(_doc_ids(c[1], texts)[0])


def test_one_document_splits_its_token_stream():
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    seq_len, fraction = 9, 0.2
    train, evals = make_datasets([text], Bytes(), seq_len=seq_len, eval_fraction=fraction)
    stream = _stream([text.encode()], EOS)
    cut = len(stream) - round(fraction * len(stream))  # the eval set is the stream's tail
    width = seq_len + 1
    assert train.tokens.reshape(-1).tolist() == stream[: len(train) * width]
    assert evals.tokens.reshape(-1).tolist() == stream[cut : cut + len(evals) * width]
    assert len(train) == cut // width and len(evals) == (len(stream) - cut) // width


def test_unequal_documents_fall_back_to_a_stream_split():
    # A document split cannot leave both sets a row: 201 + 4 tokens with rows of 10.
    texts = ["z" * 200, "abc"]
    seq_len = 9
    train, evals = make_datasets(texts, Bytes(), seq_len=seq_len, eval_fraction=0.1, seed=0)
    assert len(train) >= 1 and len(evals) >= 1
    width = seq_len + 1
    total = 205
    eval_tokens = min(max(width, round(0.1 * total)), total - width)
    candidates = [_stream([t.encode() for t in order], EOS) for order in (texts, texts[::-1])]
    matches = [
        s
        for s in candidates
        if train.tokens.reshape(-1).tolist() == s[: len(train) * width]
        and evals.tokens.reshape(-1).tolist()
        == s[total - eval_tokens : total - eval_tokens + len(evals) * width]
    ]
    assert len(matches) == 1
    assert len(train) == (total - eval_tokens) // width


def test_smallest_text_that_fits_and_the_error_below_it():
    # 3 bytes + eos = 4 tokens = two rows of seq_len + 1 = 2.
    train, evals = make_datasets(["abc"], Bytes(), seq_len=1)
    assert train.tokens.tolist() == [[97, 98]] and evals.tokens.tolist() == [[99, EOS]]
    with pytest.raises(ValueError, match=r"4 tokens .* needs at least 6 .*at most 1\)"):
        make_datasets(["abc"], Bytes(), seq_len=2)


def test_make_datasets_rejects_bad_arguments():
    texts = _marked_texts(10)
    with pytest.raises(ValueError, match="`seq_len` must be a positive int"):
        make_datasets(texts, Bytes(), seq_len=0)
    for fraction in (0, 0.0, 1.0, 1.5, -0.1, "0.1", True):
        with pytest.raises(ValueError, match=r"`eval_fraction` must be a float in \(0, 1\)"):
            make_datasets(texts, Bytes(), seq_len=4, eval_fraction=fraction)
    with pytest.raises(ValueError, match="`seed` must be a non-negative int"):
        make_datasets(texts, Bytes(), seq_len=4, seed=-1)
    with pytest.raises(ValueError, match="`texts` is empty"):
        make_datasets([], Bytes(), seq_len=4)
    with pytest.raises(TypeError, match="Wrap it in a list"):
        make_datasets("one text", Bytes(), seq_len=4)
    with pytest.raises(TypeError, match="must have a method `encode"):
        make_datasets(texts, None, seq_len=4)


def test_errors_come_before_tokenising():
    class Counting(Bytes):
        calls = 0

        def encode(self, text):
            Counting.calls += 1
            return super().encode(text)

    with pytest.raises(ValueError, match="eval_fraction"):
        make_datasets(["abc"] * 5, Counting(), seq_len=2, eval_fraction=2.0)
    assert Counting.calls == 0


# ------------------------------------------------------------------------------- corpus


def test_default_corpus_is_the_python_topics_in_sorted_order():
    topics = importlib.import_module("pydoc_data.topics").topics
    docs = default_corpus()
    assert docs == [topics[k] for k in sorted(topics)]
    assert len(docs) >= 50 and sum(map(len, docs)) > 100_000
    assert default_corpus() == docs


def test_default_corpus_splits_into_usable_datasets():
    train, evals = make_datasets(default_corpus(), Bytes(), seq_len=128, eval_fraction=0.1)
    total = sum(len(d.encode()) + 1 for d in default_corpus())
    assert 0.05 < evals.num_tokens / total < 0.2
    assert len(train) > 9 * len(evals) / 2


def test_default_corpus_missing_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydoc_data.topics", None)
    with pytest.raises(RuntimeError, match=r"pydoc_data.*read_texts"):
        default_corpus()


# ----------------------------------------------------------------------------- read_texts


def test_read_texts_walks_a_tree_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "deep").mkdir()
    (tmp_path / ".git").mkdir()
    files = {
        "z.md": "# zed",
        "a.txt": "alpha",
        "b/c.rst": "charlie",
        "b/deep/d.py": "print('delta')",
        "b.txt": "bravo",
        "blank.txt": "  \n\t ",
        "data.jsonl": '{"text": "json one"}\n\n{"text": "json two", "id": 7}\n{"text": "  "}\n',
        ".hidden.txt": "hidden",
        ".git/config.txt": "not mine",
        "image.png": "not text",
        "table.csv": "a,b",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    (tmp_path / "bom.txt").write_bytes("\ufeffwith bom".encode())

    docs = read_texts(tmp_path)
    # Sorted paths: a.txt, b.txt, b/c.rst, b/deep/d.py, blank.txt (blank), bom.txt,
    # data.jsonl, z.md; hidden files and other suffixes are skipped.
    expected = ["alpha", "bravo", "charlie", "print('delta')", "with bom", "json one"]
    assert docs == [*expected, "json two", "# zed"]
    assert "json one" in docs and "hidden" not in docs and "not text" not in docs
    assert read_texts(str(tmp_path)) == docs


def test_read_texts_keeps_the_order_of_named_paths(tmp_path):
    (tmp_path / "one.log").write_text("named files are read whatever their suffix")
    (tmp_path / "two.txt").write_text("second")
    assert read_texts([tmp_path / "two.txt", tmp_path / "one.log"]) == [
        "second",
        "named files are read whatever their suffix",
    ]


def test_read_texts_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_texts(tmp_path / "nope.txt")
    (tmp_path / "ok.txt").write_text("fine")
    with pytest.raises(FileNotFoundError, match="missing"):
        read_texts([tmp_path / "ok.txt", tmp_path / "missing"])
    with pytest.raises(ValueError, match="`paths` is empty"):
        read_texts([])

    (tmp_path / "latin.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.txt.*not UTF-8.*offset 3"):
        read_texts(tmp_path / "latin.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl.* line 2 is not valid JSON"):
        read_texts(tmp_path / "bad.jsonl")
    (tmp_path / "notext.jsonl").write_text('{"content": "a"}\n')
    with pytest.raises(ValueError, match=r'notext\.jsonl.* line 1 has no string field "text"'):
        read_texts(tmp_path / "notext.jsonl")

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.md").write_text(" \n ")
    (empty / "skip.csv").write_text("a,b")
    with pytest.raises(ValueError, match=r"No text found.*1 file\(s\) read.*\.txt"):
        read_texts(empty)


# ------------------------------------------------------------------------- BatchIterator


def test_every_row_once_per_epoch_in_the_documented_order():
    rows, batch, seed = 23, 4, 5
    data = _rows_dataset(rows)
    it = BatchIterator(data, batch, seed=seed)
    assert it.steps_per_epoch == rows // batch == 5
    for epoch in range(4):
        seen = []
        for _ in range(it.steps_per_epoch):
            out = next(it)
            assert out.shape == (batch, 3) and out.dtype == np.int32
            seen += _row_ids(out)
        assert len(set(seen)) == len(seen) == 20  # the 3 left over rows are dropped
        order = np.random.default_rng([seed, epoch]).permutation(rows)
        assert seen == order[:20].tolist()
        np.testing.assert_array_equal(data.tokens[seen], data.tokens[order[:20]])


def test_same_seed_same_batches_other_seed_other_order():
    data = _rows_dataset(40)
    a, b, c = (BatchIterator(data, 8, seed=s) for s in (1, 1, 2))
    first = [next(a) for _ in range(12)]
    for x in first:
        np.testing.assert_array_equal(x, next(b))
    assert any(not np.array_equal(x, next(c)) for x in first)
    # Epochs are reshuffled.
    assert _row_ids(np.concatenate(first[:5])) != _row_ids(np.concatenate(first[5:10]))


@pytest.mark.parametrize("num_shards", [1, 2, 4, 8])
def test_shards_together_are_the_global_batch(num_shards):
    data = _rows_dataset(37)
    batch = 8
    whole = BatchIterator(data, batch, seed=7)
    shards = [
        BatchIterator(data, batch, seed=7, shard_index=i, num_shards=num_shards)
        for i in range(num_shards)
    ]
    assert shards[0].local_batch_size == batch // num_shards
    for _ in range(3 * whole.steps_per_epoch + 1):  # across epoch boundaries
        parts = [next(s) for s in shards]
        assert all(p.shape == (batch // num_shards, 3) for p in parts)
        ids = [_row_ids(p) for p in parts]
        assert len({i for part in ids for i in part}) == batch  # disjoint
        np.testing.assert_array_equal(np.concatenate(parts), next(whole))


@pytest.mark.parametrize("taken", [0, 3, 4, 5, 11])
def test_resume_through_json_yields_the_same_batches(taken):
    data = _rows_dataset(19)
    it = BatchIterator(data, 4, seed=11)  # 4 steps per epoch
    for _ in range(taken):
        next(it)
    state = it.state()
    assert all(type(v) is int for v in state.values())
    state = json.loads(json.dumps(state))
    expected = [next(it) for _ in range(9)]  # crosses at least two epoch boundaries

    resumed = BatchIterator.from_state(data, 4, state)
    fresh = BatchIterator(data, 4, seed=11)
    fresh.restore(state)
    halves = [BatchIterator.from_state(data, 4, state, shard_index=i, num_shards=2) for i in (0, 1)]
    for want in expected:
        np.testing.assert_array_equal(next(resumed), want)
        np.testing.assert_array_equal(next(fresh), want)
        np.testing.assert_array_equal(np.concatenate([next(h) for h in halves]), want)


def test_state_reports_the_position():
    it = BatchIterator(_rows_dataset(10), 3, seed=2)  # 3 steps per epoch
    assert it.state() == {
        "epoch": 0,
        "step_in_epoch": 0,
        "batches_served": 0,
        "seed": 2,
        "batch_size": 3,
        "num_rows": 10,
    }
    for _ in range(4):
        next(it)
    state = it.state()
    assert (state["epoch"], state["step_in_epoch"], state["batches_served"]) == (1, 1, 4)
    assert it.epoch == 1


def test_batches_are_fresh_arrays():
    data = _rows_dataset(8)
    batch = next(BatchIterator(data, 4))
    batch[:] = -1
    np.testing.assert_array_equal(data.tokens, _rows_dataset(8).tokens)


def test_batch_iterator_rejects_bad_arguments():
    data = _rows_dataset(10)
    with pytest.raises(ValueError, match="`batch_size` must be a positive int"):
        BatchIterator(data, 0)
    with pytest.raises(ValueError, match="`batch_size`=6 .* divisible by `num_shards`=4"):
        BatchIterator(data, 6, num_shards=4)
    with pytest.raises(ValueError, match=r"`shard_index` must be in \[0, num_shards=2\), got 2"):
        BatchIterator(data, 4, shard_index=2, num_shards=2)
    with pytest.raises(ValueError, match="`shard_index` must be a non-negative int"):
        BatchIterator(data, 4, shard_index=-1, num_shards=2)
    with pytest.raises(ValueError, match="`num_shards` must be a positive int"):
        BatchIterator(data, 4, num_shards=0)
    with pytest.raises(ValueError, match="`seed` must be a non-negative int"):
        BatchIterator(data, 4, seed=-2)
    with pytest.raises(ValueError, match="has 10 rows, fewer than `batch_size`=16.*smaller"):
        BatchIterator(data, 16)
    with pytest.raises(TypeError, match="`dataset` must be a PackedDataset"):
        BatchIterator(np.zeros((10, 3), np.int32), 2)


def test_restore_rejects_foreign_or_corrupt_state():
    data = _rows_dataset(10)
    it = BatchIterator(data, 3, seed=1)
    good = it.state()

    def bad(**changes):
        state = dict(good)
        for key, value in changes.items():
            if value is None:
                del state[key]
            else:
                state[key] = value
        return state

    with pytest.raises(ValueError, match=r"missing keys \['epoch'\]"):
        it.restore(bad(epoch=None))
    with pytest.raises(ValueError, match=r"unknown keys \['extra'\]"):
        it.restore(bad(extra=1))
    with pytest.raises(ValueError, match=r"`state\['seed'\]`=2 does not match .* seed=1"):
        it.restore(bad(seed=2))
    with pytest.raises(ValueError, match=r"`state\['batch_size'\]`=4 does not match"):
        it.restore(bad(batch_size=4))
    with pytest.raises(ValueError, match=r"`state\['num_rows'\]`=11 does not match"):
        it.restore(bad(num_rows=11))
    with pytest.raises(ValueError, match=r"step_in_epoch'\]`=3 is out of range"):
        it.restore(bad(step_in_epoch=3, batches_served=3))
    with pytest.raises(ValueError, match=r"batches_served'\]`=5 contradicts"):
        it.restore(bad(epoch=1, step_in_epoch=1, batches_served=5))
    with pytest.raises(ValueError, match=r"`state\['epoch'\]` must be a non-negative int"):
        it.restore(bad(epoch="1"))
    with pytest.raises(ValueError, match=r"`state\['epoch'\]` must be a non-negative int"):
        it.restore(bad(epoch=-1))
    with pytest.raises(ValueError, match="must be a dict from BatchIterator.state"):
        it.restore([1, 2])
    with pytest.raises(ValueError, match="must be a dict from BatchIterator.state"):
        BatchIterator.from_state(data, 3, {})
    assert it.state() == good  # failed restores leave the position alone


# ---------------------------------------------------------------------------- eval_batches


def test_eval_batches_are_the_rows_in_order():
    data = _rows_dataset(11)
    batches = eval_batches(data, 4)
    assert [b.shape for b in batches] == [(4, 3), (4, 3)]
    np.testing.assert_array_equal(np.concatenate(batches), data.tokens[:8])
    (only,) = eval_batches(data, 32)  # fewer rows than a batch: one batch of all rows
    np.testing.assert_array_equal(only, data.tokens)


@pytest.mark.parametrize(("batch", "num_shards"), [(4, 2), (8, 4), (16, 4)])
def test_eval_batch_shards_together_are_the_batch(batch, num_shards):
    data = _rows_dataset(11)
    whole = eval_batches(data, batch) if batch <= 11 else [data.tokens[:8]]
    parts = [
        eval_batches(data, batch, shard_index=i, num_shards=num_shards) for i in range(num_shards)
    ]
    for j, want in enumerate(whole):
        np.testing.assert_array_equal(np.concatenate([p[j] for p in parts]), want)


def test_eval_batches_errors():
    with pytest.raises(ValueError, match="`batch_size` must be a positive int"):
        eval_batches(_rows_dataset(4), 0)
    with pytest.raises(ValueError, match="The eval dataset has 0 rows"):
        eval_batches(_rows_dataset(0), 4)
    with pytest.raises(ValueError, match="The eval dataset has 1 rows: too few .* 2 shard"):
        eval_batches(_rows_dataset(1), 4, num_shards=2)
    with pytest.raises(ValueError, match="divisible by `num_shards`=3"):
        eval_batches(_rows_dataset(8), 4, num_shards=3)
    with pytest.raises(TypeError, match="`dataset` must be a PackedDataset"):
        eval_batches([[1, 2]], 1)
