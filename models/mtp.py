"""Multi-token prediction (MTP) layers kept through conversion: the HF checkpoint's extra layers after the decoder,
under Megatron Core's names, as Megatron-Bridge maps them (GLM-4.5's `glm45_bridge.py`).

HF layer `model.layers.{L+i}` (L = num_hidden_layers) is MTP layer i: a whole decoder layer plus `enorm` (on the next
token's embedding), `hnorm` (on the main model's hidden state), `eh_proj` (the two concatenated, embedding first,
projected back to the hidden size) and `shared_head.norm`. Megatron Core's MultiTokenPredictionLayer holds the same:
`mtp.layers.{i}.enorm`, `hnorm`, `eh_proj`, `transformer_layer.*` (the decoder layer's names) and `final_layernorm`.
The checkpoint also stores the layer's `embed_tokens` and `shared_head.head`; Megatron's MTP shares the model's
embedding and output layer instead, so import checks that they are byte-equal copies of those and export writes them
back from them. bridge's model does not run the MTP layers (ModelConfig.mtp_layers).
"""
from __future__ import annotations

import dataclasses
from typing import Collection, Sequence

import torch

from bridge.config import ModelConfig
from bridge.errors import BridgeError
from bridge.mapping import Row, Transform


def rows(cfg: ModelConfig, layer_rows: Sequence[Row]) -> list[Row]:
    """The MTP layers' rows: `layer_rows` (a decoder MoE layer's, `{}` its index) rewritten for each MTP layer, and
    its own four modules."""
    out = []
    for i in range(cfg.mtp_layers):
        hf, megatron = f"model.layers.{cfg.num_layers + i}.", f"mtp.layers.{i}.transformer_layer."
        out += [dataclasses.replace(row, megatron=row.megatron.replace("decoder.layers.{}.", megatron),
                                    hf=tuple(name.replace("model.layers.{}.", hf) for name in row.hf), layers="all")
                for row in layer_rows if row.layers in ("all", "moe")]
        out += [Row(f"mtp.layers.{i}.enorm.weight", (hf + "enorm.weight",)),
                Row(f"mtp.layers.{i}.hnorm.weight", (hf + "hnorm.weight",)),
                Row(f"mtp.layers.{i}.eh_proj.weight", (hf + "eh_proj.weight",)),
                Row(f"mtp.layers.{i}.final_layernorm.weight", (hf + "shared_head.norm.weight",))]
    return out


def _shared_copies(cfg: ModelConfig) -> dict[str, list[str]]:
    """Megatron row -> the HF names of the MTP layers' copies of it (the embedding's and the head's)."""
    layers = [f"model.layers.{cfg.num_layers + i}." for i in range(cfg.mtp_layers)]
    copies = {"embedding.word_embeddings.weight": [p + "embed_tokens.weight" for p in layers],
              "output_layer.weight": [p + "shared_head.head.weight" for p in layers]}
    if cfg.tie_word_embeddings:  # the head is the embedding
        copies["embedding.word_embeddings.weight"] += copies.pop("output_layer.weight")
    return copies


def as_stored(cfg: ModelConfig, names: Collection[str]) -> ModelConfig:
    """`cfg` with `mtp_shared_copies` as the HF files `names` have them. Checkpoints differ: some store every MTP
    layer's `embed_tokens` and `shared_head.head`, others (GLM-4.6's, an HF export of Megatron-Bridge) none. Some but
    not all stays `True`, so that accounting names the missing ones."""
    wanted = {name for names_of in _shared_copies(cfg).values() for name in names_of}
    if not cfg.mtp_layers or not names or wanted & set(names):
        return cfg
    return cfg.replace(mtp_shared_copies=False)


def with_shared_copies(table: Sequence[Row], cfg: ModelConfig) -> list[Row]:
    """`table` with the MTP layers' copies of the embedding and of the output layer added to those two rows, where
    the HF checkpoint stores them."""
    if not (cfg.mtp_layers and cfg.mtp_shared_copies):
        return list(table)
    copies = _shared_copies(cfg)
    return [dataclasses.replace(row, hf=row.hf + tuple(copies[row.megatron]),
                                transform=_copies(row.transform, len(copies[row.megatron])))
            if row.megatron in copies else row for row in table]


def _copies(base: Transform, n: int) -> Transform:
    """`base` on the row's own HF tensor, followed by `n` copies of it: on import they must equal it byte for byte, on
    export they are written back as copies of it."""
    def to_megatron(*args: object) -> torch.Tensor:
        *tensors, cfg = args
        own, copies = tensors[0], tensors[1:]
        if not own.is_meta and not all(copy.dtype == own.dtype and torch.equal(copy, own) for copy in copies):
            raise BridgeError("an MTP layer's embed_tokens or shared_head.head differs from the model's embedding or "
                              "output layer; Megatron's MTP layers share those two, so bridge cannot keep both")
        return base.to_megatron(own, cfg)

    def to_hf(tensor: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
        own = base.to_hf(tensor, cfg)
        return own + own * n

    return Transform(f"{base.name}+mtp_copies", to_megatron, to_hf)
