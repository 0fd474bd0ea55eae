"""AWS on loopback for tests: a moto server, the environment that points boto3 and the Airflow AWS
connection at it, and a SageMaker training emulator.

moto accepts ``CreateTrainingJob`` and reports the job Completed at once, without running
anything. ``emulated_training`` makes it run the job the way SageMaker would: it downloads the
request's channels and source bundle from (moto's) S3, writes ``hyperparameters.json`` as SageMaker
does, starts the bundle's entry point with the toolkit's ``--name value`` flags and only the bundle
on ``PYTHONPATH``, reads the metric lines with the request's ``MetricDefinitions``, and uploads
``model.tar.gz`` to ``<S3OutputPath>/<job>/output/``. The job is InProgress meanwhile, then
Completed with its metrics and times, or Failed with the log's tail as ``FailureReason``.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path

REGION = "us-east-1"


@contextmanager
def moto_server() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def aws_env(url: str) -> dict[str, str]:
    """boto3 clients (``AWS_ENDPOINT_URL``) and the Airflow connection ``aws_default`` at ``url``."""
    connection = {
        "conn_type": "aws",
        "login": "testing",
        "password": "testing",
        "extra": {"region_name": REGION, "endpoint_url": url},
    }
    return {
        "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(connection),
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
    }


def client(service: str, url: str):
    import boto3

    return boto3.client(
        service, endpoint_url=url, region_name=REGION, aws_access_key_id="testing", aws_secret_access_key="testing"
    )


def toolkit_argv(hyperparameters: dict[str, str]) -> list[str]:
    """The arguments sagemaker-training-toolkit gives the entry point: each value JSON-decoded when
    it can be (``environment.read_hyperparameters``), ``sagemaker_*`` keys left out, then sorted
    ``--key str(value)`` (``mapping.to_cmd_args``)."""
    decoded = {}
    for key, value in hyperparameters.items():
        try:
            decoded[key] = json.loads(value)
        except (ValueError, TypeError):
            decoded[key] = value
    return [
        arg for key in sorted(decoded) if not key.startswith("sagemaker_") for arg in (f"--{key}", str(decoded[key]))
    ]


def _split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def _download_prefix(s3, uri: str, target: Path) -> None:
    bucket, prefix = _split(uri)
    keys = [
        item["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for item in page.get("Contents", [])
    ]
    if not keys:
        raise FileNotFoundError(f"no S3 object under {uri}")
    for key in keys:
        relative = key[len(prefix) :].lstrip("/") or key.rsplit("/", 1)[-1]
        path = target / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(s3.get_object(Bucket=bucket, Key=key)["Body"].read())


class TrainingEmulator:
    def __init__(self, url: str, work_dir: Path, timeout: float = 600):
        self.url, self.work_dir, self.timeout = url, work_dir, timeout
        self.threads: list[threading.Thread] = []
        self.requests: dict[str, dict] = {}

    def start(self, job, request: dict) -> None:
        self.requests[request["TrainingJobName"]] = request
        job.training_job_status = job.secondary_status = "InProgress"
        job.training_end_time = None
        thread = threading.Thread(target=self._run, args=(job, request), daemon=True)
        thread.start()
        self.threads.append(thread)

    def wait(self) -> None:
        for thread in self.threads:
            thread.join(self.timeout)

    @staticmethod
    def _transition(job, status: str, message: str) -> None:
        """SageMaker's SecondaryStatusTransitions: the provider's hook notices a job's end by them."""
        now = datetime.now(UTC)
        if job.secondary_status_transitions:
            job.secondary_status_transitions[-1]["EndTime"] = now
        job.secondary_status_transitions.append({"Status": status, "StartTime": now, "StatusMessage": message})
        job.secondary_status = status

    def _run(self, job, request: dict) -> None:
        self._transition(job, "Training", "Training image download completed. Training in progress.")
        started = time.monotonic()
        try:
            metrics, failure = self._train(request)
        except Exception as exc:  # an emulator fault shows as the job's failure, never a hang
            metrics, failure = {}, f"InternalServerError: {type(exc).__name__}: {exc}"
        seconds = int(time.monotonic() - started) + 1
        job.training_time_in_seconds = seconds
        job.billable_time_in_seconds = max(1, seconds // 3) if request.get("EnableManagedSpotTraining") else seconds
        job.training_end_time = datetime.now(UTC)
        now = datetime.now(UTC)
        job.final_metric_data_list = [{"MetricName": k, "Value": v, "Timestamp": now} for k, v in metrics.items()]
        self._end(job, request["TrainingJobName"], failure)

    def _end(self, job, name: str, failure: str | None) -> None:
        """The job's final status."""
        if failure:
            job.failure_reason = failure[-1024:]
            self._transition(job, "Failed", f"Training job failed. {job.failure_reason}")
            job.training_job_status = "Failed"
        else:
            self._transition(job, "Completed", "Training job completed")
            job.training_job_status = "Completed"

    def _train(self, request: dict) -> tuple[dict, str | None]:
        s3 = client("s3", self.url)
        name = request["TrainingJobName"]
        root = self.work_dir / name
        hyperparameters = request["HyperParameters"]
        for channel in request["InputDataConfig"]:
            target = root / "input" / "data" / channel["ChannelName"]
            _download_prefix(s3, channel["DataSource"]["S3DataSource"]["S3Uri"], target)
        code = root / "code"
        bucket, key = _split(hyperparameters["sagemaker_submit_directory"])
        with tarfile.open(fileobj=io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read())) as tar:
            tar.extractall(code, filter="data")
        (root / "input" / "config").mkdir(parents=True, exist_ok=True)
        (root / "input" / "config" / "hyperparameters.json").write_text(json.dumps(hyperparameters))
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(root),
            **request.get("Environment", {}),
            "SM_INPUT_CONFIG_DIR": str(root / "input" / "config"),
            "SM_MODEL_DIR": str(root / "model"),
            "SM_OUTPUT_DATA_DIR": str(root / "output" / "data"),
            "SM_TRAINING_JOB_NAME": name,
            "LLMOPS_CHECKPOINT_DIR": str(root / "checkpoints"),
            "PYTHONPATH": str(code),  # the bundle alone: it must be complete
            "OMP_NUM_THREADS": "1",
        }
        env.update(
            {
                f"SM_CHANNEL_{c['ChannelName'].upper()}": str(root / "input" / "data" / c["ChannelName"])
                for c in request["InputDataConfig"]
            }
        )
        command = [sys.executable, hyperparameters["sagemaker_program"], *toolkit_argv(hyperparameters)]
        if hyperparameters.get("sagemaker_torch_distributed_enabled") == "true":
            # The toolkit starts torchrun, a process per accelerator (2 NeuronCores on ml.trn1.2xlarge).
            command[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        done = subprocess.run(
            command,
            cwd=code,
            env=env,
            capture_output=True,
            text=True,
            timeout=self.timeout,
        )
        (root / "training.log").write_text(done.stdout + done.stderr)
        metrics = {}
        for definition in request["AlgorithmSpecification"].get("MetricDefinitions", []):
            values = re.findall(definition["Regex"], done.stdout, re.MULTILINE)
            if values:
                metrics[definition["Name"]] = float(values[-1])
        if done.returncode != 0:
            tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-5:])
            return metrics, f"AlgorithmError: ExecuteUserScriptError: exit code {done.returncode}: {tail}"
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for path in sorted((root / "model").iterdir()):
                tar.add(path, arcname=path.name)
        out_bucket, out_prefix = _split(request["OutputDataConfig"]["S3OutputPath"])
        artifact_key = "/".join(p for p in (out_prefix.rstrip("/"), name, "output", "model.tar.gz") if p)
        s3.put_object(Bucket=out_bucket, Key=artifact_key, Body=buffer.getvalue())
        return metrics, None


class ProcessingEmulator(TrainingEmulator):
    """``CreateProcessingJob`` run for real: inputs downloaded under a folder standing for
    ``/opt/ml/processing``, the container's entry point run with the request's environment (the
    emulated image already has the requirements: ``LLMOPS_PIP_INSTALL=0``), ``output/`` uploaded."""

    def start(self, job, request: dict) -> None:
        self.requests[request["ProcessingJobName"]] = request
        job.processing_job_status = "InProgress"
        job.processing_start_time = datetime.now(UTC)
        job.processing_end_time = None
        job.processing_resources = request["ProcessingResources"]  # AWS reports it; moto drops it
        thread = threading.Thread(target=self._finish, args=(job, request), daemon=True)
        thread.start()
        self.threads.append(thread)

    def _finish(self, job, request: dict) -> None:
        try:
            failure = self._process(request)
        except Exception as exc:
            failure = f"InternalServerError: {type(exc).__name__}: {exc}"
        job.processing_end_time = datetime.now(UTC)
        if failure:
            job.failure_reason = job.exit_message = failure[-1024:]
            job.processing_job_status = "Failed"
        else:
            job.processing_job_status = "Completed"

    def _process(self, request: dict) -> str | None:
        s3 = client("s3", self.url)
        name = request["ProcessingJobName"]
        root = self.work_dir / name / "processing"

        def local(path: str) -> str:
            return (
                str(root / path.removeprefix("/opt/ml/processing").lstrip("/"))
                if path.startswith("/opt/ml/processing")
                else path
            )

        for item in request.get("ProcessingInputs", []):
            _download_prefix(s3, item["S3Input"]["S3Uri"], Path(local(item["S3Input"]["LocalPath"])))
        entry = [local(arg) for arg in request["AppSpecification"]["ContainerEntrypoint"]]
        if entry[0] in ("python", "python3"):
            entry[0] = sys.executable
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(root),
            **request.get("Environment", {}),
            "LLMOPS_PROCESSING_DIR": str(root),
            "LLMOPS_PIP_INSTALL": "0",
            "OMP_NUM_THREADS": "1",
        }
        done = subprocess.run(entry, cwd=root, env=env, capture_output=True, text=True, timeout=self.timeout)
        (root.parent / "processing.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-5:])
            return f"AlgorithmError: exit code {done.returncode}: {tail}"
        for output in request["ProcessingOutputConfig"]["Outputs"]:
            folder = Path(local(output["S3Output"]["LocalPath"]))
            bucket, prefix = _split(output["S3Output"]["S3Uri"])
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                key = "/".join(x for x in (prefix.rstrip("/"), path.relative_to(folder).as_posix()) if x)
                s3.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
        return None


@contextmanager
def _emulating(action: str, name_key: str, jobs: str, emulator):
    """Patch moto's SageMaker response ``action`` so the emulator starts the job it creates."""
    from moto.sagemaker.responses import SageMakerResponse

    original = getattr(SageMakerResponse, action)

    def create(self):
        request = json.loads(self.body)  # the whole request: moto keeps only some of it
        result = original(self)
        emulator.start(getattr(self.sagemaker_backend, jobs)[request[name_key]], request)
        return result

    setattr(SageMakerResponse, action, create)
    try:
        yield emulator
    finally:
        setattr(SageMakerResponse, action, original)
        emulator.wait()


def emulated_processing(url: str, work_dir: Path):
    """While open, ``CreateProcessingJob`` on the moto server at ``url`` runs the job (see above)."""
    return _emulating(
        "create_processing_job", "ProcessingJobName", "processing_jobs", ProcessingEmulator(url, work_dir)
    )


def emulated_training(url: str, work_dir: Path):
    """While open, ``CreateTrainingJob`` on the moto server at ``url`` runs the job (see above)."""
    return _emulating("create_training_job", "TrainingJobName", "training_jobs", TrainingEmulator(url, work_dir))


def _processes_of_training_job(name: str) -> list[int]:
    """Processes an emulated training job started (they carry its ``SM_TRAINING_JOB_NAME``)."""
    marker = f"\0SM_TRAINING_JOB_NAME={name}\0".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in b"\0" + (entry / "environ").read_bytes() + b"\0":
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


class StoppableTrainingEmulator(TrainingEmulator):
    """``TrainingEmulator`` that also answers ``StopTrainingJob`` (moto has none) as SageMaker does:
    the job goes Stopping, its processes get SIGTERM (until they are gone: a stop may come while
    the channels still download), and it ends Stopped, with no ``FailureReason``, whatever its
    script exited with."""

    def __init__(self, url: str, work_dir: Path, timeout: float = 600):
        super().__init__(url, work_dir, timeout)
        self.stopped: set[str] = set()

    @staticmethod
    def running_process(name: str) -> bool:
        """Whether the job's entry point is running now (a stop then reaches the script)."""
        return bool(_processes_of_training_job(name))

    def stop(self, job) -> None:
        name = job.training_job_name
        if job.training_job_status != "InProgress":
            raise ValueError(f"training job {name} is {job.training_job_status}: only an InProgress job can be stopped")
        self.stopped.add(name)
        self._transition(job, "Stopping", "Stopping the training job")
        job.training_job_status = "Stopping"

        def terminate():
            while job.training_job_status == "Stopping":
                for pid in _processes_of_training_job(name):
                    with suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
                time.sleep(0.2)

        thread = threading.Thread(target=terminate, daemon=True)
        thread.start()
        self.threads.append(thread)

    def _end(self, job, name: str, failure: str | None) -> None:
        if name in self.stopped:
            self._transition(job, "Stopped", "Training job stopped by StopTrainingJob")
            job.training_job_status = "Stopped"
        else:
            super()._end(job, name, failure)


@contextmanager
def emulated_stoppable_training(url: str, work_dir: Path) -> Iterator[StoppableTrainingEmulator]:
    """``emulated_training`` whose jobs ``StopTrainingJob`` stops (see ``StoppableTrainingEmulator``)."""
    from moto.sagemaker.responses import SageMakerResponse

    emulator = StoppableTrainingEmulator(url, work_dir)

    def stop_training_job(self):
        name = json.loads(self.body)["TrainingJobName"]
        emulator.stop(self.sagemaker_backend.training_jobs[name])
        return json.dumps({})

    SageMakerResponse.stop_training_job = stop_training_job
    try:
        with _emulating("create_training_job", "TrainingJobName", "training_jobs", emulator):
            yield emulator
    finally:
        del SageMakerResponse.stop_training_job


@contextmanager
def fake_bedrock() -> Iterator[tuple[str, list[dict]]]:
    """A stand-in Bedrock runtime on loopback for the Converse API (moto has none): it answers
    every request with rubric scores in JSON, as a judge model would, and records the requests.
    Point a client at it with the connection's ``service_config`` for ``bedrock-runtime``."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import unquote

    received: list[dict] = []
    reply = {"helpfulness": 7, "relevance": 8, "accuracy": 6, "detail": 5, "rationale": "stand-in judge"}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            model_id = unquote(self.path.removeprefix("/model/").removesuffix("/converse"))
            received.append({"path": self.path, "model_id": model_id, "body": body})
            answer = {
                "output": {"message": {"role": "assistant", "content": [{"text": json.dumps(reply)}]}},
                "stopReason": "end_turn",
                "usage": {"inputTokens": 100, "outputTokens": 30, "totalTokens": 130},
                "metrics": {"latencyMs": 5},
            }
            data = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()


AWS_CLI_SHIM = '''#!{python}
"""The part of the AWS CLI the EC2 training commands use (aws s3 cp [--recursive] SRC DST),
on boto3, so the commands run as written against the moto server (AWS_ENDPOINT_URL)."""
import pathlib
import sys

import boto3

args = sys.argv[1:]
if args[:2] != ["s3", "cp"]:
    sys.exit(f"aws shim: only 's3 cp' is emulated, not {{args}}")
recursive = "--recursive" in args
source, target = [a for a in args[2:] if a != "--recursive"]
s3 = boto3.client("s3")


def split(uri):
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


if source.startswith("s3://"):
    bucket, prefix = split(source)
    if recursive:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
        if not keys:
            sys.exit(f"aws shim: nothing under {{source}}")
        for key in keys:
            path = pathlib.Path(target) / key[len(prefix):].lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    else:
        path = pathlib.Path(target)
        if target.endswith("/") or path.is_dir():
            path = path / prefix.rsplit("/", 1)[-1]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(s3.get_object(Bucket=bucket, Key=prefix)["Body"].read())
else:
    bucket, key = split(target)
    s3.put_object(Bucket=bucket, Key=key, Body=pathlib.Path(source).read_bytes())
'''


class InstanceEmulator:
    """EC2 instances that moto launches, as SSM sees them: each is "Inactive" on its first
    ``DescribeInstanceInformation`` and "Online" after (moto implements neither), and
    ``SendCommand`` with ``AWS-RunShellScript`` runs the commands for real in a folder standing for
    the instance (``/opt/llmops/jobs`` moved there), with an ``aws s3 cp`` shim on boto3 and this
    Python's ``torchrun``; the invocation goes InProgress, then Success or Failed with the exit code
    and the output, as SSM reports them."""

    JOB_ROOT = "/opt/llmops/jobs"

    def __init__(self, url: str, work_dir: Path, timeout: float = 900):
        self.url, self.work_dir, self.timeout = url, work_dir, timeout
        self.seen: set[str] = set()
        self.commands: list[dict] = []
        self.threads: list[threading.Thread] = []
        bin_dir = work_dir / "bin"
        bin_dir.mkdir(parents=True, exist_ok=True)
        shim = bin_dir / "aws"
        shim.write_text(AWS_CLI_SHIM.format(python=sys.executable))
        shim.chmod(0o755)
        self.path = f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin"

    def describe(self, instances) -> list[dict]:
        found = []
        for instance in instances:
            if instance._state.name != "running":
                continue
            status = "Online" if instance.id in self.seen else "Inactive"
            self.seen.add(instance.id)
            found.append({"InstanceId": instance.id, "PingStatus": status, "PlatformType": "Linux"})
        return found

    def start(self, command, request: dict) -> None:
        self.commands.append(request)
        for invocation in command.invocations:
            invocation.update(Status="InProgress", StatusDetails="InProgress", ResponseCode=-1)
        thread = threading.Thread(target=self._run, args=(command, request), daemon=True)
        thread.start()
        self.threads.append(thread)

    def wait(self) -> None:
        for thread in self.threads:
            thread.join(self.timeout)

    def _run(self, command, request: dict) -> None:
        root = self.work_dir / "instance"
        root.mkdir(parents=True, exist_ok=True)
        script = "\n".join(request["Parameters"]["commands"]).replace(self.JOB_ROOT, str(root / "jobs"))
        env = {
            "PATH": self.path,
            "HOME": str(root),
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": REGION,
            "OMP_NUM_THREADS": "1",
        }
        try:
            done = subprocess.run(
                ["/bin/sh", "-c", script], env=env, capture_output=True, text=True, timeout=self.timeout
            )
            code, out, err = done.returncode, done.stdout, done.stderr
        except subprocess.TimeoutExpired:
            code, out, err = 124, "", "timed out"
        (self.work_dir / f"command-{command.command_id}.log").write_text(out + err)
        status = "Success" if code == 0 else "Failed"
        for invocation in command.invocations:
            invocation.update(
                Status=status,
                StatusDetails=status,
                ResponseCode=code,
                StandardOutputContent=out[-24000:],
                StandardErrorContent=err[-8000:],
            )


@contextmanager
def emulated_instances(url: str, work_dir: Path) -> Iterator[InstanceEmulator]:
    """While open, SSM on the moto server sees moto's EC2 instances and runs shell commands on
    them (see ``InstanceEmulator``)."""
    from moto.core.responses import ActionResult
    from moto.ec2.models import ec2_backends
    from moto.ssm.responses import SimpleSystemManagerResponse

    emulator = InstanceEmulator(url, work_dir)
    original = SimpleSystemManagerResponse.send_command

    def describe_instance_information(self):
        instances = ec2_backends[self.current_account][self.region].all_instances()
        wanted = {v for f in self._get_param("Filters", []) if f.get("Key") == "InstanceIds" for v in f["Values"]}
        found = emulator.describe([i for i in instances if not wanted or i.id in wanted])
        return ActionResult({"InstanceInformationList": found})

    def send_command(self):
        request = json.loads(self.body)
        result = original(self)
        command = self.ssm_backend.list_commands(None, None)[-1]
        if request.get("DocumentName") == "AWS-RunShellScript":
            emulator.start(command, request)
        return result

    SimpleSystemManagerResponse.describe_instance_information = describe_instance_information
    SimpleSystemManagerResponse.send_command = send_command
    try:
        yield emulator
    finally:
        SimpleSystemManagerResponse.send_command = original
        del SimpleSystemManagerResponse.describe_instance_information
        emulator.wait()
