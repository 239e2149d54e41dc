"""`review export --format label-studio`: each queued answer as a Label Studio task."""

from __future__ import annotations

from service.commands.feedback import label_studio_task

# An unsure answer: `positive` on top at 0.314, `negative` 0.028101 behind it.
UNSURE = {"id": "r1", "input": "It works, I suppose", "model": "ft:v3", "reason": "low_margin",
          "margin": 0.028101, "predicted": {"sentiment": "positive"},
          "scores": {"sentiment": {"positive": 0.314, "negative": 0.285899, "neutral": 0.2,
                                   "mixed": 0.200101}}}


def test_a_prediction_carries_the_models_own_score_and_the_margin_apart() -> None:
    task = label_studio_task("text", UNSURE)
    prediction = task["predictions"][0]
    assert prediction["score"] == 0.314  # not 1 - margin (0.971899): the model was unsure
    assert prediction["result"] == [{"from_name": "sentiment", "to_name": "text", "type": "choices",
                                     "value": {"choices": ["positive"]}, "score": 0.314}]
    assert task["data"]["margin"] == 0.028101  # the top-two margin, under its own name
    assert task["data"]["text"] == "It works, I suppose"


def test_several_targets_score_the_least_sure_and_multi_label_its_weakest_label() -> None:
    entry = {**UNSURE, "predicted": {"sentiment": "negative", "topics": ["billing", "delivery"]},
             "scores": {"sentiment": {"positive": 0.1, "negative": 0.9},
                        "topics": {"billing": 0.8, "delivery": 0.55, "other": 0.05}}}
    prediction = label_studio_task("text", entry)["predictions"][0]
    assert prediction["score"] == 0.55
    assert [r["score"] for r in prediction["result"]] == [0.9, 0.55]


def test_no_scores_means_no_score_rather_than_a_made_up_one() -> None:
    entry = {**UNSURE, "scores": None, "margin": None}
    prediction = label_studio_task("text", entry)["predictions"][0]
    assert "score" not in prediction and "score" not in prediction["result"][0]
