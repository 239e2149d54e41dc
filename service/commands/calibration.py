"""`tasks calibrate`'s work: a cascade's first `min_margin` chosen from labelled data.

Every stage answers every example once, uncached, so the figures are the models' own: through the
gateway with `--through-gateway` (`POST /admin/tasks/{name}/cascade/{stage}` with GATEWAY_ADMIN_KEY:
the gateway's own upstream clients, so stages on any protocol, with their target and labels
mapping), else asked directly on each stage's upstream (Mistral's API only); then each candidate threshold is replayed offline with
the gateway's own routing rule (`service.gateway.classifier.certainty`, the later stages keeping
their configured `min_margin`). So one pass over the data prices every threshold, and the
threshold written reproduces the escalation and quality printed, as long as the models do not
change.

The threshold chosen is the one with the lowest escalation whose macro-F1 is at least `keep` times
the last stage's alone: the cheapest cascade that keeps that share of the big model's quality.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson

from service.commands.api import Api
from service.commands.errors import UserError
from service.gateway.classifier import certainty
from service.gateway.registry import Registry, TaskSpec

Result = dict[str, Any]  # one item's answer in Mistral's shape: {target: {"scores": {...}}}
#: Candidate thresholds: 0.00, 0.01, ..., 1.00.
GRID = tuple(round(i / 100, 2) for i in range(101))
BATCH = 64


@dataclass(frozen=True)
class Example:
    item: Any  # a text, or a conversation ({"messages": [...]}) as sent upstream
    label: str


@dataclass(frozen=True)
class Row:
    threshold: float
    escalation: float  # share of items the first stage handed on
    macro_f1: float


@dataclass(frozen=True)
class Calibration:
    target: str
    stages: list[str]  # the stages' models
    alone: list[float]  # each stage's macro-F1 on every example
    rows: list[Row]
    chosen: Row | None


def read_examples(path: Path, task: TaskSpec, target: str) -> list[Example]:
    """Labelled examples in the factory's training format (`{"text"|"messages", "labels"}`);
    the task's target must be a single-label one, given for every line."""
    if target in task.multi_label_targets:
        raise UserError(f"task {task.name!r}: target {target!r} is multi-label; calibrate "
                        "measures macro-F1 of single-label targets only")
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    examples: list[Example] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise UserError(f"{path}:{number}: not JSON ({exc})") from None
        item = obj.get("text") if task.kind == "text" else (
            {"messages": obj["messages"]} if "messages" in obj else None)
        label = (obj.get("labels") or {}).get(target) if isinstance(obj, dict) else None
        if item is None or not isinstance(label, str):
            field = "text" if task.kind == "text" else "messages"
            raise UserError(f"{path}:{number}: expected `{field}` and a `labels.{target}` "
                            "string (one label of the task's target)")
        examples.append(Example(item, label))
    if not examples:
        raise UserError(f"{path} holds no examples")
    return examples


def stage_results(registry: Registry, task: TaskSpec, items: Sequence[Any]
                  ) -> list[list[Result]]:
    """Each stage's results for every item, asked on its upstream (Mistral's API) in batches."""
    out = []
    for chain, _ in task.cascade_chains():
        upstream_name, route = chain[0]
        upstream = registry.upstreams[upstream_name]
        if upstream.protocol != "mistral":
            raise UserError(f"stage {route.model!r} is on upstream {upstream_name!r}, which speaks "
                            f"{upstream.protocol}; calibrate asks Mistral-compatible upstreams "
                            "only (the factory, Mistral)")
        path = "/v1/classifications" if task.kind == "text" else "/v1/chat/classifications"
        field = "input" if task.kind == "text" else "inputs"
        results: list[Result] = []
        with Api(upstream.base_url, what=f"upstream {upstream_name!r}", key=upstream.api_key(),
                 key_env=upstream.api_key_env or "its api_key_env", timeout_s=120.0,
                 start_hint="is it running, and is its base_url in the tasks file right?",
                 proxy=upstream.proxy) as api:
            for start in range(0, len(items), BATCH):
                batch = list(items[start:start + BATCH])
                body = api.post(path, json={"model": route.model, field: batch})
                got = body.get("results") if isinstance(body, dict) else None
                if not isinstance(got, list) or len(got) != len(batch):
                    raise UserError(f"upstream {upstream_name!r} answered {path} for "
                                    f"{route.model!r} with no list of {len(batch)} results")
                results += got
        out.append(results)
    return out


def gateway_results(api: Api, task: TaskSpec, items: Sequence[Any]) -> list[list[Result]]:
    """Each stage's results for every item, asked through the gateway's admin route (one stage
    pinned, no cache), in batches of BATCH."""
    out = []
    for stage in range(len(task.cascade)):
        path = f"/admin/tasks/{quote(task.name, safe='')}/cascade/{stage}"
        results: list[Result] = []
        for start in range(0, len(items), BATCH):
            batch = list(items[start:start + BATCH])
            body = api.post(path, json={"input": batch})
            got = body.get("results") if isinstance(body, dict) else None
            if not isinstance(got, list) or len(got) != len(batch):
                raise UserError(f"the gateway answered {path} with no list of {len(batch)} "
                                "results; is it a gateway of this version?")
            results += got
        out.append(results)
    return out


def top(result: Result, target: str) -> str:
    scores = (result.get(target) or {}).get("scores") or {}
    return max(scores, key=scores.__getitem__) if scores else ""


def macro_f1(gold: Sequence[str], pred: Sequence[str]) -> float:
    """Macro-F1 over the labels that occur in either list."""
    scores = []
    for label in sorted(set(gold) | set(pred)):
        tp = sum(1 for g, p in zip(gold, pred, strict=True) if g == label and p == label)
        fp = sum(1 for g, p in zip(gold, pred, strict=True) if g != label and p == label)
        fn = sum(1 for g, p in zip(gold, pred, strict=True) if g == label and p != label)
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / len(scores) if scores else 0.0


def calibrate(task: TaskSpec, examples: Sequence[Example], results: Sequence[Sequence[Result]],
              keep: float) -> Calibration:
    """Replay every threshold of GRID for the first stage (the others keep theirs)."""
    chains = task.cascade_chains()
    targets = [chain[0][1].target for chain, _ in chains]
    gold = [example.label for example in examples]
    sure = [[certainty(result, targets[k], task) for result in results[k]]
            for k in range(len(chains))]
    labels = [[top(result, targets[k]) for result in results[k]] for k in range(len(chains))]
    margins = [margin for _, margin in chains]
    rows = []
    for threshold in GRID:
        pred = []
        escalated = 0
        for i in range(len(examples)):
            for k, margin in enumerate([threshold, *margins[1:]]):
                if margin is None or sure[k][i] >= margin:
                    pred.append(labels[k][i])
                    escalated += k > 0
                    break
        rows.append(Row(threshold, round(escalated / len(examples), 6),
                        round(macro_f1(gold, pred), 6)))
    alone = [round(macro_f1(gold, labels[k]), 6) for k in range(len(chains))]
    good = [row for row in rows if row.macro_f1 >= keep * alone[-1]]
    chosen = min(good, key=lambda row: (row.escalation, row.threshold)) if good else None
    return Calibration(targets[0], [chain[0][1].model for chain, _ in chains], alone, rows, chosen)
