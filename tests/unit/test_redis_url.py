"""One parser for every GATEWAY_REDIS_URL scheme (service/gateway/redis_url.py).

Before, three parsers disagreed: `ssl_check_hostname` was accepted for `rediss://` and refused for
`rediss+sentinel://` and `rediss+cluster://`.
"""

from __future__ import annotations

import ssl

import pytest
from prometheus_client import CollectorRegistry

from service.gateway.cache import ResultCache
from service.gateway.metrics import GatewayMetrics
from service.gateway.redis_url import TLS_PARAMS, parse_redis_url

TLS_QUERY = ("ssl_cert_reqs=optional&ssl_check_hostname=false&ssl_ca_certs=/ca.pem"
             "&ssl_certfile=/c.pem&ssl_keyfile=/k.pem")
TLS_URLS = [f"rediss://:pw@h1:6380/0?{TLS_QUERY}",
            f"rediss+sentinel://:pw@h1:26380/mymaster/0?{TLS_QUERY}",
            f"rediss+cluster://:pw@h1:6380?{TLS_QUERY}"]


@pytest.mark.parametrize("url", TLS_URLS)
def test_every_tls_scheme_takes_the_same_tls_parameters(url: str) -> None:
    parsed = parse_redis_url(url)
    assert parsed.tls and parsed.password == "pw"
    assert parsed.tls_kwargs() == {
        "ssl": True, "ssl_cert_reqs": ssl.CERT_OPTIONAL, "ssl_check_hostname": False,
        "ssl_ca_certs": "/ca.pem", "ssl_certfile": "/c.pem", "ssl_keyfile": "/k.pem"}


@pytest.mark.parametrize("url", TLS_URLS)
@pytest.mark.parametrize("client", ["link", "redis-py"])
def test_every_scheme_and_client_accepts_them(url: str, client: str) -> None:
    ResultCache.from_url(url, prefix="p", socket_timeout_s=0.1, backoff_s=1.0,
                         metrics=GatewayMetrics(CollectorRegistry()),
                         client=client)  # type: ignore[arg-type]


@pytest.mark.parametrize("scheme", ["redis", "redis+sentinel", "redis+cluster"])
@pytest.mark.parametrize("param", TLS_PARAMS)
def test_tls_parameters_without_tls_are_refused_alike(scheme: str, param: str) -> None:
    path = "/mymaster" if "sentinel" in scheme else ""
    with pytest.raises(ValueError, match="only apply to rediss://"):
        parse_redis_url(f"{scheme}://h1{path}?{param}=x")


@pytest.mark.parametrize(("url", "message"), [
    ("redis://h?timeout=1", "unsupported parameter(s) timeout"),
    ("redis+sentinel://h/m?timeout=1", "unsupported parameter(s) timeout"),
    ("redis+cluster://h?timeout=1", "unsupported parameter(s) timeout"),
    ("redis+cluster://h?sentinel_password=x", "unsupported parameter(s) sentinel_password"),
    ("redis://h1,h2", "names several hosts"),
])
def test_the_same_mistake_gets_the_same_message(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_redis_url(url)


def test_descriptions_never_show_a_password() -> None:
    for url in ("redis://:s3cret@h:7000/2", "unix://:s3cret@/run/r.sock?db=1",
                "rediss+sentinel://:s3cret@s1,s2:26380/m/1?sentinel_password=s3cret",
                "redis+cluster://u:s3cret@n1:7000,[::1]:7002"):
        parsed = parse_redis_url(url)
        assert "s3cret" not in parsed.description and "s3cret" not in repr(parsed)
