"""Writing a fine-tuned `local-minilm` model in the forms inference servers load: the exporter
`MiniLM.exporter` hands to the export writer (`service.export.writer`, which keeps the formats,
`export.json` and the archive; its docstring says what each format holds and what cannot come
along, with the figures).

Per target, one directory:
- `onnx`: `model.onnx` is the very graph the factory serves (MiniLM + mean pooling + the heads,
  fused, int8), cut to the target's logit columns (a `Slice`, then a `Mul` by the blend's encoder
  weight over the target's temperature when the n-gram weight is 0, `minilm_onnx.export_scale`:
  the export answers the factory's calibrated scores; a model saved before calibration has
  temperature 1), with the factory's
  `tokenizer.json`, a `config.json` and `kserve_model.py`, the KServe model server that scores it
  exactly as the factory does.
- `hf`: `model.safetensors` (the float32 fine-tuned weights kept at training time, renamed to the
  keys of `MiniLMMeanPoolingForSequenceClassification`), the tokenizer files and the model code
  (`hf_modeling.py`, `trust_remote_code=True`: the network mean-pools, which no stock BERT
  classifier does).

The two runtime files an export ships, `kserve_model.py` and `hf_modeling.py`, stay in
`service/export/` (the KServe image copies `kserve_model.py` from there): they import nothing of
this project, and are copied, not imported, except `hf_modeling.MODEL_TYPE` for the HF config.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from service.factory.models.base import (
    Exported,
    ExportedTarget,
    Head,
    NotExportable,
    target_directories,
)
from service.factory.models.minilm_onnx import (
    FORMAT,
    FP32_FILE,
    NAME,
    ONNX_FILE,
    TOKENIZER_FILE,
    Blend,
    blends_of,
    describe,
    exact_alone,
    export_scale,
    temperatures_of,
)
from service.factory.models.scoring import slices

MODELING_FILE = "modeling_minilm_classifier.py"
RUNTIME_FILE = "kserve_model.py"
#: Where the runtime files an export ships live (see the module docstring).
RUNTIME_DIR = Path(__file__).resolve().parents[2] / "export"
#: Keys of the factory's `Network` -> of `MiniLMMeanPoolingForSequenceClassification`.
ENCODER_PREFIX, HF_PREFIX = "encoder.", "bert."
#: BERT's [CLS] pooler: loaded with the base model, never used by the mean-pooling network.
UNUSED_PREFIX = "encoder.pooler."
SPECIAL_TOKENS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                  "cls_token": "[CLS]", "mask_token": "[MASK]"}


class MiniLMExporter:
    """`local-minilm`'s `Exporter` (see the module docstring)."""

    advice = (f"`classifier-gateway finetune --model {NAME} --no-ngram-blend ...`")

    def export(self, model_dir: Path, model_id: str, meta: Mapping[str, Any], fmt: str,
               out: Path) -> Exported:
        if meta.get("format") != FORMAT:
            raise NotExportable(f"model {model_id!r} is a {NAME} model of format "
                                f"{meta.get('format')!r}; this factory exports format {FORMAT}: "
                                "train it again")
        heads = _heads(meta)
        weights = blends_of(meta, len(heads))
        temperatures = temperatures_of(meta, len(heads))
        state: dict[str, Any] | None = None
        if fmt == "hf":
            if not meta.get("fp32_weights") or not (model_dir / FP32_FILE).exists():
                raise NotExportable(
                    f"model {model_id!r} was trained before the factory kept float32 weights "
                    "beside its int8 graph, so no Hugging Face directory can be written from it: "
                    "export it with --format onnx (the factory's own graph, served by the "
                    "bundled KServe server), or train it again")
            from safetensors.numpy import load_file

            state = load_file(str(model_dir / FP32_FILE))
        onnx_bytes = (model_dir / ONNX_FILE).read_bytes() if fmt == "onnx" else b""
        tokenizer_json = (model_dir / TOKENIZER_FILE).read_text(encoding="utf-8")
        out.mkdir(parents=True, exist_ok=True)
        targets: list[ExportedTarget] = []
        directories = target_directories([head.name for head in heads])
        for head, columns, w, t, directory in zip(heads, slices(heads), weights, temperatures,
                                                  directories, strict=True):
            target = out / directory
            if target.exists():
                shutil.rmtree(target)
            target.mkdir(parents=True)
            scale = export_scale(w, t)
            config = _config(meta, head, scale, t, model_id, fmt)
            notes = [n for n in [_blend_note(meta, head, w)] if n]
            if fmt == "onnx":
                (target / "model.onnx").write_bytes(_onnx_target(onnx_bytes, columns, scale))
                shutil.copyfile(RUNTIME_DIR / "kserve_model.py", target / RUNTIME_FILE)
            else:
                from safetensors.numpy import save_file

                from service.export.hf_modeling import MODEL_TYPE

                assert state is not None
                save_file(_hf_weights(state, columns, scale), str(target / "model.safetensors"),
                          metadata={"format": "pt"})
                shutil.copyfile(RUNTIME_DIR / "hf_modeling.py", target / MODELING_FILE)
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
            targets.append(ExportedTarget(head.name, directory, list(head.labels),
                                          head.loss_function, w, notes))
        return Exported(targets, {"seq_len": int(meta["seq_len"]),
                                  "max_chunks": int(meta["max_chunks"]),
                                  "figures": (meta.get("info") or {}).get("export_figures")})


def _heads(meta: Mapping[str, Any]) -> list[Head]:
    return [Head(h["name"], tuple(h["labels"]), h["loss_function"], float(h["weight"]))
            for h in meta["heads"]]


def _figure(meta: Mapping[str, Any], head: str, key: str) -> tuple[float, int, str] | None:
    figures = (meta.get("info") or {}).get("export_figures") or {}
    value = (figures.get("targets") or {}).get(head, {}).get(key)
    if value is None:
        return None
    return float(value), int(figures.get("texts", 0)), str(figures.get("source", ""))


def _blend_note(meta: Mapping[str, Any], head: Head, parts: Blend) -> str | None:
    if exact_alone(parts):
        return None
    figure = _figure(meta, head.name, "blend_max")
    measured = (f"; on {figure[1]} {figure[2]} texts its scores differed from the factory's by "
                f"up to {figure[0]:.3f}" if figure else "")
    return (f"target {head.name!r}: the factory blends the n-gram model's evidence into this "
            f"model's scores ({describe(parts)}); the export "
            f"carries the encoder alone, without the temperature fitted to the blend{measured}. For an export that answers as the factory "
            "does, train with the hyperparameter ngram_blend: false (`classifier-gateway "
            "finetune --no-ngram-blend`)")


def _quantized(meta: Mapping[str, Any]) -> bool:
    """Whether the factory serves this model from an int8 graph: the default, and what a model
    without the key was."""
    return bool((meta.get("info") or {}).get("quantized", True))


def _int8_note(meta: Mapping[str, Any], head: Head) -> str | None:
    if not _quantized(meta):
        return None
    figure = _figure(meta, head.name, "int8_max")
    measured = (f" (up to {figure[0]:.3f} on {figure[1]} {figure[2]} texts)" if figure else "")
    return (f"target {head.name!r}: the export is the float32 network and the factory serves "
            f"its int8 graph, so their probabilities differ slightly{measured}; `--format onnx` "
            "exports the factory's own graph")


def _tokenizer_files(meta: Mapping[str, Any], tokenizer_json: str, target: Path) -> None:
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


def _config(meta: Mapping[str, Any], head: Head, scale: float, temperature: float,
            model_id: str, fmt: str) -> dict[str, Any]:
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
            "logit_scale": scale, "temperature": temperature,
            "kind": meta.get("kind", "text")})
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


__all__ = ["MiniLMExporter"]
