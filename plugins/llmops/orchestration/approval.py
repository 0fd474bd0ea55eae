"""After the gate: which of ``llm_finetune``'s last tasks run, what the approver reads, and the
promotion to ``challenger`` (announced once per run, however often it is retried)."""

from __future__ import annotations

from llmops.compat import AirflowSkipException
from llmops.contracts import GateOutcome, RegisteredCandidate
from llmops.evaluation import approval_status, promote_challenger
from llmops.finetune import FinetuneRequest
from llmops.orchestration import APPROVAL_RESPONSE_KEY, event_recorded, skip_as_done
from llmops.orchestration.context import RunContext


def route_decision(
    run: RunContext,
    request: FinetuneRequest | dict,
    registered: RegisteredCandidate | dict,
    decided: GateOutcome | dict,
    recorded: dict,
) -> list[str]:
    """The tasks ``route_decision`` follows: a fail only records its outcome; a pass is promoted,
    after a person approves it where that is required (the body they read goes to the XCom
    ``approval_body``)."""
    decided = GateOutcome.model_validate(decided)
    if not decided.decision.promote:
        return ["record_outcome"]
    if not FinetuneRequest.model_validate(request).require_approval:
        return ["promote_challenger", "record_outcome"]
    body = approval_body(run.settings.finetune.model_name, registered, decided, recorded)
    run.ti.xcom_push(key="approval_body", value=body)
    return ["await_approval", "record_outcome"]


def approval_body(
    model_name: str, registered: RegisteredCandidate | dict, decided: GateOutcome | dict, recorded: dict
) -> str:
    """What the approver reads: the version, the judge, the comparison, the gate's reasons and
    a link to the full report."""
    registered, decided = RegisteredCandidate.model_validate(registered), GateOutcome.model_validate(decided)
    link = recorded.get("report_url") or recorded["report_uri"]
    return (
        f"**{model_name} version {registered.version}** passed the gate.\n\n"
        f"Judge: {decided.judge}\n\n{decided.markdown}\n\n"
        + "\n".join(f"- {reason}" for reason in decided.decision.reasons)
        + f"\n\nFull report: {link}\n\nApprove to make it the `challenger` (rollout then shadows it). "
        "Without an answer it is rejected when the wait times out."
    )


def promote(run: RunContext, asset, request: FinetuneRequest | dict, registered: RegisteredCandidate | dict) -> dict:
    """Move the ``challenger`` alias to the registered version and announce it on ``asset``,
    unless an approval was required and not given."""

    request, registered = FinetuneRequest.model_validate(request), RegisteredCandidate.model_validate(registered)
    approval = run.ti.xcom_pull(task_ids="await_approval", key=APPROVAL_RESPONSE_KEY)
    if request.require_approval and approval_status(approval)["status"] != "approved":
        # e.g. the approval task was marked skipped or successful by hand: no answer, no promotion.
        raise AirflowSkipException("approval was required and not given")
    model_name, version = registered.model_name, registered.version
    announced = event_recorded(run.airflow, asset, model_name=model_name, version=version)
    promoted = promote_challenger(run.settings.mlflow.tracking_uri, model_name, version, approval, move=not announced)
    if announced:
        # Rollout may have moved the alias on since; this run's promotion happened once.
        skip_as_done(run.airflow, promoted, f"version {version} was made the challenger, and announced, already")
    run.airflow["outlet_events"][asset].extra = {"model_name": model_name, "version": version}
    return promoted
