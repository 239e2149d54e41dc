"""`classifier-gateway models list | delete`: models on the upstream."""

from __future__ import annotations

import argparse
from typing import TypeAlias

from service.commands import tasksfile
from service.commands.api import add_upstream_arguments, upstream_api, upstream_from
from service.commands.errors import UserError
from service.commands.output import print_json, table, when
from service.commands.tasksfile import add_tasks_file_argument

Sub: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def register(sub: Sub) -> None:
    models = sub.add_parser("models", help="list and delete models on the upstream",
                            description="Models on the upstream (--upstream local|mistral).")
    actions = models.add_subparsers(dest="action", required=True, metavar="ACTION")

    p = actions.add_parser("list", help="the models, fine-tuned ones first")
    p.add_argument("--fine-tuned", action="store_true", help="only fine-tuned models")
    add_upstream_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(handler=cmd_list)

    p = actions.add_parser("delete", help="delete a fine-tuned model",
                           description="Delete a fine-tuned model. Refused while a task in the "
                                       "tasks file still uses it, unless --force.")
    p.add_argument("model_id", metavar="MODEL_ID")
    p.add_argument("--force", action="store_true",
                   help="delete even if tasks in the tasks file still use the model")
    add_tasks_file_argument(p)
    add_upstream_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(handler=cmd_delete)


def _fine_tuned(model: dict[str, object]) -> bool:
    return (model.get("type") == "fine-tuned" or str(model.get("id", "")).startswith("ft:")
            or model.get("job") is not None)


def cmd_list(args: argparse.Namespace) -> int:
    with upstream_api(upstream_from(args)) as api:
        body = api.get("/v1/models")
    models = [m for m in body.get("data") or [] if isinstance(m, dict)]
    if args.fine_tuned:
        models = [m for m in models if _fine_tuned(m)]
    models.sort(key=lambda m: (not _fine_tuned(m), -(m.get("created") or 0), str(m.get("id"))))
    if args.json:
        print_json({"data": models})
        return 0
    if not models:
        print("no models")
        return 0
    print(table(["model", "fine-tuned", "created (UTC)"],
                [(m.get("id"), "yes" if _fine_tuned(m) else "no", when(m.get("created")))
                 for m in models]))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    if not args.force and args.tasks.exists():
        users = sorted(name for name, task in tasksfile.load(args.tasks).tasks.items()
                       if task.model == args.model_id)
        if users:
            raise UserError(f"task(s) {', '.join(users)} in {args.tasks} still use this model and "
                            "would fail once it is gone; point them at another model "
                            "(`classifier-gateway tasks set`) or pass --force")
    with upstream_api(upstream_from(args)) as api:
        body = api.delete(f"/v1/models/{args.model_id}")
    if args.json:
        print_json(body)
    else:
        print(f"model {args.model_id} deleted")
    return 0
