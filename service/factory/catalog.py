"""The models the factory serves: base models, fine-tuned models from the store, and a bounded
LRU of loaded ones.

Loading reads a few megabytes from disk (after fetching them from the object store, on a replica
that has not seen the model yet), so it happens in a worker thread, once per model even when many
requests ask for it at the same moment (one future per model id); other models answer meanwhile.
The LRU is bounded by count (`FACTORY_MODEL_CACHE_SIZE`) and by the bytes of the models' files
(`FACTORY_MODEL_CACHE_BYTES`), the measure that follows memory when models differ a hundredfold
in size (an n-gram model against a MiniLM one).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from service.factory.blobs import BlobMissing, dir_bytes
from service.factory.errors import FactoryError, NotFound
from service.factory.metrics import FactoryMetrics
from service.factory.models.base import ModelFormatError, Predictor
from service.factory.models.registry import Registry, default_registry
from service.factory.schemas import base_model_out, ft_model_out
from service.factory.store import ModelRecord, Store


class ModelCatalog:
    def __init__(self, store: Store, metrics: FactoryMetrics, capacity: int,
                 started_at: int, registry: Registry | None = None,
                 capacity_bytes: int | None = None) -> None:
        self.store = store
        self.registry = registry or default_registry()
        self.metrics = metrics
        self.capacity = capacity
        self.capacity_bytes = capacity_bytes
        self.started_at = started_at
        self._loaded: OrderedDict[str, Predictor] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self._loading: dict[str, asyncio.Future[Predictor]] = {}

    def base_models(self) -> list[dict[str, Any]]:
        """Every base model, available or not (`available` and `unavailable_reason` say), then
        Mistral's names with the model they stand for now."""
        out = []
        for model in self.registry.models():
            missing = model.availability()
            aliases = list(self.registry.aliases) if model is self.registry.alias_target() else []
            card = base_model_out(model.name, self.started_at, model.description, aliases)
            card.update(available=missing is None, unavailable_reason=missing,
                        base_model_capabilities=dataclasses.asdict(model.capabilities))
            out.append(card)
        target = self.registry.alias_target()
        for alias in self.registry.aliases:
            card = base_model_out(alias, self.started_at,
                                  f"Served by {target.name} here (Mistral's name, so that "
                                  "Mistral's examples run unchanged)", [])
            card.update(available=target.availability() is None, served_by=target.name)
            out.append(card)
        return out

    def list(self) -> list[dict[str, Any]]:
        return self.base_models() + [ft_model_out(r) for r in self.store.list_models()]

    def card(self, model_id: str) -> dict[str, Any]:
        for card in self.base_models():
            if card["id"] == model_id:
                return card
        return ft_model_out(self.record(model_id))

    def record(self, model_id: str) -> ModelRecord:
        record = self.store.get_model(model_id)
        if record is None:
            raise NotFound(self._unknown(model_id), param="model", code="unknown_model")
        return record

    def _unknown(self, model_id: str) -> str:
        if model_id in self.registry:
            return (f"model {model_id!r} is a base model: fine-tune it first "
                    "(POST /v1/fine_tuning/jobs) and classify with the fine_tuned_model")
        return (f"model {model_id!r} not found; GET /v1/models lists the fine-tuned models "
                "of this factory")

    def delete(self, model_id: str) -> dict[str, Any]:
        if model_id in self.registry:
            raise FactoryError(f"model {model_id!r} is a base model and cannot be deleted",
                               param="model_id")
        record = self.store.delete_model(model_id)
        if record is None:
            raise NotFound(self._unknown(model_id), param="model_id", code="unknown_model")
        self._loaded.pop(model_id, None)
        self._sizes.pop(model_id, None)
        self.metrics.models_loaded.set(len(self._loaded))
        self.store.blobs.delete_dir(self.store.model_key(record.job_id))
        return {"id": model_id, "object": "model", "deleted": True}

    def local_dir(self, record: ModelRecord) -> Path:
        """The model's files on this machine (fetched from the object store on first use)."""
        try:
            return self.store.blobs.local_dir(self.store.model_key(record.job_id))
        except BlobMissing:
            raise self._unreadable(record) from None

    @contextlib.contextmanager
    def using(self, record: ModelRecord) -> Iterator[Path]:
        """`local_dir`, kept on disk while the block reads it (the disk cache's bound waits)."""
        try:
            with self.store.blobs.pinned(self.store.model_key(record.job_id)) as path:
                yield path
        except BlobMissing:
            raise self._unreadable(record) from None

    def _unreadable(self, record: ModelRecord) -> FactoryError:
        return FactoryError(f"model {record.id!r} is recorded but its files are not in the "
                            f"store ({self.store.blobs.url}); delete it and train it again",
                            param="model", code="model_unreadable", status=409)

    def _load(self, record: ModelRecord) -> tuple[Predictor, int]:
        try:
            with self.using(record) as path:
                return self.registry.load(path), dir_bytes(path)
        except ModelFormatError as exc:
            raise FactoryError(f"model {record.id!r} cannot be served: {exc}", param="model",
                               code="model_unreadable", status=409) from None
        except ImportError as exc:
            raise FactoryError(f"model {record.id!r} needs packages this factory lacks ({exc}): "
                               "install the extra of its base model (GET /v1/models says which "
                               "command) and restart the factory", param="model",
                               code="model_unavailable", status=503) from None

    async def get(self, model_id: str) -> tuple[ModelRecord, Predictor]:
        record = self.record(model_id)
        model = self._loaded.get(model_id)
        if model is not None:
            self._loaded.move_to_end(model_id)
            return record, model
        future = self._loading.get(model_id)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._loading[model_id] = future
            try:
                loaded, size = await asyncio.to_thread(self._load, record)
            except BaseException as exc:
                future.set_exception(exc)
                future.exception()  # retrieved: waiters re-raise it, nobody else must
                raise
            else:
                future.set_result(loaded)
                self._loaded[model_id] = loaded
                self._sizes[model_id] = size
                self._evict()
                self.metrics.models_loaded.set(len(self._loaded))
            finally:
                self._loading.pop(model_id, None)
            return record, loaded
        return record, await future

    def _evict(self) -> None:
        """Drop the least recently used models beyond either bound; the newest always stays."""
        def over() -> bool:
            if len(self._loaded) > self.capacity:
                return True
            return (self.capacity_bytes is not None
                    and sum(self._sizes.values()) > self.capacity_bytes)

        while len(self._loaded) > 1 and over():
            evicted, _ = self._loaded.popitem(last=False)
            self._sizes.pop(evicted, None)

    def loaded_bytes(self) -> int:
        return sum(self._sizes.values())
