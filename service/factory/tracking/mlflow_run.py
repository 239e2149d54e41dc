"""MLflow: a job's run on a tracking server, with the model's files as the run's artifacts.

The client is `mlflow.MlflowClient` (the `mlflow-skinny` package is enough). A server that needs
a token gets the job's `api_key` as a bearer token. MLflow reads its token from the process's
environment (`MLFLOW_TRACKING_TOKEN`), which the trackers, running in the factory replica
(`base.py`), must not touch: it is the factory's, shared by every job (two jobs with two tokens
would take each other's) and inherited by every trainer child. So the key rides on a request
header provider of MLflow's (`RequestHeaderProvider`, registered once) that adds
`Authorization: Bearer <key>` only to the requests made while a call of this job's run is under
way in its thread (`_bearer`): a job's tracker calls are all made from one thread
(`reporter.JobTracking`). A factory that sets `MLFLOW_TRACKING_TOKEN` itself keeps it: MLflow then
sends the factory's token in place of the job's.

MLflow's HTTP client retries for minutes by default (7 retries, exponential backoff); a job's
record should not wait that long on a tracker, so unless the factory's environment says otherwise
a request is tried 3 times and waits 20 s at most: a server that is down costs a job about a
minute, once (the tracker is then left out).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from service.factory.tracking.base import EVENT, Outcome, Param, RunContext

PACKAGE = "mlflow"
INSTALL = "pip install 'classifier-gateway[tracking]' (or pip install mlflow-skinny)"
DEFAULT_EXPERIMENT = "classifier-factory"
#: MLflow keeps a parameter's value to 6000 characters.
MAX_PARAM_CHARS = 6000
#: The status of the MLflow run for each outcome of the job (MLflow's RunStatus names).
STATUS: dict[str, str] = {"SUCCESS": "FINISHED", "FAILED": "FAILED", "CANCELLED": "KILLED",
                          "STOPPED": "KILLED"}

#: The key of the run whose call is under way in this thread, if any.
_calling = threading.local()
_registered = threading.Lock()
_provider: list[type] = []


def _register_bearer() -> None:
    """Register, once per process, MLflow's header provider that sends the current call's key."""
    with _registered:
        if _provider:
            return
        from mlflow.tracking.request_header.abstract_request_header_provider import (
            RequestHeaderProvider,
        )
        from mlflow.tracking.request_header.registry import _request_header_provider_registry

        class JobKeyHeader(RequestHeaderProvider):
            """`Authorization: Bearer <the job's key>` while one of its run's calls is made."""

            def in_context(self) -> bool:
                return getattr(_calling, "key", None) is not None

            def request_headers(self) -> dict[str, str]:
                return {"Authorization": f"Bearer {_calling.key}"}

        _request_header_provider_registry.register(JobKeyHeader)  # type: ignore[no-untyped-call]
        _provider.append(JobKeyHeader)


@contextlib.contextmanager
def _bearer(key: str | None) -> Iterator[None]:
    """MLflow's requests made in this thread within the block carry `key` (when there is one)."""
    if key is None:
        yield
        return
    _register_bearer()
    before = getattr(_calling, "key", None)
    _calling.key = key
    try:
        yield
    finally:
        _calling.key = before


class MlflowRun:
    takes_model = True  # the model's files become the run's artifacts

    def __init__(self, client: Any, run_id: str, key: str | None) -> None:
        self.client = client
        self.run_id = run_id
        self._key = key

    def start(self, params: Mapping[str, Param]) -> None:
        from mlflow.entities import Param as MlflowParam

        with _bearer(self._key):
            self.client.log_batch(self.run_id, params=[
                MlflowParam(key, str(value)[:MAX_PARAM_CHARS]) for key, value in params.items()])

    def _metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[
            Metric(key, value, stamp, step) for key, value in metrics.items()])

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        with _bearer(self._key):
            self._metrics(step, metrics)

    def finish(self, summary: Mapping[str, float], model_dir: Path | None,
               outcome: Outcome) -> None:
        with _bearer(self._key):
            try:
                if summary:
                    self._metrics(int(summary.get("steps", 0)), summary)
                if model_dir is not None:
                    self.client.log_artifacts(self.run_id, str(model_dir), artifact_path="model")
            finally:
                self.client.set_terminated(self.run_id, STATUS[outcome])


def open_run(config: Mapping[str, Any], api_key: str | None, context: RunContext) -> MlflowRun:
    # The same for every job: the factory's environment may say otherwise (see the docstring).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    # MLflow prints each run's URL on stdout as it ends: the factory's log, where it says nothing
    # that the job's `integration` event does not.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    with _bearer(api_key or None):
        return _open(config, api_key or None, context)


def _open(config: Mapping[str, Any], api_key: str | None, context: RunContext) -> MlflowRun:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = str(config["tracking_uri"]).rstrip("/")
    client = MlflowClient(tracking_uri=uri)
    name = str(config.get("experiment_name") or DEFAULT_EXPERIMENT)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        experiment_id = str(experiment.experiment_id)
    else:
        try:
            experiment_id = str(client.create_experiment(name))
        except MlflowException:  # another job created it meanwhile
            created = client.get_experiment_by_name(name)
            if created is None:
                raise
            experiment_id = str(created.experiment_id)
    run = client.create_run(experiment_id, run_name=config.get("run_name") or
                            f"job-{context.job_id}", tags={"factory.job_id": context.job_id})
    run_id = str(run.info.run_id)
    context.event(EVENT, {"type": "mlflow", "status": "logging", "tracking_uri": uri,
                          "experiment_id": experiment_id, "run_id": run_id,
                          "url": f"{uri}/#/experiments/{experiment_id}/runs/{run_id}"})
    return MlflowRun(client, run_id, api_key)
