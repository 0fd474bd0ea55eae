"""Airflow-facing glue shared by the DAGs: assets, Params validation, connections, failure mode.

DAG files stay wiring only; anything a task needs beyond calling one library function lives
here, so it is importable and testable without parsing a DAG.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import ValidationError

from llmops import storage
from llmops.config import ConfigError, DataConfig, Settings, format_validation_error
from llmops.data.records import DataQualityError
from llmops.deployment import DeploymentRejected
from llmops.prompts import PromptCatalogError

F = TypeVar("F", bound=Callable[..., Any])


def curated_dataset_asset(settings: Settings, name: str | None = None):
    """The Asset a curated dataset publishes to; its URI is the dataset's folder in the store.
    ``llm_finetune`` is scheduled on it."""
    from airflow.sdk import Asset

    name = name or settings.data.dataset_name
    return Asset(name=f"curated_dataset.{name}", uri=storage.join(settings.datasets_uri(), name), group="llmops")


def challenger_asset(settings: Settings):
    """The Asset ``llm_finetune`` updates when it moves the ``challenger`` alias; ``llm_rollout``
    is scheduled on it."""
    from airflow.sdk import Asset

    name = settings.finetune.model_name
    return Asset(name=f"challenger.{name}", uri=f"llmops://models/{name}/challenger", group="llmops")


def data_config_from_params(settings: Settings, params: dict[str, Any]) -> DataConfig:
    """Per-run overrides from the trigger form, validated into the same type as the YAML."""
    overrides = {k: v for k, v in params.items() if k in DataConfig.model_fields and v is not None}
    if params.get("raw_uri") == "":
        overrides.pop("raw_uri", None)
    try:
        return DataConfig.model_validate({**settings.data.model_dump(), **overrides})
    except ValidationError as exc:
        raise ConfigError(f"invalid run parameters:\n{format_validation_error(exc)}") from None


def storage_options_for(uri: str | None, settings: Settings) -> dict | None:
    """For ``s3://`` URIs, a boto3 client built from the Airflow AWS connection; else None."""
    if not uri or not uri.startswith("s3://"):
        return None
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    return {"client": S3Hook(aws_conn_id=settings.aws.conn_id, region_name=settings.aws.region).get_conn()}


def fail_without_retry(fn: F) -> F:
    """Bad data and bad configuration are deterministic: fail the task at once instead of
    retrying, keeping the message that names the defect."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (DataQualityError, ConfigError, PromptCatalogError, DeploymentRejected) as exc:
            from airflow.sdk.exceptions import AirflowFailException

            raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc

    return wrapper  # type: ignore[return-value]


APPROVAL_RESPONSE_KEY = "response"


def recorded_approval_operator():
    """``ApprovalOperator`` that also records the answer as the XCom ``response``.

    On "Reject" the stock operator skips its downstream tasks by raising out of
    ``execute_complete``, so its return value never reaches XCom; the run's outcome still has to
    say who rejected, or that nobody answered in time. The class is built on first use so that
    importing this module does not import the standard provider.
    """
    from airflow.providers.standard.operators.hitl import ApprovalOperator

    class RecordedApprovalOperator(ApprovalOperator):
        def execute_complete(self, context, event):
            if "error" not in event:
                by = event.get("responded_by_user")
                context["ti"].xcom_push(
                    key=APPROVAL_RESPONSE_KEY,
                    value={
                        "chosen_options": list(event.get("chosen_options") or []),
                        "responded_by_user": dict(by) if by else None,
                    },
                )
            return super().execute_complete(context, event)

    return RecordedApprovalOperator
