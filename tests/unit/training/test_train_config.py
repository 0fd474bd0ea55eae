"""The training job's configuration: SageMaker-style string hyperparameters, CLI overrides,
validation that names the bad field, and the SM_* path layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.config import JobPaths, TrainConfig, config_from_mapping, load_config


def paths_with(tmp_path: Path, hyperparameters: dict | str | None = None) -> JobPaths:
    config_dir = tmp_path / "config"
    config_dir.mkdir(parents=True)
    if hyperparameters is not None:
        text = hyperparameters if isinstance(hyperparameters, str) else json.dumps(hyperparameters)
        (config_dir / "hyperparameters.json").write_text(text)
    return JobPaths.from_env({"SM_INPUT_CONFIG_DIR": str(config_dir)})


def test_string_hyperparameters_are_coerced_to_the_field_types(tmp_path):
    paths = paths_with(
        tmp_path,
        {
            "base_model": "/models/base",
            "peft_method": "prompt_tuning",
            "lora_r": "8",
            "lora_alpha": "32",
            "lora_dropout": "0.1",
            "learning_rate": "0.001",
            "epochs": "2.5",
            "max_steps": "-1",
            "batch_size": "2",
            "lora_target_modules": "q_proj, v_proj",
            "precision": "bf16",
        },
    )
    config = load_config([], paths)
    assert config.lora_r == 8 and type(config.lora_r) is int
    assert config.lora_alpha == 32 and type(config.lora_alpha) is int
    assert config.lora_dropout == pytest.approx(0.1) and type(config.lora_dropout) is float
    assert config.learning_rate == pytest.approx(0.001) and type(config.learning_rate) is float
    assert config.epochs == pytest.approx(2.5)
    assert config.max_steps == -1 and type(config.max_steps) is int
    assert config.batch_size == 2
    assert config.lora_target_modules == ("q_proj", "v_proj")
    assert config.peft_method == "prompt_tuning"
    assert config.precision == "bf16"
    assert config.base_model == "/models/base"
    # Fields absent from the file keep their defaults.
    assert config.seed == TrainConfig().seed


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("q_proj,v_proj", ("q_proj", "v_proj")),
        ('["q_proj"]', ("q_proj",)),
        ('["q_proj", "o_proj"]', ("q_proj", "o_proj")),
        (["k_proj", "v_proj"], ("k_proj", "v_proj")),
    ],
)
def test_target_modules_accept_a_comma_list_or_a_json_list(tmp_path, raw, expected):
    config = load_config([], paths_with(tmp_path, {"lora_target_modules": raw}))
    assert config.lora_target_modules == expected


@pytest.mark.parametrize("flag", ["--lora_r", "--lora-r"])
def test_cli_flags_override_the_file(tmp_path, flag):
    paths = paths_with(tmp_path, {"lora_r": "16", "learning_rate": "0.001"})
    config = load_config([flag, "4", "--max-seq-length", "64"], paths)
    assert config.lora_r == 4
    assert config.max_seq_length == 64
    assert config.learning_rate == pytest.approx(0.001)  # untouched by the flags


def test_no_file_and_no_flags_gives_the_defaults(tmp_path):
    assert load_config([], paths_with(tmp_path)) == TrainConfig()


def test_invalid_json_file_is_a_value_error_naming_the_file(tmp_path):
    paths = paths_with(tmp_path, '{"lora_r": "8",')
    with pytest.raises(ValueError, match="hyperparameters.json") as info:
        load_config([], paths)
    assert str(paths.config_dir / "hyperparameters.json") in str(info.value)
    assert "invalid JSON" in str(info.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("peft_method", "magic"),
        ("precision", "fp16"),
        ("lora_r", "0"),
        ("lora_dropout", "1.0"),
        ("learning_rate", "0"),
        ("max_seq_length", "8"),
        ("batch_size", "abc"),
        ("lora_r", "abc"),
    ],
)
def test_invalid_values_raise_naming_the_field(tmp_path, name, value):
    with pytest.raises(ValueError, match=rf"invalid training configuration:[\s\S]*\b{name}: "):
        load_config([], paths_with(tmp_path, {name: value}))
    # The same value given as a flag fails the same way.
    with pytest.raises(ValueError, match=rf"\b{name}: "):
        load_config([f"--{name}", value], paths_with(tmp_path / "flag"))


def test_valid_edge_values_are_accepted():
    config = config_from_mapping({"lora_dropout": "0", "max_seq_length": "16", "max_steps": "10", "epochs": "0"})
    assert config.lora_dropout == 0.0 and config.max_seq_length == 16 and config.epochs == 0.0


def test_epochs_must_be_positive_when_max_steps_is_unset():
    with pytest.raises(ValueError, match="epochs"):
        config_from_mapping({"epochs": "0", "max_steps": "-1"})


def test_an_unknown_hyperparameter_is_rejected_by_name(tmp_path):
    with pytest.raises(ValueError, match="unknown hyperparameter.*lora_rank"):
        load_config([], paths_with(tmp_path, {"lora_rank": "8"}))


def test_all_problems_are_reported_together():
    with pytest.raises(ValueError) as info:
        config_from_mapping({"lora_r": "0", "precision": "fp16"})
    assert "lora_r" in str(info.value) and "precision" in str(info.value)


def test_nan_learning_rate_is_rejected():
    with pytest.raises(ValueError, match="learning_rate"):
        config_from_mapping({"learning_rate": "nan"})


def test_job_paths_follow_the_sagemaker_environment(tmp_path):
    env = {
        "SM_INPUT_CONFIG_DIR": str(tmp_path / "cfg"),
        "SM_CHANNEL_TRAIN": str(tmp_path / "train"),
        "SM_CHANNEL_VALIDATION": str(tmp_path / "val"),
        "SM_MODEL_DIR": str(tmp_path / "model"),
        "SM_OUTPUT_DATA_DIR": str(tmp_path / "out"),
        "LLMOPS_CHECKPOINT_DIR": str(tmp_path / "ckpt"),
    }
    paths = JobPaths.from_env(env)
    assert paths.config_dir == tmp_path / "cfg"
    assert paths.train_dir == tmp_path / "train"
    assert paths.validation_dir == tmp_path / "val"
    assert paths.model_dir == tmp_path / "model"
    assert paths.output_dir == tmp_path / "out"
    assert paths.checkpoint_dir == tmp_path / "ckpt"


def test_job_paths_default_to_the_sagemaker_layout():
    paths = JobPaths.from_env({})
    assert paths.config_dir == Path("/opt/ml/input/config")
    assert paths.train_dir == Path("/opt/ml/input/data/train")
    assert paths.validation_dir == Path("/opt/ml/input/data/validation")
    assert paths.model_dir == Path("/opt/ml/model")
    assert paths.output_dir == Path("/opt/ml/output/data")
    assert paths.checkpoint_dir == Path("/opt/ml/checkpoints")


def test_job_paths_read_os_environ_when_no_mapping_is_given(monkeypatch, tmp_path):
    monkeypatch.setenv("SM_MODEL_DIR", str(tmp_path / "m"))
    monkeypatch.delenv("SM_CHANNEL_TRAIN", raising=False)
    paths = JobPaths.from_env()
    assert paths.model_dir == tmp_path / "m"
    assert paths.train_dir == Path("/opt/ml/input/data/train")


@pytest.mark.parametrize(
    "config",
    [
        TrainConfig(),
        TrainConfig(
            base_model="/m",
            peft_method="full",
            lora_r=4,
            lora_dropout=0.0,
            lora_target_modules=("q_proj",),
            epochs=3.0,
            max_steps=7,
            learning_rate=1e-5,
            precision="bf16",
            max_eval_samples=9,
        ),
    ],
)
def test_to_dict_round_trips_through_config_from_mapping(config):
    values = config.to_dict()
    assert isinstance(values["lora_target_modules"], list)
    json.dumps(values)  # serializable, as it travels as hyperparameters
    assert config_from_mapping(values) == config
    # As SageMaker would hand it back: every value a string.
    as_strings = {k: json.dumps(v) if isinstance(v, list) else str(v) for k, v in values.items()}
    assert config_from_mapping(as_strings) == config
