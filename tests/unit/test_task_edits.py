"""`service.gateway.task_edits`: the tasks file's edits as pure functions on its document, with
the roles and keys of the schema in `service.gateway.registry`."""

from __future__ import annotations

import io
from typing import Any

import pytest
from ruamel.yaml import YAML

from service.gateway import task_edits
from service.gateway.registry import ModelRole
from service.gateway.task_edits import EditError, MissingRole


def document(**tasks: dict[str, Any]) -> dict[str, Any]:
    return {"upstreams": {"local": {"base_url": "http://127.0.0.1:8100"},
                          "other": {"base_url": "http://127.0.0.1:8200"}},
            "tasks": {name: {"upstream": "local", **task} for name, task in tasks.items()}}


def round_trip(text: str) -> tuple[YAML, Any]:
    yaml = YAML(typ="rt")
    return yaml, yaml.load(text)


def test_roles_of_a_task_in_the_document() -> None:
    doc = document(t={"model": "a", "shadow": {"model": "d", "sample": 1.0, "upstream": "other"},
                      "previous": {"upstream": "local", "model": "z"}})
    assert task_edits.roles(doc, "t") == [
        ModelRole("model", "local", "a", True), ModelRole("shadow", "other", "d", True),
        ModelRole("previous", "local", "z", False)]
    doc["tasks"]["t"]["threshold"] = 2
    with pytest.raises(EditError, match=r"tasks\.t\.threshold: Input should be less than "):
        task_edits.roles(doc, "t")


def test_set_task_creates_updates_and_removes_settings() -> None:
    doc = document()
    task_edits.set_task(doc, "t", {"upstream": "local", "model": "a", "cache_ttl_s": 60})
    task_edits.set_task(doc, "t", {"model": None, "cache_ttl_s": [], "threshold": 0.3})
    assert doc["tasks"]["t"] == {"upstream": "local", "model": "a", "threshold": 0.3}
    with pytest.raises(EditError, match="a task has no setting 'weight'; its settings: upstream"):
        task_edits.set_task(doc, "t", {"weight": 0.1})
    with pytest.raises(EditError, match=r"no task named 'x' in the tasks file \(tasks: t\)"):
        task_edits.remove_task(doc, "x")
    task_edits.remove_task(doc, "t")
    assert doc["tasks"] == {}


def test_set_role_adds_changes_and_replaces_a_canary() -> None:
    doc = document(t={"model": "a"})
    task_edits.set_role(doc, "t", "canary", model="b")
    task_edits.set_role(doc, "t", "shadow", model="c", upstream="other")
    assert doc["tasks"]["t"]["canary"] == {"model": "b", "weight": 0.1}  # the role's default
    assert doc["tasks"]["t"]["shadow"] == {"model": "c", "sample": 1.0, "upstream": "other"}
    task_edits.set_role(doc, "t", "canary", share=0.5, upstream="other")
    task_edits.set_role(doc, "t", "shadow", upstream="local")  # the task's own: left implicit
    assert doc["tasks"]["t"]["canary"] == {"model": "b", "weight": 0.5, "upstream": "other"}
    assert doc["tasks"]["t"]["shadow"] == {"model": "c", "sample": 1.0}
    task_edits.set_role(doc, "t", "canary", model="d")  # another model: a new entry
    assert doc["tasks"]["t"]["canary"] == {"model": "d", "weight": 0.1}
    task_edits.clear(doc, "t", "canary")
    with pytest.raises(MissingRole, match="task 't' has no canary to change") as caught:
        task_edits.set_role(doc, "t", "canary", share=0.2)
    assert caught.value.role == "canary"
    with pytest.raises(EditError, match="'previous' is not a rollout role; those are: canary, "
                                        "shadow"):
        task_edits.set_role(doc, "t", "previous", model="x")
    task_edits.validate(doc)


def test_update_entry_merges_the_keys_of_the_entrys_model() -> None:
    doc = document(t={"model": "a"})
    task_edits.update_entry(doc, "t", "review", {"max_margin": 0.1, "sample": None})
    task_edits.update_entry(doc, "t", "review", {"sample": 0.02})
    assert doc["tasks"]["t"]["review"] == {"max_margin": 0.1, "sample": 0.02}
    with pytest.raises(EditError, match="a task's review has no setting 'margin'"):
        task_edits.update_entry(doc, "t", "review", {"margin": 0.1})
    with pytest.raises(EditError, match="a single value"):
        task_edits.update_entry(doc, "t", "feedback", {"on": True})


def test_promote_prefers_the_canary_keeps_previous_and_rollback_swaps_back() -> None:
    doc = document(t={"model": "a", "target": "topic",
                      "canary": {"model": "b", "weight": 0.1, "upstream": "other",
                                 "labels": ["x", "y"]},
                      "shadow": {"model": "c", "sample": 0.5}})
    swap = task_edits.promote(doc, "t")
    assert swap == task_edits.Swap("canary", "b", "a", ())
    task = doc["tasks"]["t"]
    assert (task["upstream"], task["model"], task["labels"], task["target"]) == (
        "other", "b", ["x", "y"], "topic")
    assert task["previous"] == {"upstream": "local", "model": "a", "target": "topic"}
    # The shadow had the task's upstream by default: it stays there, now named.
    assert task["shadow"] == {"model": "c", "sample": 0.5, "upstream": "local"}
    assert "canary" not in task
    task_edits.validate(doc)
    swap = task_edits.rollback(doc, "t")
    assert (swap.source, swap.model, swap.replaced) == ("previous", "a", "b")
    assert (task["upstream"], task["model"], task["previous"]["model"]) == ("local", "a", "b")
    assert task["shadow"] == {"model": "c", "sample": 0.5}  # the task's own upstream again
    with pytest.raises(MissingRole, match="task 't' has no canary to promote; it has a "
                                          "shadow") as caught:
        task_edits.promote(doc, "t", "canary")
    assert caught.value.present == ("shadow",)
    assert task_edits.promote(doc, "t", "shadow").model == "c"
    with pytest.raises(MissingRole, match="task 't' has no canary or shadow model to promote"):
        task_edits.promote(doc, "t")


def test_promote_removes_what_would_repeat_the_new_model() -> None:
    doc = document(t={"model": "a", "canary": {"model": "b", "weight": 0.1},
                      "shadow": {"model": "b", "sample": 0.5}})
    swap = task_edits.promote(doc, "t")
    assert swap.notes == ("shadow b removed: it is the task's model now",)
    assert "shadow" not in doc["tasks"]["t"]
    task_edits.validate(doc)


def test_rollback_without_previous_is_a_missing_role() -> None:
    with pytest.raises(MissingRole, match="task 't' has no previous model to roll back to"):
        task_edits.rollback(document(t={"model": "a"}), "t")


def test_edits_keep_the_comments_of_a_round_trip_document() -> None:
    yaml, doc = round_trip(
        "tasks:\n"
        "  t:  # the support queue\n"
        "    upstream: local\n"
        "    model: a   # current\n"
        "    shadow: {model: c, sample: 0.5}  # trying c\n"
        "    canary:\n"
        "      model: b  # candidate\n"
        "      weight: 0.1\n")
    task_edits.set_role(doc, "t", "canary", share=0.3)
    task_edits.set_role(doc, "t", "shadow", share=0.2)
    out = io.StringIO()
    yaml.dump(doc, out)
    text = out.getvalue()
    for kept in ("t:  # the support queue", "model: a   # current", "# trying c",
                 "model: b  # candidate", "weight: 0.3", "sample: 0.2"):
        assert kept in text, text


def test_changed_roles_and_a_repeated_rollout() -> None:
    before = task_edits.task_spec(document(t={"model": "a", "canary": {
        "model": "b", "weight": 0.1}}), "t")
    after = task_edits.task_spec(document(t={
        "model": "a", "canary": {"model": "b", "weight": 0.5},
        "shadow": {"model": "b", "sample": 1.0},
        "previous": {"upstream": "local", "model": "z"}}), "t")
    # A weight is no new model; `previous` is not served.
    assert task_edits.changed_roles(before, after) == [ModelRole("shadow", "local", "b", True)]
    assert [r.role for r in task_edits.changed_roles(None, before)] == ["model", "canary"]
    assert task_edits.repeated_rollout(after) == (ModelRole("canary", "local", "b", True),
                                                  ModelRole("shadow", "local", "b", True))
    assert task_edits.repeated_rollout(before) is None


def test_validate_is_the_gateways_parser() -> None:
    doc = document(t={"model": "a", "canary": {"model": "a", "weight": 0.1}})
    with pytest.raises(EditError, match=r"tasks\.t\.canary\.model: 'a' on 'local' is the task's own "
                                        "model"):
        task_edits.validate(doc)


def test_the_prediction_log_is_an_entry_the_edits_merge_and_clear() -> None:
    doc = document(t={"model": "a"})
    task_edits.update_entry(doc, "t", "log", {"sample": 0.05, "inputs": None})
    task_edits.update_entry(doc, "t", "log", {"retention_days": 3})
    assert doc["tasks"]["t"]["log"] == {"sample": 0.05, "retention_days": 3}
    spec = task_edits.validate(doc).tasks["t"].log
    assert spec is not None and (spec.sample, spec.inputs, spec.retention_days) == (0.05, False, 3)
    with pytest.raises(EditError, match="has no setting 'keep'"):
        task_edits.update_entry(doc, "t", "log", {"keep": 1})
    doc["tasks"]["t"]["log"]["sample"] = 2
    with pytest.raises(EditError, match=r"tasks\.t\.log\.sample"):
        task_edits.validate(doc)
    task_edits.clear(doc, "t", "log")
    assert "log" not in doc["tasks"]["t"]
