"""An Amazon MWAA environment and its S3 bucket, as ``devtools.mwaa`` deploys a bundle to them.

What the environment runs and may start an update from, what the bucket holds under the
environment's paths (by the ``sha256`` metadata a deploy writes), the changes a bundle makes
there, the ``UpdateEnvironment`` request, and the wait for the update to end. boto3 clients come
in as arguments; botocore is imported only where its errors are read.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

PLUGINS_ZIP, REQUIREMENTS_TXT, STARTUP_SH = "plugins.zip", "requirements.txt", "startup.sh"

# S3 paths of include/infra/mwaa.yaml, used where the environment does not name its own.
DEFAULT_PATHS = {
    "DagS3Path": "mwaa/dags",
    "PluginsS3Path": "mwaa/plugins.zip",
    "RequirementsS3Path": "mwaa/requirements.txt",
    "StartupScriptS3Path": "mwaa/startup.sh",
}
# Bundle file -> (path field, version field) of the environment.
VERSIONED = {
    PLUGINS_ZIP: ("PluginsS3Path", "PluginsS3ObjectVersion"),
    REQUIREMENTS_TXT: ("RequirementsS3Path", "RequirementsS3ObjectVersion"),
    STARTUP_SH: ("StartupScriptS3Path", "StartupScriptS3ObjectVersion"),
}
# An update may start from these; any other status means one is under way or the environment is down.
UPDATABLE = frozenset({"AVAILABLE", "UPDATE_FAILED"})
# Statuses an environment passes through while an update is applied.
_UPDATING = frozenset({"UPDATING", "ROLLING_BACK", "CREATING_SNAPSHOT", "PENDING", "MAINTENANCE", "AVAILABLE"})
SHA256_METADATA = "sha256"


class MwaaError(RuntimeError):
    """The bundle cannot be built or deployed; the message says what to do."""


@dataclass(frozen=True)
class Change:
    name: str  # in the bundle: dags/x.py, plugins.zip
    key: str  # in the bucket
    status: str  # new | changed | unchanged | removed
    version: str | None = None  # the object's current version


def get_environment(mwaa, name: str) -> dict:
    try:
        return mwaa.get_environment(Name=name)["Environment"]
    except mwaa.exceptions.ResourceNotFoundException:
        region = mwaa.meta.region_name
        raise MwaaError(
            f"no MWAA environment {name!r} in {region}: create it with include/infra/mwaa.yaml"
            " (deploy without --environment first to upload the bundle it needs)"
        ) from None


def last_error(environment: dict) -> str:
    error = (environment.get("LastUpdate") or {}).get("Error") or {}
    if not error:
        return "MWAA gave no error"
    return f"{error.get('ErrorCode', '?')}: {error.get('ErrorMessage', '')}"


def check_environment(environment: dict, bucket: str, airflow_version: str) -> None:
    """Refuse an environment an update cannot start on, or one that reads another bucket or runs another Airflow."""
    name, status = environment["Name"], environment["Status"]
    if status not in UPDATABLE:
        raise MwaaError(
            f"environment {name} is {status}: an update can start only from AVAILABLE"
            + (" (one is under way: wait for it)" if status in _UPDATING else "")
        )
    source = environment.get("SourceBucketArn", "")
    if source.rsplit(":", 1)[-1] != bucket:
        raise MwaaError(f"environment {name} reads {source}, not bucket {bucket}")
    if environment.get("AirflowVersion") and environment["AirflowVersion"] != airflow_version:
        raise MwaaError(
            f"environment {name} runs Airflow {environment['AirflowVersion']}; the bundle targets"
            f" {airflow_version} (include/mwaa/requirements.txt's constraint)"
        )


def check_versioning(s3, bucket: str) -> None:
    from botocore.exceptions import ClientError

    try:
        status = s3.get_bucket_versioning(Bucket=bucket).get("Status")
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "NoSuchBucket":
            raise MwaaError(f"no bucket {bucket}") from None
        raise
    if status != "Enabled":
        raise MwaaError(
            f"bucket {bucket} is not versioned (versioning: {status or 'never enabled'}); MWAA runs plugins.zip,"
            " requirements.txt and startup.sh by object version (include/infra/foundation.yaml enables it)"
        )


def _remote(s3, bucket: str, key: str) -> tuple[str | None, str | None] | None:
    """(sha256 metadata, version id) of an object, or None when there is none."""
    from botocore.exceptions import ClientError

    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
            return None
        raise
    return head.get("Metadata", {}).get(SHA256_METADATA), head.get("VersionId")


def _status(local: str | None, remote: tuple[str | None, str | None] | None) -> str:
    if local is None:
        # Only what a deploy wrote (it carries the sha256) is ours to delete; another file under
        # the prefix (an .airflowignore, a colleague's DAG) stays.
        return "removed" if remote is not None and remote[0] else "foreign"
    if remote is None:
        return "new"
    return "unchanged" if remote[0] == local else "changed"


def plan_changes(s3, bucket: str, files: dict[str, str], paths: dict[str, str]) -> list[Change]:
    """What each bundle file (name -> sha256) and each DAG file in the bucket needs: the bucket's ``Change`` list."""
    changes = []
    dag_prefix = paths["DagS3Path"].strip("/") + "/"
    remote_dags = sorted(
        item["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=dag_prefix)
        for item in page.get("Contents", [])
        if not item["Key"].endswith("/")
    )
    local_dags = {name: digest for name, digest in files.items() if name.startswith("dags/")}
    for name in sorted(set(local_dags) | {"dags/" + key[len(dag_prefix) :] for key in remote_dags}):
        key = dag_prefix + name[len("dags/") :]
        remote = _remote(s3, bucket, key) if key in remote_dags else None
        changes.append(Change(name, key, _status(local_dags.get(name), remote), remote[1] if remote else None))
    for name, (path_field, _) in VERSIONED.items():
        key = paths[path_field].strip("/")
        remote = _remote(s3, bucket, key)
        changes.append(Change(name, key, _status(files[name], remote), remote[1] if remote else None))
    return changes


def update_request(environment: dict, versions: dict[str, str | None], paths: dict[str, str]) -> dict[str, Any]:
    """The ``UpdateEnvironment`` request: the object versions that differ from what the
    environment runs (a path too where the environment has none)."""
    request: dict[str, Any] = {"Name": environment["Name"]}
    for name, (path_field, version_field) in VERSIONED.items():
        if not environment.get(path_field):
            request[path_field] = paths[path_field]
        if path_field in request or environment.get(version_field) != versions[name]:
            request[version_field] = versions[name]
    return request


def wait_until_available(
    mwaa,
    name: str,
    before: datetime | None,
    *,
    timeout_s: float,
    poll_s: float,
    echo: Callable[[str], None] = print,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict:
    """Poll until the update started after ``before`` (the environment's last update time
    before it) has ended: the environment, or an ``MwaaError`` with MWAA's reason."""
    deadline = clock() + timeout_s
    started, last_status = False, None
    while True:
        environment = mwaa.get_environment(Name=name)["Environment"]
        status = environment["Status"]
        last = environment.get("LastUpdate") or {}
        # Until MWAA shows the new update, an AVAILABLE or UPDATE_FAILED is the state before it.
        started = started or last.get("CreatedAt") != before or status not in UPDATABLE
        if started:
            if status == "UPDATE_FAILED" or (status == "AVAILABLE" and last.get("Status") == "FAILED"):
                raise MwaaError(f"the update of {name} failed ({status}): {last_error(environment)}")
            if status == "AVAILABLE":
                return environment
            if status not in _UPDATING:
                raise MwaaError(f"environment {name} went {status} during the update: {last_error(environment)}")
        if clock() >= deadline:
            raise MwaaError(
                f"environment {name} is still {status} after {timeout_s / 60:g} minutes; the update goes on"
                " (watch it in the MWAA console)"
            )
        if status != last_status:
            echo(f"  {name}: {status}")
            last_status = status
        sleep(poll_s)
