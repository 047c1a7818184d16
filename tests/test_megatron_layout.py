"""What `bridge import` writes is Megatron's legacy layout, checked against hand-built expectations."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

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


def _hf_with_random_expert_bias(src: Path, out: Path) -> dict[str, torch.Tensor]:
    """A copy of a tiny DeepSeek-V3 whose `e_score_correction_bias` buffers are random, not transformers' zeros,
    so that a misplaced or dropped bias is visible. Returns the copy's tensors."""
    shutil.copytree(src, out)
    hf = load_file(src / "model.safetensors")
    gen = torch.Generator().manual_seed(1)
    for name in [n for n in hf if n.endswith("e_score_correction_bias")]:
        hf[name] = torch.randn(hf[name].shape, generator=gen, dtype=hf[name].dtype)
    save_file(hf, str(out / "model.safetensors"), metadata={"format": "pt"})
    return hf


def test_deepseek_v3_mla_router_and_shared_experts_tp2_ep2(tiny_hf, tmp_path: Path) -> None:
    """MLA, router and shared experts of DeepSeek-V3 at TP=2 x EP=2 (TE spec), from Megatron Core's definitions:

    - MLA (multi_latent_attention.py, TE spec of gpt_layer_specs.py): `input_layernorm` is its own norm (the q/kv
      down projections are plain TELinear with parallel_mode='duplicated', so replicated over TP and without a fused
      norm); with qk_layernorm the up projections are TELayerNormColumnParallelLinear whose layer_norm_weight is the
      q/kv a-layernorm. `linear_kv_down_proj` output is split [kv_lora_rank, qk_pos_emb_head_dim] (latent first,
      then the shared RoPE key), HF's kv_a_proj_with_mqa split order. `linear_q_up_proj` output is viewed as
      [heads, qk_head_dim + qk_pos_emb_head_dim] and split [nope, rope] per head; `linear_kv_up_proj` as
      [heads, qk_head_dim + v_head_dim] split [k_nope, v] per head: column parallel, so each TP rank holds whole
      heads, each with its rows together. `linear_proj` is row parallel over the same heads. The RoPE rows keep
      HF's order: Megatron's MLA RoPE (rope_utils, multi_latent_attention=True) reads them interleaved, as HF's
      rope_interleave=True does.
    - Router (moe/router.py): weight [experts, hidden] and the persistent fp32 buffer `expert_bias`, not split.
    - Shared experts (moe/shared_experts.py): an MLP of moe_shared_expert_intermediate_size, fc1 = [gate; up]
      column parallel like the dense MLP, fc2 row parallel; no gate_weight (DeepSeek has no shared-expert gate).
    - Dense first layer (first_k_dense_replace=1): TE dense MLP with post_attention_layernorm fused into linear_fc1.
    """
    src = tiny_hf("deepseek-v3")
    hf = _hf_with_random_expert_bias(src, tmp_path / "hf")
    cfg = json.loads((src / "config.json").read_text())
    hidden, heads, experts = cfg["hidden_size"], cfg["num_attention_heads"], cfg["n_routed_experts"]
    q_lora, kv_lora = cfg["q_lora_rank"], cfg["kv_lora_rank"]
    nope, rope, v_dim = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    ffn, moe_ffn = cfg["intermediate_size"], cfg["moe_intermediate_size"] * cfg["n_shared_experts"]
    assert (heads, nope, rope, v_dim, experts, cfg["first_k_dense_replace"], cfg["num_hidden_layers"]) == (8, 16, 8, 16, 8, 1, 4)
    assert nope != rope and q_lora != kv_lora  # unequal part sizes: a swapped split order moves rows
    tp, ep = 2, 2
    local_heads, local_experts = heads // tp, experts // ep

    ckpt = api.import_hf(tmp_path / "hf", tmp_path / "ck", ParallelLayout(tp=tp, ep=ep))
    files = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*.pt"))
    assert files == [f"release/mp_rank_{t:02d}_{e:03d}/model_optim_rng.pt" for t in range(tp) for e in range(ep)]

    def attention_keys(i: int) -> set[str]:
        p = f"decoder.layers.{i}."
        a = p + "self_attention."
        return {p + "input_layernorm.weight", a + "linear_q_down_proj.weight", a + "linear_q_up_proj.layer_norm_weight",
                a + "linear_q_up_proj.weight", a + "linear_kv_down_proj.weight", a + "linear_kv_up_proj.layer_norm_weight",
                a + "linear_kv_up_proj.weight", a + "linear_proj.weight"}

    def moe_keys(i: int) -> set[str]:
        m = f"decoder.layers.{i}.mlp."
        return {f"decoder.layers.{i}.pre_mlp_layernorm.weight", m + "router.weight", m + "router.expert_bias",
                m + "shared_experts.linear_fc1.weight", m + "shared_experts.linear_fc2.weight",
                *(m + f"experts.local_experts.{j}.linear_fc{n}.weight" for j in range(local_experts) for n in (1, 2))}

    dense0 = {"decoder.layers.0.mlp.linear_fc1.layer_norm_weight", "decoder.layers.0.mlp.linear_fc1.weight",
              "decoder.layers.0.mlp.linear_fc2.weight"}
    expected_keys = ({"embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"} | dense0
                     | set().union(*(attention_keys(i) for i in range(4))) | set().union(*(moe_keys(i) for i in (1, 2, 3))))

    def heads_of(w: torch.Tensor, per_head: list[int], t: int) -> torch.Tensor:
        """Rows of TP rank t's heads of a per-head-packed projection: per head, its parts in order, kept together."""
        size = sum(per_head)
        parts = []
        for h in range(t * local_heads, (t + 1) * local_heads):
            at = h * size
            for n in per_head:
                parts.append(w[at:at + n])
                at += n
        return torch.cat(parts)

    for t in range(tp):
        for e in range(ep):
            state = load_pt(ckpt / f"release/mp_rank_{t:02d}_{e:03d}/model_optim_rng.pt")
            args, m = state["args"], state["model"]
            assert (args.tensor_model_parallel_size, args.expert_model_parallel_size, args.transformer_impl) == (tp, ep, "transformer_engine")
            # qk_layernorm is what makes Megatron build the up projections with their fused a-layernorms.
            assert args.multi_latent_attention is True and args.qk_layernorm is True
            assert (args.q_lora_rank, args.kv_lora_rank, args.qk_head_dim, args.qk_pos_emb_head_dim, args.v_head_dim) == (q_lora, kv_lora, nope, rope, v_dim)
            assert args.moe_layer_freq == [0, 1, 1, 1] and args.num_experts == experts
            assert args.moe_router_enable_expert_bias is True and args.moe_shared_expert_intermediate_size == moe_ffn
            assert args.moe_shared_expert_gate is False

            assert {k for k in m if not k.endswith("._extra_state")} == expected_keys
            for module in ("linear_q_down_proj", "linear_q_up_proj", "linear_kv_down_proj", "linear_kv_up_proj",
                           "core_attention", "linear_proj"):
                assert f"decoder.layers.1.self_attention.{module}._extra_state" in m, module
            assert not any("q_layernorm" in k or "kv_layernorm" in k or "linear_qkv" in k for k in m)

            for i in range(4):  # every layer's attention; layer i is HF layer i (PP=1)
                a, h = f"decoder.layers.{i}.self_attention.", f"model.layers.{i}.self_attn."
                assert torch.equal(m[f"decoder.layers.{i}.input_layernorm.weight"], hf[f"model.layers.{i}.input_layernorm.weight"])
                # Replicated: the down projections and the fused a-layernorms.
                assert torch.equal(m[a + "linear_q_down_proj.weight"], hf[h + "q_a_proj.weight"])
                assert torch.equal(m[a + "linear_q_up_proj.layer_norm_weight"], hf[h + "q_a_layernorm.weight"])
                assert torch.equal(m[a + "linear_kv_up_proj.layer_norm_weight"], hf[h + "kv_a_layernorm.weight"])
                kv_down = m[a + "linear_kv_down_proj.weight"]
                assert kv_down.shape == (kv_lora + rope, hidden)
                kv_a = hf[h + "kv_a_proj_with_mqa.weight"]
                assert torch.equal(kv_down[:kv_lora], kv_a[:kv_lora])  # latent rows first
                assert torch.equal(kv_down[kv_lora:], kv_a[kv_lora:])  # then the shared RoPE key rows
                # Column parallel over heads: rank t holds heads t*4..t*4+3, each head's rows together.
                q_up = m[a + "linear_q_up_proj.weight"]
                assert q_up.shape == (local_heads * (nope + rope), q_lora)
                assert torch.equal(q_up, heads_of(hf[h + "q_b_proj.weight"], [nope, rope], t))
                kv_up = m[a + "linear_kv_up_proj.weight"]
                assert kv_up.shape == (local_heads * (nope + v_dim), kv_lora)
                assert torch.equal(kv_up, heads_of(hf[h + "kv_b_proj.weight"], [nope, v_dim], t))
                # Row parallel: the input columns of the same heads' values.
                o = hf[h + "o_proj.weight"]
                assert torch.equal(m[a + "linear_proj.weight"], o[:, t * local_heads * v_dim:(t + 1) * local_heads * v_dim])

            # Dense first layer: post_attention_layernorm fused into fc1, fc1 = [gate_t; up_t], fc2 split on dim 1.
            d = "model.layers.0.mlp."
            assert torch.equal(m["decoder.layers.0.mlp.linear_fc1.layer_norm_weight"], hf["model.layers.0.post_attention_layernorm.weight"])
            rows = slice(t * ffn // tp, (t + 1) * ffn // tp)
            assert torch.equal(m["decoder.layers.0.mlp.linear_fc1.weight"], torch.cat([hf[d + "gate_proj.weight"][rows], hf[d + "up_proj.weight"][rows]]))
            assert torch.equal(m["decoder.layers.0.mlp.linear_fc2.weight"], hf[d + "down_proj.weight"][:, rows])

            for i in (1, 2, 3):
                p, s = f"decoder.layers.{i}.mlp.", f"model.layers.{i}.mlp."
                assert torch.equal(m[f"decoder.layers.{i}.pre_mlp_layernorm.weight"], hf[f"model.layers.{i}.post_attention_layernorm.weight"])
                # Router: whole on every rank; the score-correction bias is Megatron's fp32 expert_bias.
                assert torch.equal(m[p + "router.weight"], hf[s + "gate.weight"])
                bias = m[p + "router.expert_bias"]
                assert bias.dtype == torch.float32 and torch.count_nonzero(bias) == experts
                assert torch.equal(bias, hf[s + "gate.e_score_correction_bias"])
                # Shared experts: like the dense MLP at moe_shared_expert_intermediate_size.
                rows = slice(t * moe_ffn // tp, (t + 1) * moe_ffn // tp)
                gate, up = hf[s + "shared_experts.gate_proj.weight"], hf[s + "shared_experts.up_proj.weight"]
                assert torch.equal(m[p + "shared_experts.linear_fc1.weight"], torch.cat([gate[rows], up[rows]]))
                assert torch.equal(m[p + "shared_experts.linear_fc2.weight"], hf[s + "shared_experts.down_proj.weight"][:, rows])
                # Routed experts of this EP rank, local index j = global e*4+j, split over TP (ETP = TP).
                erows = slice(t * cfg["moe_intermediate_size"] // tp, (t + 1) * cfg["moe_intermediate_size"] // tp)
                for j in range(local_experts):
                    x = f"{s}experts.{e * local_experts + j}."
                    assert torch.equal(m[f"{p}experts.local_experts.{j}.linear_fc1.weight"],
                                       torch.cat([hf[x + "gate_proj.weight"][erows], hf[x + "up_proj.weight"][erows]]))
                    assert torch.equal(m[f"{p}experts.local_experts.{j}.linear_fc2.weight"], hf[x + "down_proj.weight"][:, erows])


def test_qwen2_moe_shared_expert_and_gate_tp2(tiny_hf, tmp_path: Path) -> None:
    """Qwen2-MoE's gated shared expert at TP=2, from Megatron Core's moe/shared_experts.py: SharedExpertMLP is an MLP
    (fc1 = [gate; up] column parallel, fc2 row parallel) plus `gate_weight` [1, hidden] for the sigmoid gate, which
    is a plain parameter, not split over TP (only marked sequence_parallel). The router weight is not split either."""
    src = tiny_hf("qwen2-moe")
    hf = load_file(src / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    shared, experts, hidden = cfg["shared_expert_intermediate_size"], cfg["num_experts"], cfg["hidden_size"]
    assert shared not in (cfg["moe_intermediate_size"], cfg["intermediate_size"]) and cfg["mlp_only_layers"] == [2]
    ckpt = api.import_hf(src, tmp_path / "ck", ParallelLayout(tp=2))
    for t in range(2):
        state = load_pt(ckpt / f"release/mp_rank_{t:02d}/model_optim_rng.pt")
        args, m = state["args"], state["model"]
        assert args.moe_shared_expert_intermediate_size == shared and args.moe_shared_expert_gate is True
        assert args.moe_layer_freq == [1, 1, 0, 1]
        for i in (0, 1, 3):
            p, s = f"decoder.layers.{i}.mlp.", f"model.layers.{i}.mlp."
            assert {k for k in m if k.startswith(p) and not k.endswith("._extra_state")} == {
                p + "router.weight", p + "shared_experts.linear_fc1.weight", p + "shared_experts.linear_fc2.weight",
                p + "shared_experts.gate_weight",
                *(p + f"experts.local_experts.{j}.linear_fc{n}.weight" for j in range(experts) for n in (1, 2))}
            assert torch.equal(m[f"decoder.layers.{i}.pre_mlp_layernorm.weight"], hf[f"model.layers.{i}.post_attention_layernorm.weight"])
            assert torch.equal(m[p + "router.weight"], hf[s + "gate.weight"])
            rows = slice(t * shared // 2, (t + 1) * shared // 2)
            gate, up = hf[s + "shared_expert.gate_proj.weight"], hf[s + "shared_expert.up_proj.weight"]
            assert torch.equal(m[p + "shared_experts.linear_fc1.weight"], torch.cat([gate[rows], up[rows]]))
            assert torch.equal(m[p + "shared_experts.linear_fc2.weight"], hf[s + "shared_expert.down_proj.weight"][:, rows])
            gate_weight = m[p + "shared_experts.gate_weight"]
            assert gate_weight.shape == (1, hidden)
            assert torch.equal(gate_weight, hf[s + "shared_expert_gate.weight"])
        # mlp_only_layers: layer 2 is a dense TE MLP with no router, experts or shared expert.
        assert not any(k.startswith("decoder.layers.2.mlp.") and ("router" in k or "experts" in k) for k in m)
        assert "decoder.layers.2.mlp.linear_fc1.layer_norm_weight" in m
