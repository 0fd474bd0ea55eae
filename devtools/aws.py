"""What ``llm_finetune`` would send to AWS for one run, printed without calling AWS; and staging a
base model to the store once.

    python -m devtools.aws dry-run --backend sagemaker-trainium --dataset-version <hash>
    python -m devtools.aws stage-model smollm2-135m-instruct
"""

from __future__ import annotations

import json
import sys
from typing import Any

from llmops import storage
from llmops.backends.evaluation.sagemaker import evaluation_plan
from llmops.backends.training import ec2
from llmops.backends.training.sagemaker import BACKENDS, SageMakerRequestError, plan_job, source_bundle
from llmops.config import ConfigError, load_settings
from llmops.evaluation import models_to_evaluate
from llmops.finetune import LATEST, job_name, request_from_params
from llmops.staging import base_model_uri, stage_base_model

DRY_RUN_BACKENDS = (*BACKENDS, "ec2-trainium")


def dry_run(settings, backend: str, dataset_version: str, run_id: str, params: dict[str, Any]) -> dict:
    """What ``llm_finetune`` would send for one run, without calling AWS: the uploads, then the
    training requests of ``backend`` and, when evaluation runs on SageMaker, the Processing job."""
    from llmops.config import PROJECT_ROOT, ConfigError

    if not settings.store_uri.startswith("s3://"):
        raise ConfigError(
            f"store_uri is {settings.store_uri}: the AWS backends read their data from S3 (use LLMOPS_ENV=aws)"
        )
    if dataset_version == LATEST:
        raise ConfigError("name the dataset version (--dataset-version): a dry run does not read the store")
    request = request_from_params(settings, {**params, "backend": backend, "dataset_version": dataset_version})
    data_uri = storage.join(settings.datasets_uri(), settings.data.dataset_name, dataset_version)
    dataset = {
        "version": dataset_version,
        "files": {s: {"uri": storage.join(data_uri, f"{s}.jsonl")} for s in ("train", "validation")},
    }
    name = job_name("llm_finetune", run_id)
    lineage = {"dag_id": "llm_finetune", "run_id": run_id}
    if backend == "ec2-trainium":
        bundle = source_bundle(PROJECT_ROOT)
        image = settings.ec2.ami_id or f"(the value of SSM parameter {settings.ec2.ami_parameter})"
        plan = ec2.plan_job(settings, request, dataset, name, lineage, image, bundle.uri(settings.store_uri))
        sent = {
            "RunInstances": {"ImageId": plan["image_id"], "MinCount": 1, "MaxCount": 1, **plan["config"]},
            "SendCommand": {
                "DocumentName": "AWS-RunShellScript",
                **ec2.send_command_kwargs(
                    settings.ec2, "(the launched instance)", name, plan["commands"], plan["output_uri"]
                ),
            },
        }
        artifact = plan["artifact_uri"]
    else:
        target = getattr(settings.sagemaker, BACKENDS[backend])
        bundle = source_bundle(PROJECT_ROOT, tuple(target.requirements))
        create = plan_job(settings, request, dataset, name, lineage, bundle.uri(settings.store_uri))
        sent = {"CreateTrainingJob": create}
        artifact = storage.join(create["OutputDataConfig"]["S3OutputPath"], name, "output", "model.tar.gz")
    printed = {
        "upload": {"uri": bundle.uri(settings.store_uri), "sha256": bundle.sha256, "bytes": len(bundle.data)},
        **sent,
    }
    if settings.evaluation.backend == "sagemaker":
        models = models_to_evaluate(request.base_model_name, {"version": "new", "artifact_uri": artifact}, None)
        plan = evaluation_plan(settings, job_name("llm_finetune", run_id, prefix="llmops-eval"), models)
        printed["CreateProcessingJob"] = plan["request"]
    return printed


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m devtools.aws", description="SageMaker training jobs.")
    commands = parser.add_subparsers(dest="command", required=True)
    dry = commands.add_parser("dry-run", help="print the requests one llm_finetune run would send (nothing is sent)")
    dry.add_argument("--backend", choices=sorted(DRY_RUN_BACKENDS), default="sagemaker")
    dry.add_argument("--dataset-version", required=True, help="a curated dataset version (its hash)")
    dry.add_argument("--run-id", default="manual__dry-run", help="the Airflow run id the job name derives from")
    dry.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a hyperparameter")
    stage = commands.add_parser("stage-model", help="upload a base model to the store for the base_model channel")
    stage.add_argument("model", help="a built-in model name or a model folder")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        if args.command == "stage-model":
            from llmops.models import resolve_model
            from llmops.orchestration import storage_options_for

            uri = base_model_uri(settings.store_uri, args.model)
            folder = resolve_model(args.model, settings.models.cache_dir)
            staged = stage_base_model(folder, uri, storage_options_for(settings.store_uri, settings))
            print(f"{args.model}: {len(staged['files'])} files at {uri}")
            return 0
        params = {}
        for item in args.set:
            name, sep, value = item.partition("=")
            if not sep:
                parser.error(f"--set {item!r}: expected NAME=VALUE")
            params[name] = value
        printed = dry_run(settings, args.backend, args.dataset_version, args.run_id, params)
    except (ConfigError, SageMakerRequestError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(printed, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
