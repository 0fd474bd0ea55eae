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
