# mypy: disallow-subclassing-any=False
# mypy: disable-error-code="no-untyped-call"
"""The model code a Hugging Face export of `local-minilm` carries (copied into the directory as
`modeling_minilm_classifier.py`, named by `auto_map` in its `config.json`).

Why custom code: the factory's network is MiniLM + *mean pooling over the real tokens* + one linear
layer. `BertForSequenceClassification` reads the [CLS] token through a tanh pooler instead (TEI's
and vLLM's BERT classifiers read [CLS] too), so no stock architecture computes this model, and
loading the weights into one would silently score with a random pooler. The export therefore has its own
`model_type`: transformers refuses it without `trust_remote_code=True`, rather than guessing.

    AutoModelForSequenceClassification.from_pretrained(directory, trust_remote_code=True)

The weights are the fine-tuned float32 network's (the factory serves an int8 graph of them, see
`service.factory.export` for the measured difference). Texts longer than the tokenizer's
`model_max_length` (the job's `seq_len`) are truncated here; the factory averages up to 8 chunks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import BertConfig, BertModel, BertPreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

MODEL_TYPE = "classifier-gateway-minilm"


class MiniLMClassifierConfig(BertConfig):
    """A BERT config under its own `model_type` (see the module docstring)."""

    model_type = MODEL_TYPE


class MiniLMMeanPoolingForSequenceClassification(BertPreTrainedModel):
    """BERT encoder, mean pooling over `attention_mask`, a linear classifier: the factory's
    `local-minilm` network for one target."""

    config_class = MiniLMClassifierConfig

    def __init__(self, config: MiniLMClassifierConfig) -> None:
        super().__init__(config)
        self.num_labels = len(config.id2label or {})
        self.bert = BertModel(config, add_pooling_layer=False)
        self.classifier = nn.Linear(int(config.hidden_size), len(config.id2label or {}))
        self.post_init()

    def forward(self, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs: Any) -> SequenceClassifierOutput:
        assert input_ids is not None, "input_ids are required"
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # The factory trains and serves with token type 0 everywhere.
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        logits = self.classifier(pooled)
        loss = None
        if labels is not None:
            if self.config.problem_type == "multi_label_classification":
                loss = nn.functional.binary_cross_entropy_with_logits(logits, labels.float())
            else:
                loss = nn.functional.cross_entropy(logits, labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits)
