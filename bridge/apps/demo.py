"""`bridge demo`: build a tiny Llama and its tokenizer, import at TP=2 PP=2, export, and compare logits."""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

from bridge.apps.demo_corpus import CORPUS
from bridge.apps.push import demo_push
from bridge.apps.verify import hf_logits, verify
from bridge.converters.convert import export_hf, import_hf, inspect_checkpoint
from bridge.hub import load_pretrained
from bridge.layout import ParallelLayout
from bridge.training.demo import demo_train

log = logging.getLogger(__name__)

#: A Llama-3.2-1B-like config (tied embeddings, llama3 RoPE scaling, GQA) scaled down to run in seconds.
DEMO_CONFIG = dict(
    architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=192, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=4, head_dim=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
    rope_theta=500000.0, tie_word_embeddings=True,
    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
)
DEMO_LAYOUT = ParallelLayout(tp=2, pp=2)


def build_tokenizer(out: Path, vocab_size: int = 400, texts: Iterable[str] | None = None):  # noqa: ANN201
    """A byte-level BPE (PreTrainedTokenizerFast) trained on `texts` (default: the built-in corpus), saved in HF
    format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines() if texts is None else texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    fast.save_pretrained(out)
    return fast


def build_model(out: Path) -> Path:
    """The tiny HF model (random weights, seeded) with its tokenizer, as a local HF folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(out)
    config = LlamaConfig(**DEMO_CONFIG, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def run(workdir: str | None = None, keep: bool = False, say: Callable[[str], None] = print) -> int:
    """Run every step, printing what happens; returns the exit code (0 when every check passed)."""
    from transformers import AutoTokenizer

    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="bridge-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    say("bridge demo: about a minute on 2 idle CPU cores (it starts 4 ranks three times), longer on a busy machine")
    try:
        say(f"[1/6] building a tiny Llama and a BPE tokenizer in {root / 'tiny-llama'}")
        hf = build_model(root / "tiny-llama")
        say(f"[2/6] bridge import {hf.name} --tp {DEMO_LAYOUT.tp} --pp {DEMO_LAYOUT.pp}, then export it straight back")
        ckpt = import_hf(hf, root / "tiny-llama-tp2-pp2", DEMO_LAYOUT, overwrite=True)
        info = inspect_checkpoint(ckpt)
        say(f"      {len(info['files'])} rank files, {info['parameters']:,} parameters, vocab padded "
            f"{info['vocab']['original']} -> {info['vocab']['padded']}")
        back = export_hf(ckpt, root / "round-trip", overwrite=True)
        ids = load_pretrained(AutoTokenizer, hf)(CORPUS.splitlines()[0]).input_ids
        same = torch.equal(*(hf_logits(folder, [ids], "fp32", "cpu")[0] for folder in (hf, back)))
        say(f"      transformers on the source and the round trip: {'identical logits' if same else 'DIFFERENT logits'}")
        say(f"[3/6] bridge verify {hf.name} {ckpt.name}  (4 spawned ranks, gloo)")
        before = verify(hf, ckpt)
        say("      " + before.table().replace("\n", "\n      "))
        say("[4/6] bridge train --load tiny-llama-tp2-pp2 --nproc 4 --tp 2 --pp 2 on the built-in corpus")
        losses, run_dir = demo_train(ckpt, CORPUS, root)
        say(f"      loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps")
        say("[5/6] bridge export train --out tiny-llama-trained; bridge verify tiny-llama-trained train")
        out = export_hf(run_dir, root / "tiny-llama-trained", overwrite=True)
        after = verify(out, run_dir)
        say(f"      the exported model computes what the trained checkpoint computes: {after.criterion}")
        say("[6/6] bridge push train demo/tiny-llama   (model card with the training summary)")
        kept = keep or bool(workdir)
        say("      " + demo_push(run_dir, kept=kept))
        ok = same and before.passed and after.passed and losses[-1] < losses[0]
        if kept:
            say(f"files kept in {root}")
        say(f"{time.perf_counter() - started:.0f} s in all")
        say("demo passed" if ok else "demo FAILED")
        return 0 if ok else 1
    finally:
        if not keep and not workdir:
            shutil.rmtree(root, ignore_errors=True)
