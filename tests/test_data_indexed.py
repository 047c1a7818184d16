"""The Megatron indexed-dataset writer and reader: exact byte layout, round trips, atomic output."""
from __future__ import annotations

import os
import struct

import numpy as np
import pytest

import bridge.data.indexed as indexed
from bridge.data.indexed import (
    IndexedDataset,
    IndexedDatasetWriter,
    SFTDataset,
    has_loss_mask,
    loss_mask_prefix,
    token_dtype,
)
from bridge.errors import BridgeError


def _write(prefix, docs, dtype=np.uint16):
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for doc in docs:
            writer.add_document(np.array(doc))
    return IndexedDataset(prefix)


def test_index_layout_is_megatrons_byte_for_byte(tmp_path):
    docs = [[5, 6, 7], [], [9], [1, 2, 3, 4]]
    prefix = tmp_path / "d"
    _write(prefix, docs, np.int32)
    raw = (tmp_path / "d.idx").read_bytes()
    lengths = [3, 0, 1, 4]
    expected = (
        b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 4)  # version 1, int32 = code 4
        + struct.pack("<QQ", 4, 5)  # 4 sequences, 5 document indices
        + np.array(lengths, np.int32).tobytes()
        + np.array([0, 12, 12, 16], np.int64).tobytes()  # byte pointers: 4 bytes per int32 token
        + np.arange(5, dtype=np.int64).tobytes()
    )
    assert raw == expected
    assert (tmp_path / "d.bin").read_bytes() == np.array([5, 6, 7, 9, 1, 2, 3, 4], np.int32).tobytes()


def test_round_trip_uint16_and_int32(tmp_path):
    rng = np.random.default_rng(0)
    for dtype, high in ((np.uint16, 65_000), (np.int32, 150_000)):
        docs = [rng.integers(0, high, size=n) for n in rng.integers(1, 200, size=50)]
        dataset = _write(tmp_path / f"rt_{np.dtype(dtype).name}", docs, dtype)
        assert dataset.dtype == np.dtype(dtype)
        assert len(dataset) == dataset.num_documents == 50
        assert dataset.num_tokens == sum(len(d) for d in docs)
        for doc, got in zip(docs, dataset.documents()):
            np.testing.assert_array_equal(got, doc)
        np.testing.assert_array_equal(dataset.get(3, offset=1, length=2), docs[3][1:3])
        with pytest.raises(IndexError):
            dataset.get(0, offset=len(docs[0]), length=1)


def test_add_documents_matches_add_document(tmp_path):
    docs = [np.arange(n, dtype=np.int64) for n in (3, 1, 7)]
    one = _write(tmp_path / "one", docs)
    with IndexedDatasetWriter(tmp_path / "many", np.uint16) as writer:
        writer.add_documents(np.concatenate(docs), np.array([3, 1, 7]))
    assert (tmp_path / "one.idx").read_bytes() == (tmp_path / "many.idx").read_bytes()
    assert (tmp_path / "one.bin").read_bytes() == (tmp_path / "many.bin").read_bytes()
    assert one.num_tokens == 11


def test_lengths_spool_to_disk_in_chunks(tmp_path, monkeypatch):
    """Memory stays flat: lengths go to the spool file every _SPOOL_ITEMS and the index is
    written in _CHUNK_ITEMS pieces; the result is the same as one big piece."""
    monkeypatch.setattr(indexed, "_SPOOL_ITEMS", 7)
    monkeypatch.setattr(indexed, "_CHUNK_ITEMS", 5)
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 1000, size=n) for n in rng.integers(0, 20, size=103)]
    dataset = _write(tmp_path / "s", docs)
    assert len(dataset) == 103
    np.testing.assert_array_equal(dataset.document_indices, np.arange(104))
    expected_pointers = np.concatenate([[0], np.cumsum([2 * len(d) for d in docs])[:-1]])
    np.testing.assert_array_equal(dataset.sequence_pointers, expected_pointers)
    for doc, got in zip(docs, dataset.documents()):
        np.testing.assert_array_equal(got, doc)


def test_nothing_is_visible_until_commit_and_abort_cleans_up(tmp_path):
    prefix = tmp_path / "a"
    (tmp_path / "a.bin").write_bytes(b"old")  # an earlier output must survive a failed run
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(prefix, np.uint16) as writer:
            writer.add_document(np.arange(10))
            assert not (tmp_path / "a.idx").exists()
            raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == ["a.bin"]
    assert (tmp_path / "a.bin").read_bytes() == b"old"


def test_keyboard_interrupt_leaves_no_temporaries(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with IndexedDatasetWriter(tmp_path / "k", np.uint16) as writer:
            writer.add_document(np.arange(10))
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_reader_errors_are_one_line(tmp_path):
    with pytest.raises(BridgeError, match="does not exist"):
        IndexedDataset(tmp_path / "missing")
    _write(tmp_path / "x", [[1, 2, 3]])
    idx = tmp_path / "x.idx"
    good = idx.read_bytes()
    idx.write_bytes(b"NOTMAGIC!" + good[9:])
    with pytest.raises(BridgeError, match="bad magic"):
        IndexedDataset(tmp_path / "x")
    idx.write_bytes(good[:40])
    with pytest.raises(BridgeError, match="truncated"):
        IndexedDataset(tmp_path / "x")
    idx.write_bytes(good)
    (tmp_path / "x.bin").write_bytes(b"\x00")
    with pytest.raises(BridgeError, match="truncated"):
        IndexedDataset(tmp_path / "x.bin")  # the .bin/.idx suffix is accepted as well


def test_token_dtype_follows_megatron():
    assert token_dtype(32_000) == np.uint16
    assert token_dtype(65_499) == np.uint16
    assert token_dtype(65_500) == np.int32
    assert token_dtype(128_256) == np.int32


def test_sft_dataset_pairs_tokens_and_mask(tmp_path):
    prefix = str(tmp_path / "sft_messages_document")
    _write(prefix, [[1, 2, 3], [4, 5]])
    assert not has_loss_mask(prefix)
    with pytest.raises(BridgeError, match="--chat"):
        SFTDataset(prefix)
    assert loss_mask_prefix(prefix) == prefix + "_loss_mask"
    mask = _write(loss_mask_prefix(prefix), [[0, 1, 1], [0, 1]], np.uint8)
    assert mask.dtype == np.uint8 and has_loss_mask(prefix)
    sft = SFTDataset(prefix)
    tokens, loss_mask = sft[0]
    np.testing.assert_array_equal(tokens, [1, 2, 3])
    np.testing.assert_array_equal(loss_mask, [0, 1, 1])
    _write(loss_mask_prefix(prefix), [[0, 1], [0, 1]], np.uint8)
    with pytest.raises(BridgeError, match="does not match"):
        SFTDataset(prefix)
