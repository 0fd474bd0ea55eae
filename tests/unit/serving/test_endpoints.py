"""Endpoint configs in SageMaker's shape and the gateway's routing: what is accepted, and where a
request goes (weights, TargetVariant, the shadow's mirrored share)."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
from pydantic import ValidationError

from serving.endpoints import (
    CaptureSpec,
    Container,
    EndpointConfigSpec,
    EndpointSpec,
    ModelSpec,
    RoutingError,
    UpdateWeightsSpec,
    VariantSpec,
    choose_variant,
    shadow_share,
)

DRAWS = 20_000
SIGMAS = 4.5  # a false alarm per share is about 7 in a million


def shares(weights: dict[str, float], seed: int = 1234) -> Counter:
    rng = random.Random(seed)
    return Counter(choose_variant(weights, rng=rng) for _ in range(DRAWS))


def assert_within_binomial_bounds(counts: Counter, weights: dict[str, float]) -> None:
    total = sum(weights.values())
    for name, weight in weights.items():
        expected = weight / total
        bound = SIGMAS * math.sqrt(expected * (1 - expected) / DRAWS)
        observed = counts[name] / DRAWS
        assert abs(observed - expected) <= bound, f"{name}: {observed:.4f} vs {expected:.4f} ± {bound:.4f}"


# -- routing ------------------------------------------------------------------------------------


def test_requests_are_routed_in_proportion_to_the_weights():
    weights = {"champion": 0.7, "challenger": 0.2, "canary": 0.1}
    counts = shares(weights)
    assert set(counts) == set(weights)
    assert sum(counts.values()) == DRAWS
    assert_within_binomial_bounds(counts, weights)


def test_equal_weights_split_traffic_in_thirds():
    weights = {"a": 1.0, "b": 1.0, "c": 1.0}
    counts = shares(weights, seed=99)
    assert_within_binomial_bounds(counts, weights)


def test_weights_need_not_sum_to_one():
    weights = {"a": 7.0, "b": 3.0}
    assert_within_binomial_bounds(shares(weights, seed=7), weights)


@pytest.mark.parametrize(
    "weights",
    [
        {"off": 0.0, "on": 1.0},
        {"on": 1.0, "off": 0.0},
        {"off1": 0.0, "on": 2.0, "off2": 0.0},
        {"a": 0.5, "off": 0.0, "b": 0.5},
    ],
)
def test_a_variant_with_zero_weight_is_never_chosen(weights):
    counts = shares(weights, seed=5)
    assert all(counts[name] == 0 for name, weight in weights.items() if weight == 0)
    assert sum(counts.values()) == DRAWS


def test_zero_weight_variants_are_never_chosen_even_at_the_edges_of_the_draw():
    class Edge(random.Random):
        def __init__(self, value):
            super().__init__()
            self.value = value

        def random(self):
            return self.value

    weights = {"off1": 0.0, "on": 1.0, "off2": 0.0}
    for value in (0.0, 0.5, 1.0 - 2**-53):
        assert choose_variant(weights, rng=Edge(value)) == "on"


def test_target_variant_wins_over_the_weights():
    weights = {"champion": 1.0, "challenger": 0.0}
    rng = random.Random(0)
    assert {choose_variant(weights, target="challenger", rng=rng) for _ in range(100)} == {"challenger"}
    assert choose_variant(weights, target="champion") == "champion"


def test_an_unknown_target_variant_is_a_routing_error_naming_the_variants():
    with pytest.raises(RoutingError) as raised:
        choose_variant({"champion": 0.9, "challenger": 0.1}, target="nope")
    message = str(raised.value)
    assert "'nope'" in message
    assert "champion" in message and "challenger" in message
    assert isinstance(raised.value, ValueError)


@pytest.mark.parametrize("weights", [{"a": 0.0, "b": 0.0}, {}])
def test_no_weight_above_zero_is_a_routing_error(weights):
    with pytest.raises(RoutingError, match="weight above 0"):
        choose_variant(weights)


def test_shadow_share_is_the_shadow_weight_over_the_production_total():
    assert shadow_share({"a": 0.5, "b": 0.5}, 0.25) == pytest.approx(0.25)
    assert shadow_share({"a": 3.0, "b": 1.0}, 1.0) == pytest.approx(0.25)
    assert shadow_share({"a": 1.0}, 0.0) == 0.0


def test_shadow_share_is_capped_at_one():
    assert shadow_share({"a": 1.0}, 1.0) == 1.0
    assert shadow_share({"a": 0.5}, 3.0) == 1.0


def test_shadow_share_is_zero_when_production_has_no_weight():
    assert shadow_share({"a": 0.0}, 1.0) == 0.0
    assert shadow_share({}, 1.0) == 0.0


# -- specs --------------------------------------------------------------------------------------


def variant(name: str, weight: float = 1.0, model: str = "m") -> dict:
    return {"VariantName": name, "ModelName": model, "InitialVariantWeight": weight}


def config(**fields) -> EndpointConfigSpec:
    return EndpointConfigSpec.model_validate(
        {"EndpointConfigName": "cfg", "ProductionVariants": [variant("champion")], **fields}
    )


CAPTURE = {
    "EnableCapture": True,
    "InitialSamplingPercentage": 100,
    "DestinationS3Uri": "s3://bucket/capture",
    "CaptureOptions": [{"CaptureMode": "Input"}, {"CaptureMode": "Output"}],
}


def test_a_config_with_production_and_one_shadow_variant_is_accepted():
    spec = config(
        ProductionVariants=[variant("champion", 0.9), variant("challenger", 0.1)],
        ShadowProductionVariants=[variant("shadow", 0.5)],
    )
    assert [v.VariantName for v in spec.variants] == ["champion", "challenger", "shadow"]
    assert spec.DataCaptureConfig is None


def test_more_than_one_shadow_variant_is_rejected():
    with pytest.raises(ValidationError, match="ShadowProductionVariants"):
        config(ShadowProductionVariants=[variant("s1"), variant("s2")])


def test_repeated_variant_names_across_production_and_shadow_are_rejected_by_name():
    with pytest.raises(ValidationError, match="repeated: champion"):
        config(ShadowProductionVariants=[variant("champion")])
    with pytest.raises(ValidationError, match="repeated: twin"):
        config(ProductionVariants=[variant("twin"), variant("twin"), variant("other")])


def test_a_config_whose_production_weights_are_all_zero_is_rejected():
    with pytest.raises(ValidationError, match="weight above 0"):
        config(ProductionVariants=[variant("a", 0.0), variant("b", 0.0)], ShadowProductionVariants=[variant("s")])


def test_negative_weights_and_an_empty_production_list_are_rejected():
    with pytest.raises(ValidationError):
        config(ProductionVariants=[variant("a", -1.0), variant("b", 2.0)])
    with pytest.raises(ValidationError):
        config(ProductionVariants=[])


@pytest.mark.parametrize("name", ["AllTraffic", "champion", "v1", "a-b", "a--b", "A1-b2-C3", "x" * 63])
def test_names_in_sagemakers_pattern_are_accepted(name):
    assert VariantSpec(VariantName=name, ModelName=name).VariantName == name
    assert EndpointSpec(EndpointName=name, EndpointConfigName=name).EndpointName == name


@pytest.mark.parametrize("name", ["", "-a", "a-", "my_variant", "a.b", "a b", "ünïcode", "x" * 64])
def test_names_outside_sagemakers_pattern_are_rejected(name):
    with pytest.raises(ValidationError):
        VariantSpec(VariantName=name, ModelName="m")
    with pytest.raises(ValidationError):
        EndpointSpec(EndpointName=name, EndpointConfigName="cfg")
    with pytest.raises(ValidationError):
        ModelSpec(ModelName=name, PrimaryContainer={"ModelDataUrl": "/models/m"})


@pytest.mark.parametrize(
    "container",
    [
        {"ModelDataUrl": "/models/m"},
        {"ModelDataUrl": "file:///models/m/model.tar.gz", "Environment": {"A": "1"}},
        {"ContainerUrl": "http://model:8080"},
        {"ContainerUrl": "https://model.example"},
    ],
)
def test_a_container_with_exactly_one_source_is_accepted(container):
    Container.model_validate(container)


@pytest.mark.parametrize("container", [{}, {"ModelDataUrl": "/m", "ContainerUrl": "http://m:8080"}, {"Image": "x"}])
def test_a_container_needs_exactly_one_of_model_data_url_or_container_url(container):
    with pytest.raises(ValidationError, match="exactly one of ModelDataUrl or ContainerUrl"):
        Container.model_validate(container)


def test_a_container_url_must_be_http():
    with pytest.raises(ValidationError):
        Container(ContainerUrl="ftp://model")


def test_aws_fields_the_gateway_does_not_use_are_accepted_and_ignored():
    spec = config(
        ProductionVariants=[
            {**variant("champion"), "InstanceType": "ml.g5.xlarge", "InitialInstanceCount": 2, "Tags": [{"Key": "a"}]}
        ],
        Tags=[{"Key": "team", "Value": "ml"}],
        KmsKeyId="arn:aws:kms:key",
    )
    dumped = spec.model_dump()
    assert "KmsKeyId" not in dumped
    assert set(dumped["ProductionVariants"][0]) == {"VariantName", "ModelName", "InitialVariantWeight"}
    # Tags are kept: one of them may set the endpoint's guardrail mode.
    assert dumped["Tags"] == [{"Key": "team", "Value": "ml"}] and spec.guardrails is None
    model = ModelSpec.model_validate(
        {
            "ModelName": "m",
            "ExecutionRoleArn": "arn:aws:iam::1:role/x",
            "PrimaryContainer": {"ModelDataUrl": "/m", "Mode": "SingleModel"},
        }
    )
    assert model.PrimaryContainer.ModelDataUrl == "/m"


def test_specs_are_frozen():
    spec = config()
    with pytest.raises(ValidationError):
        spec.EndpointConfigName = "other"


@pytest.mark.parametrize("percentage", [0, 1, 50, 100])
def test_capture_sampling_in_zero_to_a_hundred_is_accepted(percentage):
    spec = config(DataCaptureConfig={**CAPTURE, "InitialSamplingPercentage": percentage})
    assert spec.DataCaptureConfig.InitialSamplingPercentage == percentage


@pytest.mark.parametrize("percentage", [-1, 101, 1000])
def test_capture_sampling_outside_zero_to_a_hundred_is_rejected(percentage):
    with pytest.raises(ValidationError, match="InitialSamplingPercentage"):
        config(DataCaptureConfig={**CAPTURE, "InitialSamplingPercentage": percentage})


def test_capture_needs_at_least_one_known_capture_mode():
    with pytest.raises(ValidationError):
        CaptureSpec.model_validate({**CAPTURE, "CaptureOptions": []})
    with pytest.raises(ValidationError):
        CaptureSpec.model_validate({**CAPTURE, "CaptureOptions": [{"CaptureMode": "Everything"}]})


def test_capture_content_types_default_to_sagemakers():
    spec = CaptureSpec.model_validate(CAPTURE)
    assert spec.CaptureContentTypeHeader.JsonContentTypes == ["application/json"]
    assert spec.CaptureContentTypeHeader.CsvContentTypes == ["text/csv"]


@pytest.mark.parametrize(
    ("modes", "captures_input", "captures_output"),
    [
        (["Input"], True, False),
        (["Output"], False, True),
        (["Input", "Output"], True, True),
        (["InputAndOutput"], True, True),
    ],
)
def test_captures_says_which_sides_a_capture_config_records(modes, captures_input, captures_output):
    spec = CaptureSpec.model_validate({**CAPTURE, "CaptureOptions": [{"CaptureMode": m} for m in modes]})
    assert spec.captures("Input") is captures_input
    assert spec.captures("Output") is captures_output


def test_a_weights_update_may_name_each_variant_once():
    update = UpdateWeightsSpec.model_validate(
        {"DesiredWeightsAndCapacities": [{"VariantName": "a", "DesiredWeight": 0.5, "DesiredInstanceCount": 1}]}
    )
    assert update.DesiredWeightsAndCapacities[0].DesiredWeight == 0.5
    with pytest.raises(ValidationError, match="each variant may appear once"):
        UpdateWeightsSpec.model_validate(
            {
                "DesiredWeightsAndCapacities": [
                    {"VariantName": "a", "DesiredWeight": 0.5},
                    {"VariantName": "a", "DesiredWeight": 0.1},
                ]
            }
        )


def test_a_tag_sets_the_guardrail_mode_of_a_config():
    assert config(Tags=[{"Key": "llmops:guardrails", "Value": "block"}]).guardrails == "block"
    with pytest.raises(ValidationError, match="tag llmops:guardrails must be one of off, flag, block, got 'strict'"):
        config(Tags=[{"Key": "llmops:guardrails", "Value": "strict"}])


def test_a_model_server_inherits_no_credentials_and_none_of_the_gateways_keys():
    from serving.gateway.servers import model_server_environment

    parent = {
        "PATH": "/usr/bin",
        "HOME": "/home/llmops",
        "HF_HUB_OFFLINE": "1",
        "OPENBLAS_CORETYPE": "Haswell",
        "LLMOPS_MODELS_DIR": "/models",
        "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "AWS_SESSION_TOKEN": "token",
        "LLMOPS_GATEWAY_API_KEY": "k" * 32,
        "LLMOPS_GATEWAY_API_KEYS_FILE": "/secrets/keys",
        "AIRFLOW__CORE__FERNET_KEY": "f" * 44,
        "DATABASE_URL": "postgresql://u:p@db/x",
        "SAGEMAKER_BIND_TO_PORT": "8080",
    }
    environment = model_server_environment(
        parent, {"LLMOPS_SYSTEM_PROMPT": "Be brief."}, {"LLMOPS_MAX_NEW_TOKENS": "64"}, {"SM_MODEL_DIR": "/m"}
    )
    assert environment == {
        "PATH": "/usr/bin",
        "HOME": "/home/llmops",
        "HF_HUB_OFFLINE": "1",
        "OPENBLAS_CORETYPE": "Haswell",
        "LLMOPS_MODELS_DIR": "/models",
        "LLMOPS_SYSTEM_PROMPT": "Be brief.",
        "LLMOPS_MAX_NEW_TOKENS": "64",
        "SM_MODEL_DIR": "/m",
    }
