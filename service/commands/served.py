"""Whether the running gateway serves a task that the command line just wrote into a tasks file.

The gateway notices a changed tasks file by itself (a watch on its directory, and polling), but a
script that runs `finetune` and then `classify` must not race it: `finetune` and `jobs wait` return
only once `GET /tasks/NAME` on the gateway shows the new model. When it never does, they say why:
the gateway serves another tasks file, rejected this one, or did not reload in time. A gateway that
does not answer is not an error: it serves the task once it is started on that file.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from service.commands.api import Api
from service.commands.errors import TransientError, UserError

#: The longest wait for a gateway that reported no poll interval.
DEFAULT_WAIT_S = 5.0
#: However slowly the gateway polls, the command line waits at most this long.
MAX_WAIT_S = 60.0


@dataclass
class Served:
    """What the gateway said about the task: for the JSON output and the note on stderr."""

    gateway_url: str
    serving: bool
    note: str | None = None  # why it does not serve the task, and what to do

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _same_file(served: str, ours: Path) -> bool | None:
    """Whether the gateway's tasks file is ours; None when this machine cannot tell (the gateway
    runs in a container, where the same file has another path)."""
    try:
        return os.path.samefile(served, ours)
    except OSError:
        return None


def wait_until_served(api: Api, task: str, model: str, tasks_file: Path,
                      poll_s: float = 0.1) -> Served:
    """Poll `GET /tasks/TASK` until it shows `model`, for about twice the gateway's own poll
    interval (its directory watch usually makes it milliseconds)."""
    ours = tasks_file.absolute()
    try:
        listing = api.get("/tasks")
    except TransientError:
        return Served(api.base_url, False, f"no gateway answers at {api.base_url}; a gateway "
                                           f"started with `--tasks {ours}` will serve task {task}")
    except UserError as exc:
        return Served(api.base_url, False, f"cannot ask the gateway whether it serves task {task}: "
                                           f"{exc}")
    listing = listing if isinstance(listing, dict) else {}
    served_file = listing.get("tasks_file")
    if isinstance(served_file, str) and _same_file(served_file, ours) is False:
        return Served(api.base_url, False, (
            f"the gateway at {api.base_url} serves {served_file}, not {ours}, so it will not "
            f"serve task {task}: register it there (`--tasks {served_file}`), or start the "
            f"gateway with `--tasks {ours}`"))
    interval = listing.get("tasks_poll_interval_s")
    wait_s = (min(MAX_WAIT_S, max(DEFAULT_WAIT_S, 2 * interval + 1))
              if isinstance(interval, int | float) else DEFAULT_WAIT_S)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            shown = api.get(f"/tasks/{task}")
        except UserError:  # 404 until the gateway reloads; a passing hiccup is retried too
            shown = None
        canary = shown.get("canary") if isinstance(shown, dict) else None
        if isinstance(shown, dict) and (shown.get("model") == model or (
                isinstance(canary, dict) and canary.get("model") == model)):
            return Served(api.base_url, True)
        if time.monotonic() > deadline:
            break
        time.sleep(poll_s)
    return Served(api.base_url, False, _why_not(api, task, model, ours, wait_s))


def _why_not(api: Api, task: str, model: str, ours: Path, waited_s: float) -> str:
    try:
        listing = api.get("/tasks")
    except UserError as exc:
        return f"the gateway at {api.base_url} stopped answering: {exc}"
    error = listing.get("last_reload_error") if isinstance(listing, dict) else None
    if error:
        return f"the gateway at {api.base_url} rejected the tasks file: {error}"
    served_file = listing.get("tasks_file") if isinstance(listing, dict) else None
    where = (f"; it serves {served_file}: if that is not {ours} as this machine sees it, "
             f"register the task there" if served_file and served_file != str(ours) else "")
    return (f"the gateway at {api.base_url} does not serve task {task} -> {model} after "
            f"{waited_s:.0f}s{where}")
