"""What llm_finetune decides: run parameters over the config, whether to train, the job name,
and which curated dataset version to train on."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from llmops import storage
from llmops.config import ConfigError
from llmops.data import versioning
from llmops.data.records import SPLITS
from llmops.finetune import LATEST, decide_training, job_name, request_from_params, select_dataset
from training.config import TrainConfig

VALID = {
    "validation": {
        "success": True,
        "suite": "curated_dataset",
        "evaluated_expectations": 12,
        "failed_expectations": 0,
        "result_uri": "x",
        "data_docs_uri": "y",
    }
}
SAGEMAKER_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9])*$")


# --- request_from_params -------------------------------------------------------------------------


def test_no_params_gives_the_configured_hyperparameters(settings):
    request = request_from_params(settings, {})
    configured = settings.finetune.hyperparameters
    assert configured  # local.yaml sets some; otherwise this test proves nothing
    for name, value in configured.items():
        assert request.hyperparameters[name] == value, name
    # Everything else is the training entrypoint's default, so the job gets a complete config.
    assert set(request.hyperparameters) == set(TrainConfig().to_dict())
    assert request.base_model_name == configured["base_model"]
    assert request.backend == settings.finetune.backend == "local"
    assert request.processes == settings.finetune.processes
    assert request.dataset_version == LATEST
    assert request.force is False and request.reason == ""


def test_params_override_the_config(settings):
    params = {"lora_r": 4, "learning_rate": 0.01, "max_steps": 3, "peft_method": "prompt_tuning"}
    request = request_from_params(settings, params)
    assert request.hyperparameters["lora_r"] == 4
    assert request.hyperparameters["learning_rate"] == pytest.approx(0.01)
    assert request.hyperparameters["max_steps"] == 3
    assert request.hyperparameters["peft_method"] == "prompt_tuning"
    # Untouched values still come from the config.
    assert request.hyperparameters["lora_alpha"] == settings.finetune.hyperparameters["lora_alpha"]
    assert request.hyperparameters["lora_alpha"] != TrainConfig().lora_alpha


def test_string_params_are_coerced(settings):
    request = request_from_params(settings, {"lora_r": "4", "learning_rate": "0.01", "dataset_version": "abc"})
    assert request.hyperparameters["lora_r"] == 4
    assert request.hyperparameters["learning_rate"] == pytest.approx(0.01)
    assert request.dataset_version == "abc"


def test_run_fields_are_not_hyperparameters(settings):
    request = request_from_params(settings, {"force": True, "reason": "drift", "processes": 2, "backend": "local"})
    assert request.force is True and request.reason == "drift" and request.processes == 2
    assert not {"force", "reason", "processes", "backend", "dataset_version"} & set(request.hyperparameters)


def test_empty_strings_and_none_are_ignored(settings):
    baseline = request_from_params(settings, {})
    blank = request_from_params(
        settings,
        {"lora_r": "", "learning_rate": None, "peft_method": "", "dataset_version": "", "reason": None, "backend": ""},
    )
    assert blank == baseline


@pytest.mark.parametrize(
    ("name", "value"),
    [("peft_method", "magic"), ("lora_r", 0), ("batch_size", "x"), ("precision", "fp16"), ("lora_dropout", 1.0)],
)
def test_a_bad_value_is_a_config_error_naming_the_field(settings, name, value):
    with pytest.raises(ConfigError) as info:
        request_from_params(settings, {name: value})
    message = str(info.value)
    assert message.startswith("invalid run parameters")
    assert "invalid training configuration" not in message
    assert f"{name}:" in message


def test_an_unknown_parameter_is_rejected(settings):
    with pytest.raises(ConfigError, match=r"^invalid run parameters:\s+unknown parameter\(s\): lora_rank, zzz$"):
        request_from_params(settings, {"zzz": 1, "lora_rank": 8, "lora_r": 4})


@pytest.mark.parametrize("backend", ["Local", "kubernetes", "ec2"])
def test_an_unknown_backend_is_rejected(settings, backend):
    with pytest.raises(ConfigError, match=r"^invalid run parameters[\s\S]*backend") as info:
        request_from_params(settings, {"backend": backend})
    assert repr(backend) in str(info.value)


@pytest.mark.parametrize("backend", ["sagemaker", "sagemaker-trainium"])
def test_a_sagemaker_backend_needs_an_s3_store_and_a_role(settings, backend):
    with pytest.raises(ConfigError, match=r"reads its data from S3, and this environment's store is file://"):
        request_from_params(settings, {"backend": backend})
    on_s3 = settings.model_copy(update={"store_uri": "s3://bucket/llmops"})
    with pytest.raises(ConfigError, match=r"needs sagemaker.role_arn"):
        request_from_params(on_s3, {"backend": backend})
    role = "arn:aws:iam::123456789012:role/llmops"
    ready = on_s3.model_copy(update={"sagemaker": on_s3.sagemaker.model_copy(update={"role_arn": role})})
    assert request_from_params(ready, {"backend": backend}).backend == backend


# --- decide_training ----------------------------------------------------------------------------

DATASET = "a" * 64
OTHER = "b" * 64


def test_force_trains_even_on_the_champions_dataset():
    decision = decide_training(DATASET, DATASET, force=True, reason="")
    assert decision.train is True
    assert "force" in decision.reason


def test_a_reason_trains_and_is_reported():
    decision = decide_training(DATASET, DATASET, force=False, reason="drift detected on 2026-01-01")
    assert decision.train is True
    assert "drift detected on 2026-01-01" in decision.reason


def test_no_champion_trains():
    decision = decide_training(DATASET, None, force=False, reason="")
    assert decision.train is True
    assert "champion" in decision.reason


def test_champion_on_the_same_dataset_skips_and_says_how_to_retrain():
    decision = decide_training(DATASET, DATASET, force=False, reason="")
    assert decision.train is False
    assert "force" in decision.reason
    assert DATASET[:12] in decision.reason


def test_champion_on_another_dataset_trains():
    decision = decide_training(DATASET, OTHER, force=False, reason="")
    assert decision.train is True
    assert DATASET[:12] in decision.reason and OTHER[:12] in decision.reason


# --- job_name -----------------------------------------------------------------------------------

RUN_IDS = [
    "manual__2026-11-22T14:51:28.628915+00:00",
    "scheduled__2026-01-01T02:00:00+00:00",
    "asset_triggered__2026-03-04T05:06:07.000001+00:00",
    "manual__2026-11-22T14:51:28.628916+00:00",
    "my custom run!",
    "__",
]


@pytest.mark.parametrize("run_id", RUN_IDS)
def test_job_name_is_a_valid_sagemaker_name(run_id):
    name = job_name("llm_finetune", run_id)
    assert len(name) <= 63
    assert SAGEMAKER_NAME.match(name), name
    assert name == job_name("llm_finetune", run_id)  # every retry of the run gets the same name


def test_job_names_differ_between_runs_and_dags():
    names = {job_name("llm_finetune", r) for r in RUN_IDS}
    assert len(names) == len(RUN_IDS)
    assert job_name("llm_finetune", RUN_IDS[0]) != job_name("other_dag", RUN_IDS[0])


def test_job_name_with_a_long_run_id_stays_within_the_limit():
    run_id = "manual__" + "2026-11-22T14:51:28.628915+00:00" * 10
    name = job_name("llm_finetune" * 10, run_id)
    assert len(name) <= 63 and SAGEMAKER_NAME.match(name)


# --- select_dataset -----------------------------------------------------------------------------


class _Clock:
    """Stands in for ``versioning.datetime`` so that publish order is creation order."""

    def __init__(self):
        self.current = datetime(2026, 1, 1, tzinfo=UTC)

    def now(self, tz=None):
        self.current += timedelta(seconds=1)
        return self.current


@pytest.fixture
def clock(monkeypatch):
    monkeypatch.setattr(versioning, "datetime", _Clock())


def make_records(tag: str) -> list[dict]:
    return [
        {
            "id": f"{split}-{i}",
            "prompt": f"[{tag}] How do I read a file? ({split} {i})",
            "response": f"Use open(path).read() ({tag}).",
            "source": "unit",
            "split": split,
        }
        for split in SPLITS
        for i in range(2)
    ]


def publish(settings, tag: str, manifest_fields: dict | None = None):
    if manifest_fields is None:
        # select_dataset checks the saved validation result too, not only the manifest's word for it.
        result_uri = storage.join(settings.runs_uri(), "llm_data_prep", tag, "validation", "result.json")
        storage.write_json(result_uri, {"success": True})
        manifest_fields = {"validation": {**VALID["validation"], "result_uri": result_uri}}
    return versioning.publish(make_records(tag), settings.datasets_uri(), settings.data.dataset_name, manifest_fields)


def test_no_versions_says_to_run_data_prep(settings):
    with pytest.raises(ConfigError, match="llm_data_prep"):
        select_dataset(settings, LATEST)


def test_latest_is_the_newest_version(settings, clock):
    publish(settings, "v1")
    newest = publish(settings, "v2")
    publish(settings, "v1")  # republishing old content does not make it newer
    dataset = select_dataset(settings, LATEST)
    assert dataset["version"] == newest.version
    assert dataset["uri"] == newest.uri
    assert dataset["manifest_uri"] == newest.manifest_uri


def test_an_explicit_version_is_returned_with_its_locations(settings, clock):
    old = publish(settings, "v1")
    publish(settings, "v2")
    dataset = select_dataset(settings, old.version)
    assert dataset["version"] == old.version
    assert dataset["uri"] == old.uri
    assert dataset["manifest_uri"] == old.manifest_uri
    assert dataset["validation"]["success"] is True
    for split in SPLITS:
        uri = dataset["files"][split]["uri"]
        assert uri == storage.join(old.uri, f"{split}.jsonl")
        assert storage.exists(uri)
    assert "[v1]" in storage.local_path(dataset["files"]["train"]["uri"]) or True
    with open(storage.local_path(dataset["files"]["train"]["uri"]), encoding="utf-8") as f:
        assert "[v1]" in f.read()


def test_an_unknown_version_lists_the_known_ones(settings, clock):
    first = publish(settings, "v1")
    second = publish(settings, "v2")
    with pytest.raises(ConfigError, match="dataset_version") as info:
        select_dataset(settings, "0" * 64)
    message = str(info.value)
    assert "0" * 64 in message
    assert first.version[:12] in message and second.version[:12] in message


def test_an_unknown_version_with_no_dataset_at_all_is_a_config_error(settings):
    with pytest.raises(ConfigError, match=r"known: \[\]"):
        select_dataset(settings, "deadbeef")


def test_a_version_that_failed_validation_is_refused(settings, clock):
    failed = publish(settings, "bad", {"validation": {"success": False, "result_uri": "x", "data_docs_uri": "y"}})
    with pytest.raises(ConfigError, match="refusing to train") as info:
        select_dataset(settings, failed.version)
    assert failed.version in str(info.value)
    with pytest.raises(ConfigError, match="refusing to train"):
        select_dataset(settings, LATEST)


def test_a_version_without_validation_results_is_refused(settings, clock):
    unvalidated = publish(settings, "raw", {})
    with pytest.raises(ConfigError, match="did not pass validation"):
        select_dataset(settings, unvalidated.version)


def test_ec2_trainium_needs_an_s3_store_and_an_instance_profile(settings):
    with pytest.raises(ConfigError, match=r"'ec2-trainium' reads its data from S3"):
        request_from_params(settings, {"backend": "ec2-trainium"})
    on_s3 = settings.model_copy(update={"store_uri": "s3://bucket/llmops"})
    with pytest.raises(ConfigError, match=r"needs ec2.instance_profile \(LLMOPS_EC2_INSTANCE_PROFILE\)"):
        request_from_params(on_s3, {"backend": "ec2-trainium"})
    ready = on_s3.model_copy(update={"ec2": on_s3.ec2.model_copy(update={"instance_profile": "llmops-trn"})})
    assert request_from_params(ready, {"backend": "ec2-trainium"}).backend == "ec2-trainium"
