"""`classifier-gateway tasks list | show | set | remove | promote | rollback | calibrate`: read and
edit the gateway's tasks file safely (validated with the gateway's parser, written atomically), so a
running gateway picks changes up at once. `promote` makes a task's canary or shadow its model and
keeps the old one as `previous`; `rollback` puts `previous` back; `calibrate` chooses a cascade's
`min_margin` from labelled data (service/commands/calibration.py)."""

from __future__ import annotations

import argparse
from typing import Any, TypeAlias

from service.commands import calibration, tasksfile
from service.commands.api import (
    Api,
    add_gateway_arguments,
    admin_api,
    gateway_api,
    model_ids,
)
from service.commands.errors import UserError
from service.commands.output import print_json, table
from service.commands.tasksfile import add_tasks_file_argument, register_task, task_rows
from service.gateway import task_edits
from service.gateway.registry import Registry, TaskSpec, UpstreamSpec

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
    p.add_argument("name", metavar="NAME", help="the task to add or change")
    p.add_argument("--model", help="the model id (required for a new task)")
    p.add_argument("--upstream", help="the upstream's name in the tasks file; `local` and "
                                      "`mistral` are added with their defaults if missing "
                                      "(default: the task's current one, else local)")
    p.add_argument("--kind", choices=("text", "chat"), help="text or chat (default: text)")
    p.add_argument("--cache-ttl-s", type=int, metavar="S", help="result cache TTL, 0 = no cache")
    p.add_argument("--timeout-s", type=float, metavar="S", help="upstream deadline per request")
    p.add_argument("--cache-scope", choices=("tenant", "shared"),
                   help="tenant (the default): a tenant is answered only from its own cache "
                        "entries; shared: one cache for every tenant (reveals that another "
                        "tenant sent the same input; for public content)")
    p.add_argument("--threshold", type=float, metavar="X",
                   help="score from which a multi-label target lists a label (default 0.5)")
    p.add_argument("--multi-label-target", action="append", metavar="TARGET",
                   help="a target that gets a `labels` list (repeatable)")
    p.add_argument("--target", help="single-target servers (TEI, vLLM, Infinity, KServe v2): "
                                    "the key the scores appear under (default: the task's name)")
    p.add_argument("--labels", type=_names, metavar="A,B,...",
                   help="the model's classes in index order, for servers that answer with "
                        "unnamed probabilities (vLLM; KServe v2)")
    rollout = p.add_argument_group(
        "canary, shadow, review and feedback",
        "Try a model on a share of live traffic (canary) or beside it (shadow), queue unsure "
        "answers for review; `tasks promote` and `tasks rollback` finish or undo a rollout.")
    rollout.add_argument("--canary", metavar="MODEL",
                         help="a candidate model that answers a sticky share of the items")
    rollout.add_argument("--canary-weight", type=float, metavar="W",
                         help="the canary's share of items, 0-1 (default 0.1 for a new canary)")
    rollout.add_argument("--canary-upstream", metavar="NAME",
                         help="the canary's upstream (default: the task's)")
    rollout.add_argument("--no-canary", action="store_true", help="remove the task's canary")
    rollout.add_argument("--shadow", metavar="MODEL",
                         help="a model that also sees a sample of the items, only to be "
                              "compared (`tasks show` gives the agreement)")
    rollout.add_argument("--shadow-sample", type=float, metavar="S",
                         help="the share of items the shadow sees, 0-1 (default 1 for a new "
                              "shadow)")
    rollout.add_argument("--shadow-upstream", metavar="NAME",
                         help="the shadow's upstream (default: the task's)")
    rollout.add_argument("--no-shadow", action="store_true", help="remove the task's shadow")
    rollout.add_argument("--review-margin", type=float, metavar="M",
                         help="queue answers whose top two scores are closer than M for review "
                              "(`classifier-gateway review`)")
    rollout.add_argument("--review-sample", type=float, metavar="S",
                         help="also queue a random share S of all answers, as a control")
    rollout.add_argument("--no-review", action="store_true", help="stop queueing for review")
    rollout.add_argument("--feedback", action=argparse.BooleanOptionalAction, default=None,
                         help="remember responses so that POST /feedback may correct them")
    p.add_argument("--force", action="store_true",
                   help="save without asking the upstream whether it serves the model, canary "
                        "and shadow given (for an upstream that is not reachable now)")
    add_tasks_file_argument(p)
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(handler=cmd_set)

    p = actions.add_parser("show", help="one task's settings, and its shadow's agreement figures",
                           description="A task's settings from the tasks file and, when the "
                                       "gateway answers, how its shadow model agrees with it.")
    p.add_argument("name", metavar="NAME", help="the task to show")
    add_tasks_file_argument(p)
    add_gateway_arguments(p, "the gateway asked for the shadow figures")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(handler=cmd_show)

    p = actions.add_parser("promote", help="make the task's canary or shadow its model",
                           description="Make the task's canary (or, with --from shadow, its "
                                       "shadow) its model; the current model is kept as "
                                       "`previous` for `tasks rollback`. The promoted entry is "
                                       "removed, and so is a canary or shadow of the same model.")
    p.add_argument("name", metavar="NAME", help="the task whose canary or shadow to promote")
    p.add_argument("--from", dest="source", choices=("canary", "shadow"),
                   help="which to promote (default: the canary when the task has one, else the "
                        "shadow)")
    add_tasks_file_argument(p)
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(handler=cmd_promote)

    p = actions.add_parser("rollback", help="put the task's previous model back",
                           description="Make the task's `previous` model (kept by `tasks "
                                       "promote`) its model again; the model it replaces "
                                       "becomes `previous`, so a rollback can be undone.")
    p.add_argument("name", metavar="NAME", help="the task to roll back")
    add_tasks_file_argument(p)
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(handler=cmd_rollback)

    p = actions.add_parser(
        "calibrate", help="choose a cascade's min_margin from labelled data",
        description="Send labelled examples through each stage of the task's cascade (through "
                    "the gateway with --gateway, else on each stage's upstream; never from the "
                    "cache), print threshold, escalation share and macro-F1 for "
                    "the first stage's min_margin, and pick the lowest escalation whose "
                    "macro-F1 is at least KEEP times the last stage's alone.")
    p.add_argument("name", metavar="NAME", help="a task with a cascade")
    p.add_argument("--data", required=True, type=tasksfile.absolute_path, metavar="FILE",
                   help="JSONL in the training format: text (or messages) and labels")
    p.add_argument("--keep", type=float, default=0.99, metavar="K",
                   help="share of the last stage's macro-F1 to keep (default 0.99)")
    p.add_argument("--write", action="store_true",
                   help="write the chosen min_margin into the tasks file")
    p.add_argument("--through-gateway", action="store_true",
                   help="ask the stages through the running gateway (--gateway-url, its admin "
                        "route, with the key in GATEWAY_ADMIN_KEY): stages on any upstream "
                        "protocol; without it, each stage's upstream is asked directly "
                        "(Mistral-compatible upstreams only)")
    add_gateway_arguments(p, "the gateway that --through-gateway asks")
    add_tasks_file_argument(p)
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(handler=cmd_calibrate)

    p = actions.add_parser("remove", help="remove a task")
    p.add_argument("name", metavar="NAME", help="the task to remove")
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


def _names(value: str) -> list[str]:
    names = [n.strip() for n in value.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"{value!r}: give the labels comma-separated, in the "
                                         "model's index order, none empty")
    return names


def _roll_out(args: argparse.Namespace, data: dict[str, Any]) -> None:
    """Map the canary, shadow, review and feedback flags of `tasks set` onto the edits of
    `task_edits`, once the task has its other settings; the gateway's parser then validates the
    ranges. Each rollout role of the schema has its flags: `--ROLE MODEL`, `--ROLE-SHARE`,
    `--ROLE-upstream` and `--no-ROLE`."""
    for field in task_edits.rollout_roles():
        role, share = field.name, field.share
        model = getattr(args, role)
        value = getattr(args, f"{role}_{share}")
        upstream = getattr(args, f"{role}_upstream")
        if getattr(args, f"no_{role}"):
            if model or value is not None or upstream:
                raise UserError(f"--no-{role} removes the {role}: give it alone")
            task_edits.clear(data, args.name, role)
            continue
        if model is None and value is None and upstream is None:
            continue
        try:
            task_edits.set_role(data, args.name, role, model=model, share=value,
                                upstream=tasksfile.role_upstream(data, upstream))
        except task_edits.MissingRole as exc:
            raise UserError(f"{exc}: give --{role} MODEL") from None
    if args.no_review:
        if args.review_margin is not None or args.review_sample is not None:
            raise UserError("--no-review stops queueing for review: give it alone")
        task_edits.clear(data, args.name, "review")
    elif args.review_margin is not None or args.review_sample is not None:
        task_edits.update_entry(data, args.name, "review", {"max_margin": args.review_margin,
                                                            "sample": args.review_sample})
    if args.feedback is not None:
        task_edits.set_task(data, args.name, {"feedback": args.feedback})


def _check_roles(name: str, before: Registry | None, after: Registry, *, force: bool) -> None:
    """Refuse what the gateway would accept but serve badly: a shadow that is the canary too,
    and (unless `force`) a model its upstream does not serve, which would load, stay ready and
    answer every request with a 502. Only the roles this edit changed are checked, so that an
    unrelated setting can still be changed while an upstream is down."""
    new = after.tasks[name]
    changed = task_edits.changed_roles(before.task(name) if before is not None else None, new)
    repeated = task_edits.repeated_rollout(new)
    if repeated is not None and (repeated[0] in changed or repeated[1] in changed):
        first, second = repeated
        if second in changed:
            raise UserError(f"the {second.role} {second.model!r} is the task's {first.role} too: "
                            f"a {second.role} is compared with the task's model and would only "
                            f"repeat the {first.role}'s answers; give another --{second.role}, "
                            f"or remove it with --no-{second.role}")
        raise UserError(f"the {first.role} {first.model!r} is the task's {second.role} too; remove "
                        f"the {second.role} in the same command (--no-{second.role}), or choose "
                        f"another --{first.role}")
    if force:
        return
    wanted: dict[str, list[tuple[str, str]]] = {}
    for role in changed:
        wanted.setdefault(role.upstream, []).append((role.role, role.model))
    for upstream, models in wanted.items():
        _check_served(after.upstreams[upstream], models)


def _check_served(upstream: UpstreamSpec, models: list[tuple[str, str]]) -> None:
    """Ask an upstream that speaks Mistral's API (the factory, Mistral) for its model list and
    refuse a model that is not on it. Other protocols have no list to ask, and an upstream that
    answers 404 has none either: those models are saved unchecked."""
    if upstream.protocol != "mistral":
        return
    what = f"upstream {upstream.name!r}"
    try:
        with Api(upstream.base_url, what=what, key=upstream.api_key(),
                 key_env=upstream.api_key_env or "its api_key_env", timeout_s=10.0,
                 start_hint="is it running, and is its base_url in the tasks file right?",
                 proxy=upstream.proxy) as api:
            body = api.get_if_any("/v1/models")
    except UserError as exc:
        shown = ", ".join(repr(model) for _, model in models)
        raise UserError(f"cannot check that {what} serves {shown}: {exc}; pass --force to save "
                        "without checking") from None
    if body is None:
        return
    served = model_ids(body)
    for role, model in models:
        if model not in served:
            listed = sorted(served, key=lambda m: (not m.startswith("ft:"), m))
            shown = ", ".join(listed[:25]) or "none"
            if len(listed) > 25:
                shown += f", ... ({len(listed) - 25} more: `classifier-gateway models list`)"
            raise UserError(f"{what} ({upstream.base_url}) has no model {model!r} (the task's "
                            f"{role}); its models: {shown}. Pass --force to save it anyway")


def _changes(old: TaskSpec | None, new: TaskSpec) -> list[str]:
    """What an edit changed in a task, in words (`canary m2 (weight 0.1)`, `feedback off -> on`,
    `shadow removed`), so that `tasks set` confirms what it did rather than what it kept. A new
    task is compared with the settings' defaults."""
    defaults = {key: field.default for key, field in TaskSpec.model_fields.items()
                if not field.is_required()}
    before = old.model_dump() if old is not None else defaults
    found: list[str] = []
    for key, value in new.model_dump(exclude={"name"}).items():
        was = before.get(key)
        if value == was:
            continue
        if value is None:
            found.append(f"{key} removed")
        elif isinstance(value, dict) and isinstance(was, dict):
            found += [f"{key} {part} {_shown(was.get(part))} -> {_shown(now)}"
                      for part, now in value.items() if now != was.get(part)]
        elif isinstance(value, dict):
            found.append(f"{key} {_entry(value)}")
        else:
            found.append(f"{key} {_shown(was)} -> {_shown(value)}")
    return found


def _entry(value: dict[str, Any]) -> str:
    """A canary, shadow or review entry: `m3 (sample 0.25)`, `max_margin 0.1, sample 0`."""
    parts = {key: part for key, part in value.items() if part is not None}
    model = parts.pop("model", None)
    rest = ", ".join(f"{key} {_shown(part)}" for key, part in parts.items())
    return f"{model} ({rest})" if model is not None else rest


def cmd_set(args: argparse.Namespace) -> int:
    seen: dict[str, TaskSpec | None] = {}

    def check(before: Registry | None, after: Registry) -> None:
        _check_roles(args.name, before, after, force=args.force)
        seen.update(old=before.task(args.name) if before is not None else None,
                    new=after.tasks[args.name])

    register_task(args.tasks, args.name, args.upstream or "",
                  then=lambda data: _roll_out(args, data), check=check,
                  model=args.model,
                  kind=args.kind, cache_ttl_s=args.cache_ttl_s, timeout_s=args.timeout_s,
                  cache_scope=args.cache_scope,
                  threshold=args.threshold, multi_label_targets=args.multi_label_target,
                  target=args.target, labels=args.labels)
    row = next(r for r in task_rows(args.tasks) if r["name"] == args.name)
    old, new = seen["old"], seen["new"]
    assert new is not None
    changes = _changes(old, new)
    if args.json:
        print_json({"tasks_file": str(args.tasks), "task": row, "changes": changes})
    elif old is None:
        extra = [c for c in changes if c.split()[0] not in ("upstream", "model", "kind")]
        print(f"task {args.name} -> {row['model']} on {row['upstream']} ({row['kind']})"
              + "".join(f"; {change}" for change in extra) + f", saved in {args.tasks}")
    elif changes:
        print(f"task {args.name}: {'; '.join(changes)}; saved in {args.tasks}")
    else:
        print(f"task {args.name} unchanged in {args.tasks}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    if not 0 < args.keep <= 1:
        raise UserError(f"--keep must be in (0, 1], not {args.keep}")
    registry = tasksfile.load(args.tasks)
    task = registry.task(args.name)
    if task is None or not task.cascade:
        with_cascade = sorted(n for n, t in registry.tasks.items() if t.cascade)
        raise UserError(f"no task {args.name!r} with a cascade in {args.tasks}; tasks with one: "
                        f"{', '.join(with_cascade) or 'none'}")
    target = task.stage_route(task.cascade[0])[1].target
    examples = calibration.read_examples(args.data, task, target)
    items = [e.item for e in examples]
    if args.through_gateway:
        with admin_api(args, timeout_s=120.0) as api:
            results = calibration.gateway_results(api, task, items)
    else:
        results = calibration.stage_results(registry, task, items)
    found = calibration.calibrate(task, examples, results, args.keep)
    chosen = found.chosen
    if chosen is None:  # unreachable with keep <= 1 and two stages; said plainly if it happens
        raise UserError(f"no threshold keeps {args.keep} of the last stage's macro-F1 "
                        f"({found.alone[-1]})")
    if args.write:
        tasksfile.edit(args.tasks, lambda data: task_edits.set_stage_margin(
            data, args.name, 0, chosen.threshold))
    if args.json:
        print_json({"task": task.name, "target": found.target, "examples": len(examples),
                    "stages": [{"model": m, "macro_f1": f}
                               for m, f in zip(found.stages, found.alone, strict=True)],
                    "rows": [vars(row) for row in found.rows], "chosen": vars(chosen),
                    "keep": args.keep, "written": args.write})
        return 0
    print(f"task {task.name}, target {found.target}: {len(examples)} examples")
    print(table(("stage", "model", "macro-F1 alone"),
                [(k + 1, m, f) for k, (m, f) in
                 enumerate(zip(found.stages, found.alone, strict=True))]))
    shown = [row for row in found.rows if round(row.threshold * 100) % 5 == 0 or row == chosen]
    print(table(("threshold", "escalation", "macro-F1", ""),
                [(f"{row.threshold:.2f}", f"{row.escalation:.3f}", f"{row.macro_f1:.4f}",
                  "<- chosen" if row == chosen else "") for row in shown]))
    print(f"chosen min_margin {chosen.threshold:.2f}: escalates {chosen.escalation:.1%}, "
          f"macro-F1 {chosen.macro_f1:.4f} (>= {args.keep} x {found.alone[-1]:.4f})")
    if args.write:
        print(f"written to {args.tasks} (tasks.{task.name}.cascade[0].min_margin)")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    tasksfile.edit(args.tasks, lambda data: task_edits.remove_task(data, args.name))
    if args.json:
        print_json({"tasks_file": str(args.tasks), "removed": args.name})
    else:
        print(f"task {args.name} removed from {args.tasks}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    done: list[task_edits.Swap] = []

    def change(data: dict[str, Any]) -> None:
        try:
            done.append(task_edits.promote(data, args.name, args.source))
        except task_edits.MissingRole as exc:
            hint = (f"drop --from, or give --from {exc.present[0]}" if exc.present else
                    f"add one first (`classifier-gateway tasks set {args.name} --canary MODEL`)")
            raise UserError(f"{exc}: {hint}") from None

    tasksfile.edit(args.tasks, change)
    (swap,) = done
    if args.json:
        print_json({"tasks_file": str(args.tasks), "task": args.name, "model": swap.model,
                    "previous": swap.replaced, "source": swap.source, "notes": list(swap.notes)})
    else:
        print(f"task {args.name}: {swap.source} {swap.model} promoted; previous model "
              f"{swap.replaced} kept for `tasks rollback` ({args.tasks})")
        for note in swap.notes:
            print(f"  {note}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    done: list[task_edits.Swap] = []

    def change(data: dict[str, Any]) -> None:
        try:
            done.append(task_edits.rollback(data, args.name))
        except task_edits.MissingRole as exc:
            raise UserError(f"{exc} (`tasks promote` keeps one)") from None

    tasksfile.edit(args.tasks, change)
    (swap,) = done
    if args.json:
        print_json({"tasks_file": str(args.tasks), "task": args.name, "model": swap.model,
                    "replaced": swap.replaced, "notes": list(swap.notes)})
    else:
        print(f"task {args.name}: back on {swap.model} (replaced {swap.replaced}, now "
              f"`previous`) in {args.tasks}")
        for note in swap.notes:
            print(f"  {note}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    registry = tasksfile.load(args.tasks)
    task = registry.task(args.name)
    if task is None:
        known = ", ".join(sorted(registry.tasks)) or "none"
        raise UserError(f"no task {args.name!r} in {args.tasks}; known tasks: {known}")
    settings = task.model_dump(exclude_none=True, exclude_defaults=True)
    report: dict[str, Any] | None = None
    unavailable: str | None = None
    if task.shadow is not None:
        try:
            with gateway_api(args, timeout_s=10.0) as api:
                report = api.get(f"/tasks/{args.name}/shadow")
        except UserError as exc:
            unavailable = str(exc)
    if args.json:
        print_json({"tasks_file": str(args.tasks), "task": settings, "shadow_report": report,
                    "shadow_report_error": unavailable})
        return 0
    rows = [(key, _shown(value)) for key, value in settings.items()]
    print(table(["setting", "value"], rows))
    if report is not None:
        print()
        print(f"shadow {report['shadow']['model']} vs {task.model} "
              f"({'all replicas' if report['shared'] else 'this gateway process only'}):")
        targets = report["targets"]
        if not targets:
            print("  no comparisons yet")
        for target, figures in targets.items():
            rate = figures["agreement"]
            print(f"  {target}: {figures['agreed']} of {figures['compared']} agree"
                  + (f" ({rate:.1%})" if rate is not None else ""))
            cells = sorted({theirs for row in figures["confusion"].values() for theirs in row})
            print(table([f"{task.model} \\ shadow", *cells],
                        [(ours, *(row.get(c, 0) for c in cells))
                         for ours, row in sorted(figures["confusion"].items())]))
    elif unavailable is not None:
        print(f"\nshadow figures unavailable: {unavailable}")
    return 0


def _shown(value: Any) -> str:
    """A setting as people read it: `on`/`off` rather than Python's True/False, `default` for
    a setting left to the gateway (or to the task's own, for a canary's upstream)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "default"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_shown(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    return str(value)
