"""Model card (README.md with YAML metadata) for a pushed model, built only from facts found on disk.

Sources, each optional: `bridge.json` (where the weights came from, the parallel layout),
`train_summary.json` (training run), `verify.json` (the `bridge verify` table), and the license of the
source model's own card (in the folder, in `hf_meta/`, or in the local Hub cache; never fetched).
A field without data is left out. The text holds no dates, so re-pushing the same model gives the same
card and the push is a no-op.
"""
from __future__ import annotations

import json
import logging
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LOSS_CURVE_NAME = "loss_curve.png"


@dataclass
class ModelCard:
    """The README.md text and the files it refers to (name in the repo -> bytes)."""

    text: str
    assets: dict[str, bytes] = field(default_factory=dict)


def _read_json(dirs: list[Path], name: str) -> Any:
    """The first `name` found in `dirs`, parsed; None when absent or unreadable (logged)."""
    for folder in dirs:
        path = folder / name
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                logger.warning("ignoring %s: %s", path, exc)
    return None


def _source_info(meta: dict) -> dict[str, str]:
    """`bridge.json`'s `source` as {repo_id, revision, commit} for a Hub model or {local} for a folder.

    Accepts `{"repo_id", "revision"}` and what `bridge import` writes: `{"id": <as given>, "revision",
    "path": <resolved folder>}`, where a Hub id resolved to a snapshot folder `.../snapshots/<commit>`.
    """
    source = meta.get("source") if isinstance(meta.get("source"), dict) else {}
    given, path = source.get("repo_id") or source.get("id"), source.get("path")
    info = {k: str(source[k]) for k in ("revision", "path") if source.get(k)}
    # `bridge import` resolves a local folder to itself and a Hub id to a snapshot folder elsewhere
    resolved_elsewhere = bool(given) and Path(str(path or given)) != Path(str(given))
    if source.get("repo_id") or (given and re.fullmatch(r"[\w.-]+/[\w.-]+", str(given)) and resolved_elsewhere):
        info["repo_id"] = str(given)
        commit = re.search(r"/snapshots/([0-9a-f]{40})/?$", str(path or ""))
        if commit:
            info["commit"] = commit[1]
    elif given or path:
        info["local"] = Path(str(path or given)).name
    return info


def _source_card_metadata(dirs: list[Path], source: dict[str, str]) -> dict:
    """YAML metadata of the source model's card: a README.md on disk, else the Hub cache's copy."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.repocard import metadata_load

    candidates = [d / "README.md" for d in dirs] + [d / "hf_meta" / "README.md" for d in dirs]
    if source.get("repo_id"):
        if source.get("path"):
            candidates.append(Path(source["path"]) / "README.md")
        cached = try_to_load_from_cache(source["repo_id"], "README.md", revision=source.get("commit") or source.get("revision"))
        if isinstance(cached, str):
            candidates.append(Path(cached))
    for path in candidates:
        if path.is_file():
            try:
                return metadata_load(path) or {}
            except Exception as exc:  # a malformed card must not stop a push; it only loses the license
                logger.warning("could not read the metadata of %s: %s", path, exc)
    return {}


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(rows: list[dict]) -> list[str]:
    """A markdown table over the union of the rows' keys, in order of first appearance."""
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return lines


def _provenance(meta: dict, source: dict[str, str], hub_url: str) -> list[str]:
    """Where the weights came from and how they were laid out: only when a `bridge.json` says so."""
    if not meta:
        return []
    layout = meta.get("layout") if isinstance(meta.get("layout"), dict) else {}
    lines = ["## Where the weights came from", ""]
    if source.get("repo_id"):
        at = [f"revision `{source['revision']}`"] if source.get("revision") else []
        at += [f"commit `{source['commit']}`"] if source.get("commit") else []
        lines.append(f"- Source: [{source['repo_id']}]({hub_url}/{source['repo_id']})" + (f" at {', '.join(at)}" if at else ""))
    elif source.get("local"):
        lines.append(f"- Source: a local folder (`{source['local']}`)")
    if meta.get("architecture"):
        lines.append(f"- Architecture: `{meta['architecture']}`")
    parts = [f"{key.upper()}={layout[key]}" for key in ("tp", "pp", "vpp", "ep") if layout.get(key) is not None]
    if parts:
        fmt = f" (`{meta['format']}` format)" if meta.get("format") else ""
        lines.append(f"- Megatron checkpoint{fmt} with parallel layout {', '.join(parts)}")
    extras = [f"{label} `{meta[key]}`" for key, label in (("dtype", "dtype"), ("transformer_impl", "layers")) if meta.get(key)]
    if extras:
        lines.append("- " + ", ".join(extras))
    lines.append("- Converted to Hugging Face format by bridge (`bridge export`)")
    return lines + [""]


def _adapter(peft: dict, source: dict[str, str], lora: dict) -> list[str]:
    """What the adapter is: LoRA or DoRA, on which base model, rank, alpha, dropout and the modules it adapts."""
    base = _base_name(peft, source)
    kind = "DoRA" if peft.get("use_dora") else "LoRA"
    megatron = (lora.get("lora") or {}).get("target_modules")
    rows = [("Base model", base), ("Rank (r)", peft.get("r")), ("Alpha", peft.get("lora_alpha")),
            ("Dropout", peft.get("lora_dropout")), ("Target modules", ", ".join(f"`{t}`" for t in peft.get("target_modules") or [])),
            *([("Megatron modules trained", ", ".join(f"`{t}`" for t in megatron))] if megatron else [])]
    return [f"A {kind} adapter (HF PEFT format) for {base}, trained with bridge; load it on the base model with peft.",
            "", "## Adapter", "", "| | |", "|---|---|", *[f"| {k} | {_fmt(v)} |" for k, v in rows if v is not None], ""]


def _base_name(peft: dict, source: dict[str, str]) -> str:
    """The base model as a reader can find it: its Hub id, else the name of the local folder it was imported from
    (a path on the machine that trained it means nothing elsewhere)."""
    if source.get("repo_id"):
        return f"`{source['repo_id']}`"
    local = source.get("local") or Path(str(peft.get("base_model_name_or_path") or "")).name
    return f"a local folder `{local}`" if local else "its base model"


def _training(summary: dict) -> tuple[list[str], dict[str, bytes]]:
    rows = [(label, summary[key]) for key, label in (
        ("iterations", "Iterations"), ("tokens", "Tokens"),
        ("final_train_loss", "Final train loss"), ("final_valid_loss", "Final validation loss"),
    ) if isinstance(summary.get(key), (int, float)) and not isinstance(summary.get(key), bool)]
    lines = ["## Training", "", "| | |", "|---|---|"] + [f"| {label} | {_fmt(v)} |" for label, v in rows]
    assets: dict[str, bytes] = {}
    curve = summary.get("loss_curve")
    points = [(float(p[0]), float(p[1])) for p in curve or []
              if isinstance(p, (list, tuple)) and len(p) == 2 and p[1] is not None]  # null: a diverged loss
    if len(points) >= 2:
        assets[LOSS_CURVE_NAME] = loss_curve_png(points)
        lines += ["", f"![training loss]({LOSS_CURVE_NAME})", "",
                  f"Training loss from iteration {_fmt(int(points[0][0]))} to {_fmt(int(points[-1][0]))}."]
    if not rows and not assets:
        return [], {}
    return lines + [""], assets


def _verification(report: Any) -> list[str]:
    """Render whatever `bridge verify` wrote: its scalar fields as a list, its row lists as tables."""
    if isinstance(report, list):
        report = {"rows": report}
    if not isinstance(report, dict):
        return []
    lines = ["## Verification (`bridge verify`)", ""]
    for key, value in report.items():
        if isinstance(value, (str, int, float, bool)):
            lines.append(f"- {key}: {_fmt(value)}")
    for value in report.values():
        if isinstance(value, list) and value and all(isinstance(row, dict) for row in value):
            lines += ["", *_table(value)]
    return lines + [""] if len(lines) > 2 else []


def _verified_here(report: Any, checkpoint: Path | None) -> Any:
    """`report` if it is of the checkpoint iteration being pushed; None (no claim on the card) if it verified another
    one, e.g. the iteration a training run resumed from, or does not say which."""
    from bridge.converters.megatron_legacy import TRACKER, read_tracker  # imported here: it loads torch (see push)

    if checkpoint is None or not isinstance(report, dict) or not (checkpoint / TRACKER).is_file():
        return report
    current = read_tracker(checkpoint)
    if str(report.get("iteration")) != str(current):
        logger.warning("%s: verify.json is of iteration %s, not of iteration %s being pushed; the card leaves it out "
                       "(run `bridge verify` again to include it)", checkpoint, report.get("iteration", "unknown"),
                       current)
        return None
    return report


def build_model_card(
    hf_folder: Path, repo_id: str, *, checkpoint: Path | None = None, revision: str | None = None
) -> ModelCard:
    """The card for `hf_folder` pushed as `repo_id`@`revision`; `checkpoint` is the Megatron folder it came from."""
    from huggingface_hub import ModelCardData, constants

    dirs = [d for d in (checkpoint, hf_folder) if d is not None]
    meta = _read_json(dirs, "bridge.json") or {}
    source = _source_info(meta)
    card_meta = _source_card_metadata(dirs, source)
    config = _read_json([hf_folder], "config.json") or {}
    peft = _read_json([hf_folder], "adapter_config.json")
    tags = ["bridge", *(["megatron-lm"] if meta else []), *([config["model_type"]] if config.get("model_type") else [])]
    tags += ["peft", "dora" if peft.get("use_dora") else "lora"] if isinstance(peft, dict) else []
    data = ModelCardData(
        library_name="peft" if isinstance(peft, dict) else "transformers",
        base_model=source.get("repo_id") or card_meta.get("base_model"),
        license=card_meta.get("license"),
        license_name=card_meta.get("license_name"),
        license_link=card_meta.get("license_link"),
        tags=tags,
    )
    lines = ["---", data.to_yaml(), "---", "", f"# {repo_id.split('/')[-1]}", ""]
    if isinstance(peft, dict):
        lines += _adapter(peft, source, _read_json(dirs, "lora.json") or {})
    lines += _provenance(meta, source, constants.ENDPOINT)
    summary = _read_json(dirs, "train_summary.json")
    training, assets = _training(summary) if isinstance(summary, dict) else ([], {})
    lines += training + _verification(_verified_here(_read_json(dirs, "verify.json"), checkpoint))
    args = f'"{repo_id}"' + (f', revision="{revision}"' if revision and revision != "main" else "")
    if isinstance(peft, dict):
        base = f'"{source.get("repo_id") or "<the base model: " + _base_name(peft, source).strip("`") + ">"}"'
        return ModelCard("\n".join(lines + [
            "## Use", "", "```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
            f"base = AutoModelForCausalLM.from_pretrained({base})", f"model = PeftModel.from_pretrained(base, {args})",
            "```", ""]), assets)
    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f"model = AutoModelForCausalLM.from_pretrained({args})",
              f"tokenizer = AutoTokenizer.from_pretrained({args})", "```", ""]
    return ModelCard("\n".join(lines), assets)


# ---- loss curve as PNG, without matplotlib ---------------------------------------------------------
# matplotlib is not a dependency (tens of MB for one figure) and embeds version metadata; this plot is a
# few dozen lines, has no dependency and gives the same bytes for the same curve, so re-pushes stay no-ops.

#: 3x5 bitmap glyphs for axis labels; each row is 3 bits, 4 = left column.
_GLYPHS: dict[str, tuple[int, ...]] = {
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7), "4": (5, 5, 7, 1, 1),
    "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 1, 1), "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7),
    ".": (0, 0, 0, 0, 2), "-": (0, 0, 7, 0, 0), "+": (0, 2, 7, 2, 0), "e": (0, 7, 7, 4, 7), " ": (0, 0, 0, 0, 0),
}


class _Canvas:
    """An 8-bit grayscale image, white, that lines and labels are drawn on in black."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(b"\xff" * (width * height))

    def dot(self, x: int, y: int, size: int = 1) -> None:
        for dy in range(size):
            for dx in range(size):
                if 0 <= x + dx < self.width and 0 <= y + dy < self.height:
                    self.pixels[(y + dy) * self.width + x + dx] = 0

    def line(self, x0: int, y0: int, x1: int, y1: int, size: int = 1) -> None:
        steps = max(abs(x1 - x0), abs(y1 - y0), 1)
        for i in range(steps + 1):
            self.dot(round(x0 + (x1 - x0) * i / steps), round(y0 + (y1 - y0) * i / steps), size)

    def text(self, x: int, y: int, label: str, scale: int = 2) -> None:
        for k, char in enumerate(label):
            for row, bits in enumerate(_GLYPHS.get(char, _GLYPHS[" "])):
                for col in range(3):
                    if bits & (4 >> col):
                        self.dot(x + (k * 4 + col) * scale, y + row * scale, scale)

    def png(self) -> bytes:
        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        rows = b"".join(b"\x00" + self.pixels[y * self.width : (y + 1) * self.width] for y in range(self.height))
        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 0, 0, 0, 0)  # 8-bit grayscale
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")


def loss_curve_png(points: list[tuple[float, float]], width: int = 640, height: int = 360) -> bytes:
    """A line plot of (iteration, loss) with labelled axis ends, as PNG bytes."""
    left, right, top, bottom = 70, 20, 20, 40
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    canvas = _Canvas(width, height)
    canvas.line(left, top, left, height - bottom)
    canvas.line(left, height - bottom, width - right, height - bottom)

    def to_px(x: float, y: float) -> tuple[int, int]:
        px = left + (x - x0) / (x1 - x0) * (width - left - right)
        py = height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)
        return round(px), round(py)

    pixels = [to_px(x, y) for x, y in points]
    for (ax, ay), (bx, by) in zip(pixels, pixels[1:]):
        canvas.line(ax, ay, bx, by, size=2)
    canvas.text(4, top, f"{y1:.3g}")
    canvas.text(4, height - bottom - 10, f"{y0:.3g}")
    canvas.text(left, height - bottom + 10, f"{x0:.0f}")
    label = f"{x1:.0f}"
    canvas.text(width - right - len(label) * 8, height - bottom + 10, label)
    return canvas.png()
