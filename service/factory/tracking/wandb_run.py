"""Weights & Biases: a job's run, online when W&B answers, offline (to sync later) when not.

Online needs a key (the job's `api_key`, else the factory's own `WANDB_API_KEY`) and W&B's API
host (`WANDB_BASE_URL`, default api.wandb.ai) accepting a TCP connection within
`PROBE_TIMEOUT_S`, and no `WANDB_MODE=offline` on the factory; otherwise, or when the online start fails, the run is written offline
(`WANDB_MODE=offline` semantics) under the job's directory, and the job's `integration` event
names the directory and the `wandb sync` command that uploads it. The key is never given to an
offline run, so nothing on disk holds it.

The runs are made in the factory replica that supervises the jobs (`base.py`), several at once
when it runs several jobs: each is its own run (`reinit="create_new"`; W&B's default would hand a
second job the first one's run), written by W&B's one service process per replica. W&B's system
metrics are off (`x_disable_stats`), as are the machine's description and git state: sampled
here, they would describe the factory replica, not the machine that trains (a Ray worker, a
trainer child); the training's numbers are the checkpoints'.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from service.factory.tracking.base import EVENT, Outcome, Param, RunContext

PACKAGE = "wandb"
INSTALL = "pip install 'classifier-gateway[tracking]' (or pip install wandb)"
DEFAULT_BASE_URL = "https://api.wandb.ai"
#: A reachable W&B answers a TCP connect in well under a second; 3 s is what a job's tracking
#: waits at most before it goes offline (there is no retry: the offline run loses nothing).
PROBE_TIMEOUT_S = 3.0
#: `wandb.init` and `Run.finish` go through W&B's process-wide state (its one service connection,
#: the module's run bookkeeping), and W&B does not document them as safe to call from two
#: threads at once, which is what two jobs' tracking threads do when they start or end together.
#: They are serialised here (an offline init is well under a second); `log` is not.
_SETUP = threading.Lock()


def reachable(base_url: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    parts = urlsplit(base_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=timeout_s):
            return True
    except OSError:
        return False


class WandbRun:
    takes_model = False  # the run's numbers only

    def __init__(self, run: Any) -> None:
        self.run = run

    def start(self, params: Mapping[str, Param]) -> None:
        self.run.config.update(dict(params), allow_val_change=True)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def finish(self, summary: Mapping[str, float], model_dir: Path | None,
               outcome: Outcome) -> None:
        self.run.summary.update(dict(summary))
        # W&B marks a run with a non-zero exit code "failed": a cancel or a stop is one too.
        with _SETUP:
            self.run.finish(exit_code=0 if outcome == "SUCCESS" else 1)


def _init(config: Mapping[str, Any], context: RunContext, *, online: bool,
          api_key: str | None) -> Any:
    import wandb

    context.run_dir.mkdir(parents=True, exist_ok=True)
    settings = wandb.Settings(
        mode="online" if online else "offline", api_key=api_key if online else None,
        # A run of its own beside the other jobs' (the module's docstring); nothing printed, no
        # console capture (the factory's, not the job's); no system sampling, machine, code or
        # git state of the factory's host in the run.
        reinit="create_new", silent=True, console="off", x_disable_stats=True,
        x_disable_machine_info=True, disable_git=True, save_code=False,
        root_dir=str(context.run_dir), init_timeout=60)
    with _SETUP:
        return wandb.init(
            project=str(config["project"]), dir=str(context.run_dir),
            name=config.get("run_name") or config.get("name") or f"job-{context.job_id}",
            tags=["classifier-factory"], notes=f"fine-tuning job {context.job_id}",
            settings=settings)


def open_run(config: Mapping[str, Any], api_key: str | None, context: RunContext) -> WandbRun:
    key = api_key or os.environ.get("WANDB_API_KEY") or None
    base_url = os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL
    reason = None
    if os.environ.get("WANDB_MODE") in ("offline", "dryrun"):  # the operator's choice
        reason = f"WANDB_MODE={os.environ['WANDB_MODE']} is set on the factory"
    elif key is None:
        reason = "no API key was given (the job's api_key, or WANDB_API_KEY on the factory)"
    elif not reachable(base_url):
        reason = f"{urlsplit(base_url).hostname} could not be reached"
    run = None
    if reason is None:
        try:
            run = _init(config, context, online=True, api_key=key)
        except Exception as exc:
            reason = f"the online run could not start ({type(exc).__name__})"
    if run is not None:
        context.event(EVENT, {"type": "wandb", "status": "online",
                              "project": config["project"], "url": run.url})
        return WandbRun(run)
    run = _init(config, context, online=False, api_key=None)
    sync_dir = str(Path(run.dir).parent)  # run.dir is the run's files/ folder
    context.event(EVENT, {"type": "wandb", "status": "offline", "reason": reason,
                          "run_dir": sync_dir, "sync": f"wandb sync {sync_dir}"})
    return WandbRun(run)
