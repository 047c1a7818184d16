"""Training metrics: model FLOPs and MFU, peak memory, a JSONL log and TensorBoard event files.

FLOPs per token (docs/training.md), the PaLM / Megatron model-FLOPs convention (no causal-mask
discount, recomputation not counted):

    6 * N  +  12 * L * (n_heads * head_dim) * s          (4 * N with a frozen base: LoRA, DoRA)

N counts the weights of every matrix multiply (attention and MLP projections of each layer and the
output layer, whose V x h matrix is multiplied whether or not it is tied); the embedding lookup is
not a matmul. The second term is QK^T and AV: 2 * 2 * s * (n_heads * head_dim) per token per layer
forward, times 3 for forward + backward; a layer with a sliding window W < s counts W keys per query, not s.

TensorBoard: `torch.utils.tensorboard` needs the `tensorboard` package (and protobuf, grpc); to
avoid that dependency the scalars are written by `EventWriter`, ~50 lines that emit the same
TFRecord-framed `Event` protobufs (the format is frozen: TensorBoard reads files from 2016).
"""
from __future__ import annotations

import json
import math
import resource
import socket
import struct
import time
from pathlib import Path
from typing import Any

import torch

from bridge.config import ModelConfig

#: Dense bf16 peak TFLOP/s per device, matched against torch.cuda.get_device_name().
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def matmul_params(cfg: ModelConfig) -> int:
    """Weights one token multiplies through: MoE layers count only the router, top-k experts and shared expert."""
    h, d = cfg.hidden_size, cfg.kv_channels
    attention = h * cfg.qkv_rows + cfg.num_attention_heads * d * h
    total = 0
    for layer in range(cfg.num_layers):
        if cfg.is_moe_layer(layer):
            moe = cfg.moe
            mlp = 3 * h * (moe.router_topk * moe.moe_ffn_hidden_size + (moe.shared_expert_ffn_hidden_size or 0))
            mlp += h * moe.num_experts
        else:
            mlp = 3 * h * cfg.ffn_hidden_size
        total += attention + mlp
    return total + h * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_length: int, *, frozen_base: bool = False) -> float:
    """Model FLOPs per trained token. `frozen_base` (LoRA, DoRA): the base weights get no gradient, so their
    weight-gradient GEMMs are never run: 4 FLOPs per weight (forward, input gradient) instead of 6. The adapters'
    own GEMMs (under 1% of the base's at rank 16) are not counted."""
    keys = sum(min(seq_length, cfg.window(i) or seq_length) for i in range(cfg.num_layers))
    attention = 12 * cfg.num_attention_heads * cfg.kv_channels * keys
    return (4.0 if frozen_base else 6.0) * matmul_params(cfg) + attention


def peak_tflops(override: float | None) -> float | None:
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


class PeakMemory:
    """Peak allocated GPU memory of the run so far and since the last reading (a step's, once steps are queued one
    ahead: the allocator counts at launch). The run's peak includes the first steps' compilation; a step's peak is
    what training needs once it runs. On CPU: the run's peak resident set size, no step peak."""

    def __init__(self) -> None:
        self.run_gib = 0.0

    def read(self) -> tuple[float, float | None]:
        """-> (run peak, peak since the last read) in GiB; starts the next interval."""
        if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, None
        step = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
        self.run_gib = max(self.run_gib, step)
        return self.run_gib, step


# ---- TensorBoard event files ---------------------------------------------------------------------
def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire) + payload


def _bytes_field(number: int, data: bytes) -> bytes:
    return _field(number, 2, _varint(len(data)) + data)


def scalar_event(tag: str, value: float, step: int, wall_time: float) -> bytes:
    """tensorflow.Event{wall_time=1, step=2, summary=5{value=1{tag=1, simple_value=2}}}."""
    value_msg = _bytes_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", value))
    summary = _bytes_field(1, value_msg)
    return _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step)) + _bytes_field(5, summary)


class EventWriter:
    """Append-only `events.out.tfevents.*` file of scalar summaries that TensorBoard reads."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self.path = folder / f"events.out.tfevents.{int(now)}.{socket.gethostname()}"
        self._file = self.path.open("ab")
        version = _field(1, 1, struct.pack("<d", now)) + _bytes_field(3, b"brain.Event:2")
        self._record(version)

    def _record(self, data: bytes) -> None:
        header = struct.pack("<Q", len(data))
        self._file.write(header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data)))

    def scalars(self, values: dict[str, float], step: int) -> None:
        now = time.time()
        for tag, value in values.items():
            if value is not None:
                self._record(scalar_event(tag, float(value), step, now))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _parse(buf: bytes) -> dict[int, Any]:
    """A protobuf message's fields (last value wins): varint -> int, fixed64/32 -> bytes, length-delimited -> bytes."""
    fields, pos = {}, 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            fields[number], pos = _read_varint(buf, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            fields[number], pos = buf[pos:pos + size], pos + size
        else:
            size, pos = _read_varint(buf, pos)
            fields[number], pos = buf[pos:pos + size], pos + size
    return fields


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buf[pos]
        value, shift, pos = value | (byte & 0x7F) << shift, shift + 7, pos + 1
        if not byte & 0x80:
            return value, pos


def read_events(path: Path) -> list[tuple[int, str, float]]:
    """(step, tag, value) of every scalar in an event file (checks the framing CRCs; for tests and tools)."""
    data, out, pos = path.read_bytes(), [], 0
    while pos < len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        if struct.unpack_from("<I", data, pos + 8)[0] != _masked_crc(header):
            raise ValueError(f"{path}: bad record header CRC at byte {pos}")
        record = data[pos + 12:pos + 12 + length]
        if struct.unpack_from("<I", data, pos + 12 + length)[0] != _masked_crc(record):
            raise ValueError(f"{path}: bad record CRC at byte {pos}")
        pos += 16 + length
        event = _parse(record)
        if 5 in event:
            value = _parse(_parse(event[5])[1])
            out.append((event.get(2, 0), value[1].decode(), struct.unpack("<f", value[2])[0]))
    return out


class MetricsLog:
    """JSONL lines (one per logged step) and TensorBoard scalars, written by rank 0 only."""

    def __init__(self, jsonl: Path | None, tensorboard_dir: Path | None) -> None:
        self.jsonl = jsonl.open("a") if jsonl else None
        self.tb = EventWriter(tensorboard_dir) if tensorboard_dir else None

    def write(self, record: dict[str, Any]) -> None:
        if self.jsonl:  # a diverged loss is null: json would write NaN, which is not JSON
            finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
            self.jsonl.write(json.dumps(finite) + "\n")
            self.jsonl.flush()
        if self.tb:
            self.tb.scalars({k: v for k, v in record.items() if k != "iteration" and isinstance(v, (int, float))},
                            int(record["iteration"]))

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()
