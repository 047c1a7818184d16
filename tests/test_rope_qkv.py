"""The Triton split + RoPE kernels (bridge.nn.rope_qkv) against the plain formula, on the CPU.

CI has no GPU, so the kernels run in Triton's interpreter (TRITON_INTERPRET=1, read when a kernel is
defined: hence a fresh process) on fp32 tensors (the interpreter cannot store bf16). The same kernel
code runs compiled on CUDA.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="Triton is in the test extra on Linux x86-64")

SCRIPT = r'''
import torch
from bridge.config import ModelConfig
from bridge.layout import ParallelLayout
from bridge.nn import rope_qkv
from bridge.nn.gpt import GPTModel
from bridge.nn.rope import apply_rope
from bridge.parallel.state import ParallelState


def reference(qkv, cos, sin, groups, hpg):
    s, b, width = qkv.shape
    d = width // (groups * (hpg + 2))
    q, k, v = qkv.view(s, b, groups, (hpg + 2) * d).split([hpg * d, d, d], -1)
    q = q.reshape(s, b, groups * hpg, d)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def check_op(s, b, groups, hpg, d, broadcast_b, sin_contiguous=False):
    gen = torch.Generator().manual_seed(s)
    qkv = torch.randn(s, b, groups * (hpg + 2) * d, generator=gen, requires_grad=True)
    theta = torch.rand(s, 1 if broadcast_b else b, 1, d // 2, generator=gen) * 50
    emb = torch.cat([theta, theta], -1)
    cos, sin = emb.cos().expand(s, b, 1, d), emb.sin().expand(s, b, 1, d)  # b-stride 0 when broadcast
    assert (cos.stride(1) == 0) == (broadcast_b and b > 1)
    if sin_contiguous:  # cos and sin with different strides: the kernel addresses both with one set
        sin = sin.contiguous()
    ours, theirs = rope_qkv.rope_qkv(qkv, cos, sin, groups, hpg), reference(qkv, cos, sin, groups, hpg)
    for a, r in zip(ours, theirs, strict=True):
        assert a.shape == r.shape and a.is_contiguous(), (a.shape, r.shape)
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)
    grads = [torch.randn(r.shape, generator=gen) for r in theirs]
    grads[0] = torch.randn(b, groups * hpg, s, d, generator=gen).permute(2, 0, 1, 3)  # strides as SDPA returns them
    ours_grad, = torch.autograd.grad(ours, qkv, grads)
    ref_grad, = torch.autograd.grad(theirs, qkv, grads)
    torch.testing.assert_close(ours_grad, ref_grad, rtol=1e-5, atol=1e-5)


for shape in [(37, 2, 3, 2, 16, False), (64, 1, 1, 1, 8, True), (5, 3, 2, 4, 32, True), (9, 3, 1, 2, 16, True, True)]:
    check_op(*shape)


# A whole model: logits and every weight's gradient equal with and without the kernels.
cfg = ModelConfig(architecture="LlamaForCausalLM", num_layers=2, hidden_size=64, ffn_hidden_size=96,
                  num_attention_heads=8, num_query_groups=2, kv_channels=16, vocab_size=50,
                  max_position_embeddings=64)
ps = ParallelState(ParallelLayout(), 1, 0, create_groups=False)
torch.manual_seed(0)
model = GPTModel(cfg, ps, transformer_impl="local")
with torch.no_grad():
    for p in model.parameters():
        p.normal_(0, 0.2)
tokens = torch.randint(0, 50, (2, 24))
results = []
for use_kernel in (True, False):
    rope_qkv.set_rope_fusion(use_kernel)  # --no-rope-fusion
    calls = []
    real = rope_qkv.rope_qkv
    rope_qkv.rope_qkv = lambda *a: calls.append(1) or real(*a)
    model.zero_grad()
    logits = model(tokens)
    logits.square().mean().backward()
    results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    rope_qkv.rope_qkv = real
    assert len(calls) == (cfg.num_layers if use_kernel else 0), calls
torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
for name in results[0][1]:
    torch.testing.assert_close(results[0][1][name], results[1][1][name], rtol=1e-4, atol=1e-5, msg=name)
print("ok")
'''


def test_kernels_equal_the_plain_formula_forward_and_backward() -> None:
    """Several group/head/dim shapes, odd sequence lengths (a partial last block), cos/sin shared over the
    batch (stride 0) or not, gradients with SDPA's strides; then a 2-layer model's logits and every
    gradient, with and without the kernels (--no-rope-fusion)."""
    path = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-4000:]


def test_unsupported_shapes_and_devices_keep_the_plain_formula() -> None:
    import torch

    from bridge.nn import rope_qkv

    cpu = torch.zeros(4)
    assert rope_qkv.supported(cpu, 64) == (os.environ.get("TRITON_INTERPRET") == "1")  # CPU: interpreter only
    assert not rope_qkv.supported(torch.zeros(4, device="meta"), 64)
    for head_dim in (96, 80, 1, 0):  # half not a power of two: tl.arange cannot tile it
        assert not rope_qkv.supported(cpu, head_dim)


@pytest.mark.parametrize("arch", [90, 80])
def test_kernels_compile_for_the_gpus(arch: int) -> None:
    """The interpreter checks the maths but not Triton's typing; this compiles both kernels ahead of time down
    to a cubin for Hopper and Ampere (no GPU needed), with the dtypes and head dims training uses."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import triton
    from bridge.nn import rope_qkv

    for kernel in (rope_qkv._rope_qkv_fwd, rope_qkv._rope_qkv_bwd):
        for dtype in ("bf16", "fp32"):
            for head_dim in (64, 128):
                constexprs = {"HPG": 4, "D": head_dim, "BLOCK_S": rope_qkv.BLOCK_S}
                signature = {name: "constexpr" if name in constexprs else "i32" for name in kernel.arg_names}
                signature.update({name: f"*{dtype}" for name in ("qkv", "cos", "sin", "q", "k", "v", "dq", "dk", "dv",
                                                                 "dqkv") if name in signature})
                compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                          target=GPUTarget("cuda", arch, 32))
                assert compiled.asm["cubin"], (kernel.fn.__name__, dtype, head_dim)
