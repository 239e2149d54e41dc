"""One parser for every `GATEWAY_REDIS_URL` scheme.

`redis://`, `rediss://`, `unix://` (standalone), `redis+sentinel://`, `rediss+sentinel://`
(Sentinel) and `redis+cluster://`, `rediss+cluster://` (Cluster) all go through `parse_redis_url`,
so that a parameter means the same thing, and is accepted or refused the same way, whatever the
scheme and whichever client (RedisLink, redis-py) then connects. Before, three parsers disagreed:
`ssl_check_hostname` was accepted for `rediss://` and refused for the Sentinel and Cluster schemes.

Errors name the part of the URL that is wrong and what to write, never the URL itself (it may carry
a password).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import SplitResult, parse_qs, unquote, urlsplit

Kind = Literal["standalone", "sentinel", "cluster"]

SUPPORTED_URLS = (
    "redis://[[user]:password@]host[:port][/db], rediss://... (TLS), unix:///path/to/redis.sock"
    "[?db=N], redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service_name[/db] "
    "(rediss+sentinel:// for TLS), redis+cluster://[[user]:password@]host[:port][,host[:port]...] "
    "(rediss+cluster:// for TLS)"
)
_KINDS: dict[str, Kind] = {
    "redis": "standalone", "rediss": "standalone", "unix": "standalone",
    "redis+sentinel": "sentinel", "rediss+sentinel": "sentinel",
    "redis+cluster": "cluster", "rediss+cluster": "cluster",
}
_DEFAULT_PORTS: dict[Kind, int] = {"standalone": 6379, "sentinel": 26379, "cluster": 6379}
TLS_PARAMS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname")
_PARAMS: dict[Kind, tuple[str, ...]] = {
    "standalone": ("db", "username", "password", "max_connections", *TLS_PARAMS),
    "sentinel": ("sentinel_username", "sentinel_password", "max_connections", *TLS_PARAMS),
    "cluster": ("max_connections", *TLS_PARAMS),
}
_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
_FALSE_STRINGS = ("0", "F", "FALSE", "N", "NO")  # as redis-py's to_bool


@dataclass(frozen=True)
class RedisURL:
    """A parsed GATEWAY_REDIS_URL. `hosts` has one entry for a standalone TCP Redis, none for a
    Unix socket, the seeds for Sentinel (the sentinels) and Cluster (any nodes)."""

    scheme: str
    kind: Kind
    tls: bool
    hosts: tuple[tuple[str, int], ...]
    unix_path: str | None
    db: int
    service: str | None  # Sentinel: the monitored master's name
    username: str | None
    password: str | None = field(repr=False)  # a logged URL must not leak it
    sentinel_username: str | None
    sentinel_password: str | None = field(repr=False)
    max_connections: int | None
    ssl_cert_reqs: ssl.VerifyMode
    ssl_check_hostname: bool
    ssl_ca_certs: str | None
    ssl_certfile: str | None
    ssl_keyfile: str | None

    @property
    def description(self) -> str:
        """Scheme and place, for logs and /readyz: never a secret."""
        if self.unix_path is not None:
            return f"unix://{self.unix_path}" + (f"?db={self.db}" if self.db else "")
        if self.kind == "standalone":
            host, port = self.hosts[0]
            shown = f"[{host}]" if ":" in host else host
            return f"{self.scheme}://{shown}:{port}/{self.db}"
        hosts = ",".join(f"{host}:{port}" for host, port in self.hosts)
        tail = f"/{self.service}/{self.db}" if self.kind == "sentinel" else ""
        return f"{self.scheme}://{hosts}{tail}"

    @property
    def check_hostname(self) -> bool:
        """Whether the server's certificate must name its host: only when certificates are
        verified at all (`ssl_cert_reqs=none` turns both off, as redis-py does)."""
        return self.ssl_check_hostname and self.ssl_cert_reqs != ssl.CERT_NONE

    def tls_kwargs(self) -> dict[str, Any]:
        """redis-py's keyword arguments for this URL's TLS settings (empty without TLS)."""
        if not self.tls:
            return {}
        return {"ssl": True, "ssl_cert_reqs": self.ssl_cert_reqs,
                "ssl_check_hostname": self.check_hostname,
                "ssl_ca_certs": self.ssl_ca_certs, "ssl_certfile": self.ssl_certfile,
                "ssl_keyfile": self.ssl_keyfile}

    def tls_context(self) -> ssl.SSLContext:
        """The same TLS settings as an `ssl.SSLContext`, for RedisLink (which connects with
        asyncio, not redis-py). Loads the CA and certificate files: OSError or ssl.SSLError when
        they cannot be read."""
        context = ssl.create_default_context(cafile=self.ssl_ca_certs)
        context.check_hostname = self.check_hostname
        context.verify_mode = self.ssl_cert_reqs
        if self.ssl_certfile is not None:
            context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile)
        return context


def check_userinfo(parts: SplitResult, setting: str) -> None:
    """An '@' after the host means a password with an unencoded '/', '?' or '#', which split the
    URL in the wrong place: say so before any message could quote a piece of that password."""
    if "@" in parts.path or "@" in parts.query or "@" in parts.fragment:
        raise ValueError(f"the URL in {setting} does not parse: percent-encode '/', '?', '#' and "
                         "'@' in the user name and password (e.g. '/' as %2F)")


def parse_redis_url(url: str, setting: str = "GATEWAY_REDIS_URL") -> RedisURL:
    parts = urlsplit(url.strip())
    check_userinfo(parts, setting)
    scheme = parts.scheme.lower()
    kind = _KINDS.get(scheme)
    if kind is None:
        raise ValueError(f"unsupported Redis URL scheme {parts.scheme!r} in {setting}; use one of: "
                         f"{SUPPORTED_URLS}")
    tls = scheme.startswith("rediss")
    params = {name: values[0] for name, values in parse_qs(parts.query).items()}
    unknown = sorted(set(params) - set(_PARAMS[kind]))
    if unknown:
        raise ValueError(f"unsupported parameter(s) {', '.join(unknown)} in {setting} "
                         f"({scheme}://); supported: {', '.join(_PARAMS[kind])}")
    tls_given = sorted(set(params) & set(TLS_PARAMS))
    if tls_given and not tls:
        raise ValueError(f"{', '.join(tls_given)} in {setting} only apply to rediss:// URLs "
                         f"(rediss+sentinel://, rediss+cluster://)")
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username: str | None = None
    password: str | None = None
    if userinfo:
        user, has_password, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if has_password else None
    username = username or params.get("username")
    password = password if password is not None else params.get("password")
    if username and password is None:
        raise ValueError(f"{setting} names the Redis user {username!r} but no password; write "
                         f"{scheme}://user:password@host:port")
    hosts: list[tuple[str, int]] = []
    unix_path = None
    service = None
    db_text = params.get("db")
    if scheme == "unix":
        unix_path = unquote(parts.path)
        if not unix_path:
            raise ValueError(f"the unix:// URL in {setting} has no socket path; write "
                             "unix:///path/to/redis.sock")
    elif kind == "standalone":
        hosts = _hosts(hostlist, kind, scheme, setting) if hostlist else [("localhost", 6379)]
        if len(hosts) > 1:
            raise ValueError(f"{setting} names several hosts; a {scheme}:// URL names one (for "
                             f"several, use {scheme}+sentinel:// or {scheme}+cluster://)")
        if db_text is None:
            db_text = unquote(parts.path).strip("/") or None
    elif kind == "sentinel":
        hosts = _hosts(hostlist, kind, scheme, setting)
        segments = [unquote(s) for s in parts.path.strip("/").split("/") if s]
        if not segments or len(segments) > 2:
            raise ValueError(f"the {scheme}:// URL in {setting} needs the monitored master's name "
                             f"(and optionally a db) as its path: {scheme}://host:26379/mymaster/0")
        service = segments[0]
        db_text = segments[1] if len(segments) == 2 else None
    else:
        hosts = _hosts(hostlist, kind, scheme, setting)
        if parts.path.strip("/") not in ("", "0"):
            raise ValueError(f"Redis Cluster has only db 0; remove the path from the {scheme}:// "
                             f"URL in {setting}")
    try:
        db = int(db_text) if db_text is not None else 0
        if db < 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"the db in {setting} must be a number (0, 1, ...), got "
                         f"{db_text!r}") from None
    max_connections = None
    if "max_connections" in params:
        try:
            max_connections = int(params["max_connections"])
            if max_connections < 1:
                raise ValueError
        except ValueError:
            raise ValueError(f"max_connections in the {scheme}:// cache URL must be a positive "
                             f"integer, got {params['max_connections']!r}") from None
    cert_reqs_text = params.get("ssl_cert_reqs", "required")
    cert_reqs = _CERT_REQS.get(cert_reqs_text.lower())
    if cert_reqs is None:
        raise ValueError(f"ssl_cert_reqs in {setting} must be none, optional or required, got "
                         f"{cert_reqs_text!r}")
    if "ssl_keyfile" in params and "ssl_certfile" not in params:
        raise ValueError(f"ssl_keyfile in {setting} needs ssl_certfile (the client certificate)")
    return RedisURL(
        scheme=scheme, kind=kind, tls=tls, hosts=tuple(hosts), unix_path=unix_path, db=db,
        service=service, username=username, password=password,
        sentinel_username=params.get("sentinel_username"),
        sentinel_password=params.get("sentinel_password"), max_connections=max_connections,
        ssl_cert_reqs=cert_reqs,
        ssl_check_hostname=params.get("ssl_check_hostname", "").upper() not in _FALSE_STRINGS,
        ssl_ca_certs=params.get("ssl_ca_certs"), ssl_certfile=params.get("ssl_certfile"),
        ssl_keyfile=params.get("ssl_keyfile"),
    )


def _hosts(hostlist: str, kind: Kind, scheme: str, setting: str) -> list[tuple[str, int]]:
    """`host[:port][,host[:port]...]`, IPv6 in brackets, default ports per kind."""
    hosts: list[tuple[str, int]] = []
    for raw in hostlist.split(","):
        entry = raw.strip()
        if not entry:
            continue
        if entry.startswith("["):  # [IPv6]:port
            host, _, rest = entry[1:].partition("]")
            port_text = rest.removeprefix(":")
        else:
            host, _, port_text = entry.partition(":")
        try:
            port = int(port_text) if port_text else _DEFAULT_PORTS[kind]
            if not 0 < port < 65536:
                raise ValueError
        except ValueError:
            raise ValueError(f"bad port {port_text!r} for host {unquote(host)!r} in the {scheme}:// "
                             f"URL in {setting}: the port must be a number from 1 to 65535; "
                             "write host:port") from None
        hosts.append((unquote(host), port))
    if not hosts:
        raise ValueError(f"the {scheme}:// URL in {setting} names no host; write "
                         f"{scheme}://host1:port1,host2:port2...")
    return hosts
