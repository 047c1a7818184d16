"""`GPTModel`: one virtual pipeline chunk of one rank, with Megatron Core's state-dict names.

A rank's `state_dict()` is exactly its shard in a Megatron checkpoint (`model` / `model{v}` of
`model_optim_rng.pt`), so loading is `load_state_dict(strict=True)` and saving needs no mapping.

Outputs of the last stage: the logits are this TP rank's vocabulary shard, [s, b, V_pad/tp],
untrimmed (padded rows included; gather over TP and cut at `cfg.vocab_size` to compare with HF).
With `labels` the model returns the per-token loss [b, s] from vocab-parallel cross entropy; the
padded vocabulary rows take part in the softmax as in Megatron-LM unless `mask_padded_vocab`.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from bridge.checkpoint import TRANSFORMER_IMPLS
from bridge.config import ModelConfig
from bridge.errors import BridgeError
from bridge.models import conversions
from bridge.nn.attention import Documents
from bridge.nn.cross_entropy import vocab_parallel_cross_entropy
from bridge.nn.linear_cross_entropy import linear_cross_entropy
from bridge.nn.layers import ColumnParallelLinear, RMSNorm, VocabParallelEmbedding
from bridge.nn.rope import RotaryEmbedding
from bridge.nn.transformer import TransformerLayer
from bridge.parallel import collectives as C
from bridge.parallel.context import local_positions
from bridge.parallel.state import ParallelState
from bridge.params import Partial, Split, kind_of
from bridge.sharding import extra_state_keys, is_mtp_key, localize

log = logging.getLogger(__name__)


def tp_replicated(name: str) -> bool:
    """Same tensor on every TP rank (norms, row-parallel biases): counted once in the gradient norm."""
    return kind_of(name).split is Split.REPLICATED


def tp_partial(name: str, sequence_parallel: bool, tp: int) -> bool:
    """A replicated weight whose gradient on one TP rank covers only part of the data and must be summed over TP
    (Megatron's finalize_model_grads): with SP, norms and row-parallel biases outside the TP regions (each rank
    sees its sequence shard only); always, the q/k norms (each rank normalises only its own heads)."""
    if tp == 1:  # nothing to sum (and a module outside the model, an optimizer test's, needs no declared kinds)
        return False
    partial = kind_of(name).partial
    return partial is Partial.HEADS or (sequence_parallel and partial is Partial.SEQUENCE)


class LanguageModelEmbedding(nn.Module):
    """Megatron's `embedding` module: just `word_embeddings` (RoPE models have no position table)."""

    def __init__(self, cfg: ModelConfig, ps: ParallelState, *, sequence_parallel: bool, dtype: torch.dtype,
                 device: torch.device | None) -> None:
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(
            ps.layout.padded_vocab_size(cfg.vocab_size), cfg.hidden_size, tp=ps.tp, tp_rank=ps.tp_rank,
            group=ps.tp_group, sequence_parallel=sequence_parallel, dtype=dtype, device=device)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(tokens)  # [b, s] -> [s(/tp), b, h]


class TransformerBlock(nn.Module):
    """Megatron's `decoder`: this chunk's layers (local indices 0..n-1) and, on the last chunk, the final norm."""

    def __init__(self, cfg: ModelConfig, ps: ParallelState, num_layers: int, *, post_process: bool,
                 transformer_impl: str, sequence_parallel: bool, dtype: torch.dtype, device: torch.device | None,
                 first_layer: int = 0) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerLayer(cfg, ps, transformer_impl=transformer_impl, sequence_parallel=sequence_parallel,
                             dtype=dtype, device=device, layer=first_layer + i) for i in range(num_layers))
        self.final_layernorm = (RMSNorm(cfg.hidden_size, cfg.norm_epsilon, dtype=dtype, device=device,
                                        style=cfg.norm_style) if post_process else None)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                documents: Documents | None = None,
                local_rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """`local_rope`: the table of the layers whose spec says `local_rope` (Gemma 3's sliding layers)."""
        for layer in self.layers:
            x = layer(x, local_rope if layer.local_rope else rope, documents)
        return x if self.final_layernorm is None else self.final_layernorm(x)


class GPTModel(nn.Module):
    """One virtual chunk (`chunk`) of one pipeline stage; `pre_process`/`post_process` follow from the layout."""

    def __init__(self, cfg: ModelConfig, ps: ParallelState, *, chunk: int = 0, transformer_impl: str = "transformer_engine",
                 sequence_parallel: bool = False, params_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, mask_padded_vocab: bool = False) -> None:
        super().__init__()
        if transformer_impl not in TRANSFORMER_IMPLS:
            raise BridgeError(f"transformer_impl {transformer_impl} is not one of {', '.join(TRANSFORMER_IMPLS)}")
        if not 0 <= chunk < ps.layout.chunks:
            raise BridgeError(f"chunk {chunk} is outside the layout's {ps.layout.chunks} virtual chunks")
        if sequence_parallel and ps.tp == 1:
            sequence_parallel = False  # nothing to split; Megatron likewise turns it off at TP=1
        ps.layout.validate(cfg)
        self.cfg, self.ps, self.chunk, self.transformer_impl = cfg, ps, chunk, transformer_impl
        self.sequence_parallel, self.mask_padded_vocab = sequence_parallel, mask_padded_vocab
        self.pre_process, self.post_process = ps.pre_process(chunk), ps.post_process(chunk)
        self.share_embeddings_and_output_weights = cfg.tie_word_embeddings
        kw = dict(sequence_parallel=sequence_parallel, dtype=params_dtype, device=device)
        self.embedding = LanguageModelEmbedding(cfg, ps, **kw) if self.pre_process else None
        self.rotary_pos_emb = RotaryEmbedding(cfg, device=torch.device(device) if device else None)
        self.local_rotary_pos_emb = (RotaryEmbedding(cfg, device=torch.device(device) if device else None, local=True)
                                     if any(cfg.layer(i).local_rope for i in range(cfg.num_layers)) else None)
        self.layer_numbers = ps.layout.chunk_layers(ps.pp_rank, chunk, cfg.num_layers)
        self.decoder = TransformerBlock(cfg, ps, len(self.layer_numbers), post_process=self.post_process,
                                        transformer_impl=transformer_impl, first_layer=self.layer_numbers.start, **kw)
        self.output_layer = None
        if self.post_process:
            tied_here = cfg.tie_word_embeddings and self.pre_process  # PP=1: the head *is* the embedding
            self.output_layer = ColumnParallelLinear(
                cfg.hidden_size, ps.layout.padded_vocab_size(cfg.vocab_size), tp=ps.tp, group=ps.tp_group,
                skip_weight=tied_here, **kw)
        self.vocab_start = self.ps.tp_rank * ps.layout.padded_vocab_size(cfg.vocab_size) // ps.tp
        self.carried: dict[str, torch.Tensor] = {}
        """Rank-file entries this model does not run, kept as loaded for the saves: the MTP layers (set_aside_mtp)."""

    def shared_embedding_or_output_weight(self) -> torch.Tensor | None:
        """The tensor tied embeddings share on this chunk: the embedding on the first, the head on the last."""
        if self.pre_process:
            return self.embedding.word_embeddings.weight
        if self.post_process:
            return self.output_layer.weight
        return None

    def forward(self, tokens_or_hidden: torch.Tensor, position_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                max_seqlen: int | torch.Tensor | None = None, loss_weights: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [b, s] (first chunk) or hidden [s(/tp), b, h] -> hidden, logits [s, b, V_pad/tp] or loss [b, s].
        `cu_seqlens`/`max_seqlen`: packed documents (bridge.training.packing), attention stays within each.
        `loss_weights` [b, s] with labels: the loss is sum(loss * loss_weights), a scalar, formed with its
        gradients chunk by chunk without the logits where the output layer is a plain GEMM
        (bridge.nn.linear_cross_entropy: differentiate it as it is, with gradient 1)."""
        if self.pre_process:
            b, s = tokens_or_hidden.shape
            if self.sequence_parallel and s % self.ps.tp:
                raise BridgeError(f"sequence parallelism splits the sequence over tp={self.ps.tp}: length {s} is not "
                                  "divisible; pad or cut the sequences")
            hidden = self.embedding(tokens_or_hidden)  # [s(/tp), b, h]
            if self.cfg.embedding_multiplier is not None:  # HF's fp32 factor, cast to the embedding's dtype first
                hidden = hidden * torch.tensor(self.cfg.embedding_multiplier, device=hidden.device).to(hidden.dtype)
        else:
            hidden = tokens_or_hidden
            s = hidden.shape[0] * (self.ps.tp if self.sequence_parallel else 1)
            b = hidden.shape[1]
        if position_ids is None:  # with CP, `s` tokens are this rank's two chunks of a cp * s sequence
            positions = (local_positions(s * self.ps.cp, self.ps.cp, self.ps.cp_rank, hidden.device) if self.ps.cp > 1
                         else torch.arange(s, device=hidden.device))
            position_ids = positions.unsqueeze(0).expand(b, s)
        rope = self.rotary_pos_emb(position_ids, hidden.dtype)  # cos, sin: [s, b, 1, d]
        local_rope = None if self.local_rotary_pos_emb is None else self.local_rotary_pos_emb(position_ids, hidden.dtype)
        documents = None if cu_seqlens is None else Documents(cu_seqlens, int(max_seqlen))
        hidden = self.decoder(hidden, rope, documents, local_rope)
        if not self.post_process:
            return hidden
        weight = self.embedding.word_embeddings.weight if self.output_layer.weight is None else None
        cap = self.cfg.final_logit_softcap
        vocab = self.cfg.vocab_size if self.mask_padded_vocab else None
        if labels is not None and loss_weights is not None and self.output_layer.plain_gemm:
            return self._output_loss(hidden, weight, labels, loss_weights, vocab, cap)
        logits = self.output_layer(hidden, weight)  # [s, b, V_pad/tp]
        if cap is not None:  # elementwise, so each TP rank caps its vocabulary shard; HF's order of operations
            logits = torch.tanh(logits / cap) * cap
        if labels is None:
            return logits
        loss = vocab_parallel_cross_entropy(logits, labels.t(), self.ps.tp_group, self.vocab_start, vocab).t()  # [b, s]
        return loss if loss_weights is None else (loss * loss_weights).sum()

    def _output_loss(self, hidden: torch.Tensor, weight: torch.Tensor | None, labels: torch.Tensor,
                     loss_weights: torch.Tensor, vocab: int | None, cap: float | None) -> torch.Tensor:
        """The output layer and the weighted loss in one pass, without the logits (bridge.nn.linear_cross_entropy)."""
        layer = self.output_layer
        x = C.gather_from_sp(hidden, layer.group) if layer.sequence_parallel else C.copy_to_tp(hidden, layer.group)
        return linear_cross_entropy(x, layer.weight if weight is None else weight, labels.t(), loss_weights.t(),
                                    layer.group, self.vocab_start, vocab, cap)


def build_model_chunks(cfg: ModelConfig, ps: ParallelState, **kwargs: Any) -> list[GPTModel]:
    """Every virtual chunk of this rank's stage, in chunk order (`model0`, `model1`, ...)."""
    return [GPTModel(cfg, ps, chunk=v, **kwargs) for v in range(ps.layout.chunks)]


def _state_key(state: dict[str, Any], chunk: int, chunks: int) -> str:
    if chunks == 1 and "model" in state:
        return "model"
    key = f"model{chunk}"
    if key not in state:
        present = sorted(k for k in state if k.startswith("model"))
        raise BridgeError(f"rank file has {present}, not {key}; was it written for another --vpp?")
    return key


def load_rank_checkpoint(chunks: Sequence[GPTModel], state: dict[str, Any]) -> None:
    """Load one rank's `model_optim_rng.pt` dict (`model` or `model0..`) into its chunks, strictly; the MTP layers'
    tensors go to the last chunk's `carried`, as they are (see `set_aside_mtp`)."""
    for v, model in enumerate(chunks):
        shard = set_aside_mtp(model, state[_state_key(state, v, len(chunks))])
        expected = set(model.state_dict())
        missing, unexpected = sorted(expected - set(shard)), sorted(set(shard) - expected)
        if missing or unexpected:
            raise BridgeError(f"chunk {v} of rank tp={model.ps.tp_rank} pp={model.ps.pp_rank} does not match the model: "
                              f"missing {missing[:8]}, unexpected {unexpected[:8]}; is the checkpoint for this config and "
                              "--transformer-impl?")
        try:
            model.load_state_dict(shard, strict=True)
        except RuntimeError as exc:
            raise BridgeError(f"cannot load chunk {v}: {str(exc).splitlines()[-1].strip()}") from exc


def set_aside_mtp(model: GPTModel, shard: dict[str, Any]) -> dict[str, Any]:
    """`shard` without the MTP layers' entries, which become `model.carried`: the model does not run them, the
    trainer neither trains nor drops them (a save writes them back unchanged). Only the chunk whose rank file holds
    them takes them, and only all of them (any other MTP entry is left in `shard`, where loading names it)."""
    present = {key for key in shard if is_mtp_key(key)}
    if not present or present != _mtp_keys(model):
        return shard
    model.carried = {key: shard[key] for key in sorted(present)}
    log.info("rank tp=%d pp=%d ep=%d: %d tensors of %d MTP layers kept aside (not run, not trained, saved unchanged)",
             model.ps.tp_rank, model.ps.pp_rank, model.ps.ep_rank, len(present), model.cfg.mtp_layers)
    return {key: value for key, value in shard.items() if key not in present}


def _mtp_keys(model: GPTModel) -> set[str]:
    """The stage-local names of the MTP entries this chunk's rank file holds: every MTP tensor (the experts of this
    EP rank) and, in the TE spec, their `_extra_state`, on the last stage's last chunk only."""
    cfg, layout = model.cfg, model.ps.layout
    if not (cfg.mtp_layers and model.post_process):
        return set()
    keys = [conv.megatron for conv in conversions(cfg) if is_mtp_key(conv.megatron)]
    if model.transformer_impl == "transformer_engine":
        keys += [extra for module in dict.fromkeys(k.rsplit(".", 1)[0] for k in keys)
                 for extra in extra_state_keys(module, layout, cfg.num_experts)]
    places = [localize(key, layout, cfg.num_layers, model.transformer_impl, cfg.num_experts) for key in keys]
    return {p.name for p in places if p.ep_rank in (None, model.ps.ep_rank)}


def _tied_weight(chunks: Sequence[GPTModel]) -> torch.Tensor | None:
    """The tied tensor this rank holds: first stage's embedding or last stage's head copy (PP > 1 only)."""
    model = chunks[0]
    if not model.cfg.tie_word_embeddings or model.ps.pp == 1:
        return None
    if model.ps.is_first_stage:
        return chunks[0].shared_embedding_or_output_weight()
    if model.ps.is_last_stage:
        return chunks[-1].shared_embedding_or_output_weight()
    return None


def sync_tied_embeddings(chunks: Sequence[GPTModel]) -> None:
    """Copy the first stage's embedding into the last stage's head (at init, before training)."""
    weight = _tied_weight(chunks)
    ps = chunks[0].ps
    if weight is not None and ps.embedding_group is not None:
        with torch.no_grad():
            dist.broadcast(weight.data, src=ps.embedding_ranks[0], group=ps.embedding_group)


def allreduce_tp_partial_grads(chunks: Sequence[GPTModel]) -> None:
    """Sum over TP the gradients of the replicated parameters `tp_partial` names (SP norms, q/k norms); the trainer's
    gradient buffer does the same sums in its deferred buckets."""
    for model in chunks:
        group = model.ps.tp_group
        if group is None or model.ps.tp == 1:
            continue
        for name, param in model.named_parameters():
            if tp_partial(name, model.sequence_parallel, model.ps.tp) and param.grad is not None:
                dist.all_reduce(param.grad, group=group)


def allreduce_tied_embedding_grads(chunks: Sequence[GPTModel]) -> None:
    """Sum the tied weight's gradient over the first and last stage, so both copies take the same step."""
    weight = _tied_weight(chunks)
    ps = chunks[0].ps
    if weight is not None and weight.grad is not None and ps.embedding_group is not None:
        dist.all_reduce(weight.grad, group=ps.embedding_group)
