"""Megatron Core's own `IndexedDataset` (megatron-core from PyPI) reads what `bridge data prepare` writes."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from bridge.data import IndexedDataset, PrepareConfig, load_tokenizer
from bridge.data.indexed import IndexedDatasetWriter, loss_mask_prefix
from bridge.data.prepare import prepare
from tests.test_data_prepare import CHATS, TEXTS, build_tokenizer

with warnings.catch_warnings():  # megatron-core warns about missing Apex / Transformer Engine on import
    warnings.simplefilter("ignore")
    megatron_indexed = pytest.importorskip(
        "megatron.core.datasets.indexed_dataset",
        reason="megatron-core is not installed (pip install -r .ci/requirements-interop.txt)",
    )


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def _prepare(tmp_path, tok_dir, records, **kwargs):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = PrepareConfig(inputs=(str(data),), output_prefix=str(tmp_path / "corpus"), tokenizer=str(tok_dir),
                           progress=False, **kwargs)
    return prepare(config)


def _assert_same(ours: IndexedDataset, theirs) -> None:
    assert len(theirs) == len(ours)
    assert theirs.index.dtype == ours.dtype
    np.testing.assert_array_equal(theirs.sequence_lengths, ours.sequence_lengths)
    np.testing.assert_array_equal(theirs.document_indices, ours.document_indices)
    for i in range(len(ours)):
        np.testing.assert_array_equal(theirs[i], ours[i])
        length = min(2, int(ours.sequence_lengths[i]) - 1)
        np.testing.assert_array_equal(theirs.get(i, offset=1, length=length), ours.get(i, offset=1, length=length))


@pytest.mark.parametrize("workers", [1, 2])
def test_megatron_reads_prepared_corpus(tmp_path, tok_dir, workers):
    result = _prepare(tmp_path, tok_dir, [{"text": t} for t in TEXTS * 10], append_eod=True, workers=workers)
    prefix = result.prefixes["text"]
    theirs = megatron_indexed.IndexedDataset(prefix)
    ours = IndexedDataset(prefix)
    _assert_same(ours, theirs)
    tokenizer = load_tokenizer(str(tok_dir))
    expected = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in TEXTS * 10]
    assert [theirs[i].tolist() for i in range(len(theirs))] == expected
    assert theirs.document_indices.tolist() == list(range(len(expected) + 1))


def test_megatron_reads_sft_tokens_and_loss_mask(tmp_path, tok_dir):
    result = _prepare(tmp_path, tok_dir, CHATS, chat=True, json_keys=("messages",))
    prefix = result.prefixes["messages"]
    _assert_same(IndexedDataset(prefix), megatron_indexed.IndexedDataset(prefix))
    mask = megatron_indexed.IndexedDataset(loss_mask_prefix(prefix))
    assert mask.index.dtype == np.uint8
    _assert_same(IndexedDataset(loss_mask_prefix(prefix)), mask)


def test_we_read_megatron_built_files_and_write_identical_bytes(tmp_path):
    """Files from Megatron's own IndexedDatasetBuilder: bridge reads them, and bridge's writer
    produces the same bytes for the same documents."""
    import torch

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 60_000, size=n) for n in rng.integers(1, 50, size=40)]
    theirs_prefix, ours_prefix = str(tmp_path / "megatron"), str(tmp_path / "bridge")
    builder = megatron_indexed.IndexedDatasetBuilder(theirs_prefix + ".bin", dtype=np.uint16)
    for doc in docs:
        builder.add_document(torch.from_numpy(doc), [len(doc)])
    builder.finalize(theirs_prefix + ".idx")
    with IndexedDatasetWriter(ours_prefix, np.uint16) as writer:
        for doc in docs:
            writer.add_document(doc)
    for ext in ("bin", "idx"):
        assert (tmp_path / f"megatron.{ext}").read_bytes() == (tmp_path / f"bridge.{ext}").read_bytes()
    ours = IndexedDataset(theirs_prefix)
    assert [d.tolist() for d in ours.documents()] == [d.tolist() for d in docs]
