"""``llm_finetune``'s training backends as task groups: local, SageMaker (GPU or Trainium), EC2 Trainium.

Each factory builds its backend's tasks and operators inside a ``TaskGroup`` whose task ids are
not prefixed (the ids stay what they were: runs, tests and the UI name them), and returns a
``TrainingPath``: the task ``choose_backend`` branches to, and the task ``collect_training``
waits for. ``collect_training`` then reads whichever backend ran into one result shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from airflow.sdk import TaskGroup, task

from llmops.backends.training import ec2
from llmops.backends.training.sagemaker import collect, stage_job
from llmops.compat import AirflowFailException, AirflowSkipException, TriggerRule
from llmops.config import Settings
from llmops.finetune import FinetuneRequest, run_training
from llmops.orchestration import fail_without_retry, sagemaker_training_operator
from llmops.orchestration.context import RunContext


@dataclass(frozen=True)
class TrainingPath:
    first: Any  # what choose_backend branches to
    result: Any  # what collect_training waits for


def first_training_task(backend: str) -> str:
    """The task that starts ``backend``'s path (both SageMaker backends share one)."""
    return {"local": "train_adapter", "ec2-trainium": "stage_ec2_job"}.get(backend, "stage_sagemaker_job")


def sagemaker_wait_minutes(settings: Settings) -> int:
    """How long a SageMaker job may take, waiting for spot capacity included."""
    config = settings.sagemaker
    return (config.max_wait_minutes or 2 * config.max_runtime_minutes) if config.spot else config.max_runtime_minutes


def local_training(settings: Settings, request, dataset) -> TrainingPath:
    """``train_adapter``: the training entrypoint in a subprocess of the worker."""
    with TaskGroup("train_local", prefix_group_id=False):

        @task(execution_timeout=timedelta(minutes=settings.finetune.timeout_minutes + 10))
        @fail_without_retry
        def train_adapter(request: dict, dataset: dict) -> dict:
            run = RunContext.current(settings)
            return run_training(
                settings,
                FinetuneRequest.model_validate(request),
                dataset,
                run.job_name(),
                run.lineage,
                on_line=run.log.info,
                storage_options=run.storage_options,
            )

        job = train_adapter(request, dataset)
    return TrainingPath(first=job, result=job)


def sagemaker_training(settings: Settings, request, dataset) -> TrainingPath:
    """``stage_sagemaker_job`` uploads the code and builds the request; ``run_sagemaker_job``
    runs that one job per Airflow run."""
    with TaskGroup("train_sagemaker", prefix_group_id=False):

        @task
        @fail_without_retry
        def stage_sagemaker_job(request: dict, dataset: dict) -> dict:
            run = RunContext.current(settings)
            return stage_job(
                settings,
                FinetuneRequest.model_validate(request),
                dataset,
                run.job_name(),
                run.lineage,
                run.storage_options,
                run.log.info,
            )

        staged = stage_sagemaker_job(request, dataset)
        wait_seconds = sagemaker_wait_minutes(settings) * 60
        job = sagemaker_training_operator()(
            task_id="run_sagemaker_job",
            config=staged,
            aws_conn_id=settings.aws.conn_id,
            region_name=settings.aws.region,
            check_interval=settings.sagemaker.poll_seconds,
            max_attempts=wait_seconds // settings.sagemaker.poll_seconds + 1,
            max_ingestion_time=wait_seconds,
            deferrable=settings.sagemaker.deferrable,
        )
        staged >> job
    return TrainingPath(first=staged, result=job)


def ec2_training(settings: Settings, request, dataset) -> TrainingPath:
    """A trn1 instance launched for the run, the training command sent over SSM and waited for,
    and the instance terminated as a teardown: whatever happened, hiding no failure."""
    from airflow.providers.amazon.aws.operators.ec2 import EC2CreateInstanceOperator, EC2TerminateInstanceOperator
    from airflow.providers.amazon.aws.operators.ssm import SsmRunCommandOperator

    aws = {"aws_conn_id": settings.aws.conn_id, "region_name": settings.aws.region}
    with TaskGroup("train_ec2", prefix_group_id=False):

        @task(multiple_outputs=True)
        @fail_without_retry
        def stage_ec2_job(request: dict, dataset: dict) -> dict:
            from airflow.providers.amazon.aws.hooks.ssm import SsmHook

            run = RunContext.current(settings)
            image = settings.ec2.ami_id or SsmHook(**aws).get_parameter_value(settings.ec2.ami_parameter)
            return ec2.stage_job(
                settings,
                FinetuneRequest.model_validate(request),
                dataset,
                run.job_name(),
                run.lineage,
                image,
                run.storage_options,
                run.log.info,
            )

        @task(execution_timeout=timedelta(minutes=settings.ec2.ssm_online_timeout_minutes + 5))
        def await_ssm_agent(instance_ids: list[str], job_name: str, commands: list[str], output_uri: str) -> dict:
            """Wait for the instance's SSM agent, then hand the command to run_training_command."""
            from airflow.providers.amazon.aws.hooks.ssm import SsmHook

            ssm = SsmHook(**aws).conn
            timeout = settings.ec2.ssm_online_timeout_minutes * 60
            ec2.wait_until_online(ssm, instance_ids[0], timeout, settings.ec2.poll_seconds)
            return ec2.send_command_kwargs(settings.ec2, instance_ids[0], job_name, commands, output_uri)

        @task(
            trigger_rule=TriggerRule.ALL_DONE,
            execution_timeout=timedelta(minutes=settings.ec2.command_timeout_minutes + 10),
        )
        def collect_ec2_job(request: dict) -> dict:
            """Waits for the command; its exit code and output tail (in the error when it failed), and
            the archive it pushed."""
            from datetime import UTC, datetime

            from airflow.providers.amazon.aws.hooks.ec2 import EC2Hook
            from airflow.providers.amazon.aws.hooks.ssm import SsmHook

            backend = FinetuneRequest.model_validate(request).backend
            if backend != "ec2-trainium":
                raise AirflowSkipException(f"backend {backend}")
            run = RunContext.current(settings)
            # Pulled, not passed: this task runs after a failure too, when some never pushed.
            staged = run.ti.xcom_pull(task_ids="stage_ec2_job")
            instance_ids = run.ti.xcom_pull(task_ids="launch_trainium_instance")
            command_id = run.ti.xcom_pull(task_ids="run_training_command")
            if not staged or not instance_ids or not command_id:
                raise AirflowFailException(
                    "the EC2 training did not get as far as running its command; see the tasks above"
                )
            hook = SsmHook(**aws)
            timeout = settings.ec2.command_timeout_minutes * 60 + 300
            invocation = ec2.wait_for_command(
                hook.conn, command_id, instance_ids[0], timeout, settings.ec2.poll_seconds
            )
            instance = EC2Hook(**aws, api_type="client_type")
            launched = instance.conn.describe_instances(InstanceIds=instance_ids)["Reservations"][0]["Instances"][0]
            seconds = (datetime.now(UTC) - launched["LaunchTime"]).total_seconds()
            return ec2.collect(settings, staged, instance_ids[0], invocation, seconds, run.storage_options)

        staged = stage_ec2_job(request, dataset)
        launch = EC2CreateInstanceOperator(
            task_id="launch_trainium_instance",
            image_id=staged["image_id"],
            config=staged["config"],
            wait_for_completion=True,
            poll_interval=settings.ec2.poll_seconds,
            max_attempts=max(3, 900 // settings.ec2.poll_seconds),
            **aws,
        )
        command = await_ssm_agent(launch.output, staged["job_name"], staged["commands"], staged["output_uri"])
        run_command = SsmRunCommandOperator(  # sends it; collect_ec2_job waits, so a failure's output is read too
            task_id="run_training_command",
            document_name="AWS-RunShellScript",
            run_command_kwargs=command,
            wait_for_completion=False,
            retries=0,  # a training command is not sent twice; clear the task to run it again
            **aws,
        )
        job = collect_ec2_job(request)
        terminate = EC2TerminateInstanceOperator(
            task_id="terminate_trainium_instance", instance_ids=launch.output, **aws
        )
        run_command >> job >> terminate.as_teardown(setups=launch)
    return TrainingPath(first=staged, result=job)


def collect_training(settings: Settings, request):
    """The ``collect_training`` task. It pulls by task id, not by arguments: only the backend
    that ran pushed anything, and the others' tasks are skipped."""

    @task(trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS)
    def collect_training(request: dict) -> dict:
        """The training result of whichever backend ran, in one shape for registration."""
        run = RunContext.current(settings)
        ti = run.ti
        backend = FinetuneRequest.model_validate(request).backend
        if backend == "local":
            return ti.xcom_pull(task_ids="train_adapter")
        if backend == "ec2-trainium":
            return ti.xcom_pull(task_ids="collect_ec2_job")
        from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

        name = ti.xcom_pull(task_ids="stage_sagemaker_job")["TrainingJobName"]
        hook = SageMakerHook(aws_conn_id=settings.aws.conn_id, region_name=settings.aws.region)
        return collect(settings, hook.describe_training_job(name), run.storage_options)

    return collect_training(request)
