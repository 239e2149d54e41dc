"""HTTP clients of the CLI: the upstream that trains and serves models (the local factory or
Mistral's API, one wire format) and the gateway that serves tasks.

Keys come from the environment only, never from flags (a flag ends up in shell history and `ps`),
and no message of this module contains one. Every failure becomes a `UserError` whose one line says
what went wrong and what to do next.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from service.commands.errors import TransientError, UserError

DEFAULT_FACTORY_URL = "http://127.0.0.1:8100"
DEFAULT_MISTRAL_URL = "https://api.mistral.ai"
DEFAULT_GATEWAY_URL = "http://127.0.0.1:8000"
#: The base model of a fine-tuning job when `--model` is not given.
DEFAULT_MODELS = {"local": "local-ngram", "mistral": "ministral-3b-latest"}


@dataclass(frozen=True)
class Upstream:
    """Where models are trained and served, as the CLI and the tasks file both need to know it."""

    name: str  # "local" or "mistral": also the upstream's name in the tasks file
    base_url: str
    key_env: str

    @property
    def label(self) -> str:
        return "the local factory" if self.name == "local" else "Mistral's API"

    def key(self) -> str | None:
        return os.environ.get(self.key_env) or None


def add_upstream_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--upstream", choices=("local", "mistral"),
                        default=os.environ.get("CLASSIFIER_UPSTREAM", "local"),
                        help=f"local: the factory at FACTORY_URL (default {DEFAULT_FACTORY_URL}) with "
                             f"FACTORY_API_KEY; mistral: {DEFAULT_MISTRAL_URL} with "
                             "MISTRAL_API_KEY (default: CLASSIFIER_UPSTREAM, else local)")
    parser.add_argument("--upstream-url", metavar="URL",
                        help="override the upstream's address (else FACTORY_URL or MISTRAL_URL)")


def add_gateway_arguments(parser: argparse.ArgumentParser, purpose: str = "the running gateway"
                          ) -> None:
    parser.add_argument("--gateway-url", metavar="URL",
                        default=os.environ.get("GATEWAY_URL", DEFAULT_GATEWAY_URL),
                        help=f"{purpose} (GATEWAY_URL, default %(default)s); its client key is "
                             "read from GATEWAY_API_KEY")


def upstream_from(args: argparse.Namespace) -> Upstream:
    if args.upstream == "mistral":
        url = args.upstream_url or os.environ.get("MISTRAL_URL") or DEFAULT_MISTRAL_URL
        return Upstream("mistral", url.rstrip("/"), "MISTRAL_API_KEY")
    url = args.upstream_url or os.environ.get("FACTORY_URL") or DEFAULT_FACTORY_URL
    return Upstream("local", url.rstrip("/"), "FACTORY_API_KEY")


def well_known_upstream(name: str) -> Upstream | None:
    """`local` and `mistral` as `finetune --upstream` means them; None for any other name."""
    if name == "local":
        return Upstream("local", (os.environ.get("FACTORY_URL") or DEFAULT_FACTORY_URL).rstrip("/"),
                        "FACTORY_API_KEY")
    if name == "mistral":
        return Upstream("mistral",
                        (os.environ.get("MISTRAL_URL") or DEFAULT_MISTRAL_URL).rstrip("/"),
                        "MISTRAL_API_KEY")
    return None


def error_message(response: httpx.Response) -> str:
    """The server's own reason, from any of the error shapes that Mistral, the factory and the
    gateway use (`{"error": {"message"}}`, `{"message"}`, `{"detail": str | [{loc, msg}]}`)."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:200] or response.reason_phrase
    if isinstance(body, Mapping):
        error = body.get("error")
        if isinstance(error, Mapping) and error.get("message"):
            return str(error["message"])
        if body.get("message"):
            return str(body["message"])
        detail = body.get("detail")
        if isinstance(detail, str):
            return detail
        if isinstance(detail, list) and detail:
            parts = []
            for item in detail[:3]:
                if isinstance(item, Mapping):
                    loc = ".".join(str(p) for p in item.get("loc", []) if p != "body")
                    parts.append(f"{loc}: {item.get('msg')}" if loc else str(item.get("msg")))
            return "; ".join(parts)
    return str(body)[:200]


class Api:
    """A small synchronous client: the CLI does one thing at a time, so httpx.Client suffices."""

    def __init__(self, base_url: str, *, what: str, key: str | None, key_env: str,
                 start_hint: str, timeout_s: float = 60.0,
                 transport: httpx.BaseTransport | None = None, proxy: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.what = what
        self.base_url = base_url
        self.key_env = key_env
        self.start_hint = start_hint
        self._client = httpx.Client(base_url=base_url, headers=headers, transport=transport,
                                    timeout=httpx.Timeout(timeout_s, connect=5.0), proxy=proxy)

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.send(method, path, **kwargs)
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise UserError(f"{self.what} answered {method} {path} with something that is not "
                            "JSON; is the address right?") from None

    def get_if_any(self, path: str) -> Any:
        """The JSON of `GET path`, or None when the server has no such resource (404, 405): for
        what only some servers offer, such as a model list."""
        response = self.send("GET", path, absent_ok=True)
        if response.status_code in (404, 405):
            return None
        try:
            return response.json()
        except ValueError:
            raise UserError(f"{self.what} answered GET {path} with something that is not JSON; "
                            "is the address right?") from None

    def send(self, method: str, path: str, *, absent_ok: bool = False,
             **kwargs: Any) -> httpx.Response:
        """The raw response of a request that succeeded (2xx), or with `absent_ok` one that found
        nothing there (404, 405); every other failure a `UserError`."""
        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.ConnectError:
            raise TransientError(f"cannot reach {self.what} at {self.base_url}: "
                                 f"{self.start_hint}") from None
        except httpx.TimeoutException:
            raise TransientError(f"{self.what} at {self.base_url} did not answer in time; "
                            "try again, or check that it is not overloaded") from None
        except httpx.TransportError as exc:
            raise TransientError(f"talking to {self.what} at {self.base_url} failed: {exc}"
                                 ) from None
        if response.status_code == 401 or response.status_code == 403:
            raise UserError(f"{self.what} refused the key (HTTP {response.status_code}): set "
                            f"{self.key_env} to a valid key")
        if response.status_code == 429 or response.status_code >= 500:
            raise TransientError(f"{self.what} answered HTTP {response.status_code} to {method} "
                                 f"{path}: {error_message(response)}")
        if absent_ok and response.status_code in (404, 405):
            return response
        if response.status_code >= 400:
            raise UserError(f"{self.what} answered HTTP {response.status_code} to {method} {path}: "
                            f"{error_message(response)}")
        return response

    def first_line(self, path: str, limit: int = 1 << 20) -> bytes:
        """The first non-blank line of a text resource (a JSONL file's content), read as a stream
        so that a large file is not downloaded for it."""
        buffer = b""
        try:
            with self._client.stream("GET", path) as response:
                if response.status_code >= 400:
                    raise UserError(f"{self.what} answered HTTP {response.status_code} to GET "
                                    f"{path}")
                for chunk in response.iter_bytes():
                    buffer += chunk
                    if b"\n" in buffer.lstrip() or len(buffer) >= limit:
                        break
        except httpx.TransportError as exc:
            raise TransientError(f"talking to {self.what} at {self.base_url} failed: {exc}"
                                 ) from None
        return next((line for line in buffer.split(b"\n") if line.strip()), b"")

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> Any:
        return self.request("DELETE", path, **kwargs)


def upstream_api(upstream: Upstream, transport: httpx.BaseTransport | None = None) -> Api:
    key = upstream.key()
    if upstream.name == "mistral" and not key:
        raise UserError("MISTRAL_API_KEY is not set: export your Mistral API key, or use "
                        "--upstream local")
    hint = ("start it with `classifier-gateway factory`, or set FACTORY_URL"
            if upstream.name == "local" else "check your network, or set MISTRAL_URL")
    return Api(upstream.base_url, what=upstream.label, key=key, key_env=upstream.key_env,
               start_hint=hint, transport=transport)


#: The client key convention (docs/configuration.md, "Client keys"): the gateway accepts the keys
#: listed in GATEWAY_API_KEYS; a client sends one of them, read from GATEWAY_API_KEY.
GATEWAY_KEY_ENV = "GATEWAY_API_KEY"
#: What the demo's curl lines used to read; still accepted, with a warning, until it is renamed.
DEPRECATED_GATEWAY_KEY_ENV = "GATEWAY_KEY"


def gateway_key() -> str | None:
    key = os.environ.get(GATEWAY_KEY_ENV)
    if key:
        return key
    old = os.environ.get(DEPRECATED_GATEWAY_KEY_ENV)
    if old:
        print(f"classifier-gateway: warning: {DEPRECATED_GATEWAY_KEY_ENV} is deprecated; name the "
              f"gateway's client key {GATEWAY_KEY_ENV} instead (it is used this time)",
              file=sys.stderr)
        return old
    return None


def gateway_api(args: argparse.Namespace, timeout_s: float = 60.0) -> Api:
    return Api(args.gateway_url.rstrip("/"), what="the gateway", key=gateway_key(),
               key_env=GATEWAY_KEY_ENV,
               start_hint="start it with `classifier-gateway serve`, or set GATEWAY_URL",
               timeout_s=timeout_s)


#: The gateway's admin API (`/admin/...`: keys, tenant quotas, usage) takes only this key.
ADMIN_KEY_ENV = "GATEWAY_ADMIN_KEY"


def admin_api(args: argparse.Namespace, timeout_s: float = 30.0) -> Api:
    key = os.environ.get(ADMIN_KEY_ENV)
    if not key:
        raise UserError(f"{ADMIN_KEY_ENV} is not set: export the gateway's admin key (the "
                        f"value of its {ADMIN_KEY_ENV})")
    return Api(args.gateway_url.rstrip("/"), what="the gateway's admin API", key=key,
               key_env=ADMIN_KEY_ENV,
               start_hint="start it with `classifier-gateway serve`, or set GATEWAY_URL",
               timeout_s=timeout_s)


def model_ids(body: Any) -> list[str]:
    """The ids and aliases of a `GET /v1/models` answer (Mistral's `ModelList`, the factory's
    too): a task may name a model by either."""
    found: list[str] = []
    for card in (body.get("data") if isinstance(body, Mapping) else None) or []:
        if isinstance(card, Mapping) and isinstance(card.get("id"), str):
            found.append(card["id"])
            found += [alias for alias in card.get("aliases") or [] if isinstance(alias, str)]
    return list(dict.fromkeys(found))


def upload_file(api: Api, path: Path) -> dict[str, Any]:
    """`POST /v1/files` with purpose fine-tune; identical re-uploads return the existing file."""
    with path.open("rb") as handle:
        body = api.post("/v1/files", files={"file": (path.name, handle, "application/jsonl")},
                        data={"purpose": "fine-tune"})
    if not isinstance(body, dict) or "id" not in body:
        raise UserError(f"{api.what} did not return a file id for {path}")
    return body
