"""Tasks file parsing and validation: messages name the task and the field."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from service.gateway.classifier import certainty
from service.gateway.protocols import Route
from service.gateway.registry import (
    ModelRole,
    RegistryError,
    RegistryWatcher,
    TaskSpec,
    load_registry,
    parse_registry,
    role_fields,
)

GOOD = {
    "upstreams": {"local": {"base_url": "http://127.0.0.1:8100/"},
                  "mistral": {"base_url": "https://api.mistral.ai", "api_key_env": "MISTRAL_API_KEY"}},
    "tasks": {
        "sentiment": {"upstream": "local", "model": "ft:a", "kind": "text", "cache_ttl_s": 60},
        "intent": {"upstream": "mistral", "model": "ft:b", "kind": "chat", "threshold": 0.3,
                   "multi_label_targets": ["topics"]},
    },
}


def test_valid_file_parses_with_defaults() -> None:
    reg = parse_registry(GOOD)
    assert reg.upstreams["local"].base_url == "http://127.0.0.1:8100"
    assert reg.upstreams["local"].protocol == "mistral"
    assert reg.tasks["sentiment"].route() == Route("text", "ft:a", "sentiment", ())
    assert reg.tasks["intent"].route() == Route("chat", "ft:b", "intent", ())
    assert reg.tasks["intent"].multi_label_targets == ("topics",)
    assert reg.tasks["sentiment"].threshold == 0.5 and reg.tasks["sentiment"].timeout_s is None


def test_resolve_model_by_task_name_or_model_id_of_the_right_kind() -> None:
    reg = parse_registry(GOOD)
    assert reg.resolve_model("sentiment", "text") is reg.tasks["sentiment"]
    assert reg.resolve_model("ft:a", "text") is reg.tasks["sentiment"]
    assert reg.resolve_model("ft:a", "chat") is None
    assert reg.resolve_model("nope", "text") is None


@pytest.mark.parametrize(("patch", "message"), [
    ({"kind": "audio"}, "tasks.sentiment.kind: Input should be 'text' or 'chat'"),
    ({"upstream": "nowhere"}, "tasks.sentiment.upstream: unknown upstream 'nowhere'"),
    ({"model": ""}, "tasks.sentiment.model"),
    ({"threshold": 2}, "tasks.sentiment.threshold"),
    ({"cache_tll_s": 5}, "tasks.sentiment.cache_tll_s: Extra inputs are not permitted"),
])
def test_invalid_task_names_task_and_field(patch: dict[str, object], message: str) -> None:
    sentiment: dict[str, object] = {"upstream": "local", "model": "ft:a", **patch}
    data = {"upstreams": GOOD["upstreams"], "tasks": {"sentiment": sentiment}}
    with pytest.raises(RegistryError, match=message.replace("(", r"\(")):
        parse_registry(data)


def test_bad_upstream_url_is_named() -> None:
    with pytest.raises(RegistryError, match=r"upstreams\.local\.base_url"):
        parse_registry({"upstreams": {"local": {"base_url": "ftp://x"}}, "tasks": {}})


def test_proxy_is_validated_and_shown_without_credentials() -> None:
    with pytest.raises(RegistryError, match=r"upstreams\.mistral\.proxy: .*http://proxy"):
        parse_registry({"upstreams": {"mistral": {"base_url": "https://api.mistral.ai",
                                                  "proxy": "socks5://proxy:1080"}}, "tasks": {}})
    reg = parse_registry({"upstreams": {
        "plain": {"base_url": "https://a", "proxy": "http://proxy.internal:3128"},
        "secret": {"base_url": "https://b", "proxy": "http://gw:p%40ss@proxy.internal:3128"},
        "none": {"base_url": "https://c"},
    }, "tasks": {}})
    assert reg.upstreams["plain"].proxy_shown == "http://proxy.internal:3128"
    assert reg.upstreams["secret"].proxy_shown == "http://***@proxy.internal:3128"
    assert reg.upstreams["none"].proxy_shown is None
    assert "p@ss" in reg.upstreams["secret"].secrets()  # scrubbed from messages, decoded or not
    assert "p%40ss" in reg.upstreams["secret"].secrets()


def test_unreadable_and_non_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="cannot read the tasks file"):
        load_registry(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [unclosed")
    with pytest.raises(RegistryError, match="not valid YAML"):
        load_registry(bad)


def test_watcher_keeps_last_good_registry_on_a_bad_reload(tmp_path: Path) -> None:
    path = tmp_path / "tasks.yaml"
    path.write_text("upstreams: {u: {base_url: 'http://x'}}\ntasks: {a: {upstream: u, model: m}}\n")
    results: list[str] = []
    watcher = RegistryWatcher(path, on_reload=results.append)
    assert watcher.reload() and watcher.loaded
    path.write_text("tasks: {a: {upstream: missing, model: m}}\n")
    assert not watcher.reload()
    assert "unknown upstream 'missing'" in (watcher.last_error or "")
    assert list(watcher.current.tasks) == ["a"]
    assert results == ["success", "error"]


def test_an_empty_file_on_reload_is_a_write_in_progress_not_no_tasks(tmp_path: Path) -> None:
    """A truncate-then-write shows an empty file for a moment: a CI run reloaded it as "no
    tasks" and answered 404 for a task the next write kept. `tasks: {}` still removes them all."""
    path = tmp_path / "tasks.yaml"
    good = "upstreams: {u: {base_url: 'http://x'}}\ntasks: {a: {upstream: u, model: m}}\n"
    path.write_text(good)
    watcher = RegistryWatcher(path)
    assert watcher.reload()
    path.write_text(" \n")
    assert not watcher.reload()
    assert "the tasks file is empty" in (watcher.last_error or "")
    assert list(watcher.current.tasks) == ["a"]
    path.write_text("upstreams: {u: {base_url: 'http://x'}}\ntasks: {}\n")
    assert watcher.reload() and not watcher.current.tasks


def test_a_file_that_is_not_utf8_is_rejected_clearly(tmp_path: Path) -> None:
    path = tmp_path / "tasks.yaml"
    path.write_bytes("# caf\xe9\ntasks: {}\n".encode("latin-1"))
    with pytest.raises(RegistryError, match="not UTF-8 text"):
        load_registry(path)
    watcher = RegistryWatcher(path)
    assert not watcher.reload() and "not UTF-8" in (watcher.last_error or "")


def test_a_missing_file_at_start_up_says_what_to_do_then_loads_when_it_appears(
        tmp_path: Path) -> None:
    path = tmp_path / "tasks.yaml"
    watcher = RegistryWatcher(path)
    assert not watcher.reload() and not watcher.loaded
    assert "no tasks file yet" in (watcher.last_error or "")
    path.write_text("upstreams: {u: {base_url: 'http://x'}}\ntasks: {a: {upstream: u, model: m}}\n")
    assert watcher.reload() and list(watcher.current.tasks) == ["a"]


def with_upstreams(extra: dict[str, object], tasks: dict[str, object]) -> dict[str, object]:
    return {"upstreams": {**GOOD["upstreams"], **extra}, "tasks": tasks}  # type: ignore[dict-item]


def test_protocol_target_labels_and_fallbacks_parse() -> None:
    reg = parse_registry(with_upstreams(
        {"tei": {"base_url": "http://tei:80", "protocol": "tei", "max_batch_size": 16},
         "vllm": {"base_url": "http://vllm:8000", "protocol": "vllm"}},
        {"toxic": {"upstream": "vllm", "model": "clf", "labels": ["clean", "toxic"],
                   "fallbacks": [{"upstream": "tei", "model": "tox-v1", "target": "tox"},
                                 {"upstream": "local", "model": "ft:tox"}]}}))
    task = reg.tasks["toxic"]
    assert reg.upstreams["tei"].protocol == "tei" and reg.upstreams["tei"].max_batch_size == 16
    assert task.candidates() == [
        ("vllm", Route("text", "clf", "toxic", ("clean", "toxic"))),
        ("tei", Route("text", "tox-v1", "tox", ("clean", "toxic"))),
        ("local", Route("text", "ft:tox", "toxic", ("clean", "toxic")))]


@pytest.mark.parametrize(("upstreams", "task", "message"), [
    ({"x": {"base_url": "http://x", "protocol": "triton"}}, {"upstream": "x", "model": "m"},
     "upstreams.x.protocol: Value error, unknown protocol 'triton'; expected one of mistral, "
     "tei, vllm, infinity, kserve-v2"),
    ({"v": {"base_url": "http://v", "protocol": "vllm"}}, {"upstream": "v", "model": "m"},
     "tasks.t.upstream: upstream 'v' speaks vllm, which answers with unnamed probabilities; "
     "list the model's classes in index order under the task's `labels`"),
    ({}, {"upstream": "local", "model": "m", "fallbacks": [{"upstream": "nowhere", "model": "m"}]},
     "tasks.t.fallbacks[0]: unknown upstream 'nowhere'"),
    ({}, {"upstream": "local", "model": "m", "fallbacks": [{"upstream": "local", "model": "m"}]},
     "tasks.t.fallbacks[0]: model 'm' on upstream 'local' is already tried before this one"),
    ({}, {"upstream": "local", "model": "m", "labels": ["a", "a"]},
     "tasks.t.labels: Value error, labels must be distinct"),
    ({"t": {"base_url": "http://t", "protocol": "tei", "max_batch_size": 0}},
     {"upstream": "t", "model": "m"}, "upstreams.t.max_batch_size: Input should be greater"),
])
def test_protocol_fields_are_checked_at_load(upstreams: dict[str, object], task: dict[str, object],
                                             message: str) -> None:
    with pytest.raises(RegistryError) as caught:
        parse_registry(with_upstreams(upstreams, {"t": task}))
    assert message in str(caught.value)


def test_kserve_without_labels_loads_because_its_metadata_may_name_them() -> None:
    reg = parse_registry(with_upstreams({"k": {"base_url": "http://k", "protocol": "kserve-v2"}},
                                        {"t": {"upstream": "k", "model": "m"}}))
    assert reg.tasks["t"].route().labels == ()


@pytest.mark.parametrize(("task", "message"), [
    ({"canary": {"model": "ft:a", "weight": 0.1}},
     "tasks.t.canary.model: 'ft:a' on 'local' is the task's own model"),
    ({"canary": {"model": "ft:b", "weight": 1.5}}, "tasks.t.canary.weight: Input should be less"),
    ({"shadow": {"model": "ft:b", "sample": -0.1}}, "tasks.t.shadow.sample: Input should be greater"),
    ({"shadow": {"model": "ft:b", "sample": 0.2, "upstream": "nowhere"}},
     "tasks.t.shadow.upstream: unknown upstream 'nowhere'"),
    ({"shadow": {"model": "ft:a", "sample": 0.2}},
     "tasks.t.shadow.model: 'ft:a' on 'local' is the task's own model"),
    ({"review": {"max_margin": 2}}, "tasks.t.review.max_margin: Input should be less"),
])
def test_canary_shadow_and_review_are_checked_at_load(task: dict[str, object], message: str) -> None:
    with pytest.raises(RegistryError) as caught:
        parse_registry(with_upstreams({}, {"t": {"upstream": "local", "model": "ft:a", **task}}))
    assert message in str(caught.value)


def test_canary_and_shadow_routes_default_to_the_tasks_upstream_and_target() -> None:
    reg = parse_registry(with_upstreams({}, {"t": {
        "upstream": "local", "model": "ft:a", "target": "sentiment",
        "canary": {"model": "ft:b", "weight": 0.1},
        "shadow": {"model": "ft:c", "sample": 0.5, "upstream": "mistral"}}}))
    task = reg.tasks["t"]
    assert task.canary_candidates() == [("local", Route("text", "ft:b", "sentiment", ())),
                                        ("local", Route("text", "ft:a", "sentiment", ()))]
    assert task.shadow_route() == ("mistral", Route("text", "ft:c", "sentiment", ()))
    assert task.models() == ["ft:a", "ft:b", "ft:c"]


def test_every_field_that_names_a_model_is_a_marked_role() -> None:
    """A field of TaskSpec whose entries name a model and is not marked would be missed by
    every list of a task's models; the marks are the one place a role is declared."""
    naming = set()
    for name, field in TaskSpec.model_fields.items():
        classes = [arg for arg in typing.get_args(field.annotation)
                   if isinstance(arg, type) and issubclass(arg, BaseModel)]
        if any("model" in cls.model_fields for cls in classes):
            naming.add(name)
    assert {field.name for field in role_fields()} == naming == {
        "fallbacks", "cascade", "canary", "shadow", "previous"}
    assert [(f.name, f.label, f.share, f.many, f.role.served, f.role.rollout)
            for f in role_fields()] == [
        ("fallbacks", "fallback", None, True, True, False),
        ("cascade", "cascade stage", None, True, True, False),
        ("canary", "canary", "weight", False, True, True),
        ("shadow", "shadow", "sample", False, True, True),
        ("previous", "previous", None, False, False, False)]


def test_roles_name_every_model_of_a_task_and_models_only_the_served_ones() -> None:
    task = parse_registry(with_upstreams({"other": {"base_url": "http://o"}}, {"t": {
        "upstream": "local", "model": "a", "fallbacks": [{"upstream": "other", "model": "b"}],
        "canary": {"model": "c", "weight": 0.1, "upstream": "other"},
        "shadow": {"model": "d", "sample": 1.0},
        "previous": {"upstream": "local", "model": "z"}}})).tasks["t"]
    assert task.roles() == [
        ModelRole("model", "local", "a", True), ModelRole("fallback", "other", "b", True),
        ModelRole("canary", "other", "c", True), ModelRole("shadow", "local", "d", True),
        ModelRole("previous", "local", "z", False)]
    assert task.models() == ["a", "b", "c", "d"]


def test_sticky_share_is_fixed_per_item_and_uniform() -> None:
    from service.gateway.classifier import sticky_share

    shares = [sticky_share("t", "ft:b", f"text {i}") for i in range(20000)]
    assert shares[:50] == [sticky_share("t", "ft:b", f"text {i}") for i in range(50)]
    assert all(0.0 <= s < 1.0 for s in shares)
    assert abs(sum(s < 0.1 for s in shares) / len(shares) - 0.1) < 0.01
    # A new candidate draws a fresh split rather than the same items.
    assert [sticky_share("t", "ft:c", f"text {i}") for i in range(50)] != shares[:50]


CHEAP = {"model": "cheap", "min_margin": 0.35}


@pytest.mark.parametrize(("task", "message"), [
    ({"cascade": [{"model": "cheap", "min_margin": 1.5}, {"model": "big"}]},
     "tasks.t.cascade.0.min_margin: Input should be less than or equal to 1"),
    ({"cascade": [{"model": "cheap", "min_margin": -0.1}, {"model": "big"}]},
     "tasks.t.cascade.0.min_margin: Input should be greater than or equal to 0"),
    ({"cascade": [CHEAP, {"model": "cheap"}]},
     "tasks.t.cascade[1].model: 'cheap' on 'local' is already stage [0]"),
    ({"model": "big", "cascade": []}, "tasks.t.cascade: Value error, a cascade needs at least "
     "two stages, not 0"),
    ({"cascade": [{"model": "big"}]}, "a cascade needs at least two stages, not 1"),
    ({"cascade": [CHEAP, {"model": "big", "min_margin": 0.2}]},
     "the last stage [1] ('big') has `min_margin`"),
    ({"cascade": [{"model": "cheap"}, {"model": "big"}]}, "stage [0] ('cheap') needs `min_margin`"),
    ({"model": "other", "cascade": [CHEAP, {"model": "big"}]},
     "tasks.t.model: 'other' on 'local' is not the cascade's last stage ('big' on 'local')"),
    ({"cascade": [CHEAP, {"model": "big"}], "canary": {"model": "c", "weight": 0.1}},
     "tasks.t.cascade: a task cannot have both a cascade and a canary"),
    ({"cascade": [{**CHEAP, "upstream": "nowhere"}, {"model": "big"}]},
     "tasks.t.cascade[0].upstream: unknown upstream 'nowhere'"),
])
def test_a_bad_cascade_is_a_load_error_naming_the_field(task: dict[str, object],
                                                        message: str) -> None:
    with pytest.raises(RegistryError) as caught:
        parse_registry(with_upstreams({}, {"t": {"upstream": "local", **task}}))
    assert message in str(caught.value)


def test_a_cascade_names_the_tasks_model_and_its_stages_routes() -> None:
    task = parse_registry(with_upstreams({"other": {"base_url": "http://o"}}, {"t": {
        "upstream": "local", "target": "sentiment",
        "cascade": [{"model": "cheap", "min_margin": 0.35, "upstream": "other", "target": "s"},
                    {"model": "big"}],
        "fallbacks": [{"upstream": "other", "model": "backup"}]}})).tasks["t"]
    assert task.model == "big"  # the last stage
    assert task.cascade_chains() == [
        ([("other", Route("text", "cheap", "s", ()))], 0.35),
        ([("local", Route("text", "big", "sentiment", ())),
          ("other", Route("text", "backup", "sentiment", ()))], None)]
    assert task.models() == ["big", "backup", "cheap"]


def test_certainty_is_the_top_two_margin_or_the_top_score_of_a_multi_label_target() -> None:
    task = parse_registry(with_upstreams({}, {"t": {
        "upstream": "local", "model": "m", "multi_label_targets": ["topics"]}})).tasks["t"]
    result = {"t": {"scores": {"a": 0.6, "b": 0.3, "c": 0.1}},
              "topics": {"scores": {"x": 0.9, "y": 0.85}}, "one": {"scores": {"z": 0.7}}}
    assert certainty(result, "t", task) == pytest.approx(0.3)
    assert certainty(result, "topics", task) == pytest.approx(0.9)
    assert certainty(result, "one", task) == pytest.approx(0.7)
    assert certainty(result, "missing", task) < 0  # never sure: the item goes on
