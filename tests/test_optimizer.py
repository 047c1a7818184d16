"""bridge's flat AdamW (one elementwise update per buffer range, clipping and skip decided on the device) against
torch.optim.AdamW with torch's gradient clipping: same weights after several steps, weight decay on matrices only,
non-finite gradients skip the step, and the optimizer state survives a state_dict round trip."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bridge.layout import ParallelLayout
from bridge.parallel.state import ParallelState
from bridge.training.grads import ParamAndGradBuffer
from bridge.training.optimizer import STATE_NAMES, AdamConfig, MixedPrecisionAdamW, state_key

CFG = AdamConfig(lr=1e-2, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8, clip_grad=1.0)


class TinyChunk(nn.Module):
    """Two matrices (decayed) and a norm weight (not decayed), as the buffer sees a model chunk."""

    def __init__(self) -> None:
        super().__init__()
        self.cfg = SimpleNamespace(tie_word_embeddings=False)
        self.up = nn.Parameter(torch.randn(24, 8))
        self.norm = nn.Parameter(torch.ones(24))
        self.down = nn.Parameter(torch.randn(8, 24))

    def shared_embedding_or_output_weight(self) -> None:
        return None


def setup(dtype: torch.dtype, bucket_size: int) -> tuple[TinyChunk, ParamAndGradBuffer, MixedPrecisionAdamW]:
    torch.manual_seed(0)
    chunk = TinyChunk()
    ps = ParallelState(ParallelLayout(), 1, 0, create_groups=False)
    buffer = ParamAndGradBuffer([chunk], ps, param_dtype=dtype, grad_dtype=dtype, bucket_size=bucket_size,
                                distributed=False, sequence_parallel=False)
    return chunk, buffer, MixedPrecisionAdamW(buffer, ps, CFG)


def reference(grads: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    chunk = TinyChunk()
    params = dict(chunk.named_parameters())
    adam = torch.optim.AdamW([{"params": [params["up"], params["down"]], "weight_decay": CFG.weight_decay},
                              {"params": [params["norm"]], "weight_decay": 0.0}],
                             lr=CFG.lr, betas=(CFG.beta1, CFG.beta2), eps=CFG.eps)
    for g in grads:
        for name, p in params.items():
            p.grad = g[name].clone()
        norm = torch.nn.utils.clip_grad_norm_(chunk.parameters(), CFG.clip_grad)
        if math.isfinite(norm):
            adam.step()
    return {n: p.detach() for n, p in params.items()}


def random_grads(steps: int, scale: float) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    shapes = {"up": (24, 8), "norm": (24,), "down": (8, 24)}
    return [{n: torch.randn(s, generator=gen) * scale for n, s in shapes.items()} for _ in range(steps)]


def train(chunk: TinyChunk, buffer: ParamAndGradBuffer, opt: MixedPrecisionAdamW,
          grads: list[dict[str, torch.Tensor]]) -> list[float]:
    norms = []
    for g in grads:
        for name, p in chunk.named_parameters():
            p.main_grad.copy_(g[name])
        norms.append(float(opt.step(CFG.lr)))
        buffer.clear_grads()
    return norms


@pytest.mark.parametrize("bucket_size", [10_000, 100], ids=["one-range", "many-buckets"])
@pytest.mark.parametrize("scale", [0.01, 10.0], ids=["unclipped", "clipped"])
def test_matches_torch_adamw_with_clipping(bucket_size: int, scale: float) -> None:
    grads = random_grads(5, scale)
    chunk, buffer, opt = setup(torch.float32, bucket_size)
    norms = train(chunk, buffer, opt, grads)
    expected = reference(grads)
    for name, p in chunk.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-5, atol=1e-6)
    first = torch.cat([g.reshape(-1) for g in grads[0].values()]).norm()
    assert norms[0] == pytest.approx(float(first), rel=1e-6)
    assert (norms[0] > CFG.clip_grad) == (scale > 1)


def test_non_finite_gradient_skips_the_step() -> None:
    grads = random_grads(4, 1.0)
    grads[1]["up"][0, 0] = float("nan")
    chunk, buffer, opt = setup(torch.float32, 10_000)
    norms = train(chunk, buffer, opt, grads)
    assert math.isnan(norms[1])
    assert int(opt.step_count) == 3
    expected = reference(grads)  # torch's loop skips the same step
    for name, p in chunk.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-5, atol=1e-6)


def test_bf16_parameters_take_the_rounded_fp32_master() -> None:
    chunk, buffer, opt = setup(torch.bfloat16, 100)
    train(chunk, buffer, opt, random_grads(3, 1.0))
    for piece in opt.pieces:
        assert torch.equal(buffer.param_data[piece.lo:piece.hi], piece.state("master").to(torch.bfloat16))
    assert not torch.equal(opt.spans[0].master.to(torch.bfloat16).float(), opt.spans[0].master)


def whole_state(opt: MixedPrecisionAdamW) -> dict:
    """The legacy checkpoint's optimizer entry: the header and whole tensors per weight name (one rank, so one piece
    per weight)."""
    return {**opt.header(), "params": {state_key(opt.chunks, p.entry): {n: p.state(n).clone().view(p.entry.param.shape)
                                                                        for n in STATE_NAMES} for p in opt.pieces}}


def test_state_dict_round_trip_continues_identically() -> None:
    grads = random_grads(6, 1.0)
    chunk, buffer, opt = setup(torch.float32, 100)
    train(chunk, buffer, opt, grads[:3])
    state = whole_state(opt)
    assert state["step"] == 3 and set(state["params"]) == {"model.up", "model.norm", "model.down"}
    train(chunk, buffer, opt, grads[3:])
    chunk2, buffer2, opt2 = setup(torch.float32, 10_000)  # another bucket layout: the state is keyed by name
    opt2.load_state_dict(state)
    train(chunk2, buffer2, opt2, grads[3:])
    for (name, p), p2 in zip(chunk.named_parameters(), chunk2.parameters()):
        assert torch.equal(p, p2), name


def test_gradients_are_fp32_under_bf16_unless_reduced_in_bf16() -> None:
    """Megatron-LM's rule: --bf16 accumulates and all-reduces gradients in fp32 unless --grad-reduce-in-bf16."""
    from bridge.training.config import TrainConfig
    from bridge.training.state import grad_dtype

    assert grad_dtype(TrainConfig()) == torch.float32
    assert grad_dtype(TrainConfig(bf16=True)) == torch.float32
    assert grad_dtype(TrainConfig(bf16=True, grad_reduce_in_bf16=True)) == torch.bfloat16


@pytest.mark.parametrize("buffer_dtype", [torch.float32, torch.bfloat16])
def test_fused_weight_gradient_adds_bf16_products_into_the_buffer(buffer_dtype: torch.dtype) -> None:
    """The fused weight-gradient GEMM adds grad^T x to what the buffer holds, in the buffer's precision: bf16
    activations into an fp32 buffer are summed in fp32 (no bf16 rounding of the product)."""
    from bridge.nn.layers import accumulate_weight_grad

    g = torch.Generator().manual_seed(0)
    grad_out = torch.randn(3, 5, 6, generator=g).to(torch.bfloat16)  # [s, b, out]
    x = torch.randn(3, 5, 4, generator=g).to(torch.bfloat16)  # [s, b, in]
    start = torch.randn(6, 4, generator=g)
    main_grad = start.to(buffer_dtype).clone()
    accumulate_weight_grad(main_grad, grad_out, x)
    exact = start.to(buffer_dtype).double() + grad_out.reshape(15, 6).double().t() @ x.reshape(15, 4).double()
    assert main_grad.dtype == buffer_dtype
    tolerance = 1e-5 if buffer_dtype == torch.float32 else exact.abs().max().item() * 2 ** -8  # bf16: one rounding
    assert torch.allclose(main_grad.double(), exact, rtol=0, atol=tolerance), (main_grad.double() - exact).abs().max()
    if buffer_dtype == torch.float32:  # the bf16 result would be visibly coarser: the fp32 path is really taken
        assert (main_grad.double() - exact).abs().max() < (exact.to(torch.bfloat16).double() - exact).abs().max()


def test_update_compiles_without_searching_kernel_configurations(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the in-place AdamW update is compiled with inductor's pointwise autotuning off (bridge.fused): the
    search saves every mutated argument first, at the 8B shape GiBs of pinned host memory per optimizer buffer."""
    from bridge import fused as fused_module

    compiled: list[dict] = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(kw) or fn)
    monkeypatch.setattr(fused_module, "_COMPILED", {})
    seen: list[dict] = []
    real = fused_module.fused
    monkeypatch.setattr("bridge.training.optimizer.fused",
                        lambda fn, device, **kw: seen.append(kw) or real(fn, torch.device("cuda"), **kw))
    setup(torch.float32, 1 << 20)
    assert seen == [{"dynamic": True, "in_place": True}]
    assert compiled == [{"dynamic": True, "options": {"triton.autotune_pointwise": False}}]


class WideChunk(TinyChunk):
    """TinyChunk's parameters at 32M elements (128 MiB in fp32), so their copies show in the process's peak RSS."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Parameter(torch.randn(8192, 4096))
        self.norm = nn.Parameter(torch.ones(8192))


def _rss(field: str) -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's peak-RSS reset")
def test_building_the_optimizer_peaks_at_what_it_keeps() -> None:
    """The fp32 copy the buffer keeps for the masters is never alive beside the masters and moments: building the
    optimizer raises the peak RSS by what the optimizer keeps, not by another fp32 copy of every weight."""
    chunk = WideChunk()
    ps = ParallelState(ParallelLayout(), 1, 0, create_groups=False)
    buffer = ParamAndGradBuffer([chunk], ps, param_dtype=torch.bfloat16, grad_dtype=torch.float32, bucket_size=None,
                                distributed=False, sequence_parallel=False)
    fp32_bytes = buffer.param_data.numel() * 4
    Path("/proc/self/clear_refs").write_text("5\n")  # VmHWM := VmRSS
    opt = MixedPrecisionAdamW(buffer, ps, CFG)
    overshoot = _rss("VmHWM:") - _rss("VmRSS:")
    assert opt.spans  # alive until the RSS is read
    assert overshoot < fp32_bytes // 4, f"peak RSS was {overshoot / 2**20:.0f} MiB above what the optimizer keeps"


def test_masters_split_into_bf16_and_a_remainder_and_join_bit_for_bit() -> None:
    """fp32 -> (bf16, int16) -> fp32 is the identity on every finite value, signed zeros and subnormals included;
    the bf16 half is torch's round-to-nearest except at exact ties, which go away from zero."""
    from bridge.training.optimizer import join_master, split_master

    gen = torch.Generator().manual_seed(0)
    values = torch.cat([torch.randn(10_000, generator=gen) * 10.0 ** torch.randint(-30, 30, (10_000,), generator=gen),
                        torch.tensor([0.0, -0.0, 1e-40, -1e-40, 3.0e38, -3.0e38, 1.0, -1.0])])
    high, low = split_master(values)
    assert high.dtype == torch.bfloat16 and low.dtype == torch.int16
    assert torch.equal(join_master(high, low).view(torch.int32), values.view(torch.int32))
    assert torch.equal(high, values.to(torch.bfloat16))  # no exact ties among these
    ties = torch.tensor([1.0 + 2.0**-8, -(1.0 + 2.0**-8), 1.0 + 3 * 2.0**-8])  # halfway between bf16 neighbours
    high, low = split_master(ties)
    assert high.tolist() == [1.0 + 2.0**-7, -(1.0 + 2.0**-7), 1.0 + 2 * 2.0**-7]  # away from zero (RNE: 1, -1, 1+2^-6)
    assert torch.equal(join_master(high, low), ties)


def test_remainders_keep_the_same_masters_in_half_the_bytes() -> None:
    """--use-precision-aware-optimizer: the same fp32 masters bit for bit after every step, kept as int16 beside the
    bf16 parameters, which are the masters rounded; the state a checkpoint takes is the fp32 masters, and a run
    without remainders continues from it identically."""
    grads = random_grads(6, 1.0)
    plain = setup(torch.bfloat16, 100)
    torch.manual_seed(0)
    chunk = TinyChunk()
    ps = ParallelState(ParallelLayout(), 1, 0, create_groups=False)
    buffer = ParamAndGradBuffer([chunk], ps, param_dtype=torch.bfloat16, grad_dtype=torch.bfloat16, bucket_size=100,
                                distributed=False, sequence_parallel=False)
    opt = MixedPrecisionAdamW(buffer, ps, AdamConfig(**{**vars(CFG), "param_remainders": True}))
    assert all(span.master.dtype == torch.int16 for span in opt.spans)
    for g in (grads[:1], grads[1:3]):
        train(*plain, g)
        train(chunk, buffer, opt, g)
        for mine, theirs in zip(opt.pieces, plain[2].pieces):
            assert torch.equal(mine.state("master"), theirs.state("master"))
            assert torch.equal(buffer.param_data[mine.lo:mine.hi], mine.state("master").to(torch.bfloat16))
    state = whole_state(opt)
    chunk2, buffer2, opt2 = setup(torch.bfloat16, 10_000)
    opt2.load_state_dict(state)
    train(chunk2, buffer2, opt2, grads[3:])
    train(chunk, buffer, opt, grads[3:])
    for mine, theirs in zip(opt.pieces, opt2.pieces):
        assert torch.equal(mine.state("master"), theirs.state("master"))


def test_remainders_round_every_weight_the_same_way_on_every_dp_rank() -> None:
    """With the distributed optimizer a rank owns part of the masters, yet it rounds all the weights as their owners
    do (ties away from zero), so data-parallel replicas compute with the same weights from the first step."""
    torch.manual_seed(0)
    chunk = TinyChunk()
    with torch.no_grad():
        for p in chunk.parameters():
            p.fill_(1.0 + 2.0**-8)  # halfway between two bf16 values: round-to-nearest-even goes down, ours up
    ps = ParallelState(ParallelLayout(), 2, 0, create_groups=False)  # DP rank 0 of 2
    buffer = ParamAndGradBuffer([chunk], ps, param_dtype=torch.bfloat16, grad_dtype=torch.float32, bucket_size=100,
                                distributed=True, sequence_parallel=False)
    opt = MixedPrecisionAdamW(buffer, ps, AdamConfig(**{**vars(CFG), "param_remainders": True}))
    owned = sum(span.hi - span.lo for span in opt.spans)
    assert owned < buffer.param_data.numel()  # some weights belong to the other rank
    assert all(p.eq(1.0 + 2.0**-7).all() for p in chunk.parameters())
