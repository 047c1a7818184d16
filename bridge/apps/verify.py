"""`bridge verify`: prove a conversion by logits, HF model (transformers) vs the sharded Megatron model.

The checkpoint's ranks are started as local processes (gloo on CPU, NCCL with one GPU per rank),
each loads its own rank file strictly into `bridge.nn.GPTModel`, and a forward-only pipeline pass
produces the logits, which are gathered over TP, trimmed to the HF vocabulary and compared with
transformers' on the same prompts.

Both dtypes are measured against transformers in fp32. Thresholds (documented in docs/verify.md):
- fp32: max |logit difference| <= 1e-4 * max(1, max |HF logit|) (relative to the logit scale);
- bf16: no worse than transformers' own bf16 run on the same prompts (`judge_bf16`), since how far bf16
  rounding moves a model's logits depends on the model, not on the conversion.
"""
from __future__ import annotations

import datetime
import gc
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from bridge.checkpoint import CheckpointMeta
from bridge.config import DTYPES
from bridge.converters.convert import checkpoint_meta
from bridge.converters.megatron_legacy import read_tracker
from bridge.converters.torch_dist import open_rank_reader
from bridge.errors import BridgeError
from bridge.hub import load_pretrained, resolve_source
from bridge.launch import launch
from bridge.models import conversions, load_hf_config
from bridge.nn import build_model_chunks, load_rank_checkpoint
from bridge.parallel.collectives import gather_from_tp
from bridge.parallel.context import gather_sequence, split_sequence
from bridge.parallel.pipeline import forward_only
from bridge.parallel.state import ParallelState, check_context_parallel

log = logging.getLogger(__name__)

DEFAULT_PROMPTS: tuple[str, ...] = (
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "In 1905 Albert Einstein published four papers that changed physics: the photoelectric effect,",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
)
FP32_MAX_ABS_REL = 1e-4
BF16_MAX_ERROR_RATIO = 1.5
BF16_TOP1_SIGMAS = 3.0
VERIFY_FILE = "verify.json"
DEVICES = ("cpu", "cuda")
VERIFY_DTYPES = ("fp32", "bf16")


@dataclass(frozen=True)
class Metrics:
    """Logit agreement on one prompt (or all of them)."""

    name: str
    tokens: int
    max_abs: float
    mean_abs: float
    cosine: float
    top1: float
    logit_scale: float


@dataclass
class VerifyResult:
    """The comparison table and verdict; `.table()` renders it, `.to_json()` is what verify.json holds."""

    checkpoint: str
    hf_source: str
    dtype: str
    device: str
    layout: dict[str, Any]
    transformer_impl: str
    prompts: list[Metrics]
    overall: Metrics
    passed: bool
    criterion: str
    hf_bf16: Metrics | None = None  # bf16 only: transformers' own bf16 logits against its fp32 ones
    iteration: int | str | None = None  # the checkpoint iteration compared ("release" for an import)
    created: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))

    def table(self) -> str:
        head = f"{'prompt':<34} {'tokens':>6} {'max abs':>10} {'mean abs':>10} {'cosine':>9} {'top-1':>7}"
        lines = [f"bridge verify: {self.checkpoint} vs {self.hf_source}",
                 f"layout tp={self.layout['tp']} pp={self.layout['pp']}"
                 + "".join(f" {k}={self.layout[k]}" for k in ("vpp", "ep", "cp") if (self.layout.get(k) or 1) > 1)
                 + (f" ({self.layout['cp_comm_type']})" if self.layout.get("cp", 1) > 1 else "")
                 + (" sp" if self.layout.get("sequence_parallel") else "") + " "
                 f"({self.transformer_impl}), {self.dtype} on {self.device}; differences from transformers in fp32",
                 head, "-" * len(head)]
        for m in [*self.prompts, self.overall, *([self.hf_bf16] if self.hf_bf16 is not None else [])]:
            if m is self.overall:
                lines.append("-" * len(head))
            name = m.name.replace("\n", " ")
            name = name if len(name) <= 34 else name[:31] + "..."
            lines.append(f"{name:<34} {m.tokens:>6} {m.max_abs:>10.3e} {m.mean_abs:>10.3e} {m.cosine:>9.6f} {m.top1:>6.1%}")
        lines.append(f"{'PASS' if self.passed else 'FAIL'}: {self.criterion}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(max_abs_diff=self.overall.max_abs, mean_abs_diff=self.overall.mean_abs,
                    cosine=self.overall.cosine, top1_agreement=self.overall.top1)
        if self.hf_bf16 is not None:
            data.update(hf_bf16_mean_abs_diff=self.hf_bf16.mean_abs, hf_bf16_top1_agreement=self.hf_bf16.top1)
        data["thresholds"] = {"fp32_max_abs_relative_to_logit_scale": FP32_MAX_ABS_REL,
                              "bf16_max_mean_abs_ratio_to_hf_bf16": BF16_MAX_ERROR_RATIO,
                              "bf16_top1_shortfall_sigmas": BF16_TOP1_SIGMAS}
        return data


def read_prompts(path: str | Path | None) -> list[str]:
    """One prompt per line of `path` (blank lines skipped), or the built-in set."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    file = Path(path)
    if not file.is_file():
        raise BridgeError(f"prompts file {file} does not exist; give a text file with one prompt per line")
    prompts = [line for line in file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise BridgeError(f"prompts file {file} has no non-empty lines; put one prompt per line")
    return prompts


TOKENIZER_FILES: tuple[str, ...] = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def encode(folder: Path, prompts: Sequence[str], vocab_size: int) -> list[list[int]]:
    """Token ids from the model's tokenizer; models without one (tiny test models) get UTF-8 bytes mod vocab."""
    ids: list[list[int]] = []
    if any((folder / name).is_file() for name in TOKENIZER_FILES):
        try:
            from transformers import AutoTokenizer

            tokenizer = load_pretrained(AutoTokenizer, folder)
            ids = [[t for t in tokenizer(p)["input_ids"] if t < vocab_size] for p in prompts]
        except Exception as exc:  # noqa: BLE001 - any tokenizer trouble: fall back, the logits check still holds
            log.warning("cannot use the tokenizer in %s (%s: %s); using UTF-8 bytes as token ids",
                        folder, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
    if not ids or not all(ids):
        log.info("no tokenizer in %s; using UTF-8 bytes (mod vocab) as token ids", folder)
        ids = [[b % vocab_size for b in p.encode()] for p in prompts]
    return ids


def hf_logits(folder: Path, token_lists: Sequence[Sequence[int]], dtype: str, device: str) -> list[torch.Tensor]:
    """transformers' logits per prompt, [s, V] in fp32 on the CPU."""
    from transformers import AutoModelForCausalLM

    model = load_pretrained(AutoModelForCausalLM, folder, dtype=DTYPES[dtype], **_dequantised(folder)).to(device).eval()
    out = []
    with torch.no_grad():
        for ids in token_lists:
            logits = model(torch.tensor([list(ids)], device=device)).logits  # [1, s, V]
            out.append(logits[0].float().cpu())
    del model
    gc.collect()  # before the next model loads: bf16 verify runs transformers twice, never two copies at once
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def _dequantised(folder: Path) -> dict[str, Any]:
    """transformers' options that load an MXFP4 folder (GPT-OSS) dequantised, as bridge imports it: its own MXFP4
    kernels would come from the Hub and run other arithmetic; the reference is the weights' values."""
    config = json.loads((Path(folder) / "config.json").read_text())
    if (config.get("quantization_config") or {}).get("quant_method") != "mxfp4":
        return {}
    from transformers import Mxfp4Config

    return {"quantization_config": Mxfp4Config(dequantize=True)}


def packed_batch(token_lists: Sequence[Sequence[int]], device: torch.device) -> dict[str, torch.Tensor]:
    """The prompts packed into one sequence as the trainer packs documents with --reset-attention-mask and
    --reset-position-ids: one micro-batch [1, S], positions restarting at each prompt, the prompts' boundaries."""
    lengths = [len(t) for t in token_lists]
    bounds = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    return {"tokens": torch.tensor([[i for t in token_lists for i in t]], device=device),
            "position_ids": torch.cat([torch.arange(n) for n in lengths])[None].to(device),
            "cu_seqlens": bounds.to(device), "max_seqlen": torch.tensor(sum(lengths))}


def _rank_batches(token_lists: Sequence[Sequence[int]], packed: bool, cp: int, cp_rank: int,
                  device: torch.device) -> list[Any]:
    """This CP rank's chunks of each prompt, or of the one packed sequence (its boundaries stay whole)."""
    if not packed:
        return [split_sequence(torch.tensor([list(ids)], device=device), cp, cp_rank, dim=1) for ids in token_lists]
    batch = packed_batch(token_lists, device)
    return [{k: v if k in ("cu_seqlens", "max_seqlen") else split_sequence(v, cp, cp_rank, dim=1)
             for k, v in batch.items()}]


def rank_logits(checkpoints: Sequence[str], token_lists: Sequence[Sequence[int]], dtype: str, device: str,
                sequence_parallel: bool, cp: int = 1, cp_comm_type: str = "p2p",
                packed: bool = False, hf_config: str | None = None) -> list[list[torch.Tensor] | None]:
    """Runs on every rank: load this rank's shard of each checkpoint and run the prompts through the pipeline.

    With context parallelism each CP rank runs its two chunks of every prompt and the logits are gathered
    back into sequence order. Returns, on the rank holding TP rank 0 and CP rank 0 of the last stage, per
    checkpoint the full logits [s, V] per prompt; None elsewhere. `hf_config`: the HF model of checkpoints without
    bridge.json (Megatron-LM, Megatron-Bridge).
    """
    import torch.distributed as dist

    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    results: list[list[torch.Tensor] | None] = []
    for ckpt in checkpoints:
        meta = checkpoint_meta(Path(ckpt), hf_config=hf_config)[0]
        ps = ParallelState(meta.layout, dist.get_world_size(), dist.get_rank(), cp=cp, cp_comm_type=cp_comm_type)
        chunks = build_model_chunks(meta.config, ps, transformer_impl=meta.transformer_impl,
                                    sequence_parallel=sequence_parallel, params_dtype=DTYPES[dtype], device=dev)
        ep = {"ep_rank": ps.ep_rank} if meta.layout.ep > 1 else {}  # EP ranks are DP replicas holding other experts
        reader = open_rank_reader(Path(ckpt), meta, conversions(meta.config))  # torch or torch_dist
        load_rank_checkpoint(chunks, reader.load_rank(ps.tp_rank, ps.pp_rank, **ep))
        for chunk in chunks:
            chunk.eval()
        outs = forward_only(chunks, ps, _rank_batches(token_lists, packed, cp, ps.cp_rank, dev))  # [s/cp, 1, V/tp]
        full = [gather_sequence(gather_from_tp(o, ps.tp_group), ps.cp_group, cp)[:, 0, : meta.config.vocab_size]
                .float().cpu() for o in outs]
        if packed:  # back to one [s, V] per prompt
            full = list(full[0].split([len(t) for t in token_lists]))
        holder = ps.is_last_stage and ps.tp_rank == 0 and ps.dp_rank == 0 and ps.cp_rank == 0
        results.append(full if holder else None)
        del chunks
    return results


def sharded_logits(checkpoints: Sequence[Path], token_lists: Sequence[Sequence[int]], *, dtype: str = "fp32",
                   device: str = "cpu", sequence_parallel: bool = False, cp: int = 1,
                   cp_comm_type: str = "p2p", packed: bool = False, hf_config: str | None = None) -> list[list[torch.Tensor]]:
    """Start the ranks once for several checkpoints of one layout; per checkpoint, logits [s, V] per prompt (`packed`:
    all prompts in one sequence, each attending only to itself, as packed training documents)."""
    layouts = {checkpoint_meta(Path(c), hf_config=hf_config)[0].layout for c in checkpoints}
    if len(layouts) != 1:
        raise BridgeError(f"checkpoints verified together must share one layout, got {sorted(l.name for l in layouts)}")
    layout = layouts.pop()
    # EP spans DP x CP: dp = ep / gcd(ep, cp) data-parallel copies run the same prompts, each EP rank on its experts
    world = layout.tp * layout.pp * cp * (layout.ep // math.gcd(layout.ep, cp))
    backend = "nccl" if device == "cuda" else "gloo"
    log.info("starting %d ranks (%s) for layout %s", world, backend, layout.name)
    per_rank = launch(rank_logits, world, [str(c) for c in checkpoints], [list(t) for t in token_lists], dtype, device,
                      sequence_parallel, cp, cp_comm_type, packed, hf_config, backend=backend)
    order = ParallelState(layout, world, 0, cp=cp, create_groups=False)
    return per_rank[order.rank_of(0, 0, layout.pp - 1, 0)]  # the last stage's tp 0, dp 0, cp 0


def _metrics(name: str, ref: torch.Tensor, ours: torch.Tensor) -> Metrics:
    diff = (ours - ref).abs()
    return Metrics(
        name=name, tokens=ref.shape[0], max_abs=diff.max().item(), mean_abs=diff.mean().item(),
        cosine=torch.nn.functional.cosine_similarity(ours, ref, dim=-1).mean().item(),
        top1=(ours.argmax(-1) == ref.argmax(-1)).float().mean().item(), logit_scale=ref.abs().max().item())


def judge_fp32(ref: Sequence[torch.Tensor], ours: Sequence[torch.Tensor], overall: Metrics,
               hf_bf16: Sequence[torch.Tensor] | None) -> tuple[bool, str]:
    """Only summation order differs in fp32, so the bound is element-wise, relative to the logit scale."""
    bound = FP32_MAX_ABS_REL * max(1.0, overall.logit_scale)
    ok = overall.max_abs <= bound
    return ok, (f"max abs diff {overall.max_abs:.3e} {'<=' if ok else '>'} {bound:.3e} "
                f"(1e-4 x logit scale {overall.logit_scale:.3g})")


def bf16_baseline(ref: Sequence[torch.Tensor], hf_bf16: Sequence[torch.Tensor]) -> Metrics:
    """transformers' own bf16 logits against its fp32 ones: what bf16 rounding alone does to this model."""
    return _metrics("transformers bf16", torch.cat(list(ref)), torch.cat(list(hf_bf16)))


def judge_bf16(ref: Sequence[torch.Tensor], ours: Sequence[torch.Tensor], overall: Metrics,
               hf_bf16: Sequence[torch.Tensor] | None) -> tuple[bool, str]:
    """bridge in bf16 must be as close to transformers fp32 (`ref`) as transformers' own bf16 run is.

    A fixed bar cannot work: on a model with near-tied top logits (random weights) bf16 rounding alone flips
    top-1, so transformers bf16 picks its own fp32 token on 90% of the tokens or fewer, while a trained model's
    top-1 hardly moves. Two conditions, both against that baseline:
    - mean |logit error| <= 1.5 x transformers bf16's. Two bf16 runs of one function round different sums,
      equally coarsely, so their errors are of one size: bridge/transformers 0.94-1.06 on the tiny dense and
      MoE models at TP=1, 2 and 4 on the CPU, 0.99-1.00 at the Llama-3.2-1B shape on an H100. A wrong weight
      adds its own error on top, as much as the weight matters to the logits: one MLP norm scaled by 1.1 gives
      1.8x in the test's model and 10x at the 1B shape, two attention heads swapped 7x and 3.5-4.5x. Averaged
      over every logit, this is the sensitive condition.
    - top-1: bridge may pick the fp32 token less often than transformers bf16 only by chance. On the tokens
      where exactly one of the two picks it (bridge misses `b`, transformers `c`), two runs that round alike
      are a fair coin: b - c <= 3 sqrt(b + c) (McNemar's test at 3 sigma, a false alarm about once in 700
      runs). A fixed one-point margin would be a single token of the 60-80 the default prompts make.
    """
    if hf_bf16 is None:
        raise ValueError("judge_bf16 needs transformers' own bf16 logits")
    baseline = bf16_baseline(ref, hf_bf16)
    target = torch.cat(list(ref)).argmax(-1)
    ours_hit, hf_hit = torch.cat(list(ours)).argmax(-1) == target, torch.cat(list(hf_bf16)).argmax(-1) == target
    b, c = int((hf_hit & ~ours_hit).sum()), int((ours_hit & ~hf_hit).sum())
    allowed = BF16_TOP1_SIGMAS * math.sqrt(b + c)
    top1_ok, error_ok = b - c <= allowed, overall.mean_abs <= BF16_MAX_ERROR_RATIO * baseline.mean_abs
    return top1_ok and error_ok, (
        f"top-1 vs fp32 {overall.top1:.1%} {'>=' if top1_ok else '<'} transformers bf16's {baseline.top1:.1%} - "
        f"{100 * allowed / len(target):.1f} pp ({BF16_TOP1_SIGMAS:g} sigma); mean abs diff {overall.mean_abs:.3e} "
        f"{'<=' if error_ok else '>'} {BF16_MAX_ERROR_RATIO:g} x transformers bf16's {baseline.mean_abs:.3e}")


JUDGES = {"fp32": judge_fp32, "bf16": judge_bf16}


def compare(prompts: Sequence[str], ref: Sequence[torch.Tensor], ours: Sequence[torch.Tensor], dtype: str,
            hf_bf16: Sequence[torch.Tensor] | None = None) -> tuple[list[Metrics], Metrics, bool, str]:
    """Per-prompt and overall metrics of `ours` against the fp32 reference `ref`, and the dtype's verdict
    (bf16 needs `hf_bf16`, transformers' own bf16 logits, as its baseline)."""
    rows = [_metrics(p, r, o) for p, r, o in zip(prompts, ref, ours)]
    overall = _metrics("all prompts", torch.cat(list(ref)), torch.cat(list(ours)))
    ok, criterion = JUDGES[dtype](ref, ours, overall, hf_bf16)
    return rows, overall, ok, criterion


def _check_rank_files(meta: CheckpointMeta, ckpt: Path) -> None:
    """Legacy rank files are loaded as they are, so their vocabulary rows must be the padding bridge's model has
    (a torch_dist folder is re-padded on load)."""
    standard = meta.layout.padded_vocab_size(meta.config.vocab_size)
    if meta.format == "torch" and meta.padded_vocab_size != standard:
        raise BridgeError(f"{ckpt} holds {meta.padded_vocab_size} vocabulary rows, not the {standard} bridge's model pads "
                          "to; reshard it first (bridge reshard --hf-config ...) and verify the result")


def verify(hf_src: str | Path, checkpoint: str | Path, *, prompts: Sequence[str] | None = None, dtype: str = "fp32",
           device: str = "cpu", sequence_parallel: bool = False, cp: int = 1, cp_comm_type: str = "p2p",
           packed: bool = False, write_json: bool = True, hf_config: str | None = None) -> VerifyResult:
    """Compare the checkpoint's logits with transformers' on `prompts`; write `verify.json` into the checkpoint.
    `packed`: bridge runs the prompts packed into one sequence (document attention and positions, as training with
    --reset-attention-mask --reset-position-ids), transformers each prompt alone. `hf_config`: for a checkpoint
    without bridge.json (Megatron-LM, Megatron-Bridge), the HF model it started from."""
    if dtype not in VERIFY_DTYPES:
        raise BridgeError(f"--dtype {dtype} is not one of {', '.join(VERIFY_DTYPES)}")
    if device not in DEVICES:
        raise BridgeError(f"--device {device} is not one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise BridgeError("--device cuda but no CUDA GPU is visible; use --device cpu")
    ckpt = Path(checkpoint)
    meta = checkpoint_meta(ckpt, hf_config=hf_config)[0]
    _check_rank_files(meta, ckpt)
    check_context_parallel(cp, cp_comm_type, meta.config, meta.layout.tp)
    folder = resolve_source(str(hf_src))
    hf_cfg = load_hf_config(folder)
    if (hf_cfg.architecture, hf_cfg.vocab_size, hf_cfg.num_layers) != (meta.config.architecture, meta.config.vocab_size,
                                                                       meta.config.num_layers):
        raise BridgeError(f"{hf_src} ({hf_cfg.architecture}, {hf_cfg.num_layers} layers) is not the model of {ckpt} "
                          f"({meta.config.architecture}, {meta.config.num_layers} layers); give the HF source it was imported from")
    texts = list(prompts or DEFAULT_PROMPTS)
    tokens = encode(folder, texts, meta.config.vocab_size)
    multiple = (meta.layout.tp if sequence_parallel else 1) * (2 * cp if cp > 1 else 1)
    if multiple > 1:  # SP splits the sequence over TP, CP into 2*cp chunks: cut each prompt to a multiple
        tokens = [t[: len(t) // multiple * multiple] for t in tokens]
    if any(not t for t in tokens):
        raise BridgeError("a prompt encodes to no tokens (or fewer than the 2 x cp chunks --cp needs); give longer prompts")
    ref = hf_logits(folder, tokens, "fp32", device)  # one model at a time: fp32, freed, then bf16
    hf_bf16 = hf_logits(folder, tokens, "bf16", device) if dtype == "bf16" else None
    ours = sharded_logits([ckpt], tokens, dtype=dtype, device=device, sequence_parallel=sequence_parallel, cp=cp,
                          cp_comm_type=cp_comm_type, packed=packed, hf_config=hf_config)[0]
    rows, overall, ok, criterion = compare(texts, ref, ours, dtype, hf_bf16)
    iteration = read_tracker(ckpt)  # the one sharded_logits read: the tracker's
    result = VerifyResult(checkpoint=str(ckpt), hf_source=str(hf_src), dtype=dtype, device=device, iteration=iteration,
                          layout={**meta.layout.to_json(), **({"cp": cp, "cp_comm_type": cp_comm_type} if cp > 1 else {}),
                                  **({"sequence_parallel": True} if sequence_parallel and meta.layout.tp > 1 else {}),
                                  **({"packed": True} if packed else {})},
                          transformer_impl=meta.transformer_impl, prompts=rows,
                          overall=overall, passed=ok, criterion=criterion,
                          hf_bf16=None if hf_bf16 is None else bf16_baseline(ref, hf_bf16))
    if write_json:
        (ckpt / VERIFY_FILE).write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return result
