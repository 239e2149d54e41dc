"""How OpenTelemetry's SDK reads a deployed container's `OTEL_*` variables (deploy/ checks).

The SDK never refuses a bad value: an unknown variable is ignored, a misspelt sampler name or a
ratio that does not parse falls back to its default (every trace sampled) with a log line
nobody reads in a pod. So the deploy tests ask the SDK itself what it made of the values.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from unittest import mock

from opentelemetry.sdk import environment_variables
from opentelemetry.sdk.trace import TracerProvider


def unknown_names(env: Mapping[str, str]) -> list[str]:
    """The `OTEL_*` names in `env` that the SDK does not read (a typo, say)."""
    known = {name for name in dir(environment_variables) if name.startswith("OTEL_")}
    return sorted(name for name in env if name.startswith("OTEL_") and name not in known)


def sampler(env: Mapping[str, str]) -> str:
    """The description of the sampler the SDK builds from `env`'s `OTEL_*` variables alone."""
    mine = {name: value for name, value in env.items() if name.startswith("OTEL_")}
    clean = {name: value for name, value in os.environ.items() if not name.startswith("OTEL_")}
    with mock.patch.dict(os.environ, {**clean, **mine}, clear=True):
        provider = TracerProvider()
        try:
            description: str = provider.sampler.get_description()
        finally:
            provider.shutdown()
    return description


def ratio_sampler(ratio: float) -> str:
    """The start of the description of `parentbased_traceidratio` at `ratio`."""
    return f"ParentBased{{root:TraceIdRatioBased{{{ratio}}}"

