"""What a rollout run does: ``first_deploy`` (no champion yet), ``rollout`` (shadow, A/B steps,
promote or roll back) or ``nothing``, from the registry's ``champion`` and ``challenger`` aliases."""

from __future__ import annotations

from collections.abc import Callable

from llmops.backends.endpoints.base import DeploymentError, DeploymentRejected
from llmops.config import Settings
from llmops.rollout.contracts import RolloutPlan, VersionRef
from llmops.rollout.ledger import finished_phase, record_phase
from llmops.tracking import CHALLENGER, CHAMPION, client


def version_info(version) -> VersionRef:
    artifact = version.tags.get("training.artifact_uri")
    if not artifact:
        raise DeploymentError(f"model version {version.version} has no training.artifact_uri tag: it cannot be served")
    return VersionRef(
        version=str(version.version),
        artifact_uri=artifact,
        run_id=version.run_id,
        base_model=version.tags.get("base_model", ""),
    )


def plan_rollout(
    settings: Settings, requested_version: str | None, run_key: str | None = None, log: Callable[[str], None] = print
) -> dict:
    """What this rollout does: ``first_deploy`` (no champion yet), ``rollout`` (shadow, A/B,
    promote or roll back) or ``nothing`` (with the reason), as XCom carries it (a ``RolloutPlan``'s
    JSON dict). With the run's key, a finished rollout's plan is the one it made (see
    ``finished_phase``)."""
    if run_key is not None and (done := finished_phase(settings, run_key, "plan_rollout", log)) is not None:
        return done
    plan = build_plan(settings, requested_version).model_dump(mode="json")
    return record_phase(settings, run_key, "plan_rollout", plan) if run_key is not None else plan


def build_plan(settings: Settings, requested_version: str | None) -> RolloutPlan:
    from mlflow.exceptions import MlflowException

    mlflow_client = client(settings.mlflow.tracking_uri)
    name = settings.finetune.model_name

    def by_alias(alias: str):
        try:
            return mlflow_client.get_model_version_by_alias(name, alias)
        except MlflowException:
            return None

    champion = by_alias(CHAMPION)
    if requested_version:
        try:
            candidate = mlflow_client.get_model_version(name, str(requested_version))
        except MlflowException:
            raise DeploymentRejected(f"{name} has no version {requested_version}") from None
    else:
        candidate = by_alias(CHALLENGER)
    served = {
        "model_name": name,
        "endpoint": settings.serving.endpoint_name,
        "champion": version_info(champion) if champion is not None else None,
    }
    if candidate is None:
        return RolloutPlan(
            **served,
            candidate=None,
            action="nothing",
            reason=f"{name} has no {CHALLENGER} and no version was asked for",
        )
    served["candidate"] = version_info(candidate)
    if champion is not None and str(champion.version) == str(candidate.version):
        return RolloutPlan(**served, action="nothing", reason=f"version {candidate.version} already is the {CHAMPION}")
    if champion is None:
        return RolloutPlan(
            **served, action="first_deploy", reason=f"no {CHAMPION} yet: version {candidate.version} becomes it"
        )
    return RolloutPlan(
        **served,
        action="rollout",
        reason=f"version {candidate.version} challenges {CHAMPION} version {champion.version}",
    )


def current_champion(settings: Settings) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        version = client(settings.mlflow.tracking_uri).get_model_version_by_alias(
            settings.finetune.model_name, CHAMPION
        )
    except MlflowException:
        return None
    return str(version.version)
