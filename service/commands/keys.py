"""`classifier-gateway keys create|list|show|update|revoke|rotate|usage`: client keys with
identities, over the gateway's admin API (GATEWAY_URL, GATEWAY_ADMIN_KEY). docs/tenants.md says
what a key, a tenant and a quota are.

A key's secret is printed by `create` and `rotate` only, the two answers that carry it; every
other command shows keys by id."""

from __future__ import annotations

import argparse
import sys
from typing import Any, TypeAlias

from service.commands.api import add_gateway_arguments, admin_api
from service.commands.errors import UserError
from service.commands.output import print_json, table

Sub: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

QUOTAS = ("requests_per_second", "items_per_minute", "items_per_day")


def register(sub: Sub) -> None:
    keys = sub.add_parser("keys", help="client keys: tenants, tasks, quotas, usage",
                          description="Client keys with identities, over the gateway's admin "
                                      "API (GATEWAY_ADMIN_KEY).")
    actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")

    p = actions.add_parser("create", help="issue a key (its secret is printed this once)",
                           description="Issue a key for a tenant; the secret is printed once.")
    p.add_argument("--tenant", required=True, help="the tenant the key belongs to")
    p.add_argument("--name", required=True, help="what the key is for (a backend's name)")
    _limits(p)
    p.add_argument("--expires-at", metavar="ISO", help="expiry, e.g. 2027-01-01T00:00:00Z")
    _common(p, cmd_create)

    p = actions.add_parser("list", help="keys, of every tenant or one",
                           description="Keys (never their secrets), of every tenant or one.")
    p.add_argument("--tenant", help="only this tenant's keys")
    _common(p, cmd_list)

    p = actions.add_parser("show", help="one key", description="One key, never its secret.")
    p.add_argument("id", help="the key's id")
    _common(p, cmd_show)

    p = actions.add_parser("update", help="change a key's name, tasks, quotas or expiry",
                           description="Change what is given; the rest stays.")
    p.add_argument("id", help="the key's id")
    p.add_argument("--name", help="a new name")
    _limits(p)
    p.add_argument("--all-tasks", action="store_true", help="let the key call every task")
    p.add_argument("--expires-at", metavar="ISO", help="a new expiry")
    p.add_argument("--no-expiry", action="store_true", help="remove the expiry")
    _common(p, cmd_update)

    p = actions.add_parser("revoke", help="revoke a key (every replica refuses it within 1 s)",
                           description="Revoke a key: every replica refuses it within 1 s.")
    p.add_argument("id", help="the key's id")
    _common(p, cmd_revoke)

    p = actions.add_parser("rotate", help="a new secret for a key; the old one works a while",
                           description="A new secret under the same id; the old one keeps "
                                       "working for --grace-s seconds.")
    p.add_argument("id", help="the key's id")
    p.add_argument("--grace-s", type=int, default=3600, metavar="S",
                   help="seconds the old secret keeps working (default %(default)s)")
    _common(p, cmd_rotate)

    p = actions.add_parser("usage", help="requests, items, cache hits and errors per day",
                           description="Usage per UTC day: of one key (ID), or of every key of "
                                       "a tenant (--tenant), or of all keys.")
    p.add_argument("id", nargs="?", help="the key's id")
    p.add_argument("--tenant", help="every key of this tenant")
    p.add_argument("--since", metavar="YYYY-MM-DD", help="the first day (default: 30 days ago)")
    _common(p, cmd_usage)


def _limits(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", action="append", dest="tasks", metavar="NAME",
                   help="a task the key may call (repeat; default: every task)")
    for name in QUOTAS:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, metavar="N", dest=name,
                       help=f"the key's {name.replace('_', ' ')}")


def _common(p: argparse.ArgumentParser, handler: Any) -> None:
    add_gateway_arguments(p, "the gateway whose keys")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(handler=handler)


def _quotas(args: argparse.Namespace) -> dict[str, int]:
    return {name: getattr(args, name) for name in QUOTAS if getattr(args, name) is not None}


def _show(key: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(key)
        return
    quotas = ", ".join(f"{k} {v}" for k, v in (key.get("quotas") or {}).items() if v) or "none"
    tasks = ", ".join(key.get("tasks") or []) or "all"
    for label, value in (("id", key["id"]), ("tenant", key["tenant"]), ("name", key["name"]),
                         ("tasks", tasks), ("quotas", quotas),
                         ("expires", key.get("expires_at") or "never"),
                         ("created", key.get("created")), ("last used", key.get("last_used")),
                         ("revoked", "yes" if key.get("revoked") else "no")):
        print(f"{label:<10} {value if value is not None else '-'}")


def _secret(key: dict[str, Any], as_json: bool) -> None:
    _show(key, as_json)
    if not as_json:
        print(f"key        {key['key']}")
        print("The key is shown this once: hand it to its backend as GATEWAY_API_KEY.",
              file=sys.stderr)


def cmd_create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"tenant": args.tenant, "name": args.name, "quotas": _quotas(args)}
    if args.tasks:
        body["tasks"] = args.tasks
    if args.expires_at:
        body["expires_at"] = args.expires_at
    with admin_api(args) as api:
        _secret(api.post("/admin/keys", json=body), args.json)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    params = {"tenant": args.tenant} if args.tenant else {}
    with admin_api(args) as api:
        keys = api.get("/admin/keys", params=params)
    if args.json:
        print_json(keys)
        return 0
    print(table(("id", "tenant", "name", "tasks", "expires", "last used", "revoked"), [
        (k["id"], k["tenant"], k["name"], ",".join(k.get("tasks") or []) or "all",
         k.get("expires_at") or "never", k.get("last_used") or "-",
         "yes" if k.get("revoked") else "no") for k in keys]))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    with admin_api(args) as api:
        _show(api.get(f"/admin/keys/{args.id}"), args.json)
    return 0


def cmd_update(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {}
    if args.name:
        body["name"] = args.name
    if args.tasks and args.all_tasks:
        raise UserError("give --task or --all-tasks, not both")
    if args.tasks or args.all_tasks:
        body["tasks"] = args.tasks or None
    if args.expires_at and args.no_expiry:
        raise UserError("give --expires-at or --no-expiry, not both")
    if args.expires_at or args.no_expiry:
        body["expires_at"] = args.expires_at
    quotas = _quotas(args)
    with admin_api(args) as api:
        if quotas:  # merged into the key's quotas, not replacing them
            current = api.get(f"/admin/keys/{args.id}").get("quotas") or {}
            body["quotas"] = {**current, **quotas}
        if not body:
            raise UserError("nothing to change: give --name, --task, --all-tasks, a quota, "
                            "--expires-at or --no-expiry")
        _show(api.request("PATCH", f"/admin/keys/{args.id}", json=body), args.json)
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    with admin_api(args) as api:
        key = api.delete(f"/admin/keys/{args.id}")
    if args.json:
        print_json(key)
    else:
        print(f"key {key['id']} ({key['tenant']}/{key['name']}) revoked")
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    with admin_api(args) as api:
        key = api.post(f"/admin/keys/{args.id}/rotate", json={"grace_s": args.grace_s})
    _secret(key, args.json)
    if not args.json:
        print(f"The old secret keeps working for {args.grace_s} s.", file=sys.stderr)
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    if args.id and args.tenant:
        raise UserError("give a key's id or --tenant, not both")
    params = {"since": args.since} if args.since else {}
    with admin_api(args) as api:
        if args.id:
            report = api.get(f"/admin/keys/{args.id}/usage", params=params)
            keys = [report]
        else:
            report = api.get("/admin/usage", params={
                **params, **({"tenant": args.tenant} if args.tenant else {})})
            keys = report["keys"]
    if args.json:
        print_json(report)
        return 0
    columns = ("requests", "items", "cache_hits", "4xx", "5xx", "429")
    rows = [(k["id"], day, *(counts.get(c, 0) for c in columns))
            for k in keys for day, counts in sorted(k["days"].items())]
    print(table(("key", "day (UTC)", *columns), rows))
    return 0
