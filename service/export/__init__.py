"""Exporting fine-tuned factory models to the inference servers that scale serving past one
factory (KServe, onnxruntime, transformers-based servers): `writer` keeps the formats,
`export.json` and the archive, and asks the base model's exporter (`BaseModel.exporter`) for the
directories; `kserve_model` is the KServe model server that serves an ONNX export, `hf_modeling` the
model code a Hugging Face export carries (both standalone files, copied into exports)."""
