"""The infrastructure templates (``include/infra``): cfn-lint passes them, the least-privilege
check (``devtools.iam``) finds nothing in them and catches every kind of bad policy, and the roles
grant every AWS call the project makes, on the resources the project's own code names, and little
else."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from devtools import iam
from llmops.backends.endpoints.base import config_name, model_resource_name
from llmops.backends.training import ec2 as ec2_backend
from llmops.finetune import job_name
from llmops.staging import base_model_uri

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "include" / "infra"
TEMPLATES = sorted(INFRA.glob("*.yaml"))
FOUNDATION = INFRA / "foundation.yaml"
MWAA = INFRA / "mwaa.yaml"
AWS_CONFIG = yaml.safe_load((ROOT / "include" / "config" / "aws.yaml").read_text())

ACCOUNT, REGION = iam.PSEUDO_PARAMETERS["AWS::AccountId"], iam.PSEUDO_PARAMETERS["AWS::Region"]
BUCKET = f"airflow-llmops-{ACCOUNT}-{REGION}"
BUCKET_ARN = f"arn:aws:s3:::{BUCKET}"
STORE_URI = f"s3://{BUCKET}/llmops"
ENDPOINT = AWS_CONFIG["serving"]["endpoint_name"]
SM = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}"
EC2 = f"arn:aws:ec2:{REGION}:{ACCOUNT}"
LOGS = f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group"
KEY_ARN = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/KmsKey"
SAGEMAKER_ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/llmops-sagemaker-execution-{REGION}"
TRAINIUM_ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/llmops-trainium-instance-{REGION}"
MLFLOW_ARN = f"{SM}:mlflow-tracking-server/llmops-mlflow"
TRAINING_JOB = job_name("llm_finetune", "scheduled__2025-01-02T02:00:00+00:00")
EVALUATION_JOB = job_name("llm_finetune", "scheduled__2025-01-02T02:00:00+00:00", prefix="llmops-eval")


def arn(uri: str) -> str:
    """The ARN of an ``s3://`` object or prefix."""
    return "arn:aws:s3:::" + uri.removeprefix("s3://")


@pytest.fixture(scope="module")
def foundation() -> dict:
    return iam.load_template(FOUNDATION)


@pytest.fixture(scope="module")
def mwaa() -> dict:
    return iam.load_template(MWAA)


# -- cfn-lint and the policy check ------------------------------------------------------------------


def test_both_templates_are_there():
    assert [p.name for p in TEMPLATES] == ["foundation.yaml", "mwaa.yaml"]


@pytest.mark.reliability("security")
@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.name)
def test_cfn_lint_finds_nothing(path):
    """Errors, warnings and informational findings, in three Regions; no rule is ignored."""
    from cfnlint.api import ManualArgs, lint_file

    matches = lint_file(path, config=ManualArgs(include_checks=["I"], regions=["us-east-1", "us-west-2", "eu-west-1"]))
    assert [f"{m.rule.id} line {m.linenumber}: {m.message}" for m in matches] == []
    assert "ignore_checks" not in path.read_text()


def test_cfn_lint_catches_a_misspelt_action(tmp_path):
    """cfn-lint knows IAM's actions: a typo in a policy fails the lint above."""
    from cfnlint.api import ManualArgs, lint_file

    broken = tmp_path / "foundation.yaml"
    broken.write_text(FOUNDATION.read_text().replace("- ssm:GetCommandInvocation", "- ssm:GetCommandInvocatoin"))
    matches = lint_file(broken, config=ManualArgs(regions=["us-east-1"]))
    assert [m.rule.id for m in matches] == ["W3037"]


@pytest.mark.reliability("security")
def test_policy_check_is_clean():
    findings, counts = iam.check_files(TEMPLATES)
    assert [str(f) for f in findings] == []
    assert counts["templates"] == 2 and counts["documents"] >= 10 and counts["statements"] >= 40


def test_policy_check_command_line(capsys, tmp_path):
    assert iam.main(["check", *map(str, TEMPLATES)]) == 0
    assert "no findings" in capsys.readouterr().out

    bad = tmp_path / "bad.yaml"
    bad.write_text(_role_template("Action: s3:*\nResource: '*'"))
    assert iam.main(["check", str(bad)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(line.startswith(f"{bad}: Role Policies[0] (p) #0: ") for line in lines)

    assert iam.main(["check", str(tmp_path / "missing.yaml")]) == 2


def test_allowlisted_actions_really_have_no_resource_level_permission():
    """Each UNSCOPABLE_ACTIONS entry is an action IAM knows, with no resource type in the Service
    Authorization Reference (cfn-lint's copy), except CloudWatch metric calls whose only resource
    type is a ``dataset``, not a metric."""
    from cfnlint.data.AdditionalSpecs import __file__ as specs

    policies = json.loads((Path(specs).parent / "Policies.json").read_text())
    for action, reason in iam.UNSCOPABLE_ACTIONS.items():
        service, name = action.split(":")
        assert name.lower() in policies[service]["Actions"], action
        resources = policies[service]["Actions"][name.lower()].get("Resources", [])
        assert resources in ([], ["dataset"]), f"{action} can be scoped to {resources}"
        assert reason
    assert iam.ALLOWED_WILDCARD_ACTIONS == {}


# -- the checker catches each kind of bad policy ----------------------------------------------------


def _role_template(statement: str, extra: str = "") -> str:
    body = "\n".join("                " + line for line in statement.splitlines())
    return f"""
Resources:
  Role:
    Type: AWS::IAM::Role
    Properties:
      AssumeRolePolicyDocument:
        Statement:
          - Effect: Allow
            Principal: {{Service: ec2.amazonaws.com}}
            Action: sts:AssumeRole
      Policies:
        - PolicyName: p
          PolicyDocument:
            Statement:
              - Effect: Allow
{body}
{extra}"""


def _findings(tmp_path, text: str, **kwargs) -> list[str]:
    path = tmp_path / "t.yaml"
    path.write_text(text)
    return [f.message for f in iam.check_template(iam.load_template(path), "t.yaml", **kwargs)]


BAD_ROLE_STATEMENTS = {
    "action star": ("Action: '*'\nResource: arn:aws:s3:::b/*", ['Action "*"']),
    "service star": ("Action: s3:*\nResource: arn:aws:s3:::b/*", ["wildcard action s3:*"]),
    "partial wildcard": ("Action: [s3:Get*]\nResource: arn:aws:s3:::b/*", ["wildcard action s3:Get*"]),
    "question mark": ("Action: s3:GetObjec?\nResource: arn:aws:s3:::b/*", ["wildcard action s3:GetObjec?"]),
    "resource star": ("Action: s3:GetObject\nResource: '*'", ['Resource "*" for s3:GetObject']),
    "resource star among scopable": (
        "Action: [ec2:DescribeInstances, ec2:TerminateInstances]\nResource: '*'",
        ['Resource "*" for ec2:TerminateInstances:'],
    ),
    "resource star in a list": ("Action: s3:GetObject\nResource: [arn:aws:s3:::b/*, '*']", ['Resource "*"']),
    "not action": ("NotAction: iam:*\nResource: arn:aws:s3:::b/*", ["NotAction in an Allow"]),
    "not resource": ("Action: s3:GetObject\nNotResource: arn:aws:s3:::b/*", ["NotResource in an Allow"]),
    "pass role star": (
        "Action: iam:PassRole\nResource: '*'\nCondition: {StringEquals: {iam:PassedToService: ec2.amazonaws.com}}",
        ['Resource "*" for iam:PassRole', "iam:PassRole on a wildcard resource"],
    ),
    "pass role wildcard arn": (
        "Action: iam:PassRole\nResource: !Sub arn:aws:iam::${AWS::AccountId}:role/*\n"
        "Condition: {StringEquals: {iam:PassedToService: ec2.amazonaws.com}}",
        ["iam:PassRole on a wildcard resource"],
    ),
    "pass role without condition": (
        "Action: iam:PassRole\nResource: !GetAtt Role.Arn",
        ["iam:PassRole without an iam:PassedToService condition"],
    ),
    "pass role through a wildcard": (
        "Action: iam:Pass*\nResource: !GetAtt Role.Arn",
        ["wildcard action iam:Pass*", "iam:PassRole without an iam:PassedToService condition"],
    ),
}


@pytest.mark.reliability("security")
@pytest.mark.parametrize("statement, expected", BAD_ROLE_STATEMENTS.values(), ids=list(BAD_ROLE_STATEMENTS))
def test_checker_catches_bad_role_statements(tmp_path, statement, expected):
    messages = _findings(tmp_path, _role_template(statement))
    assert len(messages) == len(expected), messages
    for message, wanted in zip(messages, expected, strict=True):
        assert wanted in message


GOOD_ROLE_STATEMENTS = {
    "scoped": "Action: [s3:GetObject, s3:PutObject]\nResource: !Sub arn:aws:s3:::b/${AWS::Region}/*",
    "unscopable on star": "Action: [ec2:DescribeInstances, cloudwatch:GetMetricData]\nResource: '*'",
    "pass role named": (
        "Action: iam:PassRole\nResource: !GetAtt Role.Arn\n"
        "Condition: {StringEquals: {iam:PassedToService: sagemaker.amazonaws.com}}"
    ),
}


@pytest.mark.parametrize("statement", GOOD_ROLE_STATEMENTS.values(), ids=list(GOOD_ROLE_STATEMENTS))
def test_checker_passes_scoped_statements(tmp_path, statement):
    assert _findings(tmp_path, _role_template(statement)) == []


def test_deny_statements_may_use_wildcards(tmp_path):
    text = _role_template("Action: s3:GetObject\nResource: arn:aws:s3:::b/*").replace(
        "              - Effect: Allow\n",
        "              - Effect: Deny\n                Action: '*'\n                NotResource: arn:aws:s3:::b/*\n"
        "              - Effect: Allow\n",
    )
    assert _findings(tmp_path, text) == []


def test_wildcard_allowlist_is_honoured(tmp_path):
    text = _role_template("Action: s3:Get*\nResource: arn:aws:s3:::b/*")
    assert _findings(tmp_path, text) == ["wildcard action s3:Get*: name the actions it needs"]
    assert _findings(tmp_path, text, allowed_wildcards={"s3:Get*": "a test's reason"}) == []


def _policy_resource(resource_type: str, statement: str, roles: str = "Roles: [!Ref Role]") -> str:
    return (
        _role_template("Action: s3:GetObject\nResource: arn:aws:s3:::b/*")
        + f"""
  Extra:
    Type: {resource_type}
    Properties:
      {roles}
      PolicyName: extra
      PolicyDocument:
        Statement:
          - {statement}
"""
    )


@pytest.mark.parametrize(
    "resource_type, roles",
    [
        ("AWS::IAM::ManagedPolicy", "Roles: [!Ref Role]"),
        ("AWS::IAM::Policy", "Roles: [!Ref Role]"),
        ("AWS::IAM::RolePolicy", "RoleName: !Ref Role"),
    ],
)
def test_checker_reads_policy_resources(tmp_path, resource_type, roles):
    text = _policy_resource(resource_type, "{Effect: Allow, Action: 'sqs:*', Resource: '*'}", roles)
    assert _findings(tmp_path, text) == [
        "wildcard action sqs:*: name the actions it needs",
        'Resource "*" for sqs:*: scope it to ARNs (only actions without resource-level permissions may use *)',
    ]


def test_checker_reads_both_branches_of_a_condition(tmp_path):
    text = _role_template("Action: s3:GetObject\nResource: arn:aws:s3:::b/*").replace(
        "              - Effect: Allow\n",
        "              - !If\n                - C\n                - {Effect: Allow, Action: 'kms:*', Resource: '*'}\n"
        "                - !Ref AWS::NoValue\n              - Effect: Allow\n",
    )
    assert "wildcard action kms:*: name the actions it needs" in _findings(tmp_path, text)


def _key_template(principal: str, action: str = "kms:*") -> str:
    return f"""
Resources:
  Key:
    Type: AWS::KMS::Key
    Properties:
      KeyPolicy:
        Statement:
          - Sid: Admin
            Effect: Allow
            Principal: {principal}
            Action: {action}
            Resource: '*'
"""


@pytest.mark.parametrize(
    "principal, action, expected",
    [
        ("{AWS: !Sub 'arn:${AWS::Partition}:iam::${AWS::AccountId}:root'}", "kms:*", []),
        ("{AWS: !Ref AWS::AccountId}", "kms:*", []),
        ("{AWS: !Sub 'arn:aws:iam::${AWS::AccountId}:role/admin'}", "kms:*", ["wildcard action kms:*"]),
        (
            "{AWS: [!Sub 'arn:aws:iam::${AWS::AccountId}:root', 'arn:aws:iam::999999999999:root']}",
            "kms:*",
            ["wildcard action kms:*"],
        ),
        ("{AWS: 'arn:aws:iam::999999999999:root'}", "kms:*", ["wildcard action kms:*"]),
        ("{AWS: !Sub 'arn:aws:iam::${AWS::AccountId}:root'}", "'*'", ['Action "*"']),
        ("'*'", "kms:Decrypt", ['Principal "*"']),
        ("{AWS: '*'}", "kms:Decrypt", ['Principal "*"']),
        ("{Service: !Sub 'logs.${AWS::Region}.amazonaws.com'}", "[kms:Decrypt, kms:GenerateDataKey]", []),
    ],
    ids=[
        "root",
        "account id",
        "a role",
        "root and another account",
        "another account",
        "root with star",
        "everyone",
        "everyone as AWS",
        "a service",
    ],
)
def test_key_policies_allow_only_the_root_statement(tmp_path, principal, action, expected):
    messages = _findings(tmp_path, _key_template(principal, action))
    assert len(messages) == len(expected), messages
    for message, wanted in zip(messages, expected, strict=True):
        assert wanted in message


@pytest.mark.reliability("security")
def test_resource_and_trust_policies_may_not_allow_everyone(tmp_path):
    bucket = """
Resources:
  Policy:
    Type: AWS::S3::BucketPolicy
    Properties:
      Bucket: b
      PolicyDocument:
        Statement:
          - {Effect: Deny, Principal: '*', Action: 's3:*', Resource: 'arn:aws:s3:::b/*'}
          - {Effect: Allow, Principal: '*', Action: s3:GetObject, Resource: 'arn:aws:s3:::b/*'}
"""
    assert _findings(tmp_path, bucket) == ['Principal "*": anyone']
    trust = _role_template("Action: s3:GetObject\nResource: arn:aws:s3:::b/*").replace(
        "Principal: {Service: ec2.amazonaws.com}", "Principal: {AWS: '*'}"
    )
    assert _findings(tmp_path, trust) == ['Principal "*": anyone']


# -- the templates hold what they promise ----------------------------------------------------------


def test_foundation_parameters_and_outputs(foundation):
    assert {"EnvironmentName", "EndpointName", "JudgeModelId", "CreateMlflowServer"} <= set(foundation["Parameters"])
    parameters = foundation["Parameters"]
    assert parameters["EnvironmentName"]["Default"] == "llmops"
    assert parameters["CreateMlflowServer"]["Default"] == "true"
    # The defaults are what include/config/aws.yaml uses.
    assert parameters["EndpointName"]["Default"] == ENDPOINT
    assert parameters["JudgeModelId"]["Default"] == AWS_CONFIG["evaluation"]["judge_model_id"]
    assert AWS_CONFIG["store_uri"].endswith("${LLMOPS_S3_PREFIX:-" + parameters["StorePrefix"]["Default"] + "}")
    outputs = foundation["Outputs"]
    assert {
        "BucketName",
        "BucketArn",
        "KmsKeyArn",
        "ExecutionRoleArn",
        "SageMakerRoleArn",
        "TrainiumInstanceProfileArn",
        "MlflowTrackingServerArn",
    } <= set(outputs)
    assert outputs["MlflowTrackingServerArn"]["Condition"] == "CreateMlflow"
    for name in ("MlflowServerRole", "MlflowServerPolicy", "MwaaMlflowPolicy", "MlflowTrackingServer"):
        assert foundation["Resources"][name]["Condition"] == "CreateMlflow"


@pytest.mark.reliability("security")
def test_bucket_is_versioned_encrypted_private_and_tls_only(foundation):
    resources = foundation["Resources"]
    bucket = resources["StoreBucket"]["Properties"]
    assert bucket["VersioningConfiguration"] == {"Status": "Enabled"}
    (rule,) = bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert rule["BucketKeyEnabled"] is True
    assert rule["ServerSideEncryptionByDefault"] == {
        "SSEAlgorithm": "aws:kms",
        "KMSMasterKeyID": {"Fn::GetAtt": ["KmsKey", "Arn"]},
    }
    assert set(bucket["PublicAccessBlockConfiguration"].values()) == {True}
    assert len(bucket["PublicAccessBlockConfiguration"]) == 4
    assert bucket["OwnershipControls"]["Rules"] == [{"ObjectOwnership": "BucketOwnerEnforced"}]
    # MWAA wants its bucket's name to start with airflow-.
    assert iam.Resolver(foundation)(bucket["BucketName"]) == BUCKET
    (deny,) = resources["StoreBucketPolicy"]["Properties"]["PolicyDocument"]["Statement"]
    assert deny["Effect"] == "Deny" and deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    assert resources["KmsKey"]["Properties"]["EnableKeyRotation"] is True


def test_key_policy_lets_the_project_roles_use_the_key(foundation):
    statements = dict(iam.statements(foundation["Resources"]["KmsKey"]["Properties"]["KeyPolicy"]))
    users = statements["ProjectRolesUseTheKey"]
    principals = {p["Fn::GetAtt"][0] for p in iam._items(users["Principal"]["AWS"])}
    assert principals == {"MwaaExecutionRole", "SageMakerExecutionRole", "TrainiumInstanceRole", "MlflowServerRole"}
    assert not any("*" in action for action in users["Action"])


def _deep(resolver: iam.Resolver, value):
    if isinstance(value, dict) and len(value) == 1 and next(iter(value)).startswith(("Fn::", "Ref")):
        return resolver(value)
    if isinstance(value, dict):
        return {k: _deep(resolver, v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep(resolver, v) for v in value]
    return value


def test_managed_policies_fit_iams_size_limit(foundation):
    """IAM refuses a managed policy over 6,144 characters (whitespace not counted)."""
    resolver = iam.Resolver(foundation)
    for document in iam.policy_documents(foundation):
        if foundation["Resources"][document.resource]["Type"] == "AWS::IAM::ManagedPolicy":
            text = json.dumps(_deep(resolver, document.document), separators=(",", ":"))
            assert len(text) < 6144, (document.resource, len(text))


def test_mwaa_environment(mwaa):
    parameters = mwaa["Parameters"]
    assert {
        "EnvironmentName",
        "AirflowVersion",
        "EnvironmentClass",
        "BucketArn",
        "ExecutionRoleArn",
        "KmsKeyArn",
        "SubnetIds",
        "SecurityGroupIds",
        "PluginsS3ObjectVersion",
        "RequirementsS3ObjectVersion",
        "StartupScriptS3ObjectVersion",
        "WebserverAccessMode",
    } <= set(parameters)
    assert parameters["AirflowVersion"]["Default"] == "3.0.6"
    assert all(v.startswith("3.") for v in parameters["AirflowVersion"]["AllowedValues"])
    assert parameters["EnvironmentClass"]["Default"] == "mw1.small"
    assert parameters["WebserverAccessMode"]["Default"] == "PRIVATE_ONLY"
    assert parameters["SubnetIds"]["Type"] == "List<AWS::EC2::Subnet::Id>"
    environment = mwaa["Resources"]["Environment"]["Properties"]
    assert environment["DagS3Path"] == "mwaa/dags"
    assert environment["PluginsS3Path"] == "mwaa/plugins.zip"
    assert environment["RequirementsS3Path"] == "mwaa/requirements.txt"
    assert environment["StartupScriptS3Path"] == "mwaa/startup.sh"
    options = environment["AirflowConfigurationOptions"]
    assert options["secrets.backend"] == "airflow.providers.amazon.aws.secrets.secrets_manager.SecretsManagerBackend"
    assert json.loads(options["secrets.backend_kwargs"]) == {
        "connections_prefix": "airflow/connections",
        "variables_prefix": "airflow/variables",
    }
    logging = environment["LoggingConfiguration"]
    assert len(logging) == 5 and all(m["Enabled"] is True for m in logging.values())
    assert {m["LogLevel"] for m in logging.values()} <= {"INFO", "WARNING"}
    assert set(mwaa["Outputs"]) == {"EnvironmentArn", "WebserverUrl"}


def test_the_stacks_agree(foundation, mwaa):
    """The environment's name, the bundle prefix and the secrets prefixes are the ones the
    foundation's execution role is scoped to."""
    for key in ("Default", "AllowedPattern"):
        assert foundation["Parameters"]["EnvironmentName"][key] == mwaa["Parameters"]["EnvironmentName"][key]
    environment = mwaa["Resources"]["Environment"]["Properties"]
    bundle = [environment[k] for k in ("DagS3Path", "PluginsS3Path", "RequirementsS3Path", "StartupScriptS3Path")]
    for path in bundle:
        assert iam.role_allows(foundation, "MwaaExecutionRole", "s3:GetObject", f"{BUCKET_ARN}/{path}/x")
    kwargs = json.loads(environment["AirflowConfigurationOptions"]["secrets.backend_kwargs"])
    for prefix in kwargs.values():
        secret = f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:{prefix}/aws_default-AbCdEf"
        assert iam.role_allows(foundation, "MwaaExecutionRole", "secretsmanager:GetSecretValue", secret)


# -- the roles grant what the project calls ---------------------------------------------------------

STORE = arn(STORE_URI)
MODEL = model_resource_name(ENDPOINT, 3)
SHADOW_CONFIG = config_name(ENDPOINT, "shadow", "manual__2025-01-02")
AMI_PARAMETER = AWS_CONFIG["ec2"]["ami_parameter"]
JUDGE = AWS_CONFIG["evaluation"]["judge_model_id"]

# What the DAGs call as the MWAA execution role: (action, resource; None for actions on "*").
MWAA_CALLS = [
    # MWAA itself
    ("airflow:PublishMetrics", f"arn:aws:airflow:{REGION}:{ACCOUNT}:environment/llmops"),
    ("s3:GetObject", f"{BUCKET_ARN}/mwaa/plugins.zip"),
    ("s3:GetObjectVersion", f"{BUCKET_ARN}/mwaa/requirements.txt"),
    ("s3:GetBucketPublicAccessBlock", BUCKET_ARN),
    ("s3:GetAccountPublicAccessBlock", None),
    ("logs:CreateLogStream", f"{LOGS}:airflow-llmops-Task:log-stream:dag/run/task"),
    ("logs:PutLogEvents", f"{LOGS}:airflow-llmops-Scheduler:log-stream:scheduler"),
    ("logs:DescribeLogGroups", None),
    ("cloudwatch:PutMetricData", None),
    ("sqs:SendMessage", f"arn:aws:sqs:{REGION}:999999999999:airflow-celery-abc"),
    ("sqs:ReceiveMessage", f"arn:aws:sqs:{REGION}:999999999999:airflow-celery-abc"),
    ("kms:GenerateDataKey", KEY_ARN),
    ("kms:Decrypt", KEY_ARN),
    ("secretsmanager:GetSecretValue", f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:airflow/connections/x-AbC"),
    # the store (llmops.storage, the S3 hook, MLflow artifacts)
    ("s3:ListBucket", BUCKET_ARN),
    ("s3:GetObject", f"{STORE}/datasets/python-docs-instruct/abc/train.jsonl"),
    ("s3:PutObject", f"{STORE}/code/sourcedir-0123456789abcdef.tar.gz"),
    ("s3:PutObject", arn(base_model_uri(STORE_URI, "smollm2-135m-instruct")) + "/config.json"),
    ("s3:PutObject", f"{STORE}/mlflow/python-docs-assistant/run/artifacts/report.html"),
    ("s3:DeleteObject", f"{STORE}/runs/llm_data_prep/run/tmp.json"),
    # SageMaker training and evaluation (SageMakerTrainingOperator, SageMakerProcessingOperator)
    ("sagemaker:CreateTrainingJob", f"{SM}:training-job/{TRAINING_JOB}"),
    ("sagemaker:DescribeTrainingJob", f"{SM}:training-job/{TRAINING_JOB}"),
    ("sagemaker:AddTags", f"{SM}:training-job/{TRAINING_JOB}"),
    ("sagemaker:CreateProcessingJob", f"{SM}:processing-job/{EVALUATION_JOB}"),
    ("sagemaker:DescribeProcessingJob", f"{SM}:processing-job/{EVALUATION_JOB}"),
    ("sagemaker:AddTags", f"{SM}:processing-job/{EVALUATION_JOB}"),
    ("iam:PassRole", SAGEMAKER_ROLE_ARN),
    ("logs:DescribeLogStreams", f"{LOGS}:/aws/sagemaker/TrainingJobs"),
    ("logs:GetLogEvents", f"{LOGS}:/aws/sagemaker/TrainingJobs:log-stream:{TRAINING_JOB}/algo-1-1700000000"),
    # the rollout's endpoint (llmops.rollout.steps and its SageMaker backend)
    ("sagemaker:CreateModel", f"{SM}:model/{MODEL}"),
    ("sagemaker:DescribeModel", f"{SM}:model/{MODEL}"),
    ("sagemaker:DeleteModel", f"{SM}:model/{MODEL}"),
    ("sagemaker:AddTags", f"{SM}:model/{MODEL}"),
    ("sagemaker:CreateEndpointConfig", f"{SM}:endpoint-config/{SHADOW_CONFIG}"),
    ("sagemaker:DescribeEndpointConfig", f"{SM}:endpoint-config/{SHADOW_CONFIG}"),
    ("sagemaker:DeleteEndpointConfig", f"{SM}:endpoint-config/{SHADOW_CONFIG}"),
    ("sagemaker:CreateEndpoint", f"{SM}:endpoint/{ENDPOINT}"),
    ("sagemaker:CreateEndpoint", f"{SM}:endpoint-config/{SHADOW_CONFIG}"),
    ("sagemaker:UpdateEndpoint", f"{SM}:endpoint/{ENDPOINT}"),
    ("sagemaker:UpdateEndpoint", f"{SM}:endpoint-config/{SHADOW_CONFIG}"),
    ("sagemaker:UpdateEndpointWeightsAndCapacities", f"{SM}:endpoint/{ENDPOINT}"),
    ("sagemaker:DescribeEndpoint", f"{SM}:endpoint/{ENDPOINT}"),
    ("sagemaker:DeleteEndpoint", f"{SM}:endpoint/{ENDPOINT}"),
    ("sagemaker:InvokeEndpoint", f"{SM}:endpoint/{ENDPOINT}"),
    ("cloudwatch:GetMetricData", None),
    ("cloudwatch:PutMetricAlarm", f"arn:aws:cloudwatch:{REGION}:{ACCOUNT}:alarm:{ENDPOINT}-v3-5xx"),
    # the Bedrock judge (Converse needs bedrock:InvokeModel)
    ("bedrock:InvokeModel", f"arn:aws:bedrock:{REGION}::foundation-model/{JUDGE}"),
    # ec2-trainium (EC2CreateInstanceOperator, SsmRunCommandOperator, EC2TerminateInstanceOperator)
    ("ssm:GetParameter", f"arn:aws:ssm:{REGION}::parameter{AMI_PARAMETER}"),
    ("ec2:RunInstances", f"{EC2}:instance/i-0123456789abcdef0"),
    ("ec2:RunInstances", f"{EC2}:volume/vol-0123456789abcdef0"),
    ("ec2:RunInstances", f"arn:aws:ec2:{REGION}::image/ami-0123456789abcdef0"),
    ("ec2:RunInstances", f"{EC2}:subnet/subnet-0123"),
    ("ec2:RunInstances", f"{EC2}:security-group/sg-0123"),
    ("ec2:RunInstances", f"{EC2}:network-interface/eni-0123"),
    ("ec2:CreateTags", f"{EC2}:instance/i-0123456789abcdef0"),
    ("iam:PassRole", TRAINIUM_ROLE_ARN),
    ("ec2:DescribeInstances", None),
    ("ssm:DescribeInstanceInformation", None),
    ("ssm:SendCommand", f"arn:aws:ssm:{REGION}::document/AWS-RunShellScript"),
    ("ssm:SendCommand", f"{EC2}:instance/i-0123456789abcdef0"),
    ("ssm:SendCommand", BUCKET_ARN),
    ("ssm:GetCommandInvocation", None),
    ("ec2:TerminateInstances", f"{EC2}:instance/i-0123456789abcdef0"),
    # MLflow on the managed tracking server (llmops.tracking, llmops.prompts, llmops.evaluation)
    *[
        (f"sagemaker-mlflow:{action}", MLFLOW_ARN)
        for action in (
            "GetExperimentByName",
            "CreateExperiment",
            "SearchRuns",
            "CreateRun",
            "GetRun",
            "DeleteRun",
            "LogBatch",
            "LogInputs",
            "SetTag",
            "UpdateRun",
            "CreateRegisteredModel",
            "GetRegisteredModel",
            "CreateModelVersion",
            "GetModelVersion",
            "UpdateModelVersion",
            "SearchModelVersions",
            "SetModelVersionTag",
            "SetRegisteredModelAlias",
            "DeleteRegisteredModelAlias",
            "GetModelVersionByAlias",
        )
    ],
]


@pytest.mark.parametrize("action, resource", MWAA_CALLS, ids=[f"{a} {r or '*'}" for a, r in MWAA_CALLS])
def test_mwaa_role_grants_what_the_dags_call(foundation, action, resource):
    assert iam.role_allows(foundation, "MwaaExecutionRole", action, resource)


def test_the_project_names_what_the_policies_are_scoped_to():
    """The job, model and config names the code builds, and the tags and instance types it uses,
    are the ones the policies' ARNs and conditions expect."""
    assert TRAINING_JOB.startswith("llmops-") and EVALUATION_JOB.startswith("llmops-eval-")
    assert MODEL.startswith(f"{ENDPOINT}-v") and SHADOW_CONFIG.startswith(f"{ENDPOINT}-")
    assert AWS_CONFIG["ec2"]["tags"]["project"] == "llmops"
    assert AWS_CONFIG["ec2"]["instance_type"].startswith("trn1")
    assert AMI_PARAMETER.startswith("/aws/service/neuron/")
    assert AWS_CONFIG["finetune"]["model_name"] == ENDPOINT  # the artifact prefix used above
    # The trn1 job's outputs go where the instance role may write.
    artifact = arn(ec2_backend.artifact_uri(STORE_URI, TRAINING_JOB))
    assert artifact.startswith(f"{STORE}/training-jobs/")


MWAA_MUST_NOT = [
    ("sagemaker:CreateTrainingJob", f"{SM}:training-job/someone-elses-job"),
    ("sagemaker:CreateProcessingJob", f"{SM}:processing-job/llmops-ft-not-an-evaluation"),
    ("sagemaker:InvokeEndpoint", f"{SM}:endpoint/another-endpoint"),
    ("sagemaker:DeleteEndpoint", f"{SM}:endpoint/another-endpoint"),
    ("sagemaker:CreateModel", f"{SM}:model/another-model"),
    ("iam:PassRole", f"arn:aws:iam::{ACCOUNT}:role/admin"),
    ("iam:PassRole", f"arn:aws:iam::{ACCOUNT}:role/llmops-mwaa-execution-{REGION}"),
    ("iam:CreateRole", None),
    ("s3:PutObject", f"{BUCKET_ARN}/mwaa/dags/llm_finetune.py"),  # the DAGs cannot rewrite themselves
    ("s3:GetObject", "arn:aws:s3:::another-bucket/llmops/x"),
    ("s3:DeleteBucket", BUCKET_ARN),
    ("bedrock:InvokeModel", f"arn:aws:bedrock:{REGION}::foundation-model/another.model-v1:0"),
    ("ssm:SendCommand", f"arn:aws:ssm:{REGION}::document/AWS-RunPowerShellScript"),
    ("ssm:GetParameter", f"arn:aws:ssm:{REGION}:{ACCOUNT}:parameter/prod/database-password"),
    ("secretsmanager:GetSecretValue", f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:prod/db-AbC"),
    ("kms:ScheduleKeyDeletion", KEY_ARN),
    ("ec2:StopInstances", f"{EC2}:instance/i-0123456789abcdef0"),
    ("sagemaker-mlflow:DeleteExperiment", MLFLOW_ARN),
    ("cloudwatch:DeleteAlarms", f"arn:aws:cloudwatch:{REGION}:{ACCOUNT}:alarm:production-pager"),
]


@pytest.mark.reliability("security")
@pytest.mark.parametrize("action, resource", MWAA_MUST_NOT, ids=[f"{a} {r or '*'}" for a, r in MWAA_MUST_NOT])
def test_mwaa_role_grants_nothing_more(foundation, action, resource):
    assert not iam.role_allows(foundation, "MwaaExecutionRole", action, resource)


def _image_repository(image_uri: str) -> str:
    registry, _, path = image_uri.partition("/")
    return f"arn:aws:ecr:{REGION}:{registry.split('.')[0]}:repository/{path.split(':')[0]}"


JOB = f"{STORE}/training-jobs/{TRAINING_JOB}"
EVALUATION = f"{STORE}/evaluation-jobs/{EVALUATION_JOB}"
SAGEMAKER_CALLS = [
    ("s3:ListBucket", BUCKET_ARN),
    ("s3:GetObject", f"{STORE}/datasets/python-docs-instruct/abc/train.jsonl"),
    ("s3:GetObject", f"{STORE}/code/sourcedir-0123456789abcdef.tar.gz"),
    ("s3:GetObject", arn(base_model_uri(STORE_URI, "smollm2-135m-instruct")) + "/model.safetensors"),
    ("s3:PutObject", f"{JOB}/output/model.tar.gz"),
    ("s3:PutObject", f"{JOB}/checkpoints/checkpoint-10/adapter_model.safetensors"),
    ("s3:GetObject", f"{JOB}/checkpoints/checkpoint-10/adapter_model.safetensors"),
    ("s3:PutObject", f"{EVALUATION}/output/evaluation/summary.json"),
    ("s3:PutObject", f"{STORE}/capture/{ENDPOINT}/v3/2025/01/02/03/capture.jsonl"),
    ("kms:Decrypt", KEY_ARN),
    ("kms:GenerateDataKey", KEY_ARN),
    *[("ecr:BatchGetImage", _image_repository(AWS_CONFIG["sagemaker"][k]["image_uri"])) for k in ("gpu", "trainium")],
    ("ecr:GetDownloadUrlForLayer", _image_repository(AWS_CONFIG["sagemaker"]["evaluation"]["image_uri"])),
    ("ecr:BatchGetImage", f"arn:aws:ecr:{REGION}:{ACCOUNT}:repository/llmops-serving"),
    ("ecr:GetAuthorizationToken", None),
    ("logs:CreateLogStream", f"{LOGS}:/aws/sagemaker/TrainingJobs:log-stream:{TRAINING_JOB}/algo-1"),
    ("logs:PutLogEvents", f"{LOGS}:/aws/sagemaker/ProcessingJobs:log-stream:{EVALUATION_JOB}/algo-1"),
    ("logs:PutLogEvents", f"{LOGS}:/aws/sagemaker/Endpoints/{ENDPOINT}:log-stream:v3/i-1"),
    ("cloudwatch:PutMetricData", None),
]


@pytest.mark.parametrize("action, resource", SAGEMAKER_CALLS, ids=[f"{a} {r or '*'}" for a, r in SAGEMAKER_CALLS])
def test_sagemaker_role_grants_what_a_job_needs(foundation, action, resource):
    assert iam.role_allows(foundation, "SageMakerExecutionRole", action, resource)


SAGEMAKER_MUST_NOT = [
    ("s3:PutObject", arn(base_model_uri(STORE_URI, "smollm2-135m-instruct")) + "/model.safetensors"),
    ("s3:PutObject", f"{STORE}/datasets/python-docs-instruct/abc/train.jsonl"),
    ("s3:PutObject", f"{STORE}/code/sourcedir-0123456789abcdef.tar.gz"),
    ("s3:DeleteObject", f"{JOB}/output/model.tar.gz"),
    ("s3:GetObject", f"{BUCKET_ARN}/mwaa/plugins.zip"),
    ("ecr:BatchGetImage", f"arn:aws:ecr:{REGION}:999999999999:repository/anything"),
    ("sagemaker:CreateTrainingJob", f"{SM}:training-job/{TRAINING_JOB}"),
    ("iam:PassRole", SAGEMAKER_ROLE_ARN),
]


@pytest.mark.reliability("security")
@pytest.mark.parametrize("action, resource", SAGEMAKER_MUST_NOT, ids=[f"{a} {r}" for a, r in SAGEMAKER_MUST_NOT])
def test_sagemaker_role_grants_nothing_more(foundation, action, resource):
    assert not iam.role_allows(foundation, "SageMakerExecutionRole", action, resource)


def test_trainium_instance_role(foundation):
    role = "TrainiumInstanceRole"
    assert {"Fn::Sub": "arn:${AWS::Partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"} in foundation["Resources"][
        role
    ]["Properties"]["ManagedPolicyArns"]
    assert iam.role_allows(foundation, role, "s3:GetObject", f"{STORE}/code/sourcedir-0123456789abcdef.tar.gz")
    assert iam.role_allows(foundation, role, "s3:PutObject", arn(ec2_backend.artifact_uri(STORE_URI, TRAINING_JOB)))
    assert iam.role_allows(foundation, role, "s3:PutObject", f"{JOB}/ssm-output/i-1/stdout")
    assert iam.role_allows(foundation, role, "kms:Decrypt", KEY_ARN)
    assert not iam.role_allows(foundation, role, "s3:PutObject", f"{STORE}/datasets/x/train.jsonl")
    assert not iam.role_allows(foundation, role, "ec2:RunInstances", f"{EC2}:instance/i-1")


def test_mlflow_server_role_reaches_only_the_artifact_store(foundation):
    role = "MlflowServerRole"
    assert iam.role_allows(foundation, role, "s3:PutObject", f"{STORE}/mlflow/1/run/artifacts/model.tar.gz")
    assert not iam.role_allows(foundation, role, "s3:GetObject", f"{STORE}/datasets/x/train.jsonl")
    assert iam.Resolver(foundation)(
        foundation["Resources"]["MlflowTrackingServer"]["Properties"]["ArtifactStoreUri"]
    ) == AWS_CONFIG["mlflow"]["artifact_uri"].replace("${LLMOPS_S3_BUCKET}", BUCKET).replace(
        "${LLMOPS_S3_PREFIX:-llmops}", "llmops"
    )


def test_role_allows_matches_like_iam(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(
        _role_template(
            "Action: [s3:Get*, sagemaker:DescribeEndpoint]\nResource: !Sub arn:aws:s3:::b-${AWS::Region}/a?c/*"
        )
        + """
  Deny:
    Type: AWS::IAM::ManagedPolicy
    Properties:
      Roles: [!Ref Role]
      PolicyDocument:
        Statement:
          - {Effect: Deny, Action: s3:GetObjectVersion, Resource: '*'}
          - Effect: Deny
            Action: s3:GetObjectTagging
            Resource: '*'
            Condition: {Bool: {aws:SecureTransport: 'false'}}
"""
    )
    template = iam.load_template(path)
    assert iam.role_allows(template, "Role", "s3:getobject", f"arn:aws:s3:::b-{REGION}/abc/key")
    assert iam.role_allows(template, "Role", "s3:GetObject", f"arn:aws:s3:::b-{REGION}/abc/d/e:f")
    assert not iam.role_allows(template, "Role", "s3:GetObject", f"arn:aws:s3:::b-{REGION}/ab/key")
    assert not iam.role_allows(template, "Role", "s3:GetObject", f"arn:aws:s3:::B-{REGION}/abc/key")
    assert not iam.role_allows(template, "Role", "s3:PutObject", f"arn:aws:s3:::b-{REGION}/abc/key")
    assert not iam.role_allows(template, "Role", "s3:GetObjectVersion", f"arn:aws:s3:::b-{REGION}/abc/key")
    assert iam.role_allows(template, "Role", "s3:GetObjectTagging", f"arn:aws:s3:::b-{REGION}/abc/key")
    assert iam.role_allows(
        template, "Role", "s3:GetObject", "arn:aws:s3:::b-eu-west-1/abc/k", {"AWS::Region": "eu-west-1"}
    )
    with pytest.raises(KeyError):
        iam.role_allows(template, "Deny", "s3:GetObject")
