"""`bridge verify`: prove a conversion by logits, HF model (transformers) vs the sharded Megatron model.

The checkpoint's ranks are started as local processes (gloo on CPU, NCCL with one GPU per rank),
each loads its own rank file strictly into `bridge.nn.GPTModel`, and a forward-only pipeline pass
produces the logits, which are gathered over TP, trimmed to the HF vocabulary and compared with
transformers' on the same prompts.

Thresholds (documented in docs/verify.md):
- fp32: max |logit difference| <= 1e-4 * max(1, max |HF logit|) (relative to the logit scale);
- bf16: top-1 token agreement >= 99% (bf16 rounding makes element-wise bounds meaningless).
"""
from __future__ import annotations

import datetime
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from bridge.checkpoint import CheckpointMeta
from bridge.config import DTYPES
from bridge.errors import BridgeError
from bridge.hub import load_pretrained
from bridge.launch import launch
from bridge.parallel.state import check_context_parallel

log = logging.getLogger(__name__)

DEFAULT_PROMPTS: tuple[str, ...] = (
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "In 1905 Albert Einstein published four papers that changed physics: the photoelectric effect,",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
)
FP32_MAX_ABS_REL = 1e-4
BF16_MIN_TOP1 = 0.99
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
    created: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))

    def table(self) -> str:
        head = f"{'prompt':<34} {'tokens':>6} {'max abs':>10} {'mean abs':>10} {'cosine':>9} {'top-1':>7}"
        lines = [f"bridge verify: {self.checkpoint} vs {self.hf_source}",
                 f"layout tp={self.layout['tp']} pp={self.layout['pp']} vpp={self.layout['vpp']}"
                 + "".join(f" {k}={self.layout[k]}" for k in ("ep", "cp") if self.layout.get(k, 1) > 1)
                 + (f" ({self.layout['cp_comm_type']})" if self.layout.get("cp", 1) > 1 else "")
                 + (" sp" if self.layout.get("sequence_parallel") else "") + " "
                 f"({self.transformer_impl}), {self.dtype} on {self.device}", head, "-" * len(head)]
        for m in [*self.prompts, self.overall]:
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
        data["thresholds"] = {"fp32_max_abs_relative_to_logit_scale": FP32_MAX_ABS_REL, "bf16_min_top1": BF16_MIN_TOP1}
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

    model = load_pretrained(AutoModelForCausalLM, folder, dtype=DTYPES[dtype]).to(device).eval()
    out = []
    with torch.no_grad():
        for ids in token_lists:
            logits = model(torch.tensor([list(ids)], device=device)).logits  # [1, s, V]
            out.append(logits[0].float().cpu())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def rank_logits(checkpoints: Sequence[str], token_lists: Sequence[Sequence[int]], dtype: str, device: str,
                sequence_parallel: bool, cp: int = 1, cp_comm_type: str = "p2p") -> list[list[torch.Tensor] | None]:
    """Runs on every rank: load this rank's shard of each checkpoint and run the prompts through the pipeline.

    With context parallelism each CP rank runs its two chunks of every prompt and the logits are gathered
    back into sequence order. Returns, on the rank holding TP rank 0 and CP rank 0 of the last stage, per
    checkpoint the full logits [s, V] per prompt; None elsewhere.
    """
    import torch.distributed as dist

    from bridge.converters.torch_dist import open_rank_reader
    from bridge.nn import build_model_chunks, load_rank_checkpoint
    from bridge.parallel.collectives import gather_from_tp
    from bridge.parallel.context import gather_sequence, split_sequence
    from bridge.parallel.pipeline import forward_only
    from bridge.parallel.state import ParallelState

    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    results: list[list[torch.Tensor] | None] = []
    for ckpt in checkpoints:
        meta = CheckpointMeta.load(Path(ckpt))
        ps = ParallelState(meta.layout, dist.get_world_size(), dist.get_rank(), cp=cp, cp_comm_type=cp_comm_type)
        chunks = build_model_chunks(meta.config, ps, transformer_impl=meta.transformer_impl,
                                    sequence_parallel=sequence_parallel, params_dtype=DTYPES[dtype], device=dev)
        ep = {"ep_rank": ps.ep_rank} if meta.layout.ep > 1 else {}  # EP ranks are DP replicas holding other experts
        load_rank_checkpoint(chunks, open_rank_reader(Path(ckpt), meta).load_rank(ps.tp_rank, ps.pp_rank, **ep))  # torch or torch_dist
        for chunk in chunks:
            chunk.eval()
        batches = [split_sequence(torch.tensor([list(ids)], device=dev), cp, ps.cp_rank, dim=1) for ids in token_lists]
        outs = forward_only(chunks, ps, batches)  # last stage: [s/cp, 1, V_pad/tp] each
        full = [gather_sequence(gather_from_tp(o, ps.tp_group), ps.cp_group, cp)[:, 0, : meta.config.vocab_size]
                .float().cpu() for o in outs]
        holder = ps.is_last_stage and ps.tp_rank == 0 and ps.dp_rank == 0 and ps.cp_rank == 0
        results.append(full if holder else None)
        del chunks
    return results


def sharded_logits(checkpoints: Sequence[Path], token_lists: Sequence[Sequence[int]], *, dtype: str = "fp32",
                   device: str = "cpu", sequence_parallel: bool = False, cp: int = 1,
                   cp_comm_type: str = "p2p") -> list[list[torch.Tensor]]:
    """Start the ranks once for several checkpoints of one layout; per checkpoint, logits [s, V] per prompt."""
    layouts = {CheckpointMeta.load(Path(c)).layout for c in checkpoints}
    if len(layouts) != 1:
        raise BridgeError(f"checkpoints verified together must share one layout, got {sorted(l.name for l in layouts)}")
    layout = layouts.pop()
    # EP spans DP x CP: dp = ep / gcd(ep, cp) data-parallel copies run the same prompts, each EP rank on its experts
    world = layout.tp * layout.pp * cp * (layout.ep // math.gcd(layout.ep, cp))
    backend = "nccl" if device == "cuda" else "gloo"
    log.info("starting %d ranks (%s) for layout %s", world, backend, layout.name)
    per_rank = launch(rank_logits, world, [str(c) for c in checkpoints], [list(t) for t in token_lists], dtype, device,
                      sequence_parallel, cp, cp_comm_type, backend=backend)
    from bridge.parallel.state import ParallelState

    order = ParallelState(layout, world, 0, cp=cp, create_groups=False)
    return per_rank[order.rank_of(0, 0, layout.pp - 1, 0)]  # the last stage's tp 0, dp 0, cp 0


def _metrics(name: str, ref: torch.Tensor, ours: torch.Tensor) -> Metrics:
    diff = (ours - ref).abs()
    return Metrics(
        name=name, tokens=ref.shape[0], max_abs=diff.max().item(), mean_abs=diff.mean().item(),
        cosine=torch.nn.functional.cosine_similarity(ours, ref, dim=-1).mean().item(),
        top1=(ours.argmax(-1) == ref.argmax(-1)).float().mean().item(), logit_scale=ref.abs().max().item())


def compare(prompts: Sequence[str], ref: Sequence[torch.Tensor], ours: Sequence[torch.Tensor],
            dtype: str) -> tuple[list[Metrics], Metrics, bool, str]:
    """Per-prompt and overall metrics, and the verdict against the dtype's documented threshold."""
    rows = [_metrics(p, r, o) for p, r, o in zip(prompts, ref, ours)]
    overall = _metrics("all prompts", torch.cat(list(ref)), torch.cat(list(ours)))
    if dtype == "fp32":
        bound = FP32_MAX_ABS_REL * max(1.0, overall.logit_scale)
        ok = overall.max_abs <= bound
        criterion = f"max abs diff {overall.max_abs:.3e} {'<=' if ok else '>'} {bound:.3e} (1e-4 x logit scale {overall.logit_scale:.3g})"
    else:
        ok = overall.top1 >= BF16_MIN_TOP1
        criterion = f"top-1 agreement {overall.top1:.2%} {'>=' if ok else '<'} {BF16_MIN_TOP1:.0%}"
    return rows, overall, ok, criterion


def verify(hf_src: str | Path, checkpoint: str | Path, *, prompts: Sequence[str] | None = None, dtype: str = "fp32",
           device: str = "cpu", sequence_parallel: bool = False, cp: int = 1, cp_comm_type: str = "p2p",
           write_json: bool = True) -> VerifyResult:
    """Compare the checkpoint's logits with transformers' on `prompts`; write `verify.json` into the checkpoint."""
    from bridge.api import load_hf_config
    from bridge.hub import resolve_source

    if dtype not in VERIFY_DTYPES:
        raise BridgeError(f"--dtype {dtype} is not one of {', '.join(VERIFY_DTYPES)}")
    if device not in DEVICES:
        raise BridgeError(f"--device {device} is not one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise BridgeError("--device cuda but no CUDA GPU is visible; use --device cpu")
    ckpt = Path(checkpoint)
    meta = CheckpointMeta.load(ckpt)
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
    ref = hf_logits(folder, tokens, dtype, device)
    ours = sharded_logits([ckpt], tokens, dtype=dtype, device=device, sequence_parallel=sequence_parallel, cp=cp,
                          cp_comm_type=cp_comm_type)[0]
    rows, overall, ok, criterion = compare(texts, ref, ours, dtype)
    result = VerifyResult(checkpoint=str(ckpt), hf_source=str(hf_src), dtype=dtype, device=device,
                          layout={**meta.layout.to_json(), **({"cp": cp, "cp_comm_type": cp_comm_type} if cp > 1 else {}),
                                  **({"sequence_parallel": True} if sequence_parallel and meta.layout.tp > 1 else {})},
                          transformer_impl=meta.transformer_impl, prompts=rows,
                          overall=overall, passed=ok, criterion=criterion)
    if write_json:
        (ckpt / VERIFY_FILE).write_text(json.dumps(result.to_json(), indent=2) + "\n")
    log.info("%s: %s", "passed" if ok else "FAILED", criterion)
    return result
