from __future__ import annotations

import pytest

from llmops.config import ConfigError, load_settings


def test_local_settings_resolve_under_the_state_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOPS_HOME", str(tmp_path))
    settings = load_settings("local")
    assert settings.env == "local"
    assert settings.store_uri == f"file://{tmp_path}/store"
    assert settings.datasets_uri() == f"file://{tmp_path}/store/datasets"
    assert settings.models.base == "smollm2-135m-instruct"


def test_aws_settings_take_bucket_and_tracking_uri_from_the_environment(monkeypatch):
    monkeypatch.setenv("LLMOPS_S3_BUCKET", "my-bucket")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://mlflow.example")
    settings = load_settings("aws")
    assert settings.store_uri == "s3://my-bucket/llmops"
    assert settings.mlflow.tracking_uri == "https://mlflow.example"


def test_missing_environment_variable_is_named(monkeypatch):
    monkeypatch.delenv("LLMOPS_S3_BUCKET", raising=False)
    with pytest.raises(ConfigError, match="LLMOPS_S3_BUCKET is not set"):
        load_settings("aws")


def test_unknown_environment_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"no configuration for environment 'nope'.*local"):
        load_settings("nope")


@pytest.mark.parametrize(
    ("yaml_text", "field"),
    [
        ("data: {split: {train: 0.9, validation: 0.2, test: 0.1}}", "data.split"),
        ("data: {over_length: chop}", "data.over_length"),
        ("data: {max_tokens: 3}", "data.max_tokens"),
        ("data: {dataset_name: 'Has Spaces'}", "data.dataset_name"),
        ("data: {typo_field: 1}", "data.typo_field"),
        ("store_uri: /not/a/uri", "store_uri"),
        ("evaluation: {gate: {minimum: {bogus_metric: 1}}}", "bogus_metric"),
        ("evaluation: {gate: {non_regression: {loss: -1}}}", "margins must be >= 0"),
        ("evaluation: {judge: oracle}", "evaluation.judge"),
    ],
)
def test_bad_values_fail_at_load_naming_the_field(tmp_path, yaml_text, field):
    base = "models: {cache_dir: /tmp/models}\nmlflow: {tracking_uri: sqlite:///x.db, artifact_uri: file:///tmp/a}\n"
    if not yaml_text.startswith("store_uri"):
        base += "store_uri: file:///tmp/store\n"
    path = tmp_path / "bad.yaml"
    path.write_text(base + yaml_text + "\n")
    with pytest.raises(ConfigError) as info:
        load_settings("bad", path=path)
    assert str(path) in str(info.value)
    assert field in str(info.value)


def test_not_yaml_is_reported_with_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings("broken", path=path)


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("${A}", {"A": "x"}, "x"),
        ("${A:-d}", {}, "d"),
        ("${A:-sqlite:///${H}/m.db}", {"H": "/h"}, "sqlite:////h/m.db"),
        ("${A:-sqlite:///${H}/m.db}", {"A": "pg://db", "H": "/h"}, "pg://db"),
        ("pre-${A}-${B:-b}-post", {"A": "a"}, "pre-a-b-post"),
        ("no refs}", {}, "no refs}"),
    ],
)
def test_environment_references_expand_with_nested_defaults(text, env, expected):
    from llmops.config import _substitute

    assert _substitute(text, "field", env) == expected


def test_an_unclosed_reference_is_reported():
    from llmops.config import _substitute

    with pytest.raises(ConfigError, match="field: unclosed"):
        _substitute("${A:-${B}", "field", {})


def test_the_default_tracking_uri_is_a_sqlite_file_in_the_state_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOPS_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert load_settings("local").mlflow.tracking_uri == f"sqlite:///{tmp_path}/mlflow/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert load_settings("local").mlflow.tracking_uri == "http://mlflow:5000"


def test_a_config_file_can_be_named_in_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "store_uri: file:///tmp/elsewhere\nmodels: {cache_dir: /tmp/models}\n"
        "mlflow: {tracking_uri: sqlite:///x.db, artifact_uri: file:///tmp/a}\n"
    )
    monkeypatch.setenv("LLMOPS_CONFIG_FILE", str(path))
    assert load_settings().store_uri == "file:///tmp/elsewhere"
