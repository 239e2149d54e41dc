"""The factory's errors, answered in Mistral's error shape so that clients key on one format.

422 stays FastAPI's `{"detail": [...]}` (Mistral's spec uses the same), plus a `message` that says in
plain words which field, which item, what was expected and what came (`service/plain_errors.py`);
everything else is `{"object": "error", "message", "type", "param", "code"}` (Mistral's error
glossary).
"""

from __future__ import annotations

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
        errors = exc.errors()
        return JSONResponse({"detail": jsonable_encoder(errors), "message": describe(errors)},
                            status_code=422)

    app.add_exception_handler(FactoryError, factory_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
