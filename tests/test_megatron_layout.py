"""What `bridge import` writes is Megatron's legacy layout, checked against hand-built expectations."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from bridge import api
from bridge.layout import ParallelLayout
from tests.model_fixtures import load_pt

H, F, NQ, NG, D, V, L = 64, 128, 8, 4, 16, 300, 4  # tiny Llama-3.2-1B shape (head_dim 16)


def te_layer_keys(i: int) -> list[str]:
    p = f"decoder.layers.{i}."
    return [p + "self_attention.linear_qkv.layer_norm_weight", p + "self_attention.linear_qkv.weight",
            p + "self_attention.linear_qkv._extra_state", p + "self_attention.core_attention._extra_state",
            p + "self_attention.linear_proj.weight", p + "self_attention.linear_proj._extra_state",
            p + "mlp.linear_fc1.layer_norm_weight", p + "mlp.linear_fc1.weight", p + "mlp.linear_fc1._extra_state",
            p + "mlp.linear_fc2.weight", p + "mlp.linear_fc2._extra_state"]


def test_tree_keys_shapes_and_contents_tp2_pp2(tiny_hf, tmp_path: Path) -> None:
    src = tiny_hf("llama32-tied")  # tied embeddings
    hf = load_file(src / "model.safetensors")
    ckpt = api.import_hf(src, tmp_path / "ck", ParallelLayout(tp=2, pp=2))
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "release"
    files = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*.pt"))
    assert files == [f"release/mp_rank_0{t}_00{p}/model_optim_rng.pt" for t in (0, 1) for p in (0, 1)]

    first = load_pt(ckpt / "release/mp_rank_01_000/model_optim_rng.pt")
    last = load_pt(ckpt / "release/mp_rank_01_001/model_optim_rng.pt")
    assert first["checkpoint_version"] == 3.0 and first["iteration"] == 0
    args = first["args"]
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.padded_vocab_size) == (2, 2, 512)
    assert (args.num_layers, args.hidden_size, args.num_query_groups, args.kv_channels) == (L, H, NG, D)
    assert args.untie_embeddings_and_output_weights is False and args.use_rope_scaling is True
    assert list(first["model"]) == ["embedding.word_embeddings.weight"] + te_layer_keys(0) + te_layer_keys(1)
    assert list(last["model"]) == te_layer_keys(0) + te_layer_keys(1) + ["decoder.final_layernorm.weight", "output_layer.weight"]

    m = first["model"]
    assert m["decoder.layers.0.self_attention.linear_qkv._extra_state"].dtype == torch.uint8
    assert m["decoder.layers.0.self_attention.linear_qkv._extra_state"].numel() == 0
    # Vocab parallel: rank 1 holds rows 256..511 of the padded table; rows >= 300 are padding.
    emb = m["embedding.word_embeddings.weight"]
    assert emb.shape == (256, H)
    assert torch.equal(emb[: V - 256], hf["model.embed_tokens.weight"][256:])
    assert torch.count_nonzero(emb[V - 256:]) == 0
    # QKV: rank 1 holds query groups 2 and 3, each [q of its 2 heads; k; v].
    q, k, v = (hf[f"model.layers.0.self_attn.{n}_proj.weight"] for n in "qkv")
    per_group = NQ // NG * D
    expected = torch.cat([torch.cat([q[g * per_group:(g + 1) * per_group], k[g * D:(g + 1) * D], v[g * D:(g + 1) * D]])
                          for g in (2, 3)])
    assert torch.equal(m["decoder.layers.0.self_attention.linear_qkv.weight"], expected)
    # fc1: rank 1 holds [gate_1; up_1], not a plain chunk of [gate; up].
    gate, up = hf["model.layers.1.mlp.gate_proj.weight"], hf["model.layers.1.mlp.up_proj.weight"]
    assert torch.equal(m["decoder.layers.1.mlp.linear_fc1.weight"], torch.cat([gate[F // 2:], up[F // 2:]]))
    # Row parallel: linear_proj / fc2 split on dim 1.
    assert torch.equal(m["decoder.layers.0.self_attention.linear_proj.weight"], hf["model.layers.0.self_attn.o_proj.weight"][:, NQ * D // 2:])
    assert m["decoder.layers.0.mlp.linear_fc2.weight"].shape == (H, F // 2)
    # Stage 1's local layer 0 is global layer 2; tied head is a copy of the embedding shard.
    assert torch.equal(last["model"]["decoder.layers.0.mlp.linear_fc2.weight"], hf["model.layers.2.mlp.down_proj.weight"][:, F // 2:])
    assert torch.equal(last["model"]["output_layer.weight"], emb)


def test_local_spec_names_and_virtual_chunks(tiny_hf, tmp_path: Path) -> None:
    src = tiny_hf("qwen3", num_hidden_layers=8)
    ckpt = api.import_hf(src, tmp_path / "ck", ParallelLayout(pp=2, vpp=2), transformer_impl="local")
    files = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*.pt"))
    assert files == ["release/mp_rank_00_000/model_optim_rng.pt", "release/mp_rank_00_001/model_optim_rng.pt"]
    stage0 = load_pt(ckpt / files[0])
    assert "model" not in stage0 and set(k for k in stage0 if k.startswith("model")) == {"model0", "model1"}
    keys = list(stage0["model0"])
    assert keys[0] == "embedding.word_embeddings.weight"
    assert "decoder.layers.0.input_layernorm.weight" in keys and "decoder.layers.1.pre_mlp_layernorm.weight" in keys
    assert "decoder.layers.0.self_attention.q_layernorm.weight" in keys
    assert not any("_extra_state" in k or "layer_norm_weight" in k for k in keys)
    # model1 on stage 0 holds global layers 4,5 as local 0,1; untied head only on the last stage's last chunk.
    hf = load_file(src / "model.safetensors")
    assert torch.equal(stage0["model1"]["decoder.layers.1.self_attention.linear_proj.weight"], hf["model.layers.5.self_attn.o_proj.weight"])
    stage1 = load_pt(ckpt / files[1])
    assert "output_layer.weight" in stage1["model1"] and "output_layer.weight" not in stage1["model0"]


def test_qwen2_qkv_bias_is_grouped_and_split(tiny_hf, tmp_path: Path) -> None:
    src = tiny_hf("qwen2")
    hf = load_file(src / "model.safetensors")
    ckpt = api.import_hf(src, tmp_path / "ck", ParallelLayout(tp=2))
    rank0 = load_pt(ckpt / "release/mp_rank_00/model_optim_rng.pt")["model"]
    q, k, v = (hf[f"model.layers.3.self_attn.{n}_proj.bias"] for n in "qkv")
    d = H // NQ  # Qwen2 has no head_dim field: hidden / heads
    per_group = NQ // NG * d
    assert torch.count_nonzero(q) == q.numel()
    expected = torch.cat([torch.cat([q[g * per_group:(g + 1) * per_group], k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]]) for g in (0, 1)])
    assert torch.equal(rank0["decoder.layers.3.self_attention.linear_qkv.bias"], expected)
    assert "output_layer.weight" in rank0  # untied, PP=1
