"""The commands of `classifier-gateway`, one module per command group.

`GROUPS` is the registry: each name is a module `service.commands.<name>` whose `register(sub)`
adds its command(s) to the parser, in this order in `--help`. Adding a command group is adding its
module and one line here. A command module imports only the shared helpers of `HELPERS`, never
another command module nor the entry point `service/cli.py`, and the helpers import no command:
so there is no import cycle, and each command module can be read (and imported) on its own.
`tests/unit/test_cli_structure.py` holds them to it.
"""

from __future__ import annotations

import argparse
import importlib
from typing import TypeAlias

Sub: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

GROUPS: tuple[str, ...] = (
    "serve",
    "factory",
    "demo",
    "data",
    "finetune",
    "jobs",
    "models",
    "tasks",
    "classify",  # classify and classify-chat
    "feedback",  # feedback export, review export and predictions export
    "keys",  # client keys over the admin API
)


def register(sub: Sub) -> None:
    for name in GROUPS:
        importlib.import_module(f"{__name__}.{name}").register(sub)


#: The modules that commands share, and a command's work when it is too long for its module; each
#: imports only helpers listed before it (and the project's gateway and factory packages), never a
#: command module.
HELPERS: tuple[str, ...] = (
    "errors",     # UserError, TransientError
    "output",     # tables, JSON, timestamps, the progress line
    "parquet",    # export lines as Parquet, through pyarrow (the `export` extra)
    "demo_runner",  # demo's work: both servers, the demo tasks, the first answer
    "servers",    # what serve and factory share: their settings in --help, how they stop
    "api",        # HTTP clients of the upstream and the gateway; where they are, their keys
    "tasksfile",  # safe edits of the gateway's tasks file, its --tasks argument
    "calibration",  # tasks calibrate's work: each stage's answers, every threshold replayed
    "served",     # whether the running gateway serves a task just written
    "datacheck",  # what a training file holds, and why it cannot be used
    "prepare",    # turning a raw corpus into train/validation files
    "jobwatch",   # watching a fine-tuning job to its end and registering its model
)
