"""Writing a fine-tuned model in the forms inference servers load.

`export(model_dir, model_id, fmt, out)` asks the base model that wrote `model_dir` for its
exporter (`BaseModel.exporter`, service/factory/models/base.py), which writes one directory per
target under `out`; this module keeps what every export shares: the formats, `out/export.json`
(what was written, and how its scores relate to the factory's) and the archive. It names no
concrete model: a third exportable base model brings its own exporter. Today only `local-minilm`
has one (service/factory/models/minilm_export.py):

- `--format onnx`: `model.onnx` is the very graph the factory serves (MiniLM + mean pooling + the
  heads, fused, int8), cut to the target's logit columns (a `Slice`, then a `Mul` by the blend's
  encoder weight over the target's temperature when the n-gram weight is 0: the factory's
  calibrated scores), with the factory's `tokenizer.json`, a `config.json` (`id2label`,
  `label2id`, `problem_type`, and a `classifier_gateway` section: `seq_len`, `max_chunks`, loss,
  `logit_scale`, `temperature`) and `kserve_model.py`, the KServe model server that scores it exactly as the
  factory does (same chunking, same softmax). Any `local-minilm` model exports this way.
- `--format hf`: a Hugging Face `AutoModelForSequenceClassification` directory per target:
  `config.json` with `id2label`/`label2id`, `model.safetensors` (the float32 fine-tuned weights
  kept at training time), `tokenizer.json` + `tokenizer_config.json` + `vocab.txt`, and the model
  code (`trust_remote_code=True`: the network mean-pools, which no stock BERT classifier does, see
  `hf_modeling`). Models trained before the float32 weights were kept export as ONNX only.

What cannot come along, and what it costs (the figures come from the model's own training run,
`minilm_train.export_figures`, and are repeated in `export.json` and by the CLI):
- the n-gram evidence blended into the factory's scores: an inference server runs the encoder
  alone. Train with `ngram_blend: false` for an export that answers as the factory does; a
  blended model still exports, with a note giving the largest score difference measured on
  held-out texts.
- int8: the HF export is float32, the factory int8: on 600 held-out tweets (`python -m
  bench.export_fidelity`) probabilities differed by 0.0142 on average and 0.176 at most, the top
  label agreed on 98.0% (the `int8` figures of each model say the same for its own texts). The ONNX export differed by 0. A model trained with `quantize=False` (benches,
  tests) serves float32 and its HF export matches, without the note.
- chunking: the factory averages the logits of up to 8 chunks of `seq_len` tokens; the ONNX
  export's KServe server does too, transformers-based servers truncate to `seq_len`.

`local-ngram` models (TF-IDF over word and character n-grams + logistic regression) are read by
no inference server (the base model has no exporter) and are refused with `NotExportable`, which
names the base models that do export.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from service.factory.models.base import BaseModel, ModelFormatError, NotExportable
from service.factory.models.registry import (
    Registry,
    UnknownBaseModel,
    base_model_of,
    default_registry,
    read_meta,
)

__all__ = ["EXPORT_FILE", "FORMATS", "BadFormat", "NotExportable", "archive", "export"]

FORMATS = ("onnx", "hf")
EXPORT_FILE = "export.json"


class BadFormat(NotExportable):
    """The format itself is unknown."""


def export(model_dir: Path, model_id: str, fmt: str, out: Path,
           registry: Registry | None = None) -> dict[str, Any]:
    """Write `model_dir` (a fine-tuned model of this factory) under `out` in format `fmt`;
    returns what `export.json` holds. Raises `NotExportable` with the reason and the remedy."""
    if fmt not in FORMATS:
        raise BadFormat(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    registry = registry or default_registry()
    try:
        meta = read_meta(model_dir)
    except ModelFormatError:
        raise NotExportable(f"model {model_id!r} has no readable model.json (it was not saved "
                            "completely); train it again") from None
    name = base_model_of(meta)
    try:
        base = registry.get(name)
    except UnknownBaseModel:
        raise NotExportable(f"model {model_id!r} was written by base model {name!r}, which this "
                            f"factory does not have ({', '.join(registry.names())})") from None
    exporter = base.exporter
    if exporter is None:
        raise NotExportable(_refusal(model_id, base, registry))
    exported = exporter.export(model_dir, model_id, meta, fmt, out)
    report = {"object": "model.export", "model": model_id, "format": fmt,
              "base_model": base.name, **exported.details,
              "targets": [t.to_json() for t in exported.targets]}
    _write_json(out / EXPORT_FILE, report)
    # safetensors writes 0600: a server container running as another user could not read it.
    written = [p for t in exported.targets for p in (out / t.directory).rglob("*")]
    for path in [out / EXPORT_FILE, *written]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return report


def _refusal(model_id: str, base: BaseModel, registry: Registry) -> str:
    """Why a model of a base model without an exporter stays in the factory, and which base
    model to fine-tune instead."""
    refusal = (f"model {model_id!r} is a {base.name} model ({base.description}): no inference "
               "server loads that form, and it stays served by the factory.")
    for other in registry.models():
        exporter = other.exporter
        if exporter is not None:
            return (f"{refusal} To serve a classifier on TEI, KServe or Infinity, fine-tune "
                    f"{other.name} on the same data ({exporter.advice}) and export that model")
    return refusal


def _write_json(path: Path, doc: Any) -> None:
    path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n")


def archive(directory: Path, out_file: Path, files: Sequence[Path] | None = None) -> None:
    """`directory`'s contents as an uncompressed tarball at `out_file` (paths relative to it):
    weights compress poorly (gzip -1: 8% off an HF export's 90 MB for 5.7 s of a core, 25% off
    an ONNX export's 23 MB), and the export is fetched once per deployment."""
    import tarfile

    with tarfile.open(out_file, "w") as tar:
        for path in sorted(files if files is not None else directory.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=str(path.relative_to(directory)))
