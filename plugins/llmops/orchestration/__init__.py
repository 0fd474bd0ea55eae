"""Airflow-facing glue shared by the DAGs: assets, Params validation, connections, failure mode.

DAG files stay wiring only; anything a task needs beyond calling one library function lives
here, so it is importable and testable without parsing a DAG. Airflow itself is imported in the
functions that use it: the tooling (``devtools.traffic``) calls ``storage_options_for`` without
Airflow. The per-flow glue (``context``, ``training``, ``evaluation``, ``approval``, ``rollout``)
imports it at its top.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import ValidationError

from llmops import storage
from llmops.backends.endpoints.base import DeploymentRejected
from llmops.config import ConfigError, DataConfig, Settings, format_validation_error
from llmops.data.records import DataQualityError
from llmops.prompts import PromptCatalogError
from llmops.tracking import client

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
            from llmops.compat import AirflowFailException

            raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc

    return wrapper  # type: ignore[return-value]


def event_recorded(context, asset, **extra) -> bool:
    """Whether this DAG run has recorded an event of ``asset`` (an inlet of the task) whose extra
    has these values. Airflow records an event for every try of a task with outlets that
    succeeds, so a task that announces something looks first: a re-run must not announce twice.
    Only this run's events count: another run's (a registry re-created since, counting its
    versions from 1 again) say nothing about this one."""
    dag_id, run_id = context["dag"].dag_id, context["run_id"]
    return any(
        event.source_dag_id == dag_id
        and event.source_run_id == run_id
        and all((event.extra or {}).get(k) == v for k, v in extra.items())
        for event in context["inlet_events"][asset]
    )


def skip_as_done(context, result, reason: str):
    """End a task whose event is recorded already: skipped (succeeding would record the event
    again), with the XCom its first try returned, which downstream tasks and their re-runs read."""
    from llmops.compat import AirflowSkipException

    ti = context["ti"]
    if getattr(ti.task, "multiple_outputs", False) and isinstance(result, dict):
        # as a TaskFlow task returning a dict pushes it (``-> dict`` makes multiple_outputs true)
        for key, value in result.items():
            ti.xcom_push(key=key, value=value)
    ti.xcom_push(key="return_value", value=result)
    raise AirflowSkipException(reason)


def trigger_once_operator():
    """``TriggerDagRunOperator`` for a run id fixed by the caller (one request per key, e.g. a
    drift window). When that run exists, the stock operator with ``skip_when_already_exists``
    skips and loses its ``trigger_run_id`` XCom, the UI's link to the run; this one keeps it, and
    asks for nothing. Built on first use, so importing this module does not import the provider."""
    from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator

    from llmops.compat import AirflowSkipException

    class TriggerOnceDagRunOperator(TriggerDagRunOperator):
        def execute(self, context):
            run_id = str(self.trigger_run_id or "")
            if run_id and context["ti"].get_dr_count(dag_id=self.trigger_dag_id, run_ids=[run_id]):
                context["ti"].xcom_push(key="trigger_run_id", value=run_id)
                raise AirflowSkipException(f"{self.trigger_dag_id} run {run_id} exists: it was asked for already")
            return super().execute(context)

    return TriggerOnceDagRunOperator


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


APPROVAL_TAG = "approval.decision"
APPROVAL_BY_TAG = "approval.by"


def approval_operator(
    *, tracking_uri: str, model_name: str, version: str, subject: str, body: str, response_timeout, **kwargs
):
    """The ``await_approval`` task. On Airflow 3.1+ it is the human-in-the-loop ``ApprovalOperator``
    (the UI's Required Actions; no answer rejects it). Airflow 3.0, which Amazon MWAA runs, has no
    human-in-the-loop operators: there a sensor waits for the model version's MLflow tag
    ``approval.decision`` (``approve`` or ``reject``, with ``approval.by`` naming who), set in the
    MLflow UI. Both record the answer as the XCom ``response`` in the same shape, and both skip
    the promotion on a rejection or when ``response_timeout`` passes without an answer."""
    from llmops.compat import HAS_HITL

    if HAS_HITL:
        return recorded_approval_operator()(
            subject=subject, body=body, defaults="Reject", response_timeout=response_timeout, **kwargs
        )
    return tag_approval_sensor()(
        tracking_uri=tracking_uri,
        model_name=model_name,
        version=version,
        subject=subject,
        body=body,
        response_timeout=response_timeout,
        **kwargs,
    )


def tag_approval_sensor():
    """A sensor (reschedule mode: it holds no worker slot between pokes) on the MLflow tag
    ``approval.decision`` of a model version; see ``approval_operator``."""
    from airflow.sdk import BaseSensorOperator

    from llmops.compat import AirflowSensorTimeout, AirflowSkipException

    class MlflowTagApprovalSensor(BaseSensorOperator):
        template_fields = ("version", "subject", "body")

        def __init__(self, *, tracking_uri, model_name, version, subject, body, response_timeout, **kwargs):
            kwargs.setdefault("poke_interval", 60)
            super().__init__(mode="reschedule", timeout=response_timeout.total_seconds(), **kwargs)
            self.tracking_uri, self.model_name, self.version = tracking_uri, model_name, version
            self.subject, self.body = subject, body

        def _answer(self, context, chosen: str, by: str) -> None:
            context["ti"].xcom_push(
                key=APPROVAL_RESPONSE_KEY,
                value={"chosen_options": [chosen], "responded_by_user": {"name": by} if by else None},
            )
            if chosen == "Reject":
                raise AirflowSkipException(f"{self.model_name} version {self.version}: {chosen.lower()}ed")

        def execute(self, context):
            self.log.info(
                "%s\n\n%s\n\nTo answer, set the tag %s=approve (or reject) and %s=<your name> on %s version %s"
                " in MLflow.",
                self.subject,
                self.body,
                APPROVAL_TAG,
                APPROVAL_BY_TAG,
                self.model_name,
                self.version,
            )
            try:
                return super().execute(context)
            except AirflowSensorTimeout:
                self._answer(context, "Reject", "")  # nobody answered: rejected on timeout

        def poke(self, context) -> bool:
            tags = client(self.tracking_uri).get_model_version(self.model_name, str(self.version)).tags
            decision = tags.get(APPROVAL_TAG, "").strip().lower()
            if decision not in ("approve", "approved", "reject", "rejected"):
                if decision:
                    self.log.warning("%s=%r is neither approve nor reject: still waiting", APPROVAL_TAG, decision)
                return False
            by = tags.get(APPROVAL_BY_TAG, "").strip() or "(unnamed, through the MLflow tag)"
            self._answer(context, "Approve" if decision.startswith("approve") else "Reject", by)
            return True

    return MlflowTagApprovalSensor


def _defer_to_trigger(operator, name: str, job_type: str) -> None:
    """Hand the wait for an existing SageMaker job to the triggerer, as the stock operators do."""
    from airflow.providers.amazon.aws.triggers.sagemaker import SageMakerTrigger

    operator.defer(
        trigger=SageMakerTrigger(
            job_name=name,
            job_type=job_type,
            waiter_delay=operator.check_interval,
            waiter_max_attempts=operator.max_attempts,
            aws_conn_id=operator.aws_conn_id,
            region_name=operator.region_name,
            verify=operator.verify,
            botocore_config=operator.botocore_config,
        ),
        method_name="execute_complete",
    )


def sagemaker_training_operator():
    """``SageMakerTrainingOperator`` that keeps one training job per Airflow run.

    The stock operator, retried after its job was created, starts a second job under a
    timestamped name (or fails, with ``action_if_job_exists="fail"``). This one describes the job
    first: a job still running is waited for (deferred when ``deferrable``), a completed one is
    returned as it is, and one that ended Failed or Stopped fails the task with SageMaker's
    reason. Only a job that does not exist yet is created. Built on first use, so importing this
    module does not import the Amazon provider.
    """
    from airflow.providers.amazon.aws.operators.sagemaker import SageMakerTrainingOperator
    from botocore.exceptions import ClientError

    from llmops.compat import AirflowException

    class IdempotentSageMakerTrainingOperator(SageMakerTrainingOperator):
        def __init__(self, **kwargs):
            super().__init__(check_if_job_exists=False, print_log=True, **kwargs)

        def execute(self, context):
            name = self.config["TrainingJobName"]
            try:
                described = self.hook.describe_training_job(name)
            except ClientError as exc:
                if exc.response["Error"]["Code"] != "ValidationException":  # SageMaker's "no such job"
                    raise
                return super().execute(context)
            status = described["TrainingJobStatus"]
            self.log.info("training job %s exists (%s): this run's job, not starting another", name, status)
            if status in ("Failed", "Stopped"):
                reason = described.get("FailureReason") or "(SageMaker gave no reason)"
                raise AirflowException(f"SageMaker training job {name} ended {status}: {reason}")
            if status in self.hook.non_terminal_states and self.wait_for_completion:
                if self.deferrable:
                    _defer_to_trigger(self, name, "Training")
                self.hook.check_training_status_with_log(
                    name,
                    self.hook.non_terminal_states,
                    self.hook.training_failed_states,
                    wait_for_completion=True,
                    check_interval=self.check_interval,
                    max_ingestion_time=self.max_ingestion_time,
                )
            return self.serialize_result(name)

    return IdempotentSageMakerTrainingOperator


def sagemaker_processing_operator():
    """``SageMakerProcessingOperator`` that keeps one processing job per Airflow run, as
    ``sagemaker_training_operator`` does for training (the stock one renames a retried job with a
    timestamp and runs it again). A Stopped job fails the task too."""
    from airflow.providers.amazon.aws.operators.sagemaker import SageMakerProcessingOperator, serialize
    from botocore.exceptions import ClientError

    from llmops.compat import AirflowException

    class IdempotentSageMakerProcessingOperator(SageMakerProcessingOperator):
        def execute(self, context):
            name = self.config["ProcessingJobName"]
            try:
                described = self.hook.describe_processing_job(name)
            except ClientError as exc:
                if exc.response["Error"]["Code"] != "ValidationException":
                    raise
                described = None
            if described is None:
                super().execute(context)
            else:
                self.log.info("processing job %s exists (%s): this run's job", name, described["ProcessingJobStatus"])
                if described["ProcessingJobStatus"] in self.hook.processing_job_non_terminal_states:
                    if self.deferrable:
                        _defer_to_trigger(self, name, "Processing")
                    self.hook.check_status(
                        name,
                        "ProcessingJobStatus",
                        self.hook.describe_processing_job,
                        self.check_interval,
                        self.max_ingestion_time,
                    )
            described = self.hook.describe_processing_job(name)
            status = described["ProcessingJobStatus"]
            if status in ("Failed", "Stopped"):  # the stock waiter lets Stopped through
                reason = described.get("FailureReason") or described.get("ExitMessage") or "(no reason given)"
                raise AirflowException(f"SageMaker processing job {name} ended {status}: {reason}")
            return {"Processing": serialize(described)}

    return IdempotentSageMakerProcessingOperator
