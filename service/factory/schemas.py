"""The factory's share of Mistral's wire format: fine-tuning job requests and the JSON it answers.

Request models follow `JobIn` of Mistral's OpenAPI spec and what SDK 2.5.1 sends; unknown keys are
a 422 (a misspelt `hyperparameter` must not silently train with defaults). Responses are plain
dicts built here, so every field the SDK requires is in one place (`job_type` on every job,
`classifier_targets` with all four fields, integer `bytes`, `total` on lists).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from service.factory.models.base import Hyperparameters
from service.factory.store import FileRecord, JobRecord, ModelRecord

Status = Literal[
    "QUEUED", "STARTED", "VALIDATING", "VALIDATED", "RUNNING", "FAILED_VALIDATION", "FAILED",
    "SUCCESS", "CANCELLED", "CANCELLATION_REQUESTED",
]
ACTIVE_STATUSES = ("QUEUED", "STARTED", "VALIDATING", "VALIDATED", "RUNNING",
                   "CANCELLATION_REQUESTED")
TERMINAL = ("SUCCESS", "FAILED", "FAILED_VALIDATION", "CANCELLED")


class TrainingFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file_id: str
    weight: float = Field(default=1.0, gt=0)


class ClassifierTargetIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    labels: list[str] = Field(default_factory=list)
    weight: float = Field(default=1.0, ge=0)
    loss_function: Literal["single_class", "multi_class"] | None = None


#: The one set of defaults: what every base model reads when a job leaves a field out.
_DEFAULTS = Hyperparameters()


class ClassifierHyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    training_steps: int | None = Field(default=None, ge=1, le=1_000_000)
    learning_rate: float = Field(default=_DEFAULTS.learning_rate, ge=1e-8, le=1)
    weight_decay: float | None = Field(default=_DEFAULTS.weight_decay, ge=0, le=1)
    warmup_fraction: float | None = Field(default=_DEFAULTS.warmup_fraction, ge=0, le=1)
    epochs: float | None = Field(default=None, gt=0, le=10_000)
    seq_len: int | None = Field(default=None, ge=1, le=32_768)  # each base model checks its range
    fim_ratio: float | None = Field(default=None, ge=0, le=1)  # completion-only; ignored
    #: Beyond Mistral's fields: `false` trains `local-minilm` on the encoder alone (no n-gram
    #: evidence blended in), the form that exports to TEI/KServe with the factory's scores.
    ngram_blend: bool | None = None


class WandbIntegration(BaseModel):
    """Mistral's `WandbIntegration` (SDK 2.5.1 sends exactly these fields). `api_key` is
    optional here: without one (or when W&B cannot be reached) the run is written offline, to be
    synced later (`service/factory/tracking/wandb_run.py`)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["wandb"] = "wandb"
    project: str = Field(min_length=1, max_length=128)  # W&B's own limit on project names
    name: str | None = Field(default=None, max_length=128)
    run_name: str | None = Field(default=None, max_length=128)
    api_key: SecretStr | None = Field(default=None, min_length=1, max_length=512)


class MlflowIntegration(BaseModel):
    """Beyond Mistral's API: an MLflow tracking server. Only `http(s)://` servers: a `file:` or
    database URI would have the factory write wherever a caller names. `api_key`, when given,
    is sent as a bearer token (MLflow's `MLFLOW_TRACKING_TOKEN`); credentials in the URL
    (`user:password@`) are refused, since the URL is stored and shown with the job."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["mlflow"]
    tracking_uri: str = Field(min_length=8, max_length=2048, pattern=r"^https?://[^\s/@]+(/\S*)?$")
    experiment_name: str | None = Field(default=None, min_length=1, max_length=256)
    run_name: str | None = Field(default=None, max_length=256)
    api_key: SecretStr | None = Field(default=None, min_length=1, max_length=4096)


Integration = Annotated[WandbIntegration | MlflowIntegration, Field(discriminator="type")]

#: Trackers per job: one of each kind is what anybody needs; a bound keeps a job's training from
#: waiting on a long list of remote servers.
MAX_INTEGRATIONS = 4


class JobIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    hyperparameters: ClassifierHyperparameters
    training_files: list[TrainingFile | str] = Field(default_factory=list)
    validation_files: list[str] | None = None
    suffix: str | None = Field(default=None, max_length=18)
    integrations: list[Integration] | None = Field(default=None, max_length=MAX_INTEGRATIONS)
    auto_start: bool = True
    invalid_sample_skip_percentage: float = Field(default=0.0, ge=0, le=0.5)
    job_type: Literal["classifier", "completion"] | None = None
    repositories: list[dict[str, Any]] | None = None
    classifier_targets: list[ClassifierTargetIn] | None = None
    #: Beyond Mistral's fields (its API picks the hardware itself): where this job trains, "cpu"
    #: or "cuda"; unset, the factory's FACTORY_DEVICE decides. Top-level, not in
    #: `hyperparameters`: it says where the recipe runs, not what it is (Mistral's
    #: hyperparameters are all recipe, and `jobs list` filters and the duplicate check treat
    #: them so), and `job_type`, `auto_start` and `integrations` sit beside it as the other
    #: "how to run it" fields. Only models that use an accelerator read it (local-minilm);
    #: local-ngram trains on the CPU whatever it says. A "cuda" job that cannot get a GPU is a
    #: 422 naming this field (`Executor.device_problem`), never a job that waits forever.
    device: Literal["cpu", "cuda"] | None = None

    def files(self) -> list[TrainingFile]:
        return [TrainingFile(file_id=f) if isinstance(f, str) else f for f in self.training_files]


def file_out(record: FileRecord, *, with_deleted: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": record.id, "object": "file", "bytes": record.bytes,
        "created_at": record.created_at, "filename": record.filename, "purpose": record.purpose,
        "sample_type": record.sample_type, "num_lines": record.num_lines,
        "mimetype": record.mimetype, "source": "upload", "signature": record.sha256[:16],
        "expires_at": None, "visibility": record.visibility,
    }
    if with_deleted:
        out["deleted"] = record.deleted
    return out


def _targets_out(targets: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    return [{"name": t["name"], "labels": list(t.get("labels") or []),
             "weight": float(t.get("weight", 1.0)),
             "loss_function": t.get("loss_function") or "single_class"}
            for t in (targets or [])]


def job_out(job: JobRecord) -> dict[str, Any]:
    """`ClassifierJobOut`: what lists and `create` return."""
    doc = job.doc
    return {
        "id": job.id, "object": "job", "job_type": "classifier", "auto_start": doc["auto_start"],
        "model": job.model, "status": job.status, "created_at": job.created_at,
        "modified_at": job.modified_at,
        "training_files": [f["file_id"] for f in doc["training_files"]],
        "validation_files": doc.get("validation_files") or [],
        "hyperparameters": doc["hyperparameters"],
        "fine_tuned_model": doc.get("fine_tuned_model"), "suffix": job.suffix,
        # Mistral's shape has W&B integrations only (SDK 2.5.1 rejects a job with any other
        # type); the others (MLflow) are listed beside them.
        "integrations": [i for i in doc.get("integrations") or [] if i.get("type") == "wandb"],
        "extra_integrations": [i for i in doc.get("integrations") or []
                               if i.get("type") != "wandb"],
        "trained_tokens": doc.get("trained_tokens"), "metadata": doc.get("metadata"),
        # Beyond Mistral's shape (clients ignore extra keys): why a job failed, and how good
        # the model is on the validation file, and its temperatures with ECE before and after.
        "error": doc.get("error"),
        "validation": doc.get("validation"),
        "evaluation": doc.get("evaluation"),
        "calibration": doc.get("calibration"),
        # The device the job asked for (None: the factory's FACTORY_DEVICE); the one it trained
        # on is its `device` event.
        "device": doc.get("device"),
    }


def detailed_job_out(job: JobRecord, events: list[dict[str, Any]],
                     checkpoints: list[dict[str, Any]],
                     progress: dict[str, Any] | None = None) -> dict[str, Any]:
    """`ClassifierDetailedJobOut`: the job plus events, checkpoints and classifier_targets, and
    (beyond Mistral's shape) `progress`, what the job is doing (`JobManager.progress`): between
    two checkpoints, minutes apart on a slow machine, the only sign that it moves."""
    out = job_out(job)
    targets = job.doc.get("targets") or job.doc.get("classifier_targets")
    out.update(events=events, checkpoints=checkpoints, classifier_targets=_targets_out(targets),
               progress=progress)
    return out


CAPABILITIES = {
    "completion_chat": False, "function_calling": False, "completion_fim": False,
    "fine_tuning": False, "vision": False, "ocr": False, "classification": True,
    "moderation": False, "audio": False, "audio_transcription": False,
}


def base_model_out(model_id: str, created: int, description: str,
                   aliases: list[str]) -> dict[str, Any]:
    return {
        "id": model_id, "object": "model", "created": created, "owned_by": "factory",
        "capabilities": {**CAPABILITIES, "fine_tuning": True}, "name": model_id,
        "description": description, "max_context_length": 32768, "aliases": aliases,
        "deprecation": None, "deprecation_replacement_model": None,
        "default_model_temperature": None, "type": "base",
    }


def ft_model_out(record: ModelRecord) -> dict[str, Any]:
    doc = record.doc
    return {
        "id": record.id, "object": "model", "created": record.created, "owned_by": "factory",
        "capabilities": dict(CAPABILITIES), "name": record.id,
        "description": f"{record.kind} classifier fine-tuned by job {record.job_id}",
        "max_context_length": 32768, "aliases": [], "deprecation": None,
        "deprecation_replacement_model": None, "default_model_temperature": None,
        "type": "fine-tuned", "job": record.job_id, "root": record.root, "archived": False,
        "model_type": "classifier", "kind": record.kind,
        "classifier_targets": _targets_out(doc.get("targets")),
    }
