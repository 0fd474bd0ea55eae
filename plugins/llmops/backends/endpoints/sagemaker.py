"""The rollout's endpoint on SageMaker: the serving backend ``llmops.rollout.steps`` drives when
``serving.backend`` is ``sagemaker``, with the same operations as the local gateway's.

``llm_rollout`` does not change: its tasks call ``llmops.rollout.steps``, which asks this backend to
``CreateModel`` (the serving image, the version's ``model.tar.gz`` and its base model staged under
``<store>/base-models/`` as an additional model data source), ``CreateEndpointConfig`` (production
variants, at most one shadow variant, data capture to ``serving.capture_uri``),
``CreateEndpoint``/``UpdateEndpoint`` and ``UpdateEndpointWeightsAndCapacities``, and for each
variant's invocations, errors and latency from CloudWatch. Every call goes through the Amazon
provider's hooks, so credentials come from the ``aws.conn_id`` connection.

What the stock operators do not, and this backend does:

* **Idempotent creates.** A retried task finds its model and endpoint config already there (they
  are named after the model version and the Airflow run) and goes on; a different resource under
  the same name is an error, not a silent reuse.
* **State checks after every update.** A failed ``UpdateEndpoint`` (or a blue/green update that
  rolled itself back) leaves the endpoint ``InService`` on its *old* config with a
  ``FailureReason``: ``llmops.backends.endpoints.base.wait_in_service`` compares the config it serves with the one
  asked for, so that is a failure, not a success. Weight updates wait until the endpoint is back
  in service and are then read back.
* **Deployment guardrails where they fit.** SageMaker's blue/green update needs the same variant
  names on both sides and no shadow variant: an update that puts a new fleet behind the same
  production variants (a version served alone again on a new config) gets one, with
  auto-rollback on two CloudWatch alarms per variant (5xx errors and p99 model latency, from the
  rollout policy's guardrails). Promotion and restoring change the variants, and the A/B steps
  change weights: the state check and the rollout's own guardrail steps cover those.
* **Metrics when they exist.** CloudWatch publishes an endpoint's per-minute metrics a minute or
  two late: a window's first read waits ``serving.sagemaker.metrics_delay_seconds``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import UTC, datetime

from llmops.backends.endpoints.base import DeploymentError, DeploymentRejected, wait_settled
from llmops.backends.training.sagemaker import image_uri
from llmops.config import Settings
from llmops.contracts import VariantWindow
from llmops.staging import base_model_uri, ensure_model_staged

BASE_MODEL_CHANNEL = "base_model"
BASE_MODEL_DIR = f"/opt/ml/additional-model-data-sources/{BASE_MODEL_CHANNEL}"
BASE_MODEL_NAME_ENV = "LLMOPS_BASE_MODEL_NAME"
NAMESPACE = "AWS/SageMaker"


def _error(exc) -> tuple[str, str]:
    error = exc.response.get("Error", {})
    return error.get("Code", ""), error.get("Message", str(exc))


def _missing(exc) -> bool:
    code, message = _error(exc)
    return code == "ValidationException" and message.lower().startswith("could not find")


def alarm_requests(endpoint: str, variant: str, max_p99_latency_ms: float, periods: int) -> list[dict]:
    """``PutMetricAlarm`` bodies that stop a blue/green update when the new variant fails: any 5xx,
    or p99 model latency (microseconds in CloudWatch) above the rollout guardrail."""
    dimensions = [{"Name": "EndpointName", "Value": endpoint}, {"Name": "VariantName", "Value": variant}]
    common = {
        "Namespace": NAMESPACE,
        "Dimensions": dimensions,
        "Period": 60,
        "EvaluationPeriods": periods,
        "DatapointsToAlarm": periods,
        "ComparisonOperator": "GreaterThanThreshold",
        "TreatMissingData": "notBreaching",
        "ActionsEnabled": False,  # read by SageMaker's auto-rollback, not a notification
    }
    return [
        {
            **common,
            "AlarmName": f"{endpoint}-{variant}-5xx",
            "AlarmDescription": f"5xx errors of variant {variant} of endpoint {endpoint} (rollback guardrail)",
            "MetricName": "Invocation5XXErrors",
            "Statistic": "Sum",
            "Threshold": 0.0,
        },
        {
            **common,
            "AlarmName": f"{endpoint}-{variant}-p99-latency",
            "AlarmDescription": f"p99 model latency of variant {variant} of endpoint {endpoint} (rollback guardrail)",
            "MetricName": "ModelLatency",
            "ExtendedStatistic": "p99",
            "Threshold": float(max_p99_latency_ms) * 1000,
        },
    ]


PROVISIONING_SECONDS = 900  # a new GPU fleet: instances, image, model download


def has_instance_storage(instance_type: str) -> bool:
    """Instance types with local NVMe storage, where CreateEndpointConfig refuses ``KmsKeyId``
    (their volumes are encrypted by the hardware): the ``d`` families and the GPU ones with it."""
    family = instance_type.split(".")[1]
    return family.endswith("d") or "dn" in family or family in {"g5", "g6", "g6e", "p4de", "p5", "p5e", "p5en"}


def deployment_config(alarms: list[str], wait_seconds: int, timeout_seconds: float) -> dict:
    """A blue/green ``DeploymentConfig``: the new fleet takes all traffic at once, bakes for
    ``wait_seconds`` while ``alarms`` watch it, and SageMaker rolls back by itself if one fires.
    The execution limit must exceed both waits (SageMaker's rule) plus the fleet's start."""
    needed = 2 * wait_seconds + PROVISIONING_SECONDS
    return {
        "BlueGreenUpdatePolicy": {
            "TrafficRoutingConfiguration": {"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": wait_seconds},
            "TerminationWaitInSeconds": min(wait_seconds, 3600),
            "MaximumExecutionTimeoutInSeconds": int(min(max(timeout_seconds, needed, 600), 28800)),
        },
        "AutoRollbackConfiguration": {"Alarms": [{"AlarmName": name} for name in alarms]},
    }


def metric_queries(endpoint: str, variants: list[str], period: int) -> tuple[list[dict], dict[str, tuple[str, str]]]:
    """``GetMetricData`` queries for each variant's invocations, 4xx and 5xx errors (sums) and model
    latency (p95, p99) over one period covering the window; and what each query id stands for."""
    queries, meaning = [], {}
    wanted = [
        ("Invocations", "Sum"),
        ("Invocation4XXErrors", "Sum"),
        ("Invocation5XXErrors", "Sum"),
        ("ModelLatency", "p95"),
        ("ModelLatency", "p99"),
    ]
    for index, variant in enumerate(variants):
        for metric, stat in wanted:
            query_id = f"v{index}_{metric.lower()}_{stat.lower()}"
            meaning[query_id] = (variant, f"{metric}:{stat}")
            queries.append(
                {
                    "Id": query_id,
                    "MetricStat": {
                        "Metric": {
                            "Namespace": NAMESPACE,
                            "MetricName": metric,
                            "Dimensions": [
                                {"Name": "EndpointName", "Value": endpoint},
                                {"Name": "VariantName", "Value": variant},
                            ],
                        },
                        "Period": period,
                        "Stat": stat,
                    },
                    "ReturnData": True,
                }
            )
    return queries, meaning


class SageMakerEndpointBackend:
    """The endpoint operations of ``llmops.backends.endpoints.base`` on a SageMaker real-time endpoint."""

    def __init__(
        self,
        settings: Settings,
        sagemaker=None,
        runtime=None,
        cloudwatch=None,
        sleep: Callable[[float], None] = time.sleep,
        poll_seconds: float = 15,
    ):
        self.settings = settings
        self.config = settings.serving.sagemaker
        self.region = settings.aws.region
        self._sagemaker, self._runtime, self._cloudwatch = sagemaker, runtime, cloudwatch
        self._sleep = sleep
        self.metrics_poll_seconds = poll_seconds  # also how often a wait asks SageMaker
        self._waited: set[float] = set()

    # -- clients, through the provider's hooks (the connection's credentials and endpoint) -------

    def _client(self, kind: str):
        from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
        from botocore.config import Config

        config = Config(retries={"max_attempts": 5, "mode": "standard"}, read_timeout=120)
        return AwsBaseHook(
            aws_conn_id=self.settings.aws.conn_id, client_type=kind, region_name=self.region, config=config
        ).get_conn()

    @property
    def sagemaker(self):
        if self._sagemaker is None:
            self._sagemaker = self._client("sagemaker")
        return self._sagemaker

    @property
    def cloudwatch(self):
        if self._cloudwatch is None:
            self._cloudwatch = self._client("cloudwatch")
        return self._cloudwatch

    def runtime(self):
        if self._runtime is None:
            self._runtime = self._client("sagemaker-runtime")
        return self._runtime

    def _call(self, operation: str, **request):
        from botocore.exceptions import ClientError

        try:
            return getattr(self.sagemaker, operation)(**request)
        except ClientError as exc:
            code, message = _error(exc)
            kind = DeploymentRejected if code == "ValidationException" else DeploymentError
            raise kind(f"SageMaker {operation}: {code}: {message}") from None

    def _tags(self) -> list[dict]:
        tags = {**self.settings.sagemaker.tags, **self.config.tags}
        return [{"Key": k, "Value": v} for k, v in sorted(tags.items())]

    # -- models ------------------------------------------------------------------------------------

    def model_definition(self, request: dict) -> dict:
        """The full ``CreateModel`` request for ``llmops.backends.endpoints.base``'s model request: the serving
        image, the execution role, and the version's base model, staged in the store, mounted next
        to the adapter."""

        container = dict(request["PrimaryContainer"])
        environment = dict(container.get("Environment", {}))
        base = self.base_model(request)
        environment.pop(BASE_MODEL_NAME_ENV, None)
        if not self.settings.sagemaker.role_arn:
            raise DeploymentRejected("sagemaker.role_arn is not set: SageMaker models run as that role")
        if not self.config.image_uri:
            raise DeploymentRejected(
                "serving.sagemaker.image_uri is not set: build the serving image from the Dockerfile, push it"
                " to ECR and set LLMOPS_SERVING_IMAGE_URI"
            )
        container.update(
            {
                "Image": image_uri(self.config.image_uri, self.region),
                "Environment": {**environment, "LLMOPS_BASE_MODEL": BASE_MODEL_DIR},
                "AdditionalModelDataSources": [
                    {
                        "ChannelName": BASE_MODEL_CHANNEL,
                        "S3DataSource": {
                            "S3Uri": base_model_uri(self.settings.store_uri, base),
                            "S3DataType": "S3Prefix",
                            "CompressionType": "None",
                        },
                    }
                ],
            }
        )
        definition = {
            "ModelName": request["ModelName"],
            "PrimaryContainer": container,
            "ExecutionRoleArn": self.settings.sagemaker.role_arn,
        }
        if self.settings.sagemaker.subnets:
            definition["VpcConfig"] = {
                "Subnets": self.settings.sagemaker.subnets,
                "SecurityGroupIds": self.settings.sagemaker.security_groups,
            }
        if self._tags():
            definition["Tags"] = self._tags()
        return definition

    def base_model(self, request: dict) -> str:
        """The base model a model request's adapter was trained on (its version's tag), else the
        configured one."""
        environment = request["PrimaryContainer"].get("Environment", {})
        return environment.get(BASE_MODEL_NAME_ENV) or self.settings.models.base

    def create_model(self, request: dict) -> dict:
        """``CreateModel``, once the base model is staged in the store (staged from this machine if
        it is not yet: a worker without it gets an error saying how to stage it)."""

        ensure_model_staged(self.settings, self.base_model(request), log=lambda _: None)
        return self._call("create_model", **self.model_definition(request))

    def describe_model(self, name: str) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            return self.sagemaker.describe_model(ModelName=name)
        except ClientError as exc:
            if _missing(exc):
                return None
            raise

    # -- endpoint configs --------------------------------------------------------------------------

    def endpoint_config_definition(self, request: dict) -> dict:
        """``llmops.backends.endpoints.base``'s config request with what SageMaker needs besides: instance type
        and count per variant, the KMS key, tags."""
        definition = dict(request)
        for key in ("ProductionVariants", "ShadowProductionVariants"):
            if key in definition:
                definition[key] = [
                    {
                        **variant,
                        "InstanceType": self.config.instance_type,
                        "InitialInstanceCount": self.config.instance_count,
                    }
                    for variant in definition[key]
                ]
        if self.config.kms_key_id:
            if not has_instance_storage(self.config.instance_type):  # SageMaker refuses a key for those
                definition["KmsKeyId"] = self.config.kms_key_id
            if "DataCaptureConfig" in definition:
                definition["DataCaptureConfig"] = {
                    **definition["DataCaptureConfig"],
                    "KmsKeyId": self.config.kms_key_id,
                }
        if self._tags():
            definition["Tags"] = self._tags()
        return definition

    def create_endpoint_config(self, request: dict) -> dict:
        """Create the config; one that already exists under this name (a retried task's) is reused
        when it holds the same variants, and refused otherwise."""
        from botocore.exceptions import ClientError

        definition = self.endpoint_config_definition(request)
        name = definition["EndpointConfigName"]
        try:
            existing = self.sagemaker.describe_endpoint_config(EndpointConfigName=name)
        except ClientError as exc:
            if not _missing(exc):
                raise
            return self._call("create_endpoint_config", **definition)

        def variants(config: dict) -> list[tuple]:
            return sorted(
                (key, v["VariantName"], v["ModelName"], float(v.get("InitialVariantWeight", 1.0)))
                for key in ("ProductionVariants", "ShadowProductionVariants")
                for v in config.get(key, [])
            )

        if variants(existing) != variants(definition):
            raise DeploymentRejected(
                f"endpoint config {name} exists with other variants ({variants(existing)}); configs are immutable"
            )
        return existing

    # -- endpoints ---------------------------------------------------------------------------------

    def describe_endpoint(self, name: str) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            described = self.sagemaker.describe_endpoint(EndpointName=name)
        except ClientError as exc:
            if _missing(exc):
                return None
            raise
        status = described["EndpointStatus"]
        if status in ("SystemUpdating", "RollingBack"):
            described = {**described, "EndpointStatus": "Updating"}  # base.wait_settled waits those out
        elif status == "UpdateRollbackFailed":
            described = {**described, "EndpointStatus": "Failed"}
        return described

    def create_endpoint(self, name: str, config: str) -> dict:
        request = {"EndpointName": name, "EndpointConfigName": config}
        if self._tags():
            request["Tags"] = self._tags()
        return self._call("create_endpoint", **request)

    def update_endpoint(self, name: str, config: str) -> dict:
        """Move the endpoint to ``config``; a blue/green update with auto-rollback alarms where both
        configs are production-only (see the module's docstring)."""
        request = {"EndpointName": name, "EndpointConfigName": config}
        guarded = self.guardrail(name, config)
        if guarded is not None:
            request["DeploymentConfig"] = guarded
        return self._call("update_endpoint", **request)

    def guardrail(self, name: str, config: str) -> dict | None:
        """The ``DeploymentConfig`` of an update of ``name`` to ``config`` (alarms created), or None
        when it does not fit: alarms off, or a shadow variant on either side."""
        if not self.config.rollback_alarms:
            return None
        current = self.describe_endpoint(name) or {}
        target = self._call("describe_endpoint_config", EndpointConfigName=config)
        if current.get("ShadowProductionVariants") or target.get("ShadowProductionVariants"):
            return None
        # A blue/green update keeps the variants' names: SageMaker allows one only between configs
        # with the same names (a new fleet behind the same variants).
        names = {v["VariantName"] for v in current.get("ProductionVariants", [])}
        if names != {v["VariantName"] for v in target["ProductionVariants"]}:
            return None
        rails = self.settings.serving.policy().guardrails
        alarms = []
        for variant in target["ProductionVariants"]:
            for alarm in alarm_requests(
                name, variant["VariantName"], rails.max_p99_latency_ms, self.config.alarm_periods
            ):
                self.cloudwatch.put_metric_alarm(**alarm)
                alarms.append(alarm["AlarmName"])
        timeout = self.settings.serving.deploy_timeout_minutes * 60
        return deployment_config(alarms, self.config.blue_green_wait_seconds, timeout)

    def delete_endpoint(self, name: str) -> None:
        """Delete the endpoint and wait until it is gone: SageMaker deletes in the background, and an
        endpoint still Deleting refuses a CreateEndpoint under its name."""
        from botocore.exceptions import ClientError

        try:
            self.sagemaker.delete_endpoint(EndpointName=name)
        except ClientError as exc:
            if not _missing(exc):
                raise
        if self._settled(name) is not None:
            raise DeploymentError(f"endpoint {name} is still there after DeleteEndpoint")

    def _settled(self, name: str) -> dict | None:
        timeout = self.settings.serving.deploy_timeout_minutes * 60
        return wait_settled(self, name, timeout, self.metrics_poll_seconds, self._sleep)

    def update_endpoint_weights(self, name: str, weights: dict[str, float]) -> dict:
        """Shift traffic between production variants, then wait until the endpoint is back in
        service: SageMaker reports the new weights only once the update is done, and an update
        that failed says so in ``FailureReason``."""

        self._call(
            "update_endpoint_weights_and_capacities",
            EndpointName=name,
            DesiredWeightsAndCapacities=[{"VariantName": v, "DesiredWeight": w} for v, w in weights.items()],
        )
        described = self._settled(name)
        if described is None:
            raise DeploymentError(f"endpoint {name} disappeared during a weight update")
        if described["EndpointStatus"] != "InService":
            why = described.get("FailureReason") or described["EndpointStatus"]
            raise DeploymentError(f"endpoint {name} failed a weight update: {why}")
        return described

    # -- metrics -----------------------------------------------------------------------------------

    def variant_windows(self, name: str, since: float, shadow: bool = False) -> dict[str, VariantWindow]:
        """What each production (or shadow) variant did since ``since``, from CloudWatch's
        per-minute endpoint metrics (the window starts at ``since``'s minute)."""
        if since not in self._waited:
            self._sleep(self.config.metrics_delay_seconds)  # the window's last minutes arrive late
            self._waited.add(since)
        described = self.describe_endpoint(name) or {}
        variants = [
            v["VariantName"] for v in described.get("ShadowProductionVariants" if shadow else "ProductionVariants", [])
        ]
        if not variants:
            return {}
        start = math.floor(since / 60) * 60
        end = math.ceil(time.time() / 60) * 60 + 60
        period = max(60, end - start)
        queries, meaning = metric_queries(name, variants, period)
        values: dict[str, dict[str, float]] = {v: {} for v in variants}
        request = {
            "MetricDataQueries": queries,
            "StartTime": datetime.fromtimestamp(start, UTC),
            "EndTime": datetime.fromtimestamp(end, UTC),
        }
        while True:
            response = self.cloudwatch.get_metric_data(**request)
            for result in response["MetricDataResults"]:
                variant, what = meaning[result["Id"]]
                if result.get("Values"):
                    # One period covers the window; a sum split over two periods is added up.
                    values[variant][what] = sum(result["Values"]) if what.endswith(":Sum") else max(result["Values"])
            if not response.get("NextToken"):
                break
            request["NextToken"] = response["NextToken"]
        windows = {}
        for variant, seen in values.items():
            p95, p99 = seen.get("ModelLatency:p95"), seen.get("ModelLatency:p99")
            windows[variant] = VariantWindow(
                invocations=int(seen.get("Invocations:Sum", 0)),
                errors=int(seen.get("Invocation4XXErrors:Sum", 0) + seen.get("Invocation5XXErrors:Sum", 0)),
                p95_ms=p95 / 1000 if p95 is not None else None,
                p99_ms=p99 / 1000 if p99 is not None else None,
            )
        return windows
