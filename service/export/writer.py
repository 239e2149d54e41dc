"""Writing a fine-tuned `local-minilm` model in the forms inference servers load.

`export(model_dir, model_id, fmt, out)` writes one directory per target under `out`, plus
`out/export.json` (what was written, and how its scores relate to the factory's):

- `--format onnx`: `model.onnx` is the very graph the factory serves (MiniLM + mean pooling + the
  heads, fused, int8), cut to the target's logit columns (a `Slice`, then a `Mul` by the blend's
  encoder weight when the n-gram weight is 0), with the factory's `tokenizer.json`, a `config.json`
  (`id2label`, `label2id`, `problem_type`, and a `classifier_gateway` section: `seq_len`,
  `max_chunks`, loss) and `kserve_model.py`, the KServe model server that scores it exactly as the
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
no inference server and are refused with `NotExportable`.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from service.factory.models.base import Head
from service.factory.models.minilm_onnx import (
    FORMAT,
    FP32_FILE,
    NAME,
    ONNX_FILE,
    TOKENIZER_FILE,
    export_scale,
)
from service.factory.models.scoring import slices

FORMATS = ("onnx", "hf")
EXPORT_FILE = "export.json"
MODELING_FILE = "modeling_minilm_classifier.py"
RUNTIME_FILE = "kserve_model.py"
HERE = Path(__file__).resolve().parent
#: Keys of the factory's `Network` -> of `MiniLMMeanPoolingForSequenceClassification`.
ENCODER_PREFIX, HF_PREFIX = "encoder.", "bert."
#: BERT's [CLS] pooler: loaded with the base model, never used by the mean-pooling network.
UNUSED_PREFIX = "encoder.pooler."
SPECIAL_TOKENS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                  "cls_token": "[CLS]", "mask_token": "[MASK]"}


class NotExportable(Exception):
    """The model cannot be written in the asked format; the message says why and what to do."""


class BadFormat(NotExportable):
    """The format itself is unknown."""


@dataclass
class TargetExport:
    name: str
    directory: str
    labels: list[str]
    loss_function: str
    #: The blend's (encoder, n-gram) weights the factory scores this target with.
    blend: tuple[float, float]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "directory": self.directory, "labels": self.labels,
                "loss_function": self.loss_function, "blend": list(self.blend),
                "matches_factory": not self.notes, "notes": self.notes}


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "target"


def _meta(model_dir: Path, model_id: str) -> dict[str, Any]:
    try:
        meta = orjson.loads((model_dir / "model.json").read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        raise NotExportable(f"model {model_id!r} has no readable model.json (it was not saved "
                            "completely); train it again") from None
    base = meta.get("base_model") or "local-ngram"
    if base != NAME:
        raise NotExportable(
            f"model {model_id!r} is a {base} model (TF-IDF over word and character n-grams + "
            "logistic regression): no inference server loads that form, and it stays served by "
            "the factory. To serve a classifier on TEI, KServe or Infinity, fine-tune "
            f"{NAME} on the same data (`classifier-gateway finetune --model {NAME} "
            "--no-ngram-blend ...`) and export that model")
    if meta.get("format") != FORMAT:
        raise NotExportable(f"model {model_id!r} is a {NAME} model of format "
                            f"{meta.get('format')!r}; this factory exports format {FORMAT}: "
                            "train it again")
    return dict(meta)


def _heads(meta: dict[str, Any]) -> list[Head]:
    return [Head(h["name"], tuple(h["labels"]), h["loss_function"], float(h["weight"]))
            for h in meta["heads"]]


def _figure(meta: dict[str, Any], head: str, key: str) -> tuple[float, int, str] | None:
    figures = (meta.get("info") or {}).get("export_figures") or {}
    value = (figures.get("targets") or {}).get(head, {}).get(key)
    if value is None:
        return None
    return float(value), int(figures.get("texts", 0)), str(figures.get("source", ""))


def _blend_note(meta: dict[str, Any], head: Head, weights: tuple[float, float]) -> str | None:
    if not weights[1]:
        return None
    figure = _figure(meta, head.name, "blend_max")
    measured = (f"; on {figure[1]} {figure[2]} texts its scores differed from the factory's by "
                f"up to {figure[0]:.3f}" if figure else "")
    return (f"target {head.name!r}: the factory blends the n-gram model's evidence into this "
            f"model's scores (weights encoder {weights[0]}, n-gram {weights[1]}); the export "
            f"carries the encoder alone{measured}. For an export that answers as the factory "
            "does, train with the hyperparameter ngram_blend: false (`classifier-gateway "
            "finetune --no-ngram-blend`)")


def _quantized(meta: dict[str, Any]) -> bool:
    """Whether the factory serves this model from an int8 graph: the default, and what a model
    without the key was."""
    return bool((meta.get("info") or {}).get("quantized", True))


def _int8_note(meta: dict[str, Any], head: Head) -> str | None:
    if not _quantized(meta):
        return None
    figure = _figure(meta, head.name, "int8_max")
    measured = (f" (up to {figure[0]:.3f} on {figure[1]} {figure[2]} texts)" if figure else "")
    return (f"target {head.name!r}: the export is the float32 network and the factory serves "
            f"its int8 graph, so their probabilities differ slightly{measured}; `--format onnx` "
            "exports the factory's own graph")


def _tokenizer_files(meta: dict[str, Any], tokenizer_json: str, target: Path) -> None:
    (target / TOKENIZER_FILE).write_text(tokenizer_json, encoding="utf-8")
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True,
              "model_max_length": int(meta["seq_len"]), **SPECIAL_TOKENS}
    _write_json(target / "tokenizer_config.json", config)
    _write_json(target / "special_tokens_map.json", SPECIAL_TOKENS)
    vocab = orjson.loads(tokenizer_json).get("model", {}).get("vocab")
    if isinstance(vocab, dict):  # WordPiece: what slow tokenizers and some servers read
        ordered = sorted(vocab.items(), key=lambda kv: int(kv[1]))
        (target / "vocab.txt").write_text("".join(f"{token}\n" for token, _ in ordered),
                                          encoding="utf-8")


def _write_json(path: Path, doc: Any) -> None:
    path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n")


def _config(meta: dict[str, Any], head: Head, scale: float, model_id: str,
            fmt: str) -> dict[str, Any]:
    base = dict(meta.get("encoder_config") or {"model_type": "bert", "hidden_size": 384,
                                                 "max_position_embeddings": 512})
    for key in ("_name_or_path", "architectures", "auto_map", "transformers_version",
                "id2label", "label2id", "problem_type", "torch_dtype", "dtype"):
        base.pop(key, None)
    labels = list(head.labels)
    base.update(
        id2label={str(i): label for i, label in enumerate(labels)},
        label2id={label: i for i, label in enumerate(labels)},
        problem_type=("multi_label_classification" if head.loss_function == "multi_class"
                      else "single_label_classification"),
        classifier_gateway={
            "format": 1, "export_format": fmt, "source_model": model_id,
            "target": head.name, "loss_function": head.loss_function,
            "seq_len": int(meta["seq_len"]), "max_chunks": int(meta["max_chunks"]),
            "logit_scale": scale, "kind": meta.get("kind", "text")})
    return base


def _onnx_target(onnx_bytes: bytes, columns: slice, scale: float) -> bytes:
    """The factory's graph with its `logits` cut to one head's columns, times `scale`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load_from_string(onnx_bytes)
    graph = model.graph
    (output,) = [o for o in graph.output if o.name == "logits"]
    inner = "all_heads_logits"
    for node in graph.node:
        node.output[:] = [inner if name == "logits" else name for name in node.output]
    graph.initializer.extend([
        numpy_helper.from_array(np.asarray([columns.start], dtype=np.int64), "export_starts"),
        numpy_helper.from_array(np.asarray([columns.stop], dtype=np.int64), "export_ends"),
        numpy_helper.from_array(np.asarray([1], dtype=np.int64), "export_axes"),
        numpy_helper.from_array(np.asarray(scale, dtype=np.float32), "export_scale")])
    graph.node.extend([
        helper.make_node("Slice", [inner, "export_starts", "export_ends", "export_axes"],
                         ["head_logits"], name="export_slice"),
        helper.make_node("Mul", ["head_logits", "export_scale"], ["logits"],
                         name="export_scale_mul")])
    graph.output.remove(output)
    graph.output.append(helper.make_tensor_value_info(
        "logits", TensorProto.FLOAT, ["batch", columns.stop - columns.start]))
    return bytes(model.SerializeToString())


def _hf_weights(state: dict[str, Any], columns: slice, scale: float) -> dict[str, Any]:
    out = {HF_PREFIX + k.removeprefix(ENCODER_PREFIX): np.ascontiguousarray(v, dtype=np.float32)
           for k, v in state.items()
           if k.startswith(ENCODER_PREFIX) and not k.startswith(UNUSED_PREFIX)}
    out["classifier.weight"] = np.ascontiguousarray(state["head.weight"][columns] * scale,
                                                    dtype=np.float32)
    out["classifier.bias"] = np.ascontiguousarray(state["head.bias"][columns] * scale,
                                                  dtype=np.float32)
    return out


def export(model_dir: Path, model_id: str, fmt: str, out: Path) -> dict[str, Any]:
    """Write `model_dir` (a fine-tuned model of this factory) under `out` in format `fmt`;
    returns what `export.json` holds. Raises `NotExportable` with the reason and the remedy."""
    if fmt not in FORMATS:
        raise BadFormat(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    meta = _meta(model_dir, model_id)
    heads = _heads(meta)
    weights = [(float(a), float(b)) for a, b in meta["weights"]]
    state: dict[str, Any] | None = None
    if fmt == "hf":
        if not meta.get("fp32_weights") or not (model_dir / FP32_FILE).exists():
            raise NotExportable(
                f"model {model_id!r} was trained before the factory kept float32 weights beside "
                "its int8 graph, so no Hugging Face directory can be written from it: export it "
                "with --format onnx (the factory's own graph, served by the bundled KServe "
                "server), or train it again")
        from safetensors.numpy import load_file

        state = load_file(str(model_dir / FP32_FILE))
    onnx_bytes = (model_dir / ONNX_FILE).read_bytes() if fmt == "onnx" else b""
    tokenizer_json = (model_dir / TOKENIZER_FILE).read_text(encoding="utf-8")
    out.mkdir(parents=True, exist_ok=True)
    targets: list[TargetExport] = []
    used: set[str] = set()
    for head, columns, w in zip(heads, slices(heads), weights, strict=True):
        directory = _safe(head.name)
        while directory in used:
            directory += "_"
        used.add(directory)
        target = out / directory
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        scale = export_scale(w)
        config = _config(meta, head, scale, model_id, fmt)
        notes = [n for n in [_blend_note(meta, head, w)] if n]
        if fmt == "onnx":
            (target / "model.onnx").write_bytes(_onnx_target(onnx_bytes, columns, scale))
            shutil.copyfile(HERE / "kserve_model.py", target / RUNTIME_FILE)
        else:
            from safetensors.numpy import save_file

            from service.export.hf_modeling import MODEL_TYPE

            assert state is not None
            save_file(_hf_weights(state, columns, scale), str(target / "model.safetensors"),
                      metadata={"format": "pt"})
            shutil.copyfile(HERE / "hf_modeling.py", target / MODELING_FILE)
            module = MODELING_FILE.removesuffix(".py")
            config.update(
                model_type=MODEL_TYPE,
                architectures=["MiniLMMeanPoolingForSequenceClassification"],
                auto_map={"AutoConfig": f"{module}.MiniLMClassifierConfig",
                          "AutoModelForSequenceClassification":
                              f"{module}.MiniLMMeanPoolingForSequenceClassification"})
            notes.extend(n for n in [_int8_note(meta, head)] if n)
        _write_json(target / "config.json", config)
        _tokenizer_files(meta, tokenizer_json, target)
        targets.append(TargetExport(head.name, directory, list(head.labels),
                                    head.loss_function, w, notes))
    report = {"object": "model.export", "model": model_id, "format": fmt,
              "base_model": NAME, "seq_len": int(meta["seq_len"]),
              "max_chunks": int(meta["max_chunks"]),
              "targets": [t.to_json() for t in targets],
              "figures": (meta.get("info") or {}).get("export_figures")}
    _write_json(out / EXPORT_FILE, report)
    # safetensors writes 0600: a server container running as another user could not read it.
    for path in [out / EXPORT_FILE, *(p for t in targets for p in (out / t.directory).rglob("*"))]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return report


def archive(directory: Path, out_file: Path, files: Sequence[Path] | None = None) -> None:
    """`directory`'s contents as an uncompressed tarball at `out_file` (paths relative to it):
    weights compress poorly (gzip -1: 8% off an HF export's 90 MB for 5.7 s of a core, 25% off
    an ONNX export's 23 MB), and the export is fetched once per deployment."""
    import tarfile

    with tarfile.open(out_file, "w") as tar:
        for path in sorted(files if files is not None else directory.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=str(path.relative_to(directory)))
