"""`classifier-gateway models list | delete | export`: models on the upstream, and fine-tuned
`local-minilm` models written for the inference servers that scale serving past one factory."""

from __future__ import annotations

import argparse
import io
import shutil
import tarfile
from pathlib import Path
from typing import Any, TypeAlias

import httpx
import orjson

from service.commands import tasksfile
from service.commands.api import add_upstream_arguments, upstream_api, upstream_from
from service.commands.errors import UserError
from service.commands.output import print_json, table, when
from service.commands.tasksfile import add_tasks_file_argument

Sub: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def register(sub: Sub) -> None:
    models = sub.add_parser("models", help="list, delete and export models on the upstream",
                            description="Models on the upstream (--upstream local|mistral).")
    actions = models.add_subparsers(dest="action", required=True, metavar="ACTION")

    p = actions.add_parser("list", help="the models, fine-tuned ones first, with the tasks that "
                                        "use each")
    p.add_argument("--fine-tuned", action="store_true", help="only fine-tuned models")
    add_tasks_file_argument(p)
    add_upstream_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(handler=cmd_list)

    p = actions.add_parser("delete", help="delete a fine-tuned model",
                           description="Delete a fine-tuned model. Refused while a task in the "
                                       "tasks file still uses it, unless --force.")
    p.add_argument("model_id", metavar="MODEL_ID", help="the fine-tuned model's id (see `models list`)")
    p.add_argument("--force", action="store_true",
                   help="delete even if tasks in the tasks file still use the model")
    add_tasks_file_argument(p)
    add_upstream_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(handler=cmd_delete)

    p = actions.add_parser(
        "export", help="write a fine-tuned local-minilm model for KServe, onnxruntime or "
                       "transformers",
        description="Write a fine-tuned local-minilm model of the local factory in the form "
                    "inference servers load, one directory per target under --out: `onnx` (the "
                    "factory's own int8 graph, tokenizer, labels and a KServe model server: the "
                    "factory's scores) or `hf` (a transformers AutoModelForSequenceClassification "
                    "directory, float32, trust_remote_code). Blended models (trained without "
                    "--no-ngram-blend) export their encoder alone, with the difference measured.")
    p.add_argument("model_id", metavar="MODEL_ID", help="the fine-tuned model to export")
    p.add_argument("--format", choices=("onnx", "hf"), default="onnx",
                   help="onnx (default; answers as the factory does) or hf (float32)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="where to write; must be empty or absent unless --force")
    p.add_argument("--force", action="store_true", help="replace what --out holds")
    add_upstream_arguments(p)
    p.add_argument("--json", action="store_true", help="print export.json")
    p.set_defaults(handler=cmd_export)


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
    users = tasksfile.model_users(args.tasks)
    if args.json:
        print_json({"tasks_file": str(args.tasks),
                    "data": [{**m, "used_by": users.get(str(m.get("id")), [])} for m in models]})
        return 0
    if not models:
        print("no models")
        return 0
    print(table(["model", "fine-tuned", "created (UTC)", "tasks"],
                [(m.get("id"), "yes" if _fine_tuned(m) else "no", when(m.get("created")),
                  ", ".join(users.get(str(m.get("id")), [])) or "-") for m in models]))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    if not args.force and args.tasks.exists():
        # Every role that sends traffic (model, canary, shadow, fallback) would fail once the
        # model is gone; `previous` would only break a later rollback, so it blocks too.
        users = tasksfile.model_users(args.tasks).get(args.model_id, [])
        if users:
            tasks, use, them = (("task", "uses", "it") if len(users) == 1
                                else ("tasks", "use", "them"))
            raise UserError(f"{tasks} {', '.join(users)} in {args.tasks} still {use} this model "
                            f"and would fail once it is gone; point {them} at another model "
                            "(`classifier-gateway tasks set`, `tasks promote`) or pass --force")
    with upstream_api(upstream_from(args)) as api:
        body = api.delete(f"/v1/models/{args.model_id}")
    if args.json:
        print_json(body)
    else:
        print(f"model {args.model_id} deleted")
    return 0


#: An export of a model with several targets writes ~25-90 MB a target: allow minutes.
EXPORT_TIMEOUT = httpx.Timeout(600.0, connect=5.0)


def cmd_export(args: argparse.Namespace) -> int:
    upstream = upstream_from(args)
    if upstream.name != "local":
        raise UserError("Mistral's API does not hand out model weights: export works on models "
                        "of the local factory (--upstream local); fine-tune local-minilm there "
                        "(`classifier-gateway finetune --model local-minilm --no-ngram-blend`)")
    out: Path = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not args.force:
            raise UserError(f"{out} is not an empty directory; choose another --out, or pass "
                            "--force to replace its contents")
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    with upstream_api(upstream) as api:
        response = api.send("GET", f"/v1/models/{args.model_id}/export",
                            params={"format": args.format}, timeout=EXPORT_TIMEOUT)
    out.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:") as tar:
            tar.extractall(out, filter="data")
        report: dict[str, Any] = orjson.loads((out / "export.json").read_bytes())
    except (tarfile.TarError, OSError, orjson.JSONDecodeError) as exc:
        raise UserError(f"the factory's export of {args.model_id} could not be unpacked "
                        f"({exc}); is FACTORY_URL a factory of this version?") from None
    if args.json:
        print_json(report)
        return 0
    print(summary(report, out))
    return 0


def summary(report: dict[str, Any], out: Path) -> str:
    """What was written, what differs from the factory, and how to serve it behind the gateway."""
    lines = [f"exported {report['model']} as {report['format']} to {out}"]
    for target in report["targets"]:
        where = out / target["directory"]
        lines.append(f"  target {target['name']}: {where} (labels: "
                     f"{', '.join(target['labels'])})")
        lines += [f"    note: {note}" for note in target["notes"]]
    first = report["targets"][0]
    where = out / first["directory"]
    if report["format"] == "onnx":
        lines += ["", "serve a target with KServe's model server (pip install kserve "
                      "onnxruntime tokenizers):",
                  f"  python {where}/kserve_model.py --model_dir {where} "
                  f"--model_name {first['directory']} --http_port 8080",
                  "and route a task to it in the gateway's tasks file:",
                  "  upstreams:",
                  "    kserve: {base_url: \"http://127.0.0.1:8080\", protocol: kserve-v2}",
                  "  tasks:",
                  f"    {first['name']}:",
                  "      upstream: kserve",
                  f"      model: {first['directory']}",
                  f"      target: {first['name']}",
                  f"      labels: [{', '.join(first['labels'])}]"]
    else:
        lines += ["", "load it with transformers (the model mean-pools; stock BERT classifiers "
                      "do not, hence the custom code):",
                  "  AutoModelForSequenceClassification.from_pretrained("
                  f"\"{where}\", trust_remote_code=True)"]
    return "\n".join(lines)
