"""A real Infinity server (`infinity_emb v2`) on a loopback port. It lives in its own virtualenv,
`.venv-infinity`, made by `make install-dev` (Infinity pins numpy<2, uvicorn<0.33 and
sentence-transformers<4, which clash with ours); `INFINITY_EMB` may name another executable."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.support.processes import REPO, wait_ready
from tests.support.redis_server import free_port, terminate

INFINITY = Path(os.environ.get("INFINITY_EMB", REPO / ".venv-infinity" / "bin" / "infinity_emb"))


@contextlib.contextmanager
def running_infinity(model_dir: Path, served_name: str, log: Path,
                     timeout_s: float = 180.0) -> Iterator[str]:
    """Serve `model_dir` (a Hugging Face classification directory) as `served_name`; yields the
    base URL once `/health` answers. The start-up is torch's import and the model load: ~20 s on
    two busy cores."""
    if not INFINITY.exists():
        raise RuntimeError(f"{INFINITY} is missing: `make install-dev` creates it (or set "
                           "INFINITY_EMB to an infinity_emb executable)")
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0",
           "DO_NOT_TRACK": "1"}
    with log.open("wb") as handle:
        process = subprocess.Popen(
            [str(INFINITY), "v2", "--model-id", str(model_dir), "--served-model-name",
             served_name, "--engine", "torch", "--device", "cpu", "--port", str(port),
             "--host", "127.0.0.1"], env=env, stdout=handle, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_ready(process, f"{url}/health", timeout_s, "Infinity did not start")
        except RuntimeError:
            raise RuntimeError(f"Infinity did not start; its log:\n{log.read_text()}") from None
        yield url
    finally:
        terminate(process, grace_s=10)
