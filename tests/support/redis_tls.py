"""A real redis-server speaking only TLS, with a throwaway self-signed certificate for 127.0.0.1."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.support.redis_server import RedisServer, free_port, start_redis


@dataclass
class TlsRedis:
    server: RedisServer
    ca_file: Path  # the self-signed certificate, which is its own CA

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.server.port}/0?ssl_ca_certs={self.ca_file}"

    def stop(self) -> None:
        self.server.stop()


def self_signed_cert(directory: Path, cn: str, san: str) -> tuple[Path, Path]:
    """A throwaway certificate (its own CA) and key, e.g. `san="IP:127.0.0.1"`."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("openssl is not installed: `apt-get install openssl`")
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
         "-subj", f"/CN={cn}", "-addext", f"subjectAltName={san}"],
        check=True, capture_output=True, timeout=30,
    )
    return cert, key


def start_tls_redis(directory: Path) -> TlsRedis:
    cert, key = self_signed_cert(directory, "127.0.0.1", "IP:127.0.0.1")
    port = free_port()
    # `--port 0` after start_redis's own `--port`: no plaintext listener, TLS on `port` only.
    server = start_redis(
        directory, "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert),
        "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
        port=port,
    )
    return TlsRedis(server=server, ca_file=cert)
