"""Least-privilege checks for the IAM policies in CloudFormation templates.

    python -m devtools.iam check include/infra/*.yaml

prints one line per finding and exits 1, or a summary and exits 0. It reads every policy document
a template holds: a role's inline ``Policies`` and its trust policy, ``AWS::IAM::ManagedPolicy``,
``AWS::IAM::Policy`` and ``AWS::IAM::RolePolicy``, bucket, queue and topic policies, and KMS key
policies. A finding is:

* an Allow of ``Action: "*"`` or of any action with a wildcard in its name (``s3:*``,
  ``s3:Get*``), unless ``ALLOWED_WILDCARD_ACTIONS`` names it with the reason AWS requires it.
  Deny statements may use wildcards: they only take away;
* an Allow in an identity policy on ``Resource: "*"``, unless every action in the statement is one
  AWS gives no resource-level permission for (``UNSCOPABLE_ACTIONS``, each with its reason);
* ``NotAction``, ``NotResource`` or ``NotPrincipal`` in an Allow: it grants everything it does not
  name;
* ``iam:PassRole`` on a wildcard resource, or without an ``iam:PassedToService`` condition;
* an Allow to ``Principal: "*"`` in a resource, key or trust policy.

In a KMS key policy ``Resource: "*"`` means the key itself, and the statement that gives the
account root ``kms:*`` is the one AWS requires: without it nobody, the account included, could
manage the key again, and no IAM policy could grant its use. It delegates to IAM and lets no one
in by itself. That statement, and only that one, is not a finding.

``role_allows(template, role, action, resource)`` tells whether a role's policies grant an action
(optionally on a resource), with IAM's wildcard matching, so a test can check that every AWS call
the project makes is granted to the role that makes it. Intrinsic functions are resolved with the
parameters' defaults and a fixed account and Region (``Resolver``). Conditions are not evaluated
(a conditional Allow counts as granting; only an unconditional Deny takes away), and AWS managed
policies attached by ARN are not known here.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

# Actions that support no resource-level permission: a statement of only these may (must) use
# Resource "*". Each entry says why.
UNSCOPABLE_ACTIONS: dict[str, str] = {
    "cloudwatch:GetMetricData": "CloudWatch metrics are not IAM resources; a metric read cannot be scoped by ARN",
    "cloudwatch:GetMetricStatistics": "CloudWatch metrics are not IAM resources; a metric read cannot be scoped by ARN",
    "cloudwatch:ListMetrics": "CloudWatch metrics are not IAM resources; listing them cannot be scoped by ARN",
    "cloudwatch:PutMetricData": "CloudWatch metrics are not IAM resources; narrow it with cloudwatch:namespace",
    "ec2:DescribeImages": "EC2 Describe* actions have no resource-level permissions",
    "ec2:DescribeInstanceStatus": "EC2 Describe* actions have no resource-level permissions",
    "ec2:DescribeInstances": "EC2 Describe* actions have no resource-level permissions",
    "ecr:GetAuthorizationToken": "the registry login token is account-wide; it has no resource",
    "logs:DescribeLogGroups": "listing log groups has no resource-level permission (MWAA's documented policy)",
    "s3:GetAccountPublicAccessBlock": "an account-level setting, not a bucket (MWAA checks it)",
    "s3:ListAllMyBuckets": "lists the account's buckets; it has no resource",
    "ssm:DescribeInstanceInformation": "SSM has no resource-level permission for it",
    "ssm:GetCommandInvocation": "SSM has no resource-level permission for it",
    "ssm:ListCommandInvocations": "SSM has no resource-level permission for it",
    "ssm:ListCommands": "SSM has no resource-level permission for it",
    "sts:GetCallerIdentity": "needs no permission and has no resource",
}

# Actions with a wildcard in their name that an Allow may grant, each with the reason AWS requires
# it. None is needed: every granted action is named. (The KMS key policy's root statement is a
# separate, narrower exception: see ``_is_key_root_administration``.)
ALLOWED_WILDCARD_ACTIONS: dict[str, str] = {}

IDENTITY, RESOURCE, KEY, TRUST = "identity", "resource", "key", "trust"

# Where a resource's policy document is: type -> (property, kind).
_DOCUMENTS: dict[str, tuple[str, str]] = {
    "AWS::IAM::ManagedPolicy": ("PolicyDocument", IDENTITY),
    "AWS::IAM::Policy": ("PolicyDocument", IDENTITY),
    "AWS::IAM::RolePolicy": ("PolicyDocument", IDENTITY),
    "AWS::IAM::UserPolicy": ("PolicyDocument", IDENTITY),
    "AWS::IAM::GroupPolicy": ("PolicyDocument", IDENTITY),
    "AWS::S3::BucketPolicy": ("PolicyDocument", RESOURCE),
    "AWS::SQS::QueuePolicy": ("PolicyDocument", RESOURCE),
    "AWS::SNS::TopicPolicy": ("PolicyDocument", RESOURCE),
    "AWS::KMS::Key": ("KeyPolicy", KEY),
    "AWS::IAM::Role": ("AssumeRolePolicyDocument", TRUST),
}
_INLINE_POLICIES = {"AWS::IAM::Role", "AWS::IAM::User", "AWS::IAM::Group"}

# Physical names CloudFormation is given, for Ref and ARNs: type -> name property.
_NAME_PROPERTIES = {
    "AWS::IAM::Role": "RoleName",
    "AWS::IAM::InstanceProfile": "InstanceProfileName",
    "AWS::S3::Bucket": "BucketName",
    "AWS::SageMaker::MlflowTrackingServer": "TrackingServerName",
    "AWS::MWAA::Environment": "Name",
}
_ARNS = {
    ("AWS::IAM::Role", "Arn"): "arn:{partition}:iam::{account}:role/{name}",
    ("AWS::IAM::InstanceProfile", "Arn"): "arn:{partition}:iam::{account}:instance-profile/{name}",
    ("AWS::S3::Bucket", "Arn"): "arn:{partition}:s3:::{name}",
    ("AWS::KMS::Key", "Arn"): "arn:{partition}:kms:{region}:{account}:key/{name}",
    ("AWS::SageMaker::MlflowTrackingServer", "TrackingServerArn"): (
        "arn:{partition}:sagemaker:{region}:{account}:mlflow-tracking-server/{name}"
    ),
    ("AWS::MWAA::Environment", "Arn"): "arn:{partition}:airflow:{region}:{account}:environment/{name}",
}
PSEUDO_PARAMETERS = {
    "AWS::AccountId": "123456789012",
    "AWS::Region": "us-east-1",
    "AWS::Partition": "aws",
    "AWS::URLSuffix": "amazonaws.com",
    "AWS::StackName": "stack",
}


class TemplateError(ValueError):
    """A template that cannot be read."""


@dataclass(frozen=True)
class Finding:
    template: str
    resource: str  # the logical id
    statement: str  # where in the resource, and the statement's Sid or index
    message: str

    def __str__(self) -> str:
        return f"{self.template}: {self.resource} {self.statement}: {self.message}"


@dataclass(frozen=True)
class PolicyDocument:
    resource: str  # the logical id of the resource that holds it
    kind: str  # IDENTITY, RESOURCE, KEY or TRUST
    where: str  # e.g. "PolicyDocument", "Policies[0]"
    document: Any
    roles: tuple[str, ...] = ()  # identity policies: the logical ids of the roles they apply to


# -- loading and resolving --------------------------------------------------------------------------


def load_template(path: str | Path) -> dict:
    """A CloudFormation template (YAML with the short-form intrinsics, or JSON) as plain data, read
    the way cfn-lint reads it (``!Sub x`` becomes ``{"Fn::Sub": "x"}``)."""
    from cfnlint.decode import decode

    template, problems = decode(str(path))
    if template is None or problems:
        detail = "; ".join(str(p) for p in problems) or "not a template"
        raise TemplateError(f"{path}: {detail}")
    return json.loads(json.dumps(template))


class Resolver:
    """Resolves intrinsic functions to strings for matching: parameters take their defaults (or
    ``parameters``), pseudo parameters ``PSEUDO_PARAMETERS``, a resource's ``Ref`` its name
    property (or its logical id), ``GetAtt`` ARNs built from that name. ``Fn::If`` takes the true
    branch. What it cannot resolve it leaves as it is."""

    def __init__(self, template: Mapping, parameters: Mapping[str, str] | None = None):
        self.resources = template.get("Resources", {}) or {}
        self.values = dict(PSEUDO_PARAMETERS)
        for name, spec in (template.get("Parameters", {}) or {}).items():
            if "Default" in spec:
                default = spec["Default"]
                self.values[name] = ",".join(default) if isinstance(default, list) else str(default)
        self.values.update(parameters or {})

    def __call__(self, value: Any) -> Any:
        if isinstance(value, list):
            return [self(v) for v in value]
        if not isinstance(value, dict) or len(value) != 1:
            return value
        ((function, argument),) = value.items()
        if function == "Ref":
            return self.ref(argument)
        if function == "Fn::GetAtt":
            name, attribute = argument.split(".", 1) if isinstance(argument, str) else argument
            return self.get_att(name, attribute)
        if function == "Fn::Sub":
            text, variables = (argument, {}) if isinstance(argument, str) else argument
            return self.sub(text, {k: self(v) for k, v in variables.items()})
        if function == "Fn::Join":
            separator, parts = argument
            resolved = self(parts)
            if isinstance(resolved, list) and all(isinstance(p, str) for p in resolved):
                return separator.join(resolved)
            return value
        if function == "Fn::If":
            return self(argument[1])
        return value

    def ref(self, name: str) -> Any:
        if name in self.values:
            return self.values[name]
        if name in self.resources:
            return self.physical_name(name)
        return {"Ref": name}

    def physical_name(self, logical_id: str) -> str:
        resource = self.resources[logical_id]
        prop = _NAME_PROPERTIES.get(resource.get("Type", ""))
        name = (resource.get("Properties") or {}).get(prop) if prop else None
        resolved = self(name) if name is not None else logical_id
        return resolved if isinstance(resolved, str) else logical_id

    def get_att(self, logical_id: str, attribute: str) -> str:
        resource = self.resources.get(logical_id, {})
        pattern = _ARNS.get((resource.get("Type", ""), attribute))
        if pattern is None:
            return f"{logical_id}.{attribute}"
        return pattern.format(
            partition=self.values["AWS::Partition"],
            region=self.values["AWS::Region"],
            account=self.values["AWS::AccountId"],
            name=self.physical_name(logical_id),
        )

    def sub(self, text: str, variables: Mapping[str, Any]) -> str:
        def replace(match: re.Match) -> str:
            inner = match.group(1)
            if inner.startswith("!"):
                return "${" + inner[1:] + "}"
            if inner in variables and isinstance(variables[inner], str):
                return variables[inner]
            if "." in inner and inner not in self.values:
                return self.get_att(*inner.split(".", 1))
            resolved = self.ref(inner)
            return resolved if isinstance(resolved, str) else match.group(0)

        return re.sub(r"\$\{([^}]+)\}", replace, text)


# -- walking the policies ---------------------------------------------------------------------------


def _branches(value: Any) -> Iterator[Any]:
    """Every value ``value`` can take: both branches of an ``Fn::If``, never ``AWS::NoValue``."""
    if isinstance(value, dict) and set(value) == {"Fn::If"}:
        for branch in value["Fn::If"][1:]:
            yield from _branches(branch)
    elif value == {"Ref": "AWS::NoValue"}:
        return
    else:
        yield value


def _items(value: Any) -> list:
    """A policy element (one value or a list, either possibly conditional) as a flat list."""
    items = []
    for branch in _branches(value):
        if isinstance(branch, list):
            for item in branch:
                items.extend(_items(item))
        elif branch is not None:
            items.append(branch)
    return items


def statements(document: Any) -> list[tuple[str, dict]]:
    """A policy document's statements as (label, statement): the Sid, or ``#<index>``."""
    found = []
    for document_branch in _branches(document):
        if not isinstance(document_branch, dict):
            continue
        for index, statement in enumerate(_items(document_branch.get("Statement"))):
            if isinstance(statement, dict):
                found.append((str(statement.get("Sid") or f"#{index}"), statement))
    return found


def _role_refs(value: Any, resolver: Resolver, roles: Mapping[str, str]) -> tuple[str, ...]:
    """The logical ids of the template's roles that ``value`` (a list of Refs or names) names."""
    found = []
    for item in _items(value):
        if isinstance(item, dict) and "Ref" in item and item["Ref"] in roles:
            found.append(item["Ref"])
        else:
            name = resolver(item)
            found.extend(logical for logical, physical in roles.items() if physical == name)
    return tuple(found)


def policy_documents(template: Mapping) -> list[PolicyDocument]:
    """Every policy document in the template, with the roles each identity policy applies to."""
    resolver = Resolver(template)
    resources = template.get("Resources", {}) or {}
    roles = {
        logical: resolver.physical_name(logical)
        for logical, spec in resources.items()
        if spec.get("Type") == "AWS::IAM::Role"
    }
    # Policies a role lists in ManagedPolicyArns by Ref.
    attached: dict[str, list[str]] = {}
    for logical in roles:
        arns = (resources[logical].get("Properties") or {}).get("ManagedPolicyArns")
        for item in _items(arns):
            if isinstance(item, dict) and "Ref" in item:
                attached.setdefault(item["Ref"], []).append(logical)

    documents = []
    for logical, spec in resources.items():
        kind_of = spec.get("Type", "")
        properties = spec.get("Properties") or {}
        prop, kind = _DOCUMENTS.get(kind_of, ("", ""))
        if properties.get(prop) is not None:
            applies_to: tuple[str, ...] = ()
            if kind == IDENTITY:
                applies_to = _role_refs(properties.get("Roles"), resolver, roles)
                applies_to += _role_refs(properties.get("RoleName"), resolver, roles)
                applies_to += tuple(attached.get(logical, ()))
            documents.append(PolicyDocument(logical, kind, prop, properties[prop], applies_to))
        if kind_of in _INLINE_POLICIES:
            for index, policy in enumerate(_items(properties.get("Policies"))):
                if isinstance(policy, dict) and policy.get("PolicyDocument") is not None:
                    where = f"Policies[{index}]" + (f" ({policy['PolicyName']})" if "PolicyName" in policy else "")
                    owner = (logical,) if kind_of == "AWS::IAM::Role" else ()
                    documents.append(PolicyDocument(logical, IDENTITY, where, policy["PolicyDocument"], owner))
    return documents


# -- matching ---------------------------------------------------------------------------------------


@cache
def _pattern(pattern: str, ignore_case: bool) -> re.Pattern:
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(f"^{regex}$", (re.IGNORECASE if ignore_case else 0) | re.DOTALL)


def action_matches(pattern: str, action: str) -> bool:
    """IAM action matching: case-insensitive, ``*`` and ``?`` wildcards."""
    return isinstance(pattern, str) and bool(_pattern(pattern, True).match(action))


def resource_matches(pattern: str, resource: str) -> bool:
    """IAM resource matching: case-sensitive, ``*`` (any run of characters, ``/`` and ``:``
    included) and ``?``."""
    return isinstance(pattern, str) and bool(_pattern(pattern, False).match(resource))


def _strings(value: Any, resolver: Resolver | None = None) -> list:
    items = _items(value)
    return [resolver(item) for item in items] if resolver else items


# -- the checks -------------------------------------------------------------------------------------


def _has_condition_key(statement: Mapping, key: str) -> bool:
    for operator in _items(statement.get("Condition")):
        if isinstance(operator, dict):
            for keys in operator.values():
                if isinstance(keys, dict) and any(k.lower() == key.lower() for k in keys):
                    return True
    return False


def _principal_is_everyone(principal: Any) -> bool:
    if principal == "*":
        return True
    if isinstance(principal, dict):
        return any(item == "*" for values in principal.values() for item in _items(values))
    return False


def _is_key_root_administration(statement: Mapping, resolver: Resolver) -> bool:
    """The key policy statement AWS requires: Allow ``kms:*`` to this account's root, no one else."""
    actions = _items(statement.get("Action"))
    principal = statement.get("Principal")
    if statement.get("Effect") != "Allow" or actions != ["kms:*"] or not isinstance(principal, dict):
        return False
    if set(principal) != {"AWS"}:
        return False
    account = resolver.values["AWS::AccountId"]
    root = re.compile(rf"^arn:aws[a-z-]*:iam::{account}:root$")
    principals = [resolver(p) for p in _items(principal["AWS"])]
    return bool(principals) and all(p == account or (isinstance(p, str) and root.match(p)) for p in principals)


def check_statement(
    statement: Mapping,
    kind: str,
    resolver: Resolver,
    allowed_wildcards: Mapping[str, str] = ALLOWED_WILDCARD_ACTIONS,
    unscopable: Mapping[str, str] = UNSCOPABLE_ACTIONS,
) -> list[str]:
    """What is wrong with one statement of a policy of ``kind``, as messages."""
    if statement.get("Effect") != "Allow":
        return []
    problems = [
        f"{key} in an Allow grants everything it does not name"
        for key in ("NotAction", "NotResource", "NotPrincipal")
        if key in statement
    ]
    if kind == KEY and _is_key_root_administration(statement, resolver):
        return problems
    actions = [a for a in _strings(statement.get("Action")) if isinstance(a, str)]
    allowed = {a.lower() for a in allowed_wildcards}
    for action in actions:
        if action == "*":
            problems.append('Action "*" grants every action of every service')
        elif ("*" in action or "?" in action) and action.lower() not in allowed:
            problems.append(f"wildcard action {action}: name the actions it needs")
    if kind == IDENTITY:
        resources = _strings(statement.get("Resource"))
        if "*" in resources:
            scopable = [a for a in actions if a.lower() not in {u.lower() for u in unscopable}]
            if scopable or not actions:
                problems.append(
                    'Resource "*" for ' + (", ".join(scopable) or "its actions") + ": scope it to ARNs"
                    " (only actions without resource-level permissions may use *)"
                )
        # Action "*" is reported once, above, not again as a PassRole.
        if any(a != "*" and action_matches(a, "iam:PassRole") for a in actions):
            targets = _strings(statement.get("Resource"), resolver)
            if not targets or any(not isinstance(t, str) or "*" in t for t in targets):
                problems.append("iam:PassRole on a wildcard resource: name the role")
            if not _has_condition_key(statement, "iam:PassedToService"):
                problems.append("iam:PassRole without an iam:PassedToService condition")
    elif _principal_is_everyone(statement.get("Principal")):
        problems.append('Principal "*": anyone')
    return problems


def check_template(
    template: Mapping,
    name: str = "template",
    allowed_wildcards: Mapping[str, str] = ALLOWED_WILDCARD_ACTIONS,
    unscopable: Mapping[str, str] = UNSCOPABLE_ACTIONS,
) -> list[Finding]:
    """Every finding in a loaded template."""
    resolver = Resolver(template)
    findings = []
    for document in policy_documents(template):
        for label, statement in statements(document.document):
            for message in check_statement(statement, document.kind, resolver, allowed_wildcards, unscopable):
                findings.append(Finding(name, document.resource, f"{document.where} {label}", message))
    return findings


def check_files(paths: Iterable[str | Path]) -> tuple[list[Finding], dict[str, int]]:
    """Findings in the templates at ``paths``, and counts of what was checked."""
    findings: list[Finding] = []
    counts = {"templates": 0, "documents": 0, "statements": 0}
    for path in paths:
        template = load_template(path)
        documents = policy_documents(template)
        counts["templates"] += 1
        counts["documents"] += len(documents)
        counts["statements"] += sum(len(statements(d.document)) for d in documents)
        findings.extend(check_template(template, str(path)))
    return findings, counts


# -- what a role may do -----------------------------------------------------------------------------


def role_statements(template: Mapping, role: str) -> list[dict]:
    """The statements of every identity policy in the template that applies to role ``role``
    (a logical id): its inline policies and the policy resources attached to it."""
    if (template.get("Resources", {}).get(role) or {}).get("Type") != "AWS::IAM::Role":
        raise KeyError(f"no AWS::IAM::Role {role!r} in the template")
    return [
        statement
        for document in policy_documents(template)
        if document.kind == IDENTITY and role in document.roles
        for _, statement in statements(document.document)
    ]


def _statement_matches(statement: Mapping, action: str, resource: str | None, resolver: Resolver) -> bool:
    if "Action" in statement:
        if not any(action_matches(p, action) for p in _strings(statement["Action"])):
            return False
    elif any(action_matches(p, action) for p in _strings(statement.get("NotAction"))):
        return False
    if resource is None:
        return True
    if "Resource" in statement:
        return any(resource_matches(p, resource) for p in _strings(statement["Resource"], resolver))
    return not any(resource_matches(p, resource) for p in _strings(statement.get("NotResource"), resolver))


def role_allows(
    template: Mapping,
    role: str,
    action: str,
    resource: str | None = None,
    parameters: Mapping[str, str] | None = None,
) -> bool:
    """Whether role ``role``'s policies in the template allow ``action`` (on ``resource``, an ARN
    as ``Resolver`` would resolve the template's: see ``PSEUDO_PARAMETERS``). Conditions are not
    evaluated: a conditional Allow grants, only an unconditional Deny takes away."""
    resolver = Resolver(template, parameters)
    found = role_statements(template, role)
    for statement in found:
        unconditional_deny = statement.get("Effect") == "Deny" and "Condition" not in statement
        if unconditional_deny and _statement_matches(statement, action, resource, resolver):
            return False
    return any(
        statement.get("Effect") == "Allow" and _statement_matches(statement, action, resource, resolver)
        for statement in found
    )


# -- command line -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.iam", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="check the IAM policies in CloudFormation templates")
    check.add_argument("templates", nargs="+", help="template files (YAML or JSON)")
    args = parser.parse_args(argv)

    try:
        findings, counts = check_files(args.templates)
    except (OSError, TemplateError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for finding in findings:
        print(finding)
    if findings:
        print(f"{len(findings)} finding(s)", file=sys.stderr)
        return 1
    print(
        f"{counts['templates']} template(s), {counts['documents']} policy document(s),"
        f" {counts['statements']} statement(s): no findings"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
