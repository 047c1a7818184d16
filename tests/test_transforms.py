"""Pure transforms: fuse/split round trips and the exact Megatron QKV grouping."""
import torch

from bridge.config import ModelConfig
from bridge.transforms import fuse_gate_up, fuse_qkv, split_gate_up, split_qkv


def cfg(heads: int = 8, groups: int = 2, d: int = 4, h: int = 16) -> ModelConfig:
    return ModelConfig(architecture="LlamaForCausalLM", num_layers=2, hidden_size=h, ffn_hidden_size=32,
                       num_attention_heads=heads, num_query_groups=groups, kv_channels=d, vocab_size=10,
                       max_position_embeddings=32)


def test_qkv_grouping_matches_hand_built_layout() -> None:
    c = cfg()
    # Each row's first element encodes (source, row index) so the layout is readable.
    q = torch.arange(8 * 4).float().unsqueeze(1).repeat(1, 16)
    k = 1000 + torch.arange(2 * 4).float().unsqueeze(1).repeat(1, 16)
    v = 2000 + torch.arange(2 * 4).float().unsqueeze(1).repeat(1, 16)
    fused = fuse_qkv(q, k, v, c)
    assert fused.shape == ((8 + 2 * 2) * 4, 16)
    expected_rows = (list(range(0, 16)) + [1000 + i for i in range(0, 4)] + [2000 + i for i in range(0, 4)]
                     + list(range(16, 32)) + [1000 + i for i in range(4, 8)] + [2000 + i for i in range(4, 8)])
    assert fused[:, 0].tolist() == expected_rows


def test_qkv_round_trip_weights_and_biases() -> None:
    c = cfg(heads=6, groups=3, d=5, h=7)
    q, k, v = torch.randn(30, 7), torch.randn(15, 7), torch.randn(15, 7)
    for tensors in ((q, k, v), (q[:, 0], k[:, 0], v[:, 0])):
        back = split_qkv(fuse_qkv(*tensors, c), c)
        assert all(torch.equal(a, b) for a, b in zip(tensors, back))


def test_mha_qkv_is_per_head_interleaved() -> None:
    c = cfg(heads=2, groups=2, d=1, h=1)
    fused = fuse_qkv(torch.tensor([[0.0], [1.0]]), torch.tensor([[10.0], [11.0]]), torch.tensor([[20.0], [21.0]]), c)
    assert fused[:, 0].tolist() == [0, 10, 20, 1, 11, 21]


def test_gate_up_round_trip_and_order() -> None:
    gate, up = torch.randn(6, 4), torch.randn(6, 4)
    fc1 = fuse_gate_up(gate, up, cfg())
    assert torch.equal(fc1[:6], gate) and torch.equal(fc1[6:], up)
    g2, u2 = split_gate_up(fc1, cfg())
    assert torch.equal(g2, gate) and torch.equal(u2, up)
