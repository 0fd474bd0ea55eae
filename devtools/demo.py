"""The one-command demo: run the pipeline's DAGs on the embedded stack and say where things are.

    make demo          # or: python -m devtools.demo

It converts the base models on first use, prepares Airflow's SQLite database under
``.llmops/airflow``, runs ``llm_data_prep`` on the bundled corpus with ``dag.test()`` and prints
the dataset version, its manifest and the Data Docs; then runs ``llm_finetune`` (LoRA on
SmolLM2-135M-Instruct, a few minutes on a laptop CPU), which evaluates the candidate against the
base model (and the champion, once there is one) and gates it, and prints the held-out loss
before and after, the registered MLflow model version, the comparison table with confidence
intervals, the gate's verdict with its reasons, and where the HTML report is. Finally it starts
the local endpoint gateway (it keeps running; ``make down`` stops it) and runs ``llm_rollout``: the
first run deploys the candidate as the champion; a later run takes the new challenger through
shadow and A/B traffic steps to promotion or rollback, and shows how to call the endpoint with
curl and boto3. Last, drift monitoring: it sends in-domain prompts (held-out ones from the curated
dataset) through the endpoint and runs ``llm_drift_monitor`` on that window (no alarm), then
everyday off-domain questions (drift: a report in MLflow, and an ``llm_finetune`` run queued with
the reason in its conf; ``make up`` runs it).
"""

from __future__ import annotations

import json
import sys

from devtools import traffic
from devtools.localstack import (
    GATEWAY_INVOKE_KEY_FILE,
    INVOKE_KEY_ENV,
    apply_environment,
    gateway_invoke_key,
    migrate_db,
    up,
)
from llmops import storage
from llmops.config import get_settings
from llmops.models import bootstrap
from llmops.rollout.policy import step_label


def return_value(dag_run, task_id: str, key: str = "return_value"):
    """What a task of a finished run returned (its ``return_value`` XCom, or another key's)."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = (
            session.query(XComModel)
            .filter_by(dag_id=dag_run.dag_id, run_id=dag_run.run_id, task_id=task_id, key=key)
            .one_or_none()
        )
        return XComModel.deserialize_value(row) if row is not None else None


def run_dag(dag_id: str, conf: dict | None = None):
    """Run one DAG of ``dags/`` to completion in this process; return its DagRun."""
    from airflow.dag_processing.dagbag import DagBag

    from llmops.config import PROJECT_ROOT

    bag = DagBag(dag_folder=str(PROJECT_ROOT / "dags" / f"{dag_id}.py"))
    if bag.import_errors:
        raise RuntimeError(f"{dag_id} failed to import: {bag.import_errors}")
    return bag.dags[dag_id].test(run_conf=conf or {})


def main() -> int:
    env = apply_environment()

    settings = get_settings()
    print("Preparing base models (converted once, then cached)...", flush=True)
    for name, folder in bootstrap(settings.models.cache_dir).items():
        print(f"  {name}: {folder}")
    print("Preparing Airflow's database...", flush=True)
    migrate_db(env)

    print("Running llm_data_prep on the bundled corpus...", flush=True)
    dag_run = run_dag("llm_data_prep")
    if dag_run.state != "success":
        print(f"llm_data_prep ended in state {dag_run.state}; see the task logs above.", file=sys.stderr)
        return 1
    published = return_value(dag_run, "publish_version")

    manifest = storage.read_json(published["manifest_uri"])
    counts = manifest["counts"]
    print()
    print("Curated dataset" + (" (new version)" if published["created"] else " (unchanged: this version existed)"))
    print(f"  name:          {published['name']}")
    print(f"  version:       {published['version']}")
    print(f"  location:      {published['uri']}")
    print(f"  manifest:      {published['manifest_uri']}")
    print(f"  records:       train {counts['train']}, validation {counts['validation']}, test {counts['test']}")
    validation = manifest["validation"]
    print(
        f"  validation:    {'passed' if validation['success'] else 'FAILED'} "
        f"({validation['evaluated_expectations']} expectations, suite {validation['suite']})"
    )
    print(f"  result:        {validation['result_uri']}")
    print(f"  Data Docs:     {validation['data_docs_uri']}")
    pii = manifest["stages"]["scrub_pii"]["replaced"]
    if pii:
        print(f"  PII scrubbed:  {', '.join(f'{k} {v}' for k, v in pii.items())}")

    print("\nRunning llm_finetune (LoRA on the curated dataset)...", flush=True)
    dag_run = run_dag("llm_finetune", {"dataset_version": published["version"], "force": True})
    if dag_run.state != "success":
        print(f"llm_finetune ended in state {dag_run.state}; see the task logs above.", file=sys.stderr)
        return 1
    registered = return_value(dag_run, "register_model")
    metrics = registered["metrics"]
    print()
    print("Fine-tuned model")
    print(
        f"  held-out loss: {metrics['eval_loss_before']:.3f} before -> {metrics['eval_loss']:.3f} after "
        f"({metrics['global_step']} steps, {metrics['train_wall_seconds']:.0f}s)"
    )
    print(f"  registered:    {registered['model_name']} version {registered['version']}")
    print(f"  MLflow run:    {registered['run_id']}")
    print(f"  model files:   {registered['source']}")

    decided = return_value(dag_run, "decide_promotion")
    recorded = return_value(dag_run, "record_evaluation")
    outcome = return_value(dag_run, "record_outcome")
    evaluation = return_value(dag_run, "evaluate_models")
    print()
    print(
        f"Evaluation of {len(evaluation['models'])} models on {evaluation['summary']['items']} items "
        "(a sample of the test split and the evaluation catalog)"
    )
    print(f"  judge: {decided['judge']}")
    print(decided["table"])
    print()
    print(f"Gate: {decided['decision']['verdict'].upper()}")
    for reason in decided["decision"]["reasons"]:
        print(f"  - {reason}")
    print(f"Outcome:         {outcome['outcome'] if outcome else 'not recorded'}")
    print(f"Report:          {recorded['report_url'] or recorded['report_uri']}")
    print("                 (make up, then open it; it is linked from the model version's page)")
    print(f"Tracking:        {settings.mlflow.tracking_uri}")
    if not (outcome or {}).get("outcome", "").startswith("promoted"):
        print("\nNo new challenger: nothing to roll out.")
        return 0
    return rollout(settings)


def rollout(settings) -> int:

    print("\nStarting the local endpoint gateway (it keeps running; `make down` stops it)...", flush=True)
    if up(components=("gateway",)) != 0:
        return 1
    print("Running llm_rollout...", flush=True)
    dag_run = run_dag("llm_rollout")
    plan = return_value(dag_run, "plan_rollout")
    if dag_run.state != "success":
        print(f"llm_rollout ended in state {dag_run.state}; see the task logs above.", file=sys.stderr)
        return 1
    print()
    print(f"Rollout: {plan['reason'] if plan else 'nothing to roll out'}")
    shadow = return_value(dag_run, "compare_shadow")
    if shadow:
        c = shadow["comparison"]
        print(f"  shadow:        {shadow['decision']['verdict'].upper()} on {c['pairs']} paired answers")
        for reason in shadow["decision"]["reasons"]:
            print(f"                 - {reason}")

    for share in settings.serving.policy().traffic_steps:
        step = return_value(dag_run, f"shift_traffic_{step_label(share)}")
        if step:
            print(f"  {step['label']:>5} traffic: {step['decision']['verdict'].upper()}")
            for reason in step["decision"]["reasons"]:
                print(f"                 - {reason}")
    promoted, rolled_back = return_value(dag_run, "promote"), return_value(dag_run, "roll_back")
    if promoted:
        print(f"  outcome:       version {promoted['champion']} is the champion")
    if rolled_back:
        print(f"  outcome:       version {rolled_back['rolled_back']} rolled back; the champion keeps serving")
    url, endpoint = settings.serving.gateway_url, settings.serving.endpoint_name
    print()
    print(f"Endpoint {endpoint} on the local gateway {url}. It takes the API key in {key_reference()}; with curl:")
    body = json.dumps({"inputs": "How do I reverse a list in Python?", "parameters": {"max_new_tokens": 64}})
    print(
        f'  curl -s {url}/endpoints/{endpoint}/invocations -H "x-api-key: {key_reference(for_shell=True)}"'
        f" -H 'Content-Type: application/json' -d '{body}'"
    )
    print("With boto3 (any AWS credentials: the gateway checks the API key, not signatures):")
    print(
        "  import boto3, json, os\n"
        f"  runtime = boto3.client('sagemaker-runtime', endpoint_url='{url}', region_name='us-east-1',\n"
        "                         aws_access_key_id='x', aws_secret_access_key='x')\n"
        f"  key = {key_reference(python=True)}\n"
        "  runtime.meta.events.register('before-sign.sagemaker-runtime.*',\n"
        "                               lambda request, **_: request.headers.__setitem__('x-api-key', key))\n"
        f"  r = runtime.invoke_endpoint(EndpointName='{endpoint}', ContentType='application/json',\n"
        "                             Body=json.dumps({'inputs': 'What does len() do?'}))\n"
        "  print(r['InvokedProductionVariant'], json.loads(r['Body'].read())['generated_text'])"
    )
    print(f"  captured traffic: {settings.serving.capture_uri}")
    return monitor(settings)


def key_reference(for_shell: bool = False, python: bool = False) -> str:
    """Where a caller's API key is, as a reader would fetch it (never the key itself): the ``invoke``
    key ``make up`` made (it calls models, nothing else), or ``LLMOPS_GATEWAY_INVOKE_KEY`` when the
    key is one of the user's own."""
    import os
    from pathlib import Path

    home = Path(os.environ["LLMOPS_HOME"])
    made = gateway_invoke_key(home)
    if made is not None and os.environ.get(INVOKE_KEY_ENV) in (None, "", made):
        path = home / "secrets" / GATEWAY_INVOKE_KEY_FILE
        if python:
            return f"open('{path}').read().strip()"
        return f"$(cat {path})" if for_shell else str(path)
    if python:
        return f"os.environ['{INVOKE_KEY_ENV}']"
    return f"${INVOKE_KEY_ENV}" if for_shell else INVOKE_KEY_ENV


def monitor(settings, count: int = 60) -> int:
    """Two windows of traffic through the endpoint, each analysed by llm_drift_monitor."""

    for kind in ("in-domain", "off-domain"):
        print(f"\nSending {count} {kind} prompts through the endpoint...", flush=True)
        sent = traffic.send(settings, traffic.prompts_of(settings, kind, count), log=lambda line: None)
        print(f"  {sent['ok']} answered, {sent['failed']} failed")
        print(f"Running llm_drift_monitor on [{sent['start']}, {sent['end']})...", flush=True)
        dag_run = run_dag("llm_drift_monitor", {"window_start": sent["start"], "window_end": sent["end"]})
        if dag_run.state != "success":
            print(f"llm_drift_monitor ended in state {dag_run.state}; see the task logs above.", file=sys.stderr)
            return 1
        analysis, recorded = return_value(dag_run, "analyze_window"), return_value(dag_run, "record_report")
        print(f"Drift ({kind} traffic): {analysis['verdict'].upper()} on {analysis['records']} calls")
        for check in analysis["checks"]:
            mark = "BREACH" if check["status"] == "breach" else check["status"]
            print(f"  {check['name']:>15}: {mark:<7} {check['summary']}")
        print(f"  report:        {recorded['report_url'] or analysis['folder'] + '/report.html'}")
        from airflow.models import DagRun

        decision = return_value(dag_run, "decide_retraining", key="decision") or {}
        requested = DagRun.find(dag_id="llm_finetune", run_id=decision.get("run_id")) if decision.get("trigger") else []
        if requested:
            run = requested[0]
            print(f"  retraining:    llm_finetune run {run.run_id} ({run.state}; `make up` runs it), conf:")
            print(f"                 {json.dumps(run.conf)[:600]}")
        else:
            print(f"  retraining:    not requested ({decision.get('reason', 'no decision')[:300]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
