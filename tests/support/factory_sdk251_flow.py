"""The whole fine-tuning flow with the official `mistralai==2.5.1` SDK against a running factory.

Run in a child interpreter whose PYTHONPATH starts with the SDK's target directory (see
`tests/support/factory.py: run_with_sdk_251`): `python factory_sdk251_flow.py <server_url> <key>
<text.jsonl> <chat.jsonl>`. Every call's response is parsed by the SDK's own models; a response it
cannot parse raises, and the script fails. The last stdout line is a JSON summary for the test.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
import time
from pathlib import Path
from typing import Any

import mistralai.client
from mistralai.client import Mistral

from tests.support.waits import Deadline

LONG_STEPS = 30_000  # as tests/support/factory.py (this script runs with the 2.5.1 SDK only)
#: The chat job's W&B key, which the factory must never return (test_factory_sdk.py).
WANDB_KEY = "sdk-flow-wandb-key-" + "0" * 24


def _known(obj: Any) -> Any:
    """Union responses fall back to an `Unknown...` model instead of failing: that is a failure
    for us."""
    assert not getattr(obj, "is_unknown", False), f"the SDK did not recognise: {obj!r}"
    return obj


def wait(client: Any, job_id: str, statuses: tuple[str, ...], timeout_s: float = 120) -> Any:
    deadline = Deadline(timeout_s)  # stretched by the load (tests/support/waits.py)
    status = None
    while True:
        job = _known(client.fine_tuning.jobs.get(job_id=job_id))
        if job.status in statuses:
            return job
        if job.status != status:
            status = job.status
            deadline.renew()
        elif deadline.expired():
            raise TimeoutError(f"job {job_id} still {job.status} after {deadline.describe()}")
        time.sleep(0.1)


def main(server_url: str, api_key: str, text_path: str, chat_path: str,
         base_model: str = "local-ngram") -> dict[str, Any]:
    # Typed as Any: mypy sees the installed SDK (3.x), while this script runs against 2.5.1.
    client: Any = Mistral(api_key=api_key, server_url=server_url)
    out: dict[str, Any] = {"sdk": mistralai.client.__name__}
    out["version"] = importlib.metadata.version("mistralai")
    text_file = client.files.upload(file={"file_name": "text.jsonl",
                                          "content": Path(text_path).read_bytes()},
                                    purpose="fine-tune")
    chat_file = client.files.upload(file={"file_name": "chat.jsonl",
                                          "content": Path(chat_path).read_bytes()})
    out["file_bytes"] = text_file.size_bytes
    out["file_types"] = [type(text_file).__name__, type(chat_file).__name__]

    # auto_start true: Mistral's documented example, unchanged.
    created = _known(client.fine_tuning.jobs.create(
        model=base_model, job_type="classifier",
        training_files=[{"file_id": text_file.id, "weight": 1}],
        validation_files=[text_file.id],
        hyperparameters={"training_steps": 100, "learning_rate": 4e-5},
        auto_start=True, suffix="sdk-text",
    ))
    out["created_type"] = type(created).__name__
    out["created_status"] = created.status
    text_job = wait(client, created.id, ("SUCCESS", "FAILED", "FAILED_VALIDATION", "CANCELLED"))
    out["text_job"] = {
        "type": type(text_job).__name__, "status": text_job.status,
        "model": text_job.fine_tuned_model,
        "events": [e.data["status"] for e in text_job.events or [] if e.name == "status-updated"],
        "checkpoints": [c.model_dump() for c in text_job.checkpoints or []],
        "targets": [t.model_dump() for t in text_job.classifier_targets],
    }

    # auto_start false, then start.
    created = _known(client.fine_tuning.jobs.create(
        model=base_model, job_type="classifier",
        training_files=[{"file_id": chat_file.id, "weight": 1}],
        hyperparameters={"training_steps": 50, "learning_rate": 1e-4},
        auto_start=False, suffix="sdk-chat",
        classifier_targets=[{"name": "intent", "labels": ["greet", "order", "weather"],
                             "weight": 1, "loss_function": "single_class"}],
        # Mistral's W&B integration as the SDK sends it (W&B is not reachable from the tests:
        # the run is written offline in the factory's data directory).
        integrations=[{"type": "wandb", "project": "sdk-flow", "api_key": WANDB_KEY}],
    ))
    validated = wait(client, created.id, ("VALIDATED", "FAILED_VALIDATION"))
    out["validated_status"] = validated.status
    started = _known(client.fine_tuning.jobs.start(job_id=created.id))
    out["start_type"] = type(started).__name__
    chat_job = wait(client, created.id, ("SUCCESS", "FAILED", "CANCELLED"))
    out["chat_job"] = {
        "status": chat_job.status, "model": chat_job.fine_tuned_model,
        "integrations": [i.model_dump() for i in chat_job.integrations or []],
        "integration_events": [e.data for e in chat_job.events or []
                               if e.name == "integration"],
        "events": [e.data["status"] for e in chat_job.events or [] if e.name == "status-updated"],
    }

    text = client.classifiers.classify(
        model=text_job.fine_tuned_model,
        inputs=["the meal was wonderful, really fantastic", "the phone was broken and useless"])
    out["classify"] = [{k: v.scores for k, v in r.items()} for r in text.results]
    chat = client.classifiers.classify_chat(
        model=chat_job.fine_tuned_model,
        input=[{"messages": [{"role": "user", "content": "is it sunny outside"}]},
               {"messages": [{"role": "user", "content": "where is my order"},
                             {"role": "assistant", "content": "Let me check."}]}])
    out["classify_chat"] = [{k: v.scores for k, v in r.items()} for r in chat.results]

    jobs = client.fine_tuning.jobs.list(page=0, page_size=10)
    out["list_total"] = jobs.total
    out["list_types"] = sorted({type(_known(j)).__name__ for j in jobs.data or []})
    out["list_suffix"] = [j.id for j in client.fine_tuning.jobs.list(suffix="sdk-chat").data or []]

    long = _known(client.fine_tuning.jobs.create(
        model="local-minilm", job_type="classifier",  # long enough to be caught RUNNING
        training_files=[{"file_id": text_file.id, "weight": 1}],
        hyperparameters={"training_steps": LONG_STEPS}, auto_start=True, suffix="sdk-cancel",
    ))
    wait(client, long.id, ("RUNNING",))
    cancelled = _known(client.fine_tuning.jobs.cancel(job_id=long.id))
    out["cancel_status"] = cancelled.status
    out["cancel_final"] = wait(client, long.id, ("CANCELLED", "SUCCESS", "FAILED")).status

    models = client.models.list()
    out["models"] = [(m.id, m.type) for m in models.data or []]
    out["model_get"] = client.models.retrieve(model_id=chat_job.fine_tuned_model).id
    files = client.files.list()
    out["files_total"] = files.total
    out["file_get"] = client.files.retrieve(file_id=text_file.id).deleted
    return out


def minimal(server_url: str, api_key: str, text_path: str, base_model: str) -> dict[str, Any]:
    """Mistral's documented flow, once: upload, a job (`base_model`, Mistral's example
    hyperparameters), poll, classify."""
    client: Any = Mistral(api_key=api_key, server_url=server_url)
    file = client.files.upload(file={"file_name": "text.jsonl",
                                     "content": Path(text_path).read_bytes()},
                               purpose="fine-tune")
    created = _known(client.fine_tuning.jobs.create(
        model=base_model, job_type="classifier",
        training_files=[{"file_id": file.id, "weight": 1}], validation_files=[file.id],
        hyperparameters={"training_steps": 30, "learning_rate": 4e-5}, auto_start=True,
    ))
    job = wait(client, created.id, ("SUCCESS", "FAILED", "FAILED_VALIDATION", "CANCELLED"),
               timeout_s=540)
    result = client.classifiers.classify(
        model=job.fine_tuned_model,
        inputs=["the meal was wonderful, really fantastic", "the phone was broken and useless"])
    return {
        "status": job.status, "model": job.fine_tuned_model,
        "events": [[e.name, e.data] for e in job.events or []],
        "checkpoints": [c.model_dump() for c in job.checkpoints or []],
        "classify": [{k: v.scores for k, v in r.items()} for r in result.results],
    }


if __name__ == "__main__":
    if sys.argv[1] == "minimal":
        print(json.dumps(minimal(*sys.argv[2:6]), default=str))
    else:
        print(json.dumps(main(*sys.argv[1:6])))
