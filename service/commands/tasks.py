"""`classifier-gateway tasks list | set | remove`: edit the gateway's tasks file safely (validated
with the gateway's parser, written atomically), so a running gateway picks changes up at once."""

from __future__ import annotations

import argparse
from typing import TypeAlias

from service.commands import tasksfile
from service.commands.errors import UserError
from service.commands.output import print_json, table
from service.commands.tasksfile import add_tasks_file_argument, register_task, task_rows

Sub: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def register(sub: Sub) -> None:
    tasks = sub.add_parser("tasks", help="list and edit the tasks of the tasks file",
                           description="List and edit the gateway's tasks file. Edits are "
                                       "validated and written atomically; a running gateway "
                                       "reloads the file by itself.")
    actions = tasks.add_subparsers(dest="action", required=True, metavar="ACTION")

    p = actions.add_parser("list", help="the tasks and the models they use")
    add_tasks_file_argument(p)
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(handler=cmd_list)

    p = actions.add_parser("set", help="add a task, or change one",
                           description="Add a task or change one; settings not given are kept.")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--model", help="the model id (required for a new task)")
    p.add_argument("--upstream", help="the upstream's name in the tasks file; `local` and "
                                      "`mistral` are added with their defaults if missing "
                                      "(default: the task's current one, else local)")
    p.add_argument("--kind", choices=("text", "chat"), help="text or chat (default: text)")
    p.add_argument("--cache-ttl-s", type=int, metavar="S", help="result cache TTL, 0 = no cache")
    p.add_argument("--timeout-s", type=float, metavar="S", help="upstream deadline per request")
    p.add_argument("--threshold", type=float, metavar="X",
                   help="score from which a multi-label target lists a label (default 0.5)")
    p.add_argument("--multi-label-target", action="append", metavar="TARGET",
                   help="a target that gets a `labels` list (repeatable)")
    add_tasks_file_argument(p)
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(handler=cmd_set)

    p = actions.add_parser("remove", help="remove a task")
    p.add_argument("name", metavar="NAME")
    add_tasks_file_argument(p)
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(handler=cmd_remove)


def cmd_list(args: argparse.Namespace) -> int:
    if not args.tasks.exists():
        raise UserError(f"no tasks file at {args.tasks}: pass --tasks FILE or set "
                        "GATEWAY_TASKS_FILE, or create one with `classifier-gateway tasks set`")
    rows = task_rows(args.tasks)
    if args.json:
        print_json({"tasks_file": str(args.tasks), "tasks": rows})
    elif not rows:
        print(f"{args.tasks}: no tasks")
    else:
        print(table(["task", "kind", "upstream", "model"],
                    [(r["name"], r["kind"], r["upstream"], r["model"]) for r in rows]))
    return 0


def cmd_set(args: argparse.Namespace) -> int:
    register_task(args.tasks, args.name, args.upstream or "", model=args.model, kind=args.kind,
                  cache_ttl_s=args.cache_ttl_s, timeout_s=args.timeout_s,
                  threshold=args.threshold,
                  multi_label_targets=args.multi_label_target)
    row = next(r for r in task_rows(args.tasks) if r["name"] == args.name)
    if args.json:
        print_json({"tasks_file": str(args.tasks), "task": row})
    else:
        print(f"task {args.name} -> {row['model']} on {row['upstream']} ({row['kind']}), "
              f"saved in {args.tasks}")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    tasksfile.edit(args.tasks, lambda data: tasksfile.remove_task(data, args.name))
    if args.json:
        print_json({"tasks_file": str(args.tasks), "removed": args.name})
    else:
        print(f"task {args.name} removed from {args.tasks}")
    return 0
