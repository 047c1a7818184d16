"""A short training run for `bridge demo`: the built-in corpus, the checkpoint's own layout, loss going down."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from bridge.checkpoint import CheckpointMeta
from bridge.training.config import TrainConfig
from bridge.training.run import train

log = logging.getLogger(__name__)


def demo_config(ckpt: Path, data: Path, save: Path, iters: int) -> TrainConfig:
    """Small batches of 64-token packed samples at a high learning rate: tens of steps show the loss falling."""
    layout = CheckpointMeta.load(ckpt).layout
    return TrainConfig(load=str(ckpt), data_path=[str(data)], nproc=layout.tp * layout.pp, tp=layout.tp, pp=layout.pp,
                       vpp=layout.vpp, micro_batch_size=2, global_batch_size=4, seq_length=64, train_iters=iters,
                       lr=3e-3, min_lr=3e-4, lr_warmup_iters=min(3, iters), weight_decay=0.0, split="85,15,0",
                       eval_interval=iters, eval_iters=1, save=str(save), progress=False, device="cpu",
                       log_interval=10)


def demo_train(ckpt: str | Path, data_text: str, workdir: str | Path, *, iters: int = 30) -> tuple[list[float], Path]:
    """Train `ckpt` (a bridge checkpoint with a tokenizer in hf_meta/) on the lines of `data_text`.

    Returns the per-iteration training losses and the save folder, which `bridge export` turns
    into an HF model (latest iteration).
    """
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "demo_corpus.jsonl"
    with data.open("w") as stream:
        for line in data_text.splitlines():
            if line.strip():
                stream.write(json.dumps({"text": line}) + "\n")
    summary = train(demo_config(Path(ckpt), data, work / "train", iters))
    losses = [loss for _, loss in summary["loss_curve"]]
    log.info("demo training: loss %.3f -> %.3f in %d steps", losses[0], losses[-1], len(losses))
    return losses, work / "train"
