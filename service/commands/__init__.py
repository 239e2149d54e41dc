"""The workflow commands of `classifier-gateway`, one module per command group: `data`,
`finetune`, `jobs`, `models`, `tasks`, `classify`. `service/cli.py` registers them with
`register(sub)` and stays the one entry point (exit codes, `UserError`)."""

from __future__ import annotations

import argparse
from typing import TypeAlias

Sub: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def register(sub: Sub) -> None:
    from service.commands import classify, data, finetune, jobs, models, tasks

    for module in (data, finetune, jobs, models, tasks, classify):
        module.register(sub)
