"""Home Assistant's English intent sentences (the `home-assistant-intents` wheel), as chat data.

The wheel holds sentence *templates* in hassil's syntax: `(a|b)` alternatives, `[x]` optional
parts, `<rule>` expansion rules and `{list}` slots. This module samples sentences from them with a
fixed seed (a small expander instead of installing hassil): slot lists the wheel defines are
filled from their values or ranges; the ones Home Assistant fills at run time (areas, entity
names, free text) from a short fixed vocabulary below.
"""

from __future__ import annotations

import random
import zipfile
from typing import Any

import orjson

from tests.support.factory import wheel

RUNTIME_LISTS = {
    "area": ["kitchen", "living room", "bedroom", "garage", "office", "bathroom"],
    "name": ["ceiling light", "front door", "tv", "desk lamp", "fan", "thermostat", "garage door"],
    "floor": ["upstairs", "downstairs", "first floor"],
    "message": ["dinner is ready", "the car is here", "time to leave"],
    "search_query": ["jazz", "the news", "my workout playlist"],
    "timer_name": ["pasta", "laundry"],
}
FALLBACK = ["thing", "kitchen", "music", "lights"]


class _Expander:
    def __init__(self, spec: dict[str, Any], rng: random.Random) -> None:
        self.rules: dict[str, str] = spec.get("expansion_rules", {})
        self.lists: dict[str, Any] = spec.get("lists", {})
        self.rng = rng

    def sample(self, template: str) -> str:
        text, _ = self._sequence(template, 0, ())
        return " ".join(text.split())

    def _sequence(self, s: str, i: int, stops: tuple[str, ...]) -> tuple[str, int]:
        """Parse and sample from position `i` up to one of `stops` (unconsumed)."""
        out: list[str] = []
        while i < len(s) and s[i] not in stops:
            c = s[i]
            if c == "(":
                text, i = self._alternatives(s, i + 1, ")")
                out.append(text)
            elif c == "[":
                text, i = self._alternatives(s, i + 1, "]")
                if self.rng.random() < 0.5:
                    out.append(text)
            elif c == "<":
                end = s.index(">", i)
                rule = self.rules.get(s[i + 1:end], "")
                out.append(self.sample(rule))
                i = end + 1
            elif c == "{":
                end = s.index("}", i)
                out.append(self._slot(s[i + 1:end].split(":")[0]))
                i = end + 1
            else:
                out.append(c)
                i += 1
        return "".join(out), i

    def _alternatives(self, s: str, i: int, close: str) -> tuple[str, int]:
        choices = []
        while True:
            text, i = self._sequence(s, i, ("|", close))
            choices.append(text)
            if i >= len(s) or s[i] == close:
                return self.rng.choice(choices), i + 1
            i += 1  # past "|"

    def _slot(self, name: str) -> str:
        spec = self.lists.get(name)
        if isinstance(spec, dict) and spec.get("values"):
            value = self.rng.choice(spec["values"])
            text = value.get("in", "") if isinstance(value, dict) else value
            return self.sample(str(text))
        if isinstance(spec, dict) and spec.get("range"):
            r = spec["range"]
            return str(self.rng.randint(int(r.get("from", 0)), int(r.get("to", 100))))
        return self.rng.choice(RUNTIME_LISTS.get(name, FALLBACK))


def intent_examples(per_intent: int = 60, seed: int = 0) -> list[tuple[str, str]]:
    """(sentence, intent) pairs, distinct sentences, up to `per_intent` per intent."""
    return [(sentence, intent) for sentence, intent, _ in intent_domain_examples(per_intent, seed)]


def _block_domain(block: dict[str, Any], intent_domain: str) -> str:
    """The entity domain a template block targets: its fixed `domain` slot, else a single domain
    it requires, else the domain Home Assistant declares for the intent."""
    slot = block.get("slots", {}).get("domain")
    if isinstance(slot, str):
        return slot
    required = block.get("requires_context", {}).get("domain")
    if isinstance(required, str):
        return required
    if isinstance(required, list) and len(required) == 1:
        return str(required[0])
    return intent_domain


def intent_domain_examples(per_intent: int = 60, seed: int = 0,
                           language: str = "en") -> list[tuple[str, str, str]]:
    """(sentence, intent, domain) triples: the sentences of `intent_examples` (same seed, same
    order), each with the domain of the template block it was sampled from (`_block_domain`).
    `language`: one of the wheel's `data/*.json` (en, fr, de, ru, ...); the runtime lists above
    stay English."""
    with zipfile.ZipFile(wheel("home-assistant-intents", "2026.10.27")) as z:
        spec = orjson.loads(z.read(f"home_assistant_intents/data/{language}.json"))
        declared = orjson.loads(z.read("home_assistant_intents/intents.json"))
    rng = random.Random(seed)
    expander = _Expander(spec, rng)
    out: list[tuple[str, str, str]] = []
    for intent in sorted(spec["intents"]):
        intent_domain = str(declared.get(intent, {}).get("domain", "homeassistant"))
        templates = [(t, _block_domain(block, intent_domain))
                     for block in spec["intents"][intent]["data"] for t in block["sentences"]]
        seen: set[str] = set()
        for _ in range(per_intent * 5):
            template, domain = rng.choice(templates)
            sentence = expander.sample(template)
            if sentence and sentence not in seen:
                seen.add(sentence)
                out.append((sentence, intent, domain))
            if len(seen) >= per_intent:
                break
    return out
