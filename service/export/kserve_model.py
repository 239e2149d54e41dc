"""A KServe model server for an ONNX export of a factory model (`classifier-gateway models export
MODEL --format onnx`): the Open Inference Protocol v2 over KServe's Python model server.

    python kserve_model.py --model_dir DIR --model_name NAME [--http_port 8080]

Needs only `kserve`, `onnxruntime`, `tokenizers` and `numpy` (no torch, nothing from this
repository): the export copies this file into each target's directory, so that a KServe
`InferenceService` runs it from the model volume (`deploy/k8s/components/kserve`).

The wire, as the gateway's `kserve-v2` protocol reads it:
- `POST /v2/models/{name}/infer` with one BYTES input `text`, shape `[n]`; the answer's output
  `probabilities`, FP32, shape `[n, labels]`, labels in the order of `config.json`'s `id2label`
  (KServe's metadata endpoint drops custom tensor parameters, so the gateway's task lists the
  labels: `models export` prints the tasks-file entry).
- `GET /v2/models/{name}`: the tensors' names, types and shapes.

The scores are the factory's own, to float rounding: the same graph (fused, int8), the same
tokenizer, the same chunking (texts longer than `seq_len` tokens are cut into at most `max_chunks`
chunks whose logits are averaged), the same softmax or sigmoid. A model trained with
`ngram_blend: false` therefore answers as the factory does (`bench.export_fidelity`: 0 on 600
tweets); a blended model answers with its encoder alone (`export.json` says by how much that
differs). It also runs the graph as the factory does, one text per onnxruntime call (its chunks
together) on a thread per core: the int8 graph quantises each call's activations with one scale,
so a call shared with other texts would move a text's scores with theirs (by up to 0.12 in
probability on tweets).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

CONFIG_FILE = "config.json"
ONNX_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
INPUT_NAME = "text"
OUTPUT_NAME = "probabilities"
CLS_ID, SEP_ID, PAD_ID = 101, 102, 0
F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


def cores() -> int:
    """CPU cores this server may use: those it may run on, capped by its cgroup v2 CPU quota (a
    Kubernetes CPU limit; the factory's `minilm_onnx.cores` does the same, this file imports
    nothing from the repository)."""
    visible = max(1, len(os.sched_getaffinity(0)))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text(encoding="ascii").split()[:2]
        if quota != "max":
            return max(1, min(visible, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return visible


class ExportedModel:
    """An export directory loaded for scoring: texts -> (n, labels) probabilities."""

    def __init__(self, directory: Path, workers: int | None = None) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
        spec = config.get("classifier_gateway")
        if not isinstance(spec, dict):
            raise ValueError(f"{directory / CONFIG_FILE} has no `classifier_gateway` section: "
                             "this is not a directory written by `classifier-gateway models "
                             "export --format onnx`")
        id2label = config["id2label"]
        self.labels = [str(id2label[str(i)]) for i in range(len(id2label))]
        self.multi_label = spec["loss_function"] == "multi_class"
        self.seq_len = int(spec["seq_len"])
        self.max_chunks = int(spec["max_chunks"])
        self.tokenizer = Tokenizer.from_file(str(directory / TOKENIZER_FILE))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # As the factory: one text per call on one intra-op thread, calls spread over a thread
        # per core (see `logits`).
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(directory / ONNX_FILE), options,
                                            providers=["CPUExecutionProvider"])
        self.pool = concurrent.futures.ThreadPoolExecutor(workers or cores(),
                                                          thread_name_prefix="onnx")

    def chunks(self, texts: list[str]) -> tuple[list[list[int]], I64]:
        """Token id sequences of at most `seq_len` ([CLS] ... [SEP]), at most `max_chunks` per
        text, and the text each belongs to."""
        width = self.seq_len - 2
        max_chars = width * self.max_chunks * 6  # as the factory: what is cut is never read
        sequences: list[list[int]] = []
        owner: list[int] = []
        encodings = self.tokenizer.encode_batch([t[:max_chars] for t in texts],
                                                add_special_tokens=False)
        for i, encoding in enumerate(encodings):
            ids = encoding.ids
            for c in range(max(1, min(self.max_chunks, -(-len(ids) // width)))):
                sequences.append([CLS_ID, *ids[c * width:(c + 1) * width], SEP_ID])
                owner.append(i)
        return sequences, np.asarray(owner, dtype=np.int64)

    def logits(self, texts: list[str]) -> F32:
        """(n, labels): each text's logits averaged over its chunks, one onnxruntime call per
        text holding its chunks alone, as the factory runs them: the int8 graph scales a call's
        activations together, so only that gives a text the same scores whatever it is sent
        with, and the factory's scores exactly."""
        sequences, owner = self.chunks(texts)
        bounds = np.searchsorted(owner, np.arange(len(texts) + 1))
        calls = [sequences[int(bounds[i]):int(bounds[i + 1])] for i in range(len(texts))]
        if len(calls) == 1:
            return self._text_logits(calls[0])[None, :]
        return np.stack(list(self.pool.map(self._text_logits, calls)))

    def _text_logits(self, chunks: list[list[int]]) -> F32:
        width = max(len(c) for c in chunks)
        ids = np.full((len(chunks), width), PAD_ID, dtype=np.int64)
        mask = np.zeros((len(chunks), width), dtype=np.int64)
        for r, chunk in enumerate(chunks):
            ids[r, :len(chunk)] = chunk
            mask[r, :len(chunk)] = 1
        (z,) = self.session.run(["logits"], {"input_ids": ids, "attention_mask": mask})
        mean: F32 = z.mean(axis=0, dtype=np.float32)
        return mean

    def probabilities(self, texts: list[str]) -> F32:
        if not texts:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        z = self.logits(texts)
        if self.multi_label:
            p: F32 = (0.5 * (1.0 + np.tanh(0.5 * z))).astype(np.float32)
            return p
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        s: F32 = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
        return s


def texts_of(data: Any) -> list[str]:
    """A BYTES tensor's elements (JSON strings, or bytes from the binary extension), flattened."""
    if isinstance(data, np.ndarray):
        data = data.tolist()
    out: list[str] = []
    for item in data if isinstance(data, list) else [data]:
        if isinstance(item, list):
            out.extend(texts_of(item))
        elif isinstance(item, bytes):
            out.append(item.decode("utf-8"))
        elif isinstance(item, str):
            out.append(item)
        else:
            raise ValueError(f"input `{INPUT_NAME}` holds a {type(item).__name__}; send the "
                             "texts as a BYTES tensor of strings")
    return out


def build_model(name: str, directory: Path) -> Any:
    """The `kserve.Model` serving `directory` as `name` (kserve imported here, so that the
    scoring above runs without it)."""
    import kserve
    from kserve.errors import InvalidInput
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

    class ExportedClassifier(kserve.Model):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(name)
            self.scorer: ExportedModel | None = None
            self.ready = False

        def load(self) -> bool:
            self.scorer = ExportedModel(directory)
            self.ready = True
            return True

        def get_input_types(self) -> list[dict[str, Any]]:
            return [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}]

        def get_output_types(self) -> list[dict[str, Any]]:
            assert self.scorer is not None
            return [{"name": OUTPUT_NAME, "datatype": "FP32",
                     "shape": [-1, len(self.scorer.labels)],
                     "parameters": {"labels": self.scorer.labels}}]

        async def predict(self, payload: Any, headers: dict[str, str] | None = None,
                          response_headers: dict[str, str] | None = None) -> Any:
            assert self.scorer is not None
            if not isinstance(payload, InferRequest):
                raise InvalidInput("send an Open Inference Protocol v2 request: "
                                   "POST /v2/models/{name}/infer")
            inputs = [i for i in payload.inputs if i.name == INPUT_NAME] or payload.inputs[:1]
            if not inputs or inputs[0].datatype != "BYTES":
                raise InvalidInput(f"expected one BYTES input named `{INPUT_NAME}` holding the "
                                   "texts, shape [n]")
            try:
                texts = texts_of(inputs[0].data)
            except ValueError as exc:
                raise InvalidInput(str(exc)) from None
            probs = await asyncio.to_thread(self.scorer.probabilities, texts)
            output = InferOutput(name=OUTPUT_NAME, shape=list(probs.shape), datatype="FP32")
            output.set_data_from_numpy(probs, binary_data=False)
            return InferResponse(model_name=name, infer_outputs=[output],
                                 response_id=payload.id or uuid.uuid4().hex)

    return ExportedClassifier()


def main(argv: list[str] | None = None) -> None:
    import kserve

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     parents=[kserve.model_server.parser])
    parser.add_argument("--model_dir", type=Path, default=Path("/mnt/models"),
                        help="the export's target directory (default /mnt/models, where KServe "
                             "mounts the storageUri)")
    args, _ = parser.parse_known_args(argv)
    model = build_model(args.model_name, args.model_dir)
    model.load()
    kserve.ModelServer(http_port=args.http_port, enable_grpc=False).start([model])


if __name__ == "__main__":
    main()
