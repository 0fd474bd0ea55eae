from __future__ import annotations

import pytest

from llmops.config import ConfigError
from llmops.data.records import DataQualityError
from llmops.orchestration import curated_dataset_asset, data_config_from_params, fail_without_retry


def test_params_override_the_configured_data_settings(settings):
    data = data_config_from_params(settings, {"raw_uri": "s3://b/raw.csv", "max_tokens": 256, "scrub_pii": False})
    assert (data.raw_uri, data.max_tokens, data.scrub_pii) == ("s3://b/raw.csv", 256, False)
    assert data.template == settings.data.template


def test_an_empty_raw_uri_from_the_form_means_the_bundled_corpus(settings):
    assert data_config_from_params(settings, {"raw_uri": ""}).raw_uri is None


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"over_length": "chop"}, "over_length"),
        ({"max_tokens": 3}, "max_tokens"),
        ({"max_tokens": "many"}, "max_tokens"),
    ],
)
def test_a_bad_param_names_the_field(settings, params, field):
    with pytest.raises(ConfigError, match=rf"invalid run parameters:\n  {field}:"):
        data_config_from_params(settings, params)


@pytest.mark.parametrize("error", [DataQualityError("line 3: bad"), ConfigError("max_tokens: too small")])
def test_bad_data_and_bad_config_fail_without_retry(error):
    from airflow.sdk.exceptions import AirflowFailException

    @fail_without_retry
    def task():
        raise error

    with pytest.raises(AirflowFailException, match=str(error)):
        task()


def test_other_errors_keep_their_type_so_airflow_retries_them():
    @fail_without_retry
    def task():
        raise TimeoutError("S3 slow")

    with pytest.raises(TimeoutError):
        task()


def test_the_dataset_asset_points_at_the_dataset_folder(settings):
    asset = curated_dataset_asset(settings)
    assert asset.uri == f"{settings.datasets_uri()}/python-docs-instruct"
    assert asset.name == "curated_dataset.python-docs-instruct"


# -- approval on Airflow 3.0 (MWAA): a sensor on the version's MLflow tag -----------------------


class _TaskInstance:
    def __init__(self):
        self.pushed = {}

    def xcom_push(self, key, value):
        self.pushed[key] = value


@pytest.fixture
def approval(tmp_path):
    from datetime import timedelta

    from llmops.orchestration import tag_approval_sensor
    from llmops.tracking import client

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    registry = client(uri)
    registry.create_registered_model("assistant")
    registry.create_model_version("assistant", source="/tmp/m1")
    sensor = tag_approval_sensor()(
        task_id="await_approval",
        tracking_uri=uri,
        model_name="assistant",
        version="1",
        subject="Promote?",
        body="report",
        response_timeout=timedelta(hours=2),
    )
    return sensor, registry, {"ti": _TaskInstance()}


def test_the_approval_sensor_waits_for_the_tag_and_records_who_approved(approval):
    from llmops.evaluation import approval_status
    from llmops.orchestration import APPROVAL_RESPONSE_KEY

    sensor, registry, context = approval
    assert sensor.mode == "reschedule" and sensor.timeout == 2 * 3600
    assert sensor.poke(context) is False
    registry.set_model_version_tag("assistant", "1", "approval.decision", "maybe")
    assert sensor.poke(context) is False  # neither word: still waiting
    registry.set_model_version_tag("assistant", "1", "approval.decision", "Approve")
    registry.set_model_version_tag("assistant", "1", "approval.by", "ana")
    assert sensor.poke(context) is True
    answer = context["ti"].pushed[APPROVAL_RESPONSE_KEY]
    assert approval_status(answer) == {"status": "approved", "by": "ana"}  # the shape the HITL operator records


def test_a_rejection_or_a_timeout_skips_the_promotion_and_says_which(approval, monkeypatch):
    from airflow.sdk import BaseSensorOperator

    from llmops.compat import AirflowSensorTimeout, AirflowSkipException
    from llmops.evaluation import approval_status
    from llmops.orchestration import APPROVAL_RESPONSE_KEY

    sensor, registry, context = approval
    registry.set_model_version_tag("assistant", "1", "approval.decision", "reject")
    with pytest.raises(AirflowSkipException):
        sensor.poke(context)
    assert approval_status(context["ti"].pushed[APPROVAL_RESPONSE_KEY])["status"] == "rejected"

    def timed_out(self, context):
        raise AirflowSensorTimeout("no answer")

    monkeypatch.setattr(BaseSensorOperator, "execute", timed_out)
    context = {"ti": _TaskInstance()}
    with pytest.raises(AirflowSkipException):
        sensor.execute(context)
    assert approval_status(context["ti"].pushed[APPROVAL_RESPONSE_KEY])["status"] == "rejected_on_timeout"


def test_airflow_3_1_and_later_use_the_human_in_the_loop_operator():
    from datetime import timedelta

    from llmops.compat import HAS_HITL
    from llmops.orchestration import approval_operator

    operator = approval_operator(
        task_id="await_approval",
        tracking_uri="sqlite:///unused.db",
        model_name="assistant",
        version="1",
        subject="Promote?",
        body="report",
        response_timeout=timedelta(hours=1),
    )
    assert HAS_HITL  # the pinned Airflow; 3.0 is covered by tests/integration/test_mwaa_bundle.py
    assert type(operator).__name__ == "RecordedApprovalOperator"
