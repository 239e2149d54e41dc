"""`/v1/models`: base and fine-tuned models (Mistral's `ModelList`), retrieve, delete."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends

from service.factory.state import FactoryState, get_state

router = APIRouter(prefix="/v1/models")


@router.get("")
async def list_models(state: Annotated[FactoryState, Depends(get_state)],
                      provider: str | None = None, model: str | None = None) -> dict[str, Any]:
    cards = state.catalog.list()
    if model is not None:
        cards = [c for c in cards if c["id"] == model]
    return {"object": "list", "data": cards}


@router.get("/{model_id:path}")
async def retrieve_model(model_id: str,
                         state: Annotated[FactoryState, Depends(get_state)]) -> dict[str, Any]:
    return state.catalog.card(model_id)


@router.delete("/{model_id:path}")
async def delete_model(model_id: str,
                       state: Annotated[FactoryState, Depends(get_state)]) -> dict[str, Any]:
    return state.catalog.delete(model_id)
