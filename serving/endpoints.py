"""Models, endpoint configs and endpoints of the local gateway, with SageMaker's field names.

The request bodies of the gateway's control API are the SageMaker API's own
(``CreateModel``, ``CreateEndpointConfig``, ``CreateEndpoint``, ``UpdateEndpoint``,
``UpdateEndpointWeightsAndCapacities``), so the code that builds them serves both backends. The
local gateway reads the subset it needs and ignores instance types and counts.

Routing is a pure function of the variants' weights and a random draw, as on SageMaker: a
request goes to a production variant with probability weight / sum of weights, or to the variant
it names (``TargetVariant``). A shadow variant receives a mirrored copy of a share of the
requests: its weight over the production variants' total weight, capped at 1.

An endpoint config's ``Tags`` may set its guardrail mode (``serving.guardrails``): the tag
``llmops:guardrails`` with ``off``, ``flag`` or ``block``; without it the gateway's default applies.
The tag ``llmops:capture-pii`` says what data capture keeps: ``redact`` (the default: personal
data scrubbed from prompts and answers before they are written) or ``raw`` (as sent; the records
say so).
"""

from __future__ import annotations

import random
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serving.guardrails import MODES, TAG

CAPTURE_PII_TAG = "llmops:capture-pii"
CAPTURE_PII_MODES = ("redact", "raw")

NAME = r"^[a-zA-Z0-9](-*[a-zA-Z0-9])*$"  # SageMaker's pattern for model, config, endpoint and variant names


class _Shape(BaseModel):
    # Fields of the AWS API this gateway does not use (InstanceType, Tags, ...) are accepted and ignored.
    model_config = ConfigDict(extra="ignore", frozen=True)


class Container(_Shape):
    """Where a model's server comes from: a model artifact the gateway serves with ``serving.app``
    (``ModelDataUrl``: a folder, a ``model.tar.gz``, or a ``file://`` URI of either), or a server
    that already runs (``ContainerUrl``, a local extension: e.g. a docker-compose service)."""

    ModelDataUrl: str | None = None
    ContainerUrl: str | None = Field(None, pattern=r"^https?://")
    Environment: dict[str, str] = Field(default_factory=dict)
    Image: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Container:
        if (self.ModelDataUrl is None) == (self.ContainerUrl is None):
            raise ValueError("a container needs exactly one of ModelDataUrl or ContainerUrl")
        return self


class ModelSpec(_Shape):
    ModelName: str = Field(pattern=NAME, max_length=63)
    PrimaryContainer: Container


class VariantSpec(_Shape):
    VariantName: str = Field(pattern=NAME, max_length=63)
    ModelName: str = Field(pattern=NAME, max_length=63)
    InitialVariantWeight: float = Field(1.0, ge=0)


class CaptureOptionSpec(_Shape):
    CaptureMode: Literal["Input", "Output", "InputAndOutput"]


class CaptureHeaders(_Shape):
    JsonContentTypes: list[str] = Field(default_factory=lambda: ["application/json"])
    CsvContentTypes: list[str] = Field(default_factory=lambda: ["text/csv"])


class CaptureSpec(_Shape):
    EnableCapture: bool = True
    InitialSamplingPercentage: int = Field(ge=0, le=100)
    DestinationS3Uri: str = Field(min_length=1, max_length=512)
    CaptureOptions: list[CaptureOptionSpec] = Field(min_length=1, max_length=32)
    CaptureContentTypeHeader: CaptureHeaders = Field(default_factory=CaptureHeaders)

    def captures(self, mode: Literal["Input", "Output"]) -> bool:
        return any(o.CaptureMode in (mode, "InputAndOutput") for o in self.CaptureOptions)


class TagSpec(_Shape):
    Key: str = Field(min_length=1, max_length=128)
    Value: str = Field("", max_length=256)


class EndpointConfigSpec(_Shape):
    EndpointConfigName: str = Field(pattern=NAME, max_length=63)
    ProductionVariants: list[VariantSpec] = Field(min_length=1, max_length=10)
    ShadowProductionVariants: list[VariantSpec] = Field(default_factory=list, max_length=1)
    DataCaptureConfig: CaptureSpec | None = None
    Tags: list[TagSpec] = Field(default_factory=list, max_length=50)

    @field_validator("Tags")
    @classmethod
    def _guardrail_tag(cls, tags: list[TagSpec]) -> list[TagSpec]:
        for tag in tags:
            if tag.Key == TAG and tag.Value not in MODES:
                raise ValueError(f"tag {TAG} must be one of {', '.join(MODES)}, got {tag.Value!r}")
            if tag.Key == CAPTURE_PII_TAG and tag.Value not in CAPTURE_PII_MODES:
                raise ValueError(
                    f"tag {CAPTURE_PII_TAG} must be one of {', '.join(CAPTURE_PII_MODES)}, got {tag.Value!r}"
                )
        return tags

    @property
    def capture_pii(self) -> str:
        """What capture keeps of personal data: ``redact`` unless the config's tag says ``raw``."""
        return next((tag.Value for tag in self.Tags if tag.Key == CAPTURE_PII_TAG), "redact")

    @property
    def guardrails(self) -> str | None:
        """The guardrail mode this config asks for, or None (the gateway's default)."""
        return next((tag.Value for tag in self.Tags if tag.Key == TAG), None)

    @model_validator(mode="after")
    def _names_unique_and_some_traffic(self) -> EndpointConfigSpec:
        names = [v.VariantName for v in (*self.ProductionVariants, *self.ShadowProductionVariants)]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"variant names must be unique; repeated: {', '.join(duplicated)}")
        if sum(v.InitialVariantWeight for v in self.ProductionVariants) <= 0:
            raise ValueError("at least one production variant needs a weight above 0")
        return self

    @property
    def variants(self) -> list[VariantSpec]:
        return [*self.ProductionVariants, *self.ShadowProductionVariants]


class EndpointSpec(_Shape):
    EndpointName: str = Field(pattern=NAME, max_length=63)
    EndpointConfigName: str = Field(pattern=NAME, max_length=63)


class UpdateEndpointSpec(_Shape):
    EndpointConfigName: str = Field(pattern=NAME, max_length=63)


class DesiredWeight(_Shape):
    VariantName: str = Field(pattern=NAME, max_length=63)
    DesiredWeight: float = Field(ge=0)


class UpdateWeightsSpec(_Shape):
    DesiredWeightsAndCapacities: list[DesiredWeight] = Field(min_length=1)

    @field_validator("DesiredWeightsAndCapacities")
    @classmethod
    def _unique(cls, value: list[DesiredWeight]) -> list[DesiredWeight]:
        names = [w.VariantName for w in value]
        if len(set(names)) != len(names):
            raise ValueError("each variant may appear once")
        return value


class RoutingError(ValueError):
    """The request cannot be routed (unknown target variant, no variant with traffic)."""


def choose_variant(weights: dict[str, float], target: str | None = None, rng: random.Random | None = None) -> str:
    """The production variant that serves a request: ``target`` when given (it must exist), else
    one drawn with probability proportional to its weight."""
    if target is not None:
        if target not in weights:
            raise RoutingError(
                f"the target variant {target!r} is not a production variant of this endpoint"
                f" (variants: {', '.join(weights)})"
            )
        return target
    total = sum(weights.values())
    if total <= 0:
        raise RoutingError("no production variant of this endpoint has a traffic weight above 0")
    draw = (rng or random).random() * total
    for name, weight in weights.items():
        draw -= weight
        if draw < 0 and weight > 0:
            return name
    return next(name for name, weight in reversed(weights.items()) if weight > 0)


def shadow_share(production_weights: dict[str, float], shadow_weight: float) -> float:
    """The fraction of requests mirrored to the shadow variant."""
    total = sum(production_weights.values())
    return 0.0 if total <= 0 else min(1.0, shadow_weight / total)
