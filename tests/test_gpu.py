"""GPU checks over NCCL, one GPU per rank: verify at real widths, CP and SP with MoE and MLA, compiled = eager.

    python -m pytest -m gpu tests/test_gpu.py          # 2 CUDA GPUs (some need 1, the TP=2 x EP=2 ones 4)

Every model is built here with random weights (no download). With purely random weights the top logits of a large
vocabulary lie within bf16 noise of each other, so bf16 top-1 agreement would measure rounding: the embedding is
scaled to unit variance (the residual stream then carries the token, and the model has clear preferences as a
trained one does; under a final logit softcap, less: see random_hf) and the norms are perturbed; attention and MLP
still contribute to every logit checked.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from bridge.api import import_hf
from bridge.layout import ParallelLayout
from bridge.apps.verify import verify
from tests.model_fixtures import real_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def gpus(n: int) -> pytest.MarkDecorator:
    return pytest.mark.skipif(torch.cuda.device_count() < n, reason=f"needs {n} CUDA GPUs")


#: DeepSeek-V3's attention (MLA ranks and head sizes: q/k 192, v 128; YaRN) and router (sigmoid, bias, shared
#: expert), narrower and shallower: 3 layers, the first dense, 8 experts of 512.
DEEPSEEK = dict(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", hidden_size=1024,
                intermediate_size=2048, moe_intermediate_size=512, num_hidden_layers=3, first_k_dense_replace=1,
                n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
                norm_topk_prob=True, routed_scaling_factor=2.5, scoring_func="sigmoid", topk_method="noaux_tc",
                num_attention_heads=16, num_key_value_heads=16, q_lora_rank=1536, kv_lora_rank=512,
                qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, rope_theta=10000,
                rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                              "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
                max_position_embeddings=163840, vocab_size=32000, rms_norm_eps=1e-6, tie_word_embeddings=False,
                bos_token_id=0, eos_token_id=1, num_nextn_predict_layers=0, attention_bias=False)
#: Mixtral-8x7B's structure (8 experts, top-2, GQA) at width 1024, 2 layers.
MIXTRAL = dict(architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_size=1024, intermediate_size=2048,
               num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=4, head_dim=64, vocab_size=32000,
               num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.02, rope_theta=1000000.0,
               max_position_embeddings=32768, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1,
               eos_token_id=2, sliding_window=None)
MOE_MODELS = {"deepseek-v3": DEEPSEEK, "mixtral": MIXTRAL}


def random_hf(out: Path, config: dict[str, Any], seed: int = 0) -> Path:
    """The HF model of `config` with seeded random weights, saved in bf16, its embedding scaled so that the logits are
    spread like a trained model's: unit variance, or under a final logit softcap c a standard deviation of c / 6
    over the hidden size's root. Unit variance there puts the capped logits near +-c, where tanh flattens them into
    near-ties: Gemma-2-2B's shape on 6 layers, transformers in bf16 against fp32, agreed on 0% of top-1 tokens that
    way and on 100% scaled (logit std 22.5 against 4.9). Initialised on the GPU: a real-size model's random init
    takes minutes on the CPU."""
    from transformers import AutoConfig, AutoModelForCausalLM

    data = {k: v for k, v in config.items() if k != "_name_or_path"}
    hf_config = AutoConfig.for_model(data.pop("model_type"), **data)
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        cap = getattr(hf_config, "final_logit_softcapping", None)
        emb.mul_((1.0 if cap is None else cap / 6 / hf_config.hidden_size ** 0.5) / emb.std())
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.to(torch.bfloat16).save_pretrained(out)
    return out


def train_losses(ckpt: Path, seq_length: int = 4096, steps: int = 10, **layout: Any) -> list[float]:
    """bf16 training of the checkpoint on mock data, one sequence per DP rank per step -> the loss per step."""
    from bridge.training import TrainConfig, train

    cfg = TrainConfig(load=str(ckpt), mock_data=True, bf16=True, micro_batch_size=1, global_batch_size=2,
                      seq_length=seq_length, train_iters=steps, lr=1e-4, lr_warmup_iters=2, eval_interval=0,
                      eval_iters=1, progress=False, device="cuda", **layout)
    return [r["loss"] for r in train(cfg)["records"]]


def max_rel_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def llama_1b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama-3.2-1B at its real size (config from tests/configs), random weights."""
    config = json.loads(real_config("llama32-tied").read_text())
    return random_hf(tmp_path_factory.mktemp("llama-1b") / "hf", config)


@gpus(2)
@pytest.mark.parametrize("layout,verify_kw", [(ParallelLayout(tp=2), {}), (ParallelLayout(), {"cp": 2})],
                         ids=["tp2", "cp2-ring"])
def test_verify_llama_1b(llama_1b: Path, tmp_path: Path, layout: ParallelLayout, verify_kw: dict) -> None:
    """Import at TP=2 (or TP=1, verified through the CP=2 ring): verify passes in bf16 and in fp32."""
    ckpt = import_hf(llama_1b, tmp_path / "ckpt", layout, dtype="bf16")
    for dtype in ("bf16", "fp32"):
        result = verify(llama_1b, ckpt, dtype=dtype, device="cuda", **verify_kw)
        print(result.table())  # pytest -s shows the figures
        assert result.passed, result.table()


@pytest.mark.parametrize("name", ["gemma2", "phi3"])
def test_verify_real_shape_bf16(name: str, tmp_path: Path) -> None:
    """Gemma-2-2B (softcaps, alternate windows, (1+w) norms) and Phi-3-mini (fused qkv/gate_up, LongRoPE) at their
    real sizes, random weights: `bridge verify --dtype bf16 --device cuda` agrees with transformers on >= 99% of
    top-1 tokens, one GPU."""
    config = json.loads(real_config(name).read_text())
    hf = random_hf(tmp_path / "hf", config)
    ckpt = import_hf(hf, tmp_path / "ckpt", ParallelLayout(), dtype="bf16")
    result = verify(hf, ckpt, dtype="bf16", device="cuda", write_json=False)
    print(result.table())
    assert result.passed and result.overall.top1 >= 0.99, result.table()


def test_verify_gpt_oss_20b_shape_bf16(tmp_path: Path) -> None:
    """GPT-OSS-20b's widths (64 query heads of 64, 8 KV heads, 32 experts of 2880 taking 4, 201088 tokens) and blocks
    (sinks, windows of 128 on alternate layers, YaRN, clamped SwiGLU, biases) on 4 of its 24 layers, random bf16
    weights (the experts unquantised): `bridge verify --dtype bf16 --device cuda` agrees with transformers (its eager
    attention: the one with sinks) on >= 99% of top-1 tokens, one GPU. bridge runs the sinks through compiled
    FlexAttention here, not the CPU's plain softmax."""
    config = json.loads(real_config("gpt-oss").read_text())
    config.update(num_hidden_layers=4, layer_types=config["layer_types"][:4])
    config.pop("quantization_config")
    hf = random_hf(tmp_path / "hf", config)
    ckpt = import_hf(hf, tmp_path / "ckpt", ParallelLayout(), dtype="bf16")
    result = verify(hf, ckpt, dtype="bf16", device="cuda", write_json=False)
    print(result.table())
    assert result.passed and result.overall.top1 >= 0.99, result.table()


@gpus(2)
@pytest.mark.parametrize("model", sorted(MOE_MODELS))
def test_cp2_ep2_moe(model: str, tmp_path: Path) -> None:
    """CP=2 x EP=2: verify passes in fp32 and bf16 (MLA's narrower v travels the ring, its softmax scale goes to the
    ring's kernels), and training at CP=2 gives CP=1's (DP=2) losses on the same global batches."""
    hf = random_hf(tmp_path / "hf", MOE_MODELS[model])
    ckpt = import_hf(hf, tmp_path / "ckpt", ParallelLayout(ep=2), dtype="bf16")
    for dtype in ("fp32", "bf16"):
        result = verify(hf, ckpt, dtype=dtype, device="cuda", cp=2, write_json=False)
        assert result.passed, result.table()
    cp1 = train_losses(ckpt, nproc=2, ep=2)
    cp2 = train_losses(ckpt, nproc=2, ep=2, cp=2)
    assert max_rel_diff(cp2, cp1) < 1e-3, (cp1, cp2)


@gpus(4)
@pytest.mark.parametrize("model", sorted(MOE_MODELS))
def test_sp_tp2_ep2_moe(model: str, tmp_path: Path) -> None:
    """TP=2 x EP=2 with sequence parallelism: fp32 verify passes; bf16 top-1 is that of the run without SP (these
    random models' top-1 against fp32 sits near 98% at TP=2 either way: TP's rounding, not SP's); training gives the
    losses of TP=2 without SP."""
    hf = random_hf(tmp_path / "hf", MOE_MODELS[model])
    ckpt = import_hf(hf, tmp_path / "ckpt", ParallelLayout(ep=2, tp=2, moe_grouped_gemm=True), dtype="bf16")
    result = verify(hf, ckpt, dtype="fp32", device="cuda", sequence_parallel=True, write_json=False)
    assert result.passed, result.table()
    top1 = [verify(hf, ckpt, dtype="bf16", device="cuda", sequence_parallel=sp, write_json=False).overall.top1
            for sp in (False, True)]
    assert abs(top1[1] - top1[0]) < 0.005, top1
    tp2 = train_losses(ckpt, nproc=4, ep=2, tp=2)
    tp2_sp = train_losses(ckpt, nproc=4, ep=2, tp=2, sequence_parallel=True)
    assert max_rel_diff(tp2_sp, tp2) < 1e-3, (tp2, tp2_sp)


def test_fused_weight_grad_accumulation_is_fp32() -> None:
    """The weight-gradient GEMM adds bf16 products into the fp32 buffer unrounded (cuBLAS's bf16 GEMM with an fp32
    output): twice in a row, at the 8B shape's widths, within 1e-4 of fp64, where rounding to bf16 alone is ~2e-3."""
    from bridge.nn.layers import accumulate_weight_grad

    for tokens, out, inp in [(8192, 4096, 4096), (8192, 14336, 4096), (333, 96, 80)]:
        g = torch.Generator(device="cuda").manual_seed(0)
        grad = torch.randn(tokens, 1, out, device="cuda", generator=g).bfloat16()
        x = torch.randn(tokens, 1, inp, device="cuda", generator=g).bfloat16()
        start = torch.randn(out, inp, device="cuda", generator=g)
        buf = start.clone()
        accumulate_weight_grad(buf, grad, x)
        accumulate_weight_grad(buf, grad, x)  # the second call adds to the first
        exact = start.double() + 2 * (grad.reshape(tokens, out).double().t() @ x.reshape(tokens, inp).double())
        assert (buf.double() - exact).abs().max().item() / exact.abs().max().item() < 1e-4


def test_fused_linear_cross_entropy_matches_the_logits_and_peaks_lower() -> None:
    """bf16 on CUDA, compiled passes, a 128k vocabulary and 8192 tokens (the 8B shape's step), softcap on and off: the
    loss and gradients of the chunked output layer + loss against the logits path's (logits whole, autograd), the
    weight's gradient through the fp32 buffer; and the peak memory above the inputs at most half the logits path's."""
    from bridge.nn.cross_entropy import vocab_parallel_cross_entropy
    from bridge.nn.linear_cross_entropy import linear_cross_entropy

    tokens, h, v = 8192, 4096, 128256
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(tokens, 1, h, device="cuda", generator=g).bfloat16().requires_grad_()
    weight = (torch.randn(v, h, device="cuda", generator=g) * 0.02).bfloat16().requires_grad_()
    target = torch.randint(0, v, (tokens, 1), device="cuda", generator=g)
    weights = torch.rand(tokens, 1, device="cuda", generator=g) / tokens
    for cap in (None, 30.0):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        logits = torch.nn.functional.linear(hidden, weight)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        ref = (vocab_parallel_cross_entropy(logits, target, None, 0) * weights).sum()
        ref.backward()
        del logits
        ref_peak = torch.cuda.max_memory_allocated() - base
        ref_dh, ref_dw = hidden.grad, weight.grad.float()
        hidden.grad = weight.grad = None
        weight.fuse_wgrad_accumulation, weight.main_grad = True, torch.zeros(v, h, device="cuda")
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = linear_cross_entropy(hidden, weight, target, weights, None, 0, softcap=cap)
        loss.backward()
        peak = torch.cuda.max_memory_allocated() - base
        assert abs(loss.item() - ref.item()) < 1e-4 * abs(ref.item()), (cap, loss.item(), ref.item())
        for ours, theirs in ((hidden.grad, ref_dh), (weight.main_grad, ref_dw)):
            rel = ((ours.float() - theirs.float()).abs().max() / theirs.float().abs().max()).item()
            assert rel < 2e-2, (cap, rel)  # bf16 products rounded differently
        assert peak < ref_peak / 2, (cap, peak / 2**30, ref_peak / 2**30)
        print(f"softcap {cap}: peak above inputs {peak / 2**30:.2f} GiB against {ref_peak / 2**30:.2f} GiB")
        hidden.grad = None
        del weight.main_grad, weight.fuse_wgrad_accumulation


def test_fused_embedding_gradient_is_the_dense_one_and_deterministic() -> None:
    """The embedding's backward adding token rows into the fp32 buffer (bridge.nn.layers._EmbeddingIntoMainGrad) on
    CUDA, 8192 tokens over a 128k vocabulary with heavy repeats: within fp32 summation order of F.embedding's dense
    gradient, and bitwise the same on a second run."""
    from bridge.nn.layers import _EmbeddingIntoMainGrad

    g = torch.Generator(device="cuda").manual_seed(0)
    weight = torch.randn(128256, 4096, device="cuda", generator=g).bfloat16().requires_grad_()
    tokens = torch.randint(0, 512, (2, 4096), device="cuda", generator=g)  # each token ~16 times
    grad = torch.randn(2, 4096, 4096, device="cuda", generator=g).bfloat16()
    torch.nn.functional.embedding(tokens, weight).backward(grad)
    dense = weight.grad.float()
    runs = []
    for _ in range(2):
        main_grad = torch.zeros(weight.shape, device="cuda")
        _EmbeddingIntoMainGrad.apply(tokens, weight, main_grad).backward(grad)
        runs.append(main_grad)
    assert torch.equal(runs[0], runs[1])
    assert ((runs[0] - dense).abs().max() / dense.abs().max()).item() < 1e-2  # dense: rounded to bf16 once


def test_compiled_update_with_master_remainders_keeps_the_fp32_masters() -> None:
    """The optimizer's compiled update on CUDA with masters as bf16 + int16 remainders against the one on fp32
    masters, three steps over 10M elements with the same gradients: the same masters (to fp32 rounding: two kernels
    may contract multiply-adds differently; bit for bit on the CPU, test_optimizer), the weights exactly the rounded
    upper halves of their own masters."""
    from bridge.fused import fused
    from bridge.training.optimizer import adamw_update, adamw_update_remainders, join_master, split_master

    n, g = 10_000_000, torch.Generator(device="cuda").manual_seed(0)
    master = torch.randn(n, device="cuda", generator=g) * 0.02
    param, remainder = split_master(master.clone())
    plain_param = master.to(torch.bfloat16)
    moments = [torch.zeros(n, device="cuda") for _ in range(4)]
    decay = torch.rand(n, device="cuda", generator=g) > 0.1
    plain, ours = (fused(f, torch.device("cuda"), dynamic=True, in_place=True)
                   for f in (adamw_update, adamw_update_remainders))
    for step in range(1, 4):
        grad = (torch.randn(n, device="cuda", generator=g) * 1e-3).bfloat16()
        scalars = torch.tensor([1e-3, 1 - 0.9**step, (1 - 0.95**step) ** 0.5, 1.0, 1.0], device="cuda")
        plain(master, moments[0], moments[1], grad, decay, plain_param, scalars, 0.9, 0.95, 1e-8, 0.1)
        ours(remainder, moments[2], moments[3], grad, decay, param, scalars, 0.9, 0.95, 1e-8, 0.1)
        joined = join_master(param, remainder)
        assert ((joined - master).abs() <= 2 * torch.finfo(torch.float32).eps * master.abs()).all(), step
        assert torch.equal(param, split_master(joined)[0]), step


def test_rope_kernels_stay_in_the_compiled_graph() -> None:
    """bridge.nn.rope_qkv's Triton kernels are torch.library ops: the compiled split + RoPE is one graph, no break."""
    from bridge.nn.rope_qkv import rope_qkv

    s, b, groups, hpg, d = 256, 2, 4, 4, 64
    qkv = torch.randn(s, b, groups * (hpg + 2) * d, device="cuda", dtype=torch.bfloat16)
    cos, sin = (torch.randn(s, b, 1, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    explained = torch._dynamo.explain(lambda t: rope_qkv(t, cos, sin, groups, hpg))(qkv)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


#: A small dense Llama, and a Mixtral-shaped MoE for expert parallelism (fp32 training runs of a few steps).
SMALL = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=256, intermediate_size=512,
             num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=32, vocab_size=1024,
             tie_word_embeddings=False, rope_theta=10000.0, max_position_embeddings=1024, rms_norm_eps=1e-5,
             bos_token_id=1, eos_token_id=2)
SMALL_MOE = dict(SMALL, architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=4,
                 num_experts_per_tok=2, router_aux_loss_coef=0.02, sliding_window=None)
COMPILED_LAYOUTS = {"tp2": (SMALL, dict(tp=2)), "tp2-sp": (SMALL, dict(tp=2, sequence_parallel=True)),
                    "cp2-p2p": (SMALL, dict(cp=2)), "cp2-all_gather": (SMALL, dict(cp=2, cp_comm_type="all_gather")),
                    "cp2-a2a": (SMALL, dict(cp=2, cp_comm_type="a2a")), "ep2": (SMALL_MOE, dict(ep=2)),
                    "ep2-tp2-sp": (SMALL_MOE, dict(ep=2, tp=2, sequence_parallel=True))}


@pytest.mark.parametrize("name", list(COMPILED_LAYOUTS))
def test_compiled_matches_eager(name: str, tmp_path: Path) -> None:
    """`bridge train --compile` trains as eager does, layout by layout: a collective whose gradient compiles wrong
    (a view or an in-place c10d call inside an autograd.Function) shows at once in the first step's gradient norm.
    A new torch version is where this can break."""
    from bridge.training import TrainConfig, train

    shape, layout = COMPILED_LAYOUTS[name]
    nproc = layout.get("tp", 1) * layout.get("cp", 1) * layout.get("ep", 1)  # data parallel = ep
    if torch.cuda.device_count() < nproc:
        pytest.skip(f"needs {nproc} CUDA GPUs")
    (tmp_path / "config.json").write_text(json.dumps(shape))
    runs = []
    for compile in (False, True):
        cfg = TrainConfig(model_config=str(tmp_path), mock_data=True, nproc=nproc, micro_batch_size=2,
                          global_batch_size=2 * nproc // (layout.get("tp", 1) * layout.get("cp", 1)), seq_length=256,
                          train_iters=6, lr=1e-3, lr_warmup_iters=1, seed=1234, compile=compile, eval_interval=0,
                          eval_iters=1, progress=False, device="cuda", **layout)
        runs.append(train(cfg)["records"])
    eager, compiled = ([r["grad_norm"] for r in rs] for rs in runs)
    assert abs(compiled[0] - eager[0]) / eager[0] < 1e-4, (eager, compiled)
    assert max_rel_diff([r["loss"] for r in runs[1]], [r["loss"] for r in runs[0]]) < 1e-3


@pytest.mark.parametrize("window", [None, 48])
def test_varlen_kernel_matches_document_by_document_attention(window: int | None) -> None:
    """Packed documents through flash attention's varlen kernel (bf16, grouped queries, with and without a window)
    against the document-by-document path in fp32: outputs and the gradients of q, k and v."""
    from bridge.nn.attention import Documents
    from bridge.nn.core_attention import CoreAttention

    s, b, nq, ng, d = 512, 2, 8, 2, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    lengths = torch.tensor([0, 100, 3, 250, 159, 1, 511])  # sample by sample: each sample's documents sum to s
    cu = lengths.cumsum(0).to(torch.int32).cuda()
    documents = Documents(cu, s)
    leaves = [torch.randn(s, b, h, d, device="cuda", generator=g) for h in (nq, ng, ng)]
    grad_out = torch.randn(s, b, nq, d, device="cuda", generator=g)
    results = []
    for dtype in (torch.bfloat16, torch.float32):  # bf16: the varlen kernel; fp32: one SDPA per document
        inputs = [t.to(dtype).requires_grad_() for t in leaves]
        out = CoreAttention(window)(*inputs, documents)
        out.backward(grad_out.to(dtype))
        results.append([out.float()] + [t.grad.float() for t in inputs])
    for fast, exact in zip(*results):
        assert (fast - exact).abs().max().item() < 3e-2 * exact.abs().max().item()


def test_packed_training_compiles_in_bf16_and_fp8(tmp_path: Path) -> None:
    """`--reset-attention-mask --reset-position-ids --eod-mask-loss` on the GPU's path (varlen kernel, compiled
    layers): compiled bf16 trains as eager bf16 does, and FP8 (torchao, where installed) stays close to both."""
    from bridge.training import TrainConfig, train
    from tests.model_fixtures import write_random_corpus

    (tmp_path / "config.json").write_text(json.dumps(SMALL))
    corpus = write_random_corpus(tmp_path / "corpus", seed=0, documents=2000, max_length=200)
    runs = {}
    variants = {"eager": dict(), "compiled": dict(compile=True), "fp8": dict(compile=True, fp8="tensorwise")}
    try:
        import torchao  # noqa: F401
    except ImportError:
        del variants["fp8"]
    for name, extra in variants.items():
        cfg = TrainConfig(model_config=str(tmp_path), data_path=[str(corpus)], split="100,0,0", bf16=True,
                          reset_attention_mask=True, reset_position_ids=True, eod_mask_loss=True, micro_batch_size=4,
                          global_batch_size=4, seq_length=512, train_iters=8, lr=1e-3, lr_warmup_iters=1, seed=1234,
                          eval_interval=0, eval_iters=1, progress=False, device="cuda", **extra)
        runs[name] = [r["loss"] for r in train(cfg)["records"]]
    assert max_rel_diff(runs["compiled"], runs["eager"]) < 2e-2, runs
    if "fp8" in runs:
        assert max_rel_diff(runs["fp8"], runs["eager"]) < 5e-2, runs


@pytest.mark.parametrize("s", [24, 300], ids=["one-block", "windowed"])
@pytest.mark.parametrize("shape", ["gemma2", "gpt-oss"])
def test_compiled_flex_attention_matches_the_math_with_gradients(shape: str, s: int) -> None:
    """Compiled FlexAttention in bf16, as training and verify run it on CUDA, against the plain math in fp32: outputs
    and the gradients of q, k, v (and the sinks). Gemma 2's heads (8 over 4 KV heads of 256, softcap 50) and GPT-OSS's
    (64 over 8 KV heads of 64, sinks), both with a window of 128; a sequence shorter than one block (a verify prompt)
    and one the window cuts."""
    from bridge.nn.core_attention import flex_scored_attention, math_scored_attention

    nq, ng, d, softcap, sinks = (8, 4, 256, 50.0, False) if shape == "gemma2" else (64, 8, 64, None, True)
    g = torch.Generator(device="cuda").manual_seed(0)
    leaves = [torch.randn(1, h, s, d, device="cuda", generator=g) for h in (nq, ng, ng)]
    leaves += [torch.randn(nq, device="cuda", generator=g) * 2] if sinks else []
    grad_out = torch.randn(1, nq, s, d, device="cuda", generator=g)
    results = []
    for dtype, attention in ((torch.bfloat16, flex_scored_attention), (torch.float32, math_scored_attention)):
        inputs = [t.to(dtype).requires_grad_() for t in leaves]
        out = attention(*inputs[:3], d ** -0.5, 128, softcap, inputs[3] if sinks else None)
        out.backward(grad_out.to(dtype))
        results.append([out.float()] + [t.grad.float() for t in inputs])
    for fast, exact in zip(*results):
        assert (fast - exact).abs().max().item() < 3e-2 * exact.abs().max().item()
