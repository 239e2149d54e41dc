"""The factory's errors, answered in Mistral's error shape so that clients key on one format.

422 stays FastAPI's `{"detail": [...]}` (Mistral's spec uses the same), plus a `message` that says in
plain words which field, which item, what was expected and what came (`service/plain_errors.py`);
everything else is `{"object": "error", "message", "type", "param", "code"}` (Mistral's error
glossary).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.plain_errors import describe
from service.wire import ErrorBody


class FactoryError(Exception):
    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers
        if status is not None:
            self.status = status


class NotFound(FactoryError):
    status = 404


class Conflict(FactoryError):
    status = 409


class TooLarge(FactoryError):
    status = 413


class Unauthorized(FactoryError):
    status = 401
    type = "authentication_error"


def _body(message: str, type_: str, param: str | None, code: str | None) -> dict[str, object]:
    return ErrorBody(message=message, type=type_, param=param, code=code).model_dump()


#: Request fields that hold a secret (an integration's `api_key`): a 422 never echoes them.
SECRET_FIELDS = frozenset({"api_key"})


#: Credentials written into a URL (`https://user:password@host`).
_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def _hide_secrets(value: Any) -> Any:
    if isinstance(value, str):
        return _USERINFO.sub("[hidden]@", value)
    if isinstance(value, dict):
        return {k: "[hidden]" if k in SECRET_FIELDS else _hide_secrets(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_hide_secrets(v) for v in value]
    return value


def without_secrets(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """Pydantic's errors with no secret in their `input` (an error about an integration carries
    the whole integration, key included; a URL may carry a password) nor in their context."""
    out = []
    for error in errors:
        error = dict(error)
        if error.get("loc") and error["loc"][-1] in SECRET_FIELDS:
            error["input"] = "[hidden]"
            error.pop("ctx", None)
        elif "input" in error:
            error["input"] = _hide_secrets(error["input"])
        out.append(error)
    return out


def install_error_handlers(app: FastAPI) -> None:
    async def factory_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, FactoryError)
        return JSONResponse(_body(exc.message, exc.type, exc.param, exc.code),
                            status_code=exc.status, headers=exc.headers)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return JSONResponse(_body(str(exc.detail), "invalid_request_error", None, None),
                            status_code=exc.status_code, headers=exc.headers)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = without_secrets(exc.errors())
        return JSONResponse({"detail": jsonable_encoder(errors), "message": describe(errors)},
                            status_code=422)

    app.add_exception_handler(FactoryError, factory_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
