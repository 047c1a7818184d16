"""Packed documents (Megatron-LM's --reset-attention-mask, --reset-position-ids, --eod-mask-loss): the batch fields
against a plain per-token reference, and what the trainer's micro-batches carry."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bridge.training.data import Documents, PackedDataset, micro_batch
from bridge.training.packing import (PackingFlags, document_positions, document_segments, pack_fields,
                                     varlen_boundaries)
from tests.model_fixtures import write_random_corpus

EOD = 0


def _reference(row: list[int]) -> tuple[list[int], list[int]]:
    """Megatron's get_ltor_masks_and_position_ids, one token at a time: (document, position) of each input token."""
    docs, positions, doc, pos = [], [], 0, 0
    for token in row:
        docs.append(doc)
        positions.append(pos)
        pos += 1
        if token == EOD:
            doc, pos = doc + 1, 0
    return docs, positions


def test_segments_and_positions_follow_the_eods() -> None:
    rng = np.random.default_rng(0)
    inputs = torch.from_numpy(rng.integers(0, 4, (6, 40)))  # EOD (0) a quarter of the tokens, runs of EODs too
    inputs[0, 0] = inputs[1, -1] = EOD
    segments = document_segments(inputs, EOD)
    positions = document_positions(segments)
    for row in range(inputs.shape[0]):
        docs, pos = _reference(inputs[row].tolist())
        assert segments[row].tolist() == docs and positions[row].tolist() == pos


def test_varlen_boundaries_cover_the_flattened_batch_document_by_document() -> None:
    inputs = torch.tensor([[5, 6, EOD, 7, 8, 9, EOD, 4], [EOD, 1, 2, 3, EOD, EOD, 5, 6]])
    cu = varlen_boundaries(document_segments(inputs, EOD))
    longest = int((cu[1:] - cu[:-1]).max())
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 7, 8, 9, 13, 14, 16] and longest == 4


def test_eod_mask_loss_drops_the_predictions_made_at_eod() -> None:
    inputs = torch.tensor([[5, EOD, 7, EOD]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0]])  # an SFT mask already drops position 2
    out = pack_fields(inputs, mask, EOD, PackingFlags(eod_mask_loss=True))
    assert out["loss_mask"].tolist() == [[1.0, 0.0, 0.0, 0.0]] and set(out) == {"loss_mask"}
    assert pack_fields(inputs, mask, EOD, PackingFlags())["loss_mask"] is mask


def test_micro_batches_carry_the_documents_of_their_samples(tmp_path: Path) -> None:
    prefix = write_random_corpus(tmp_path / "corpus", seed=4, documents=30, max_length=20)
    docs = Documents([str(prefix)])
    dataset = PackedDataset(docs, np.arange(len(docs)), seq_length=48, seed=1, eod=EOD)
    flags = PackingFlags(reset_attention_mask=True, reset_position_ids=True, eod_mask_loss=True)
    batch = micro_batch(dataset, 3, 2, torch.device("cpu"), packing=flags)
    plain = micro_batch(dataset, 3, 2, torch.device("cpu"))
    assert torch.equal(batch["tokens"], plain["tokens"]) and torch.equal(batch["labels"], plain["labels"])
    for row in range(2):
        docs_ref, pos_ref = _reference(batch["tokens"][row].tolist())
        assert batch["position_ids"][row].tolist() == pos_ref
    assert (batch["loss_mask"] == (batch["tokens"] != EOD).float()).all()
    assert batch["loss_tokens"] == batch["loss_mask"].sum() < plain["loss_tokens"]
    lengths = (batch["cu_seqlens"][1:] - batch["cu_seqlens"][:-1]).tolist()
    assert sum(lengths) == 2 * 48 and int(batch["max_seqlen"]) == 48 >= max(lengths) and len(lengths) > 4


#: Documents of different lengths, each ending with EOD, packed into samples of SEQ tokens (ids clear of specials).
SEQ, DOC_LENGTHS = 48, ([9, 17, 5, 17], [30, 11, 7])
FLAGS = PackingFlags(reset_attention_mask=True, reset_position_ids=True, eod_mask_loss=True)
LAYOUTS = {"tp1": dict(), "tp2": dict(tp=2), "tp2-sp": dict(tp=2), "pp2": dict(pp=2)}
PACKED_MODELS = ("llama31", "qwen3", "mixtral")  # dense, q/k norm, MoE


def _packed_batch(eod: int) -> tuple[dict[str, torch.Tensor], list[list[torch.Tensor]]]:
    """A micro-batch of two packed samples (the flags' fields), and each sample's documents."""
    rng = np.random.default_rng(5)
    rows, documents = [], []
    for lengths in DOC_LENGTHS:
        docs = [torch.from_numpy(np.append(rng.integers(3, 300, n - 1), eod)) for n in lengths]
        assert sum(lengths) == SEQ
        rows.append(torch.cat(docs))
        documents.append(docs)
    tokens = torch.stack(rows)
    labels = torch.cat([tokens[:, 1:], torch.full((len(rows), 1), eod)], dim=1)  # the last input is EOD: masked
    batch = {"tokens": tokens, "labels": labels, **pack_fields(tokens, torch.ones(tokens.shape), eod, FLAGS)}
    return batch, documents


def _hf_document_losses(hf_dir: Path, documents: list[list[torch.Tensor]]) -> torch.Tensor:
    """[b, s] per-token losses of each document run alone through transformers (0 at each EOD)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    rows = []
    with torch.no_grad():
        for docs in documents:
            row = []
            for doc in docs:
                logits = model(doc[None]).logits[0]
                loss = torch.nn.functional.cross_entropy(logits[:-1], doc[1:], reduction="none")
                row.append(torch.cat([loss, torch.zeros(1)]))
            rows.append(torch.cat(row))
    return torch.stack(rows)


def _packed_losses(checkpoints: list[str], batches: list[dict[str, torch.Tensor]],
                   sequence_parallel: list[bool]) -> list[torch.Tensor] | None:
    """Rank body: each checkpoint's per-token losses [b, s] of its batch, from the last pipeline stage's rank 0."""
    import torch.distributed as dist

    from bridge.parallel.pipeline import forward_only
    from tests.model_fixtures import rank_model

    results = []
    for ckpt, batch, sp in zip(checkpoints, batches, sequence_parallel):
        ps, chunks = rank_model(ckpt, dist.get_world_size(), mask_padded_vocab=True, sequence_parallel=sp)
        out = forward_only(chunks, ps, [batch])
        results.append(out[0] if out and ps.tp_rank == 0 else None)
    return results


@pytest.fixture(scope="module")
def packed_results(tiny_hf, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str, bool], Any]:
    """(model, layout, flags on) -> per-token losses, every case of a world size in one launch; plus the references."""
    from bridge.api import import_hf
    from bridge.launch import launch
    from bridge.layout import ParallelLayout

    root = tmp_path_factory.mktemp("packed")
    results: dict[tuple[str, str, bool], Any] = {}
    batch, documents = _packed_batch(EOD)
    plain = {k: v for k, v in batch.items() if k in ("tokens", "labels")}
    for world, layouts in ((1, ["tp1"]), (2, ["tp2", "tp2-sp", "pp2"])):
        cases = [(m, lay, on) for m in PACKED_MODELS for lay in layouts for on in (True, False)]
        ckpts = {(m, lay): str(import_hf(tiny_hf(m), root / f"{m}-{lay}", ParallelLayout(**LAYOUTS[lay])))
                 for m in PACKED_MODELS for lay in layouts}
        outs = launch(_packed_losses, world, [ckpts[(m, lay)] for m, lay, _ in cases],
                      [batch if on else plain for _, _, on in cases], [lay.endswith("-sp") for _, lay, _ in cases])
        for i, case in enumerate(cases):
            results[case] = next(r[i] for r in outs if r[i] is not None)
    for m in PACKED_MODELS:
        results[(m, "hf")] = _hf_document_losses(tiny_hf(m), documents)
    results["mask"] = batch["loss_mask"]
    return results


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("model", PACKED_MODELS)
def test_packed_documents_train_as_if_alone(packed_results: dict, model: str, layout: str) -> None:
    """Per-token losses of a packed batch equal transformers' on each document alone; without the flags they do not."""
    mask = packed_results["mask"].bool()
    reference = packed_results[(model, "hf")]
    packed, unpacked = packed_results[(model, layout, True)], packed_results[(model, layout, False)]
    assert (packed[mask] - reference[mask]).abs().max() <= 1e-5
    assert (unpacked[mask] - reference[mask]).abs().max() > 1e-2  # the masks and positions matter here


def _chat_corpus(prefix: Path, conversations: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """SFT data as `bridge data prepare --chat` lays it out (tokens, and a loss mask dataset beside them): lengths
    long-tailed (log-normal, median ~40 tokens, a few past the sequence), each conversation ending with EOD, its
    mask on the 'assistant' spans. Returns the conversations as written."""
    from bridge.data.indexed import IndexedDatasetWriter, loss_mask_prefix

    rng = np.random.default_rng(seed)
    written = []
    with IndexedDatasetWriter(prefix, np.uint16) as tokens, IndexedDatasetWriter(loss_mask_prefix(prefix), np.uint8) as masks:
        for n in np.clip(rng.lognormal(np.log(40), 0.8, conversations).astype(int), 4, 400):
            t = np.append(rng.integers(3, 300, n - 1), EOD)
            m = np.zeros(n, np.int64)
            reply = int(rng.integers(1, n - 1))
            m[reply:n - 1] = 1  # the assistant's reply, up to the EOD
            tokens.add_document(t)
            masks.add_document(m)
            written.append((t, m))
    return written


def test_sft_packing_keeps_every_conversation_whole_once_per_epoch(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    from bridge.training.data import WholeDocumentDataset

    seq = 128
    written = _chat_corpus(tmp_path / "chats", 300, seed=6)
    docs = Documents([str(tmp_path / "chats")], use_loss_mask=True)
    with caplog.at_level("WARNING"):
        dataset = WholeDocumentDataset(docs, np.arange(len(docs)), seq_length=seq, seed=3, eod=EOD)
    too_long = sum(t.size > seq + 1 for t, _ in written)
    assert too_long and dataset.truncated == too_long and f"{too_long} of 300 documents" in caplog.text
    by_content = {tuple(t.tolist()): i for i, (t, _) in enumerate(written)}
    seen: dict[int, int] = {}
    k = 0
    while len(seen) < len(written) - too_long:  # the first epoch's samples
        tokens, mask = dataset.sample(k)
        ends = np.flatnonzero(tokens == EOD)
        start = 0
        for end in ends:
            piece = tuple(tokens[start:end + 1].tolist())
            if piece in by_content:  # a whole conversation: never split, never seen twice in the epoch
                i = by_content[piece]
                assert i not in seen, f"conversation {i} in samples {seen[i]} and {k}"
                seen[i] = k
                assert np.array_equal(mask[start:end + 1], written[i][1])  # its assistant span, exactly
            start = end + 1
        tail = tokens[start:]
        if tail.size and not (tail == dataset.pad).all():  # a conversation longer than a sample, cut to it
            cut = [i for i, (t, _) in enumerate(written) if t.size > seq + 1 and np.array_equal(t[:tail.size], tail)]
            assert len(cut) == 1 and start == 0 and np.array_equal(mask, written[cut[0]][1][:seq + 1])
        else:
            assert not mask[start:].any()  # padding after the last conversation is never trained
        k += 1
    assert set(seen) == {i for i, (t, _) in enumerate(written) if t.size <= seq + 1}
    again = WholeDocumentDataset(docs, np.arange(len(docs)), seq_length=seq, seed=3, eod=EOD)
    for j in (k + 5, 3, k - 1, 2 * k + 1):  # any order, the next epochs too: a resumed run sees the same samples
        assert all(np.array_equal(a, b) for a, b in zip(again.sample(j), dataset.sample(j)))


def _reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: list[int], window: int | None,
                         scale: float) -> torch.Tensor:
    """Causal attention within each document written out with a dense per-document score matrix: [T, heads, d]."""
    out = []
    groups = q.shape[1] // k.shape[1]
    for start, end in zip(bounds[:-1], bounds[1:]):
        qd, kd, vd = (t[start:end].transpose(0, 1) for t in (q, k, v))
        kd, vd = kd.repeat_interleave(groups, 0), vd.repeat_interleave(groups, 0)
        scores = qd @ kd.transpose(1, 2) * scale
        i, j = torch.arange(end - start)[:, None], torch.arange(end - start)[None]
        allowed = (j <= i) & ((i - j < window) if window else True)
        out.append((scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ vd).transpose(0, 1))
    return torch.cat(out)


@pytest.mark.parametrize("window,dv", [(None, 16), (3, 16), (None, 8)])  # plain, a sliding window, MLA's narrower v
def test_both_document_attention_paths_match_a_written_out_reference(window: int | None, dv: int) -> None:
    """The CPU's document-by-document path, and the CUDA varlen path's plumbing (its kernel replaced by one that checks
    what it is given and computes the reference), against per-document attention written out by hand."""
    from bridge.nn.attention import Documents, VarlenKernel, varlen_attention
    from bridge.nn.core_attention import CoreAttention

    torch.manual_seed(0)
    s, b, nq, ng, d = 12, 2, 4, 2, 16
    inputs = torch.tensor([[5, 6, EOD, 7, 8, 9, 9, 9, EOD, 4, 4, EOD], [EOD, 1, 2, 3, 4, 5, 6, 7, 8, 9, EOD, 5]])
    cu = varlen_boundaries(document_segments(inputs, EOD))
    longest = int((cu[1:] - cu[:-1]).max())
    documents = Documents(cu, longest)
    q, k, v = torch.randn(s, b, nq, d), torch.randn(s, b, ng, d), torch.randn(s, b, ng, dv)
    flat = [t.transpose(0, 1).reshape(b * s, t.shape[2], t.shape[3]) for t in (q, k, v)]
    expected = _reference_attention(*flat, cu.tolist(), window, d ** -0.5)

    looped = CoreAttention(window)(q, k, v, documents)  # [s, b, nq, dv]
    assert torch.allclose(looped.transpose(0, 1).reshape(b * s, nq, dv), expected, atol=1e-5)

    def kernel(q_, k_, v_, cu_q, cu_k, max_q, max_k, *, scale, window_size, enable_gqa=False):  # noqa: ANN001, ANN202
        assert cu_q is cu and cu_k is cu and max_q == max_k == longest
        assert k_.shape[1] == (ng if enable_gqa else nq)  # without grouped queries, k and v come per q head
        assert q_.shape[-1] == k_.shape[-1] == v_.shape[-1] == d  # v padded to one head size for flash
        assert window_size == ((-1, 0) if window is None else (window - 1, 0))
        w = None if window_size[0] < 0 else window_size[0] + 1
        return _reference_attention(q_, k_, v_, cu_q.tolist(), w, scale)

    for grouped in (True, False):  # torch's kernel with grouped queries, and torch 2.11's without
        out = varlen_attention(*flat, documents, window, d ** -0.5, kernel=VarlenKernel(kernel, grouped))
        assert torch.allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("flags,needle", [
    (["--mock-data", "--eod-mask-loss"], "--eod-mask-loss act on the documents of a corpus; --mock-data has none"),
    (["--mock-data", "--reset-attention-mask", "--reset-position-ids"],
     "--reset-attention-mask, --reset-position-ids act on the documents of a corpus"),
])
def test_packing_flags_refuse_what_they_cannot_do(tiny_hf, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                   flags: list[str], needle: str) -> None:
    from bridge.api import import_hf
    from bridge.cli.main import main

    ckpt = import_hf(tiny_hf("llama32-tied"), tmp_path / "ckpt")
    args = ["train", "--load", str(ckpt), "--seq-length", "32", "--device", "cpu", *flags]
    assert main(args) == 1
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("bridge train:")]
    assert len(said) == 1 and needle in said[0], said


def _real_inputs(dataset: Any, k: int) -> int:
    """Input tokens of sample k before its trailing padding, read from the sample itself."""
    tokens, _ = dataset.sample(k)
    inputs = tokens[:-1]
    padded = np.flatnonzero(inputs != dataset.pad)
    return 0 if padded.size == 0 else int(padded[-1]) + 1


def test_trainer_logs_real_tokens_and_packing_efficiency(tiny_hf, tmp_path: Path) -> None:
    import json

    from bridge.api import import_hf
    from bridge.training import TrainConfig, train
    from bridge.training.data import WholeDocumentDataset

    ckpt = import_hf(tiny_hf("llama32-tied"), tmp_path / "ckpt")
    _chat_corpus(tmp_path / "chats", 120, seed=8)
    cfg = TrainConfig(load=str(ckpt), data_path=[str(tmp_path / "chats")], sft=True, split="100,0,0", seq_length=64,
                      micro_batch_size=2, global_batch_size=4, train_iters=3, eval_interval=0, eval_iters=1,
                      progress=False, device="cpu", save=str(tmp_path / "run"), save_interval=0, log_interval=1)
    train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    eos = json.loads((ckpt / "hf_meta" / "config.json").read_text())["eos_token_id"]
    docs = Documents([str(tmp_path / "chats")], use_loss_mask=True)
    dataset = WholeDocumentDataset(docs, np.arange(len(docs)), seq_length=64, seed=cfg.seed, eod=eos)
    for step, record in enumerate(records):
        real = sum(_real_inputs(dataset, k) for k in range(4 * step, 4 * step + 4))
        assert record["packing_efficiency"] == pytest.approx(real / (4 * 64)) and record["packing_efficiency"] < 1
        assert record["real_tokens_per_s"] == pytest.approx(real / record["step_s"])


def _packed_losses_cp(checkpoints: list[str], batch: dict[str, torch.Tensor],
                      comm_types: list[str]) -> list[torch.Tensor]:
    """Rank body at CP=2: each (checkpoint, --cp-comm-type)'s local per-token losses [b, S/2] of this rank's chunks."""
    import torch.distributed as dist

    from bridge.checkpoint import CheckpointMeta
    from bridge.converters.megatron_legacy import LegacyCheckpointReader
    from bridge.nn import build_model_chunks, load_rank_checkpoint
    from bridge.parallel.context import split_sequence
    from bridge.parallel.pipeline import forward_only
    from bridge.parallel.state import ParallelState

    results = []
    for ckpt in checkpoints:
        meta = CheckpointMeta.load(Path(ckpt))
        for comm in comm_types:
            ps = ParallelState(meta.layout, dist.get_world_size(), dist.get_rank(), cp=2, cp_comm_type=comm)
            chunks = build_model_chunks(meta.config, ps, transformer_impl=meta.transformer_impl, mask_padded_vocab=True)
            load_rank_checkpoint(chunks, LegacyCheckpointReader(Path(ckpt), meta.layout).load_rank(0, 0))
            local = {k: v if k in ("cu_seqlens", "max_seqlen") else split_sequence(v, 2, ps.cp_rank, dim=1)
                     for k, v in batch.items()}
            results.append(forward_only(chunks, ps, [local])[0])
    return results


@pytest.mark.slow
def test_packed_documents_at_cp2_train_as_if_alone(tiny_hf, tmp_path: Path) -> None:
    """At CP=2 (the ring's and the all-gather's exchange, documents split across the ranks' zigzag chunks) the per-token
    losses of a packed batch equal transformers' on each document alone."""
    from bridge.api import import_hf
    from bridge.launch import launch
    from bridge.parallel.context import chunk_ids

    batch, documents = _packed_batch(EOD)
    comm_types = ["p2p", "all_gather", "a2a"]
    ckpts = [str(import_hf(tiny_hf(m), tmp_path / m)) for m in PACKED_MODELS]
    outs = launch(_packed_losses_cp, 2, ckpts, batch, comm_types)
    size = SEQ // 4
    mask = batch["loss_mask"].bool()
    for i, model in enumerate(PACKED_MODELS):
        reference = _hf_document_losses(tiny_hf(model), documents)
        for j, comm in enumerate(comm_types):
            whole = torch.empty_like(reference)
            for rank, out in enumerate(outs):
                local = out[i * len(comm_types) + j]
                for half, chunk in enumerate(chunk_ids(2, rank)):
                    whole[:, chunk * size:(chunk + 1) * size] = local[:, half * size:(half + 1) * size]
            assert (whole[mask] - reference[mask]).abs().max() <= 1e-5, (model, comm)


def test_sft_packed_training_resumes_bitwise(tiny_hf, tmp_path: Path) -> None:
    """--sft with the three packing flags at TP=2: stopped at 2 and resumed, the loss curve is the uninterrupted one."""
    from bridge.api import import_hf
    from bridge.training import TrainConfig, train

    ckpt = import_hf(tiny_hf("llama32-tied"), tmp_path / "ckpt")
    _chat_corpus(tmp_path / "chats", 120, seed=9)
    base = dict(load=str(ckpt), data_path=[str(tmp_path / "chats")], sft=True, reset_attention_mask=True,
                reset_position_ids=True, eod_mask_loss=True, split="100,0,0", seq_length=64, micro_batch_size=2,
                global_batch_size=4, train_iters=4, lr=1e-3, eval_interval=0, eval_iters=1, progress=False,
                device="cpu", nproc=2, tp=2, save_interval=2)
    full = train(TrainConfig(**base, save=str(tmp_path / "full")))
    first = train(TrainConfig(**base, save=str(tmp_path / "split"), exit_interval=2))
    assert first["stopped_by"] == "exit-interval"
    resumed = train(TrainConfig(**{**base, "load": str(tmp_path / "split")}, save=str(tmp_path / "split")))
    assert resumed["loss_curve"] == full["loss_curve"] and len(full["loss_curve"]) == 4  # bitwise


@pytest.mark.slow
@pytest.mark.parametrize("cp", [1, 2])
def test_verify_packed_runs_the_prompts_in_one_sequence(tiny_hf, tmp_path: Path, cp: int) -> None:
    """`bridge verify --packed`: the prompts packed into one sequence through bridge give transformers' logits of each
    prompt alone (fp32 bound), with CP too."""
    import json

    from bridge.api import import_hf
    from bridge.cli.main import main

    hf = tiny_hf("qwen3")
    ckpt = import_hf(hf, tmp_path / "ckpt")
    args = ["verify", str(hf), str(ckpt), "--packed"] + (["--cp", str(cp)] if cp > 1 else [])
    assert main(args) == 0
    result = json.loads((ckpt / "verify.json").read_text())
    assert result["passed"] and result["layout"]["packed"] and result["overall"]["top1"] == 1.0


def _eager_and_compiled_losses(ckpt: str, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank body: the packed batch's per-token losses through the eager layers, then through compiled ones."""
    from bridge.parallel.pipeline import forward_only
    from bridge.training.model import compile_chunks
    from tests.model_fixtures import rank_model

    ps, chunks = rank_model(ckpt, 1, mask_padded_vocab=True)
    eager = forward_only(chunks, ps, [batch])[0]
    compile_chunks(chunks)
    return eager, forward_only(chunks, ps, [batch])[0]


@pytest.mark.slow
def test_compiled_layers_take_packed_documents(tiny_hf, tmp_path: Path) -> None:
    from bridge.api import import_hf
    from bridge.launch import launch

    batch, _ = _packed_batch(EOD)
    ckpt = str(import_hf(tiny_hf("qwen3"), tmp_path / "ckpt"))
    eager, compiled = launch(_eager_and_compiled_losses, 1, ckpt, batch)[0]
    assert torch.allclose(eager, compiled, atol=1e-5, rtol=0)
