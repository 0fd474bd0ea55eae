"""The rollout plan: what ``plan_rollout`` decided and every later step of ``llm_rollout`` reads.

Pure data. It crosses XCom as ``RolloutPlan.model_dump(mode="json")`` (the dict the run's ledger
keeps too), and each step takes that dict back with ``RolloutPlan.model_validate``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VersionRef(_Frozen):
    """A registered model version, as much of it as serving needs."""

    version: str
    artifact_uri: str
    run_id: str | None = None
    base_model: str = ""


class RolloutPlan(_Frozen):
    """What a rollout run does: ``first_deploy`` (no champion yet), ``rollout`` (shadow, A/B
    steps, promote or roll back) or ``nothing``, and why."""

    model_name: str
    endpoint: str
    champion: VersionRef | None
    candidate: VersionRef | None
    action: Literal["first_deploy", "rollout", "nothing"]
    reason: str
