"""The models the factory serves: base models, fine-tuned models from the store, and a bounded
LRU of loaded ones.

Loading reads a few megabytes from disk, so it happens in a worker thread, once per model even
when many requests ask for it at the same moment (one future per model id).
"""

from __future__ import annotations

import asyncio
import shutil
from collections import OrderedDict
from typing import Any

from service.factory.errors import FactoryError, NotFound
from service.factory.metrics import FactoryMetrics
from service.factory.model import BASE_ALIASES, BASE_MODEL, Classifier
from service.factory.schemas import base_model_out, ft_model_out
from service.factory.store import ModelRecord, Store

BASE_DESCRIPTION = ("Hashed word and character n-grams with a linear head per target; "
                    "needs no downloaded weights")


class ModelCatalog:
    def __init__(self, store: Store, metrics: FactoryMetrics, capacity: int,
                 started_at: int) -> None:
        self.store = store
        self.metrics = metrics
        self.capacity = capacity
        self.started_at = started_at
        self._loaded: OrderedDict[str, Classifier] = OrderedDict()
        self._loading: dict[str, asyncio.Future[Classifier]] = {}

    def base_models(self) -> list[dict[str, Any]]:
        out = [base_model_out(BASE_MODEL, self.started_at, BASE_DESCRIPTION, list(BASE_ALIASES))]
        out += [base_model_out(alias, self.started_at,
                               f"Served by {BASE_MODEL} (so that Mistral's examples run unchanged)",
                               []) for alias in BASE_ALIASES]
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
        if model_id == BASE_MODEL or model_id in BASE_ALIASES:
            return (f"model {model_id!r} is a base model: fine-tune it first "
                    "(POST /v1/fine_tuning/jobs) and classify with the fine_tuned_model")
        return (f"model {model_id!r} not found; GET /v1/models lists the fine-tuned models "
                "of this factory")

    def delete(self, model_id: str) -> dict[str, Any]:
        if model_id == BASE_MODEL or model_id in BASE_ALIASES:
            raise FactoryError(f"model {model_id!r} is a base model and cannot be deleted",
                               param="model_id")
        record = self.store.delete_model(model_id)
        if record is None:
            raise NotFound(self._unknown(model_id), param="model_id", code="unknown_model")
        self._loaded.pop(model_id, None)
        self.metrics.models_loaded.set(len(self._loaded))
        shutil.rmtree(self.store.model_dir(record.job_id), ignore_errors=True)
        return {"id": model_id, "object": "model", "deleted": True}

    async def get(self, model_id: str) -> tuple[ModelRecord, Classifier]:
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
                loaded = await asyncio.to_thread(Classifier.load,
                                                 self.store.model_dir(record.job_id))
            except BaseException as exc:
                future.set_exception(exc)
                future.exception()  # retrieved: waiters re-raise it, nobody else must
                raise
            else:
                future.set_result(loaded)
                self._loaded[model_id] = loaded
                while len(self._loaded) > self.capacity:
                    self._loaded.popitem(last=False)
                self.metrics.models_loaded.set(len(self._loaded))
            finally:
                self._loading.pop(model_id, None)
            return record, loaded
        return record, await future
