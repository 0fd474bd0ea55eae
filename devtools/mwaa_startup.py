"""``startup.sh`` of an Amazon MWAA bundle: the variables ``include/config/aws.yaml`` reads, their
values from the foundation stack's outputs and ``--set``, checked (no secret, no password in a
URI, no loopback address) and rendered as exports next to the fixed ones. ``devtools.mwaa``
packages what this renders.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit

from devtools.mwaa_environment import MwaaError
from llmops.config import INCLUDE_DIR

MWAA_PLUGINS_DIR = "/usr/local/airflow/plugins"

# Set by startup.sh itself, or by MWAA (a startup script may not change AWS_DEFAULT_REGION).
_SET_BY_STARTUP = frozenset({"LLMOPS_ENV", "LLMOPS_PROJECT_ROOT", "LLMOPS_HOME", "LLMOPS_MODELS_DIR", "LLMOPS_GIT_SHA"})
_MWAA_PROTECTED = frozenset({"AWS_DEFAULT_REGION", "AWS_REGION", "PYTHONPATH", "AIRFLOW_HOME", "AIRFLOW_VERSION"})
_SECRET_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|PRIVATE|CREDENTIAL", re.IGNORECASE)
_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-)?")
_LOOPBACK = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}  # nosec B104 - hosts a URL may not name; nothing binds

# The foundation stack's outputs (include/infra/foundation.yaml) -> startup variables.
STACK_OUTPUTS = {
    "BucketName": "LLMOPS_S3_BUCKET",
    "SageMakerRoleArn": "LLMOPS_SAGEMAKER_ROLE_ARN",
    "TrainiumInstanceProfileName": "LLMOPS_EC2_INSTANCE_PROFILE",
    "MlflowTrackingServerArn": "MLFLOW_TRACKING_URI",
}


def config_variables(path: Path | None = None) -> dict[str, bool]:
    """The environment variables ``include/config/aws.yaml`` reads, each with whether it is
    required (referenced without a default)."""
    path = path or INCLUDE_DIR / "config" / "aws.yaml"
    found: dict[str, bool] = {}
    for name, default in _REFERENCE.findall(path.read_text(encoding="utf-8")):
        found[name] = found.get(name, False) or not default
    return found


def startup_names(path: Path | None = None) -> dict[str, bool]:
    """The variables startup.sh carries values for (name -> required)."""
    return {
        name: required
        for name, required in config_variables(path).items()
        if name not in _SET_BY_STARTUP and name not in _MWAA_PROTECTED
    }


def _check_value(name: str, value: str) -> None:
    if _SECRET_NAME.search(name):
        raise MwaaError(f"{name} looks like a secret: secrets go in Airflow connections, never in startup.sh")
    if any(ch in value for ch in "\n\r\0"):
        raise MwaaError(f"{name}: the value holds a line break or NUL")
    if "://" in value:
        parts = urlsplit(value)
        if parts.password:
            raise MwaaError(f"{name} holds a password in its URI: give it through an Airflow connection instead")
        if parts.hostname in _LOOPBACK:
            raise MwaaError(f"{name}={value} points at this machine, which MWAA cannot reach")


def resolve_startup_values(
    sets: dict[str, str], stack: dict[str, str] | None = None, config: Path | None = None
) -> dict[str, str]:
    """The startup variables' values: the stack's outputs, then ``sets``; unknown names,
    missing required ones and secrets are refused."""
    names = startup_names(config)
    unknown = sorted(set(sets) - set(names))
    if unknown:
        raise MwaaError(
            f"{', '.join(unknown)}: not a variable include/config/aws.yaml reads (it reads: {', '.join(sorted(names))})"
        )
    values = {k: v for k, v in {**(stack or {}), **sets}.items() if k in names and v != ""}
    missing = sorted(name for name, required in names.items() if required and name not in values)
    if missing:
        raise MwaaError(
            f"startup.sh needs {', '.join(missing)}: give --from-stack <foundation stack> or --set NAME=VALUE"
        )
    for name, value in values.items():
        _check_value(name, value)
    return dict(sorted(values.items()))


def render_startup(values: dict[str, str], git_sha: str) -> str:
    fixed = {
        "LLMOPS_ENV": "aws",
        "LLMOPS_PROJECT_ROOT": MWAA_PLUGINS_DIR,
        "LLMOPS_HOME": "/tmp/llmops",  # nosec B108 - the one folder MWAA workers may write
        "LLMOPS_MODELS_DIR": "/tmp/llmops/models",  # nosec B108 - the one folder MWAA workers may write
        "LLMOPS_GIT_SHA": git_sha,
    }
    lines = [
        "#!/bin/bash",
        "# Amazon MWAA startup script, written by `python -m devtools.mwaa package` (make mwaa-package):",
        "# change include/config/aws.yaml or the package command's values, not this file.",
        "# MWAA runs it before each scheduler, worker and web server starts and hands what it exports",
        "# to Airflow. No secrets: AWS credentials come from the execution role, others from Airflow",
        "# connections.",
    ]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in {**fixed, **values}.items()]
    return "\n".join(lines) + "\n"


def stack_values(cloudformation, stack_name: str) -> dict[str, str]:
    """Startup values from the foundation stack's outputs (``describe_stacks``)."""
    from botocore.exceptions import ClientError

    try:
        stacks = cloudformation.describe_stacks(StackName=stack_name)["Stacks"]
    except ClientError as exc:
        if "does not exist" in str(exc):
            raise MwaaError(
                f"no CloudFormation stack {stack_name!r}: deploy include/infra/foundation.yaml first"
            ) from None
        raise
    stack = stacks[0]
    if not stack["StackStatus"].endswith("_COMPLETE") or "ROLLBACK" in stack["StackStatus"]:
        raise MwaaError(f"stack {stack_name} is {stack['StackStatus']}: wait for it to be CREATE_ or UPDATE_COMPLETE")
    outputs = {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}
    values = {variable: outputs[key] for key, variable in STACK_OUTPUTS.items() if outputs.get(key)}
    if store := outputs.get("StoreUri"):
        prefix = urlsplit(store).path.strip("/")
        if prefix:
            values["LLMOPS_S3_PREFIX"] = prefix
    return values


def stack_bucket(cloudformation, stack_name: str) -> str:
    bucket = stack_values(cloudformation, stack_name).get("LLMOPS_S3_BUCKET")
    if not bucket:
        raise MwaaError(f"stack {stack_name} has no BucketName output")
    return bucket
