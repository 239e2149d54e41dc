"""The base models this factory can fine-tune, by name, and Mistral's names for them.

A job's `model` is a base model's name (`local-ngram`, `local-minilm`) or one of Mistral's
fine-tunable classifier bases (`ministral-3b-latest`, ...). Mistral's names resolve to the first
*available* model of `ALIAS_PREFERENCE`: the fine-tuned encoder when its extra is installed (it is
what Mistral's guide promises: a fine-tuned language model), else the n-gram model, so that
Mistral's examples run unchanged on any install. `GET /v1/models` says which one serves them.

Adding a base model: a module implementing `service.factory.models.base.BaseModel`, and one line
in `_builtin()`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from service.factory.models.base import BaseModel, ModelFormatError, Predictor

#: Mistral's fine-tunable classifier bases: accepted as a job's `model`.
MISTRAL_ALIASES = ("ministral-3b-latest", "ministral-8b-latest", "mistral-small-latest")
#: Which base model Mistral's names mean: the first available of these.
ALIAS_PREFERENCE = ("local-minilm", "local-ngram")
#: A model directory without `base_model` in its `model.json` was written by the n-gram model
#: before base models had names (format 1); it still loads.
LEGACY_BASE = "local-ngram"


class UnknownBaseModel(KeyError):
    """A name that is neither a base model nor an alias."""


class Registry:
    """Base models by name, plus aliases resolved at call time (availability can change when an
    extra is installed, so it is not frozen at import)."""

    def __init__(self, models: Iterable[BaseModel], aliases: Sequence[str] = MISTRAL_ALIASES,
                 preference: Sequence[str] = ALIAS_PREFERENCE) -> None:
        self._models = {m.name: m for m in models}
        self.aliases = tuple(aliases)
        self.preference = tuple(p for p in preference if p in self._models)

    def __contains__(self, name: object) -> bool:
        return name in self._models or name in self.aliases

    def names(self) -> list[str]:
        return list(self._models)

    def models(self) -> list[BaseModel]:
        return list(self._models.values())

    def get(self, name: str) -> BaseModel:
        """A base model by its own name (not an alias)."""
        try:
            return self._models[name]
        except KeyError:
            raise UnknownBaseModel(name) from None

    def alias_target(self) -> BaseModel:
        """The model Mistral's names stand for now."""
        for name in self.preference:
            if self._models[name].availability() is None:
                return self._models[name]
        return self._models[self.preference[-1]]

    def resolve(self, name: str) -> BaseModel:
        """A base model by name or alias."""
        if name in self.aliases:
            return self.alias_target()
        return self.get(name)

    def load(self, directory: Path) -> Predictor:
        """Load a fine-tuned model directory with the base model that wrote it."""
        base = base_model_of(read_meta(directory))
        try:
            model = self.get(base)
        except UnknownBaseModel:
            raise ModelFormatError(f"{directory} was written by base model {base!r}, which this "
                                   f"factory does not have ({', '.join(self._models)})") from None
        return model.load(directory)


def read_meta(directory: Path) -> dict[str, Any]:
    """The `model.json` of a fine-tuned model directory; ModelFormatError says what is wrong."""
    meta_path = directory / "model.json"
    try:
        meta = orjson.loads(meta_path.read_bytes())
    except FileNotFoundError:
        raise ModelFormatError(f"{directory}: no model.json (the model was not saved "
                               "completely); train it again") from None
    except orjson.JSONDecodeError as exc:
        raise ModelFormatError(f"{meta_path} is corrupt ({exc}); train the model "
                               "again") from None
    if not isinstance(meta, dict):
        raise ModelFormatError(f"{meta_path} is not a JSON object; train the model again")
    return meta


def base_model_of(meta: Mapping[str, Any]) -> str:
    """The name of the base model that wrote a `model.json` (`LEGACY_BASE` before names)."""
    return str(meta.get("base_model") or LEGACY_BASE)


def _builtin() -> list[BaseModel]:
    from service.factory.models.minilm import MiniLM
    from service.factory.models.ngram import NGram

    return [NGram(), MiniLM()]


@functools.cache
def default_registry() -> Registry:
    """The registry of this install's built-in base models."""
    return Registry(_builtin())
