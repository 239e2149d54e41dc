"""Read an offline W&B run's transaction log (`run-<id>.wandb`) with W&B's own record schema.

wandb 0.31 dropped its Python reader (`wandb.sdk.internal.datastore`; the Go core writes and reads
the log now), so the framing is read here: a 7-byte header (`:W&B`, magic 0xBEE1, version 0),
then LevelDB log blocks of 32 KiB, each record chunk a 7-byte header (CRC-32, length, type:
full, first, middle, last) and its bytes; a block's tail shorter than a header is padding. Each
record is a `wandb_internal_pb2.Record`, decoded by wandb's own protobuf classes.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), "not a W&B transaction log"
    offset, pending = 7, b""
    while offset + HEADER.size <= len(data):
        left = BLOCK - offset % BLOCK
        if left < HEADER.size:  # padding at a block's end
            offset += left
            continue
        checksum, length, kind = HEADER.unpack_from(data, offset)
        if length == 0 and kind == 0:  # zeroed tail of the last block
            break
        chunk = data[offset + HEADER.size:offset + HEADER.size + length]
        assert zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF == checksum, "bad checksum"
        offset += HEADER.size + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()  # type: ignore[attr-defined]
            record.ParseFromString(pending)
            yield record


def _key(item: Any) -> str:
    """An item's key: `key`, or (as wandb-core writes history and summary) `nested_key`."""
    return str(item.key) or "/".join(item.nested_key)


def read_run(run_dir: Path) -> dict[str, Any]:
    """The run's config, history rows, summary and exit code (None while it runs), from its
    directory (`.../wandb/offline-run-<date>-<id>`)."""
    (log,) = run_dir.glob("run-*.wandb")
    config: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    run: dict[str, Any] = {}
    exit_code: int | None = None
    for record in records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = {"project": record.run.project, "display_name": record.run.display_name}
            config.update({_key(i): json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            config.update({_key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            summary.update({_key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "exit":
            exit_code = int(record.exit.exit_code)
    return {"run": run, "config": config, "history": history, "summary": summary,
            "exit_code": exit_code}
