"""Each upstream protocol against its server's published request and answer shapes (TEI's
OpenAPI document, vLLM's and Infinity's classify examples, the Open Inference Protocol v2):
what goes on the wire, what comes back in Mistral's result shape, and what a broken answer,
an error body or the model metadata says."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from service.gateway import protocols
from service.gateway.protocols import Route, ServerInfo
from service.gateway.protocols.infinity import Infinity
from service.gateway.protocols.kserve_v2 import KServeV2
from service.gateway.protocols.mistral import Mistral
from service.gateway.protocols.tei import TEI
from service.gateway.protocols.vllm import VLLM

CHAT = {"messages": [{"role": "user", "content": "hello"},
                     {"role": "assistant", "content": [{"type": "text", "text": "hi there"}]}]}
RENDERED = "user: hello\nassistant: hi there"  # as the factory renders it (service.wire)


def body(protocol: Any, route: Route, inputs: list[Any]) -> Any:
    return orjson.loads(protocol.encode(route, inputs))


def test_the_registry_names_every_protocol() -> None:
    assert protocols.NAMES == ("mistral", "tei", "vllm", "infinity", "kserve-v2")
    with pytest.raises(KeyError, match="known: mistral, tei"):
        protocols.get("triton")


def test_mistral_sends_conversations_as_they_are_and_checks_the_answer() -> None:
    m = Mistral()
    route = Route.chat("ft:m")
    assert m.root("https://api.mistral.ai/v1") == "https://api.mistral.ai"
    assert m.path(route) == "/v1/chat/classifications"
    assert m.path(Route.text("ft:m")) == "/v1/classifications"
    assert body(m, route, [CHAT]) == {"model": "ft:m", "input": [CHAT]}
    good = {"results": [{"t": {"scores": {"a": 0.5, "b": 0.5}}}]}
    assert m.decode(route, good, 1, None) == good["results"]
    assert m.decode(route, {"results": [{"t": {"scores": {"a": True}}}]}, 1, None) == \
        "results[0].t.scores.a is not a number"
    assert m.error_text({"detail": [{"loc": ["body", "input"], "msg": "Field required"}]}) == \
        "input: Field required"
    assert m.error_text({"object": "error", "message": "Invalid model"}) == "Invalid model"


def test_tei_sends_a_batch_of_one_element_lists_and_reads_every_label() -> None:
    tei, route = TEI(), Route.text("sentiment-v3", target="sentiment")
    assert tei.path(route) == "/predict"
    # Two bare strings would be one sentence *pair* to TEI: each input is its own list.
    assert body(tei, route, ["good", CHAT]) == {
        "inputs": [["good"], [RENDERED]], "truncate": True, "raw_scores": False}
    answer = [[{"label": "positive", "score": 0.9}, {"label": "negative", "score": 0.1}],
              [{"label": "negative", "score": 0.7}, {"label": "positive", "score": 0.3}]]
    assert tei.decode(route, answer, 2, None) == [
        {"sentiment": {"scores": {"positive": 0.9, "negative": 0.1}}},
        {"sentiment": {"scores": {"negative": 0.7, "positive": 0.3}}}]
    assert tei.decode(route, [{"label": "x", "score": 1}], 1, None) == "[0] is not a non-empty list of {label, score} objects"
    assert tei.decode(route, {"error": "x"}, 1, None) == \
        "the body is not a list of predictions (TEI's batch answer)"
    assert tei.error_text({"error": "Model is overloaded", "error_type": "overloaded"}) == \
        "Model is overloaded"


def test_tei_info_gives_the_labels_and_the_batch_limit() -> None:
    info = {"model_id": "m", "model_dtype": "float16", "served_model_name": "m",
            "model_type": {"classifier": {"id2label": {"1": "positive", "0": "negative"},
                                          "label2id": {"negative": 0, "positive": 1}}},
            "max_concurrent_requests": 512, "max_input_length": 512, "max_batch_tokens": 16384,
            "max_client_batch_size": 32, "auto_truncate": False, "tokenization_workers": 4,
            "version": "1.8.0"}
    assert TEI().read_info(Route.text("m"), info) == ServerInfo(("negative", "positive"), 32)
    embedder = {**info, "model_type": {"embedding": {"pooling": "cls"}}}
    assert "embedding model, not a sequence classifier" in str(
        TEI().read_info(Route.text("m"), embedder))


def test_vllm_names_probabilities_by_the_task_labels_in_index_order() -> None:
    vllm = VLLM()
    route = Route.text("clf", target="toxicity", labels=("clean", "toxic"))
    assert vllm.root("http://vllm:8000/v1") == "http://vllm:8000"
    assert vllm.path(route) == "/classify"
    assert body(vllm, route, ["a", CHAT]) == {"model": "clf", "input": ["a", RENDERED]}
    answer = {"id": "classify-1", "object": "list", "created": 1745383213, "model": "clf",
              "data": [{"index": 1, "label": "clean", "probs": [0.8, 0.2], "num_classes": 2},
                       {"index": 0, "label": "toxic", "probs": [0.25, 0.75], "num_classes": 2}],
              "usage": {"prompt_tokens": 10, "total_tokens": 10}}
    assert vllm.decode(route, answer, 2, None) == [
        {"toxicity": {"scores": {"clean": 0.25, "toxic": 0.75}}},
        {"toxicity": {"scores": {"clean": 0.8, "toxic": 0.2}}}]
    three = Route.text("clf", target="t", labels=("a", "b", "c"))
    assert "has 2 classes but the task names 3 labels" in str(vllm.decode(three, answer, 2, None))
    repeated = {"data": [{"index": 0, "probs": [1.0, 0.0]}, {"index": 0, "probs": [1.0, 0.0]}]}
    assert "repeated or out-of-range 'index'" in str(vllm.decode(route, repeated, 2, None))
    assert vllm.error_text({"error": {"message": "The model `x` does not exist.",
                                      "type": "NotFoundError", "code": 404}}) == \
        "The model `x` does not exist."
    assert vllm.error_text({"object": "error", "message": "too long", "code": 400}) == "too long"


def test_infinity_sends_model_and_texts_and_reads_labelled_scores() -> None:
    inf, route = Infinity(), Route.chat("exported", target="intent")
    assert inf.path(route) == "/classify"
    assert body(inf, route, [CHAT]) == {"model": "exported", "input": [RENDERED],
                                         "raw_scores": False}
    answer = {"object": "classify", "id": "infinity-1", "created": 1, "model": "exported",
              "usage": {"prompt_tokens": 3, "total_tokens": 3},
              "data": [[{"score": 0.6, "label": "book"}, {"score": 0.4, "label": "cancel"}]]}
    assert inf.decode(route, answer, 1, None) == [
        {"intent": {"scores": {"book": 0.6, "cancel": 0.4}}}]
    assert inf.error_text({"error": {"message": "model not found", "type": "NotFound"}}) == \
        "model not found"
    assert inf.error_text({"detail": [{"loc": ["body", "input"], "msg": "Field required"}]}) == \
        "input: Field required"


def test_kserve_v2_sends_a_bytes_tensor_and_reads_a_probability_tensor() -> None:
    ks = KServeV2()
    route = Route.text("my model", target="spam", labels=("ham", "spam"))
    assert ks.path(route) == "/v2/models/my%20model/infer"
    assert body(ks, route, ["a", CHAT]) == {"inputs": [
        {"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a", RENDERED]}]}
    flat = {"model_name": "my model", "outputs": [
        {"name": "logits", "shape": [2, 3], "datatype": "FP32", "data": [0, 0, 0, 0, 0, 0]},
        {"name": "probabilities", "shape": [2, 2], "datatype": "FP32",
         "data": [0.9, 0.1, 0.3, 0.7]}]}
    assert ks.decode(route, flat, 2, None) == [
        {"spam": {"scores": {"ham": 0.9, "spam": 0.1}}},
        {"spam": {"scores": {"ham": 0.3, "spam": 0.7}}}]
    nested = {"outputs": [{"name": "out", "shape": [1, 2], "datatype": "FP32",
                           "data": [[0.5, 0.5]]}]}
    assert ks.decode(route, nested, 1, None) == [{"spam": {"scores": {"ham": 0.5, "spam": 0.5}}}]
    unlabelled = Route.text("m", target="spam")
    assert "names no `labels`" in str(ks.decode(unlabelled, nested, 1, None))
    assert ks.decode(unlabelled, nested, 1, ServerInfo(("a", "b"))) == [
        {"spam": {"scores": {"a": 0.5, "b": 0.5}}}]
    wrong = {"outputs": [{"name": "out", "shape": [2, 2], "datatype": "FP32", "data": [1, 2]}]}
    assert "has 2 numbers for shape [2, 2]" in str(ks.decode(route, wrong, 2, None))
    assert ks.error_text({"error": "Model with name m does not exist."}) == \
        "Model with name m does not exist."


def test_kserve_v2_metadata_may_name_the_labels() -> None:
    ks, route = KServeV2(), Route.text("m")
    assert ks.info_path(route) == "/v2/models/m"
    meta = {"name": "m", "platform": "onnxruntime", "inputs": [
        {"name": "text", "datatype": "BYTES", "shape": [-1]}], "outputs": [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2],
         "parameters": {"labels": ["ham", "spam"]}}]}
    assert ks.read_info(route, meta) == ServerInfo(("ham", "spam"))
    top = {**meta, "outputs": [{"name": "p", "datatype": "FP32", "shape": [-1, 2]}],
           "parameters": {"labels": "ham, spam"}}
    assert ks.read_info(route, top) == ServerInfo(("ham", "spam"))
    assert ks.read_info(route, {**meta, "outputs": []}) == ServerInfo(())


def test_answer_scope_names_target_and_labels_only_where_they_name_the_answer() -> None:
    """Mistral's answers carry their own targets and labels: its scope is the base URL alone (the
    cache keys it had before other protocols existed). A single-target server's answer is named
    with the route's target and labels, so they are part of its scope."""
    route = Route.text("m", "sentiment", ["neg", "pos"])
    base = "http://upstream:8080"
    assert Mistral().answer_scope(base, route) == base
    assert Mistral().answer_scope(base, Route.text("m", "other", ["x"])) == base
    for wire in (TEI(), VLLM(), Infinity(), KServeV2()):
        assert wire.answer_scope(base, route) == f"{wire.name}:{base}#sentiment:neg,pos"
