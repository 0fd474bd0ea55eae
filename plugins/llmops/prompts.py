"""The prompt catalog (``include/prompts/*.yaml``) and its twin in the MLflow prompt registry.

The YAML files are the source of truth, kept in git: chat templates in Jinja2 with variables and
tags (``templates:``), and the evaluation catalog of questions with reference answers
(``eval_catalog.yaml``). ``sync_prompts`` registers every template in the MLflow prompt registry, as
a new version only when its content changed, and points the alias ``production`` at it. Data
formatting and evaluation then load templates by alias with ``load_registered``, so every record
and every evaluation names the exact registered version it used (``name@version``).

    python -m llmops.prompts sync      # register the catalog in $MLFLOW_TRACKING_URI's registry
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmops.config import INCLUDE_DIR, get_settings

PROMPTS_DIR = INCLUDE_DIR / "prompts"
EVAL_CATALOG = "eval_catalog.yaml"
PRODUCTION = "production"
CONTENT_TAG = "llmops.content_sha256"
FILE_VERSION = "catalog"

# The variables each kind of template must use, and may use, by its ``tags.task``.
TASK_VARIABLES: dict[str, tuple[set[str], set[str]]] = {
    "instruction": ({"instruction"}, {"instruction", "context"}),
    "judge": ({"question", "answer"}, {"question", "answer", "reference"}),
}
ITEM_KINDS = ("short_answer", "open")


class PromptCatalogError(ValueError):
    """The catalog, a template in it, or the registry's copy is unusable."""


def _environment():
    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    # Sandboxed like MLflow's own rendering; a missing variable is an error, never an empty string.
    return SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=False)


def _variables(text: str) -> set[str]:
    from jinja2 import meta

    return set(meta.find_undeclared_variables(_environment().parse(text)))


@dataclass(frozen=True)
class PromptTemplate:
    """A chat template: messages whose contents are Jinja2 templates."""

    name: str
    messages: tuple[dict[str, str], ...]
    tags: dict[str, str] = field(default_factory=dict)
    description: str = ""
    version: str = FILE_VERSION

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def task(self) -> str:
        return self.tags.get("task", "")

    @property
    def content_sha256(self) -> str:
        """What a registry version is compared by: messages, tags and description."""
        canonical = json.dumps(
            {"messages": list(self.messages), "tags": self.tags, "description": self.description}, sort_keys=True
        )
        return hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def system(self) -> str:
        return next((m["content"] for m in self.messages if m["role"] == "system"), "")

    def render(self, **variables: Any) -> list[dict[str, str]]:
        """The chat with every message rendered; an unknown or missing variable raises."""
        allowed = TASK_VARIABLES.get(self.task, (set(), set()))[1]
        if allowed and (unknown := set(variables) - allowed):
            raise PromptCatalogError(f"template {self.ref} takes no variable(s) {sorted(unknown)}")
        env = _environment()
        try:
            return [
                {"role": m["role"], "content": env.from_string(m["content"]).render(**variables)} for m in self.messages
            ]
        except Exception as exc:  # jinja2 raises several types; the caller needs which template and why
            raise PromptCatalogError(f"template {self.ref} cannot be rendered: {exc}") from None

    def render_instruction(self, instruction: str, context: str = "") -> tuple[str, str]:
        """(system, user prompt) of an instruction template, as a curated record stores them."""
        messages = self.render(instruction=instruction, context=context or "")
        user = [m["content"] for m in messages if m["role"] == "user"]
        system = next((m["content"] for m in messages if m["role"] == "system"), "")
        return system, user[-1]

    def with_version(self, version: str | int) -> PromptTemplate:
        return PromptTemplate(self.name, self.messages, dict(self.tags), self.description, str(version))


def _template_from_entry(name: str, entry: Any, where: str) -> PromptTemplate:
    if not isinstance(entry, dict):
        raise PromptCatalogError(f"{where}: template {name!r} must be a mapping")
    unknown = set(entry) - {"messages", "tags", "description"}
    if unknown:
        raise PromptCatalogError(f"{where}: template {name!r} has unknown key(s) {sorted(unknown)}")
    messages = entry.get("messages")
    if not isinstance(messages, list) or not messages:
        raise PromptCatalogError(f"{where}: template {name!r} needs a non-empty list of messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise PromptCatalogError(f"{where}: template {name!r} message {i} must have exactly role and content")
        if message["role"] not in ("system", "user", "assistant"):
            raise PromptCatalogError(f"{where}: template {name!r} message {i} has unknown role {message['role']!r}")
    tags = {str(k): str(v) for k, v in (entry.get("tags") or {}).items()}
    template = PromptTemplate(
        name=name,
        messages=tuple({"role": m["role"], "content": str(m["content"])} for m in messages),
        tags=tags,
        description=str(entry.get("description") or ""),
    )
    validate_template(template, where)
    return template


def validate_template(template: PromptTemplate, where: str) -> None:
    if template.task not in TASK_VARIABLES:
        raise PromptCatalogError(
            f"{where}: template {template.name!r} needs tags.task, one of {sorted(TASK_VARIABLES)}"
            f" (got {template.task!r})"
        )
    required, allowed = TASK_VARIABLES[template.task]
    users = [i for i, m in enumerate(template.messages) if m["role"] == "user"]
    if users != [len(template.messages) - 1]:
        raise PromptCatalogError(
            f"{where}: template {template.name!r} must end with its only user message"
            f" (roles: {[m['role'] for m in template.messages]})"
        )
    used: set[str] = set()
    for i, message in enumerate(template.messages):
        try:
            used |= _variables(message["content"])
        except Exception as exc:
            raise PromptCatalogError(f"{where}: template {template.name!r} message {i} is malformed: {exc}") from None
    if not required <= used or not used <= allowed:
        raise PromptCatalogError(
            f"{where}: template {template.name!r} uses {sorted(used)}; a {template.task} template must use"
            f" {sorted(required)} and may only use {sorted(allowed)}"
        )


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise PromptCatalogError(f"{path}: cannot read the prompt catalog: {exc}") from exc
    if not isinstance(data, dict):
        raise PromptCatalogError(f"{path}: expected a mapping at the top level")
    return data


def load_catalog(prompts_dir: Path = PROMPTS_DIR) -> dict[str, PromptTemplate]:
    """Every template of every ``*.yaml`` in the folder; a name defined twice is an error."""
    templates: dict[str, PromptTemplate] = {}
    for path in sorted(Path(prompts_dir).glob("*.yaml")):
        data = _read_yaml(path)
        for name, entry in (data.get("templates") or {}).items():
            if name in templates:
                raise PromptCatalogError(f"{path}: template {name!r} is defined twice in {prompts_dir}")
            templates[name] = _template_from_entry(name, entry, str(path))
    if not templates:
        raise PromptCatalogError(f"{prompts_dir}: no templates found")
    return templates


def load_template(name: str, prompts_dir: Path = PROMPTS_DIR) -> PromptTemplate:
    """A template as the catalog files define it (version ``catalog``: not from the registry)."""
    templates = load_catalog(prompts_dir)
    if name not in templates:
        raise PromptCatalogError(f"{prompts_dir}: no template {name!r} (known: {', '.join(sorted(templates))})")
    return templates[name]


@dataclass(frozen=True)
class EvalItem:
    id: str
    kind: str
    instruction: str
    reference: str
    context: str = ""


@dataclass(frozen=True)
class EvalCatalog:
    template: str
    items: tuple[EvalItem, ...]
    content_sha256: str
    path: str


def load_eval_catalog(path: Path | None = None, prompts_dir: Path = PROMPTS_DIR) -> EvalCatalog:
    path = Path(path or PROMPTS_DIR / EVAL_CATALOG)
    data = _read_yaml(path)
    if not isinstance(data.get("template"), str):
        raise PromptCatalogError(f"{path}: 'template' must name the instruction template that renders the items")
    templates = load_catalog(prompts_dir)
    instruction = sorted(n for n, t in templates.items() if t.task == "instruction")
    if data["template"] not in instruction:
        raise PromptCatalogError(
            f"{path}: template {data['template']!r} is not an instruction template of the catalog"
            f" (instruction templates: {', '.join(instruction)})"
        )
    raw_items = data.get("items")
    if not isinstance(raw_items, list) or not raw_items:
        raise PromptCatalogError(f"{path}: 'items' must be a non-empty list")
    items, seen = [], set()
    for i, raw in enumerate(raw_items):
        where = f"{path}: items[{i}]"
        if not isinstance(raw, dict):
            raise PromptCatalogError(f"{where} must be a mapping")
        unknown = set(raw) - {"id", "kind", "instruction", "reference", "context"}
        if unknown:
            raise PromptCatalogError(f"{where} has unknown key(s) {sorted(unknown)}")
        for key in ("id", "instruction", "reference"):
            if not isinstance(raw.get(key), str) or not raw[key].strip():
                raise PromptCatalogError(f"{where}: {key!r} must be a non-empty string")
        if raw["id"] in seen:
            raise PromptCatalogError(f"{where}: id {raw['id']!r} is used twice")
        seen.add(raw["id"])
        kind = raw.get("kind", "open")
        if kind not in ITEM_KINDS:
            raise PromptCatalogError(f"{where}: kind {kind!r} is not one of {list(ITEM_KINDS)}")
        items.append(EvalItem(raw["id"], kind, raw["instruction"], raw["reference"], str(raw.get("context") or "")))
    digest = hashlib.sha256(
        json.dumps({"template": data["template"], "items": [i.__dict__ for i in items]}, sort_keys=True).encode()
    ).hexdigest()
    return EvalCatalog(data["template"], tuple(items), digest, str(path))


# --- the MLflow prompt registry -------------------------------------------------------------------


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _registered_versions(client, name: str) -> list:
    from mlflow.exceptions import MlflowException

    try:
        if client.get_prompt(name) is None:
            return []
        return list(client.search_prompt_versions(name, max_results=1000))
    except MlflowException:
        return []


@dataclass(frozen=True)
class SyncResult:
    name: str
    version: str
    created: bool
    alias_moved: bool

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def sync_prompts(tracking_uri: str, prompts_dir: Path = PROMPTS_DIR) -> dict[str, SyncResult]:
    """Register each catalog template whose content is not in the registry yet, and point
    ``production`` at the version that holds the catalog's content. Idempotent: a second sync of
    the same catalog registers nothing and moves nothing."""
    client = _client(tracking_uri)
    results = {}
    for name, template in load_catalog(prompts_dir).items():
        digest = template.content_sha256
        versions = _registered_versions(client, name)
        production = _alias_version(client, name)
        matching = [v for v in versions if v.tags.get(CONTENT_TAG) == digest]
        created = False
        if production is not None and production.tags.get(CONTENT_TAG) == digest:
            results[name] = SyncResult(name, str(production.version), False, False)
            continue
        if matching:
            target = max(matching, key=lambda v: int(v.version))
        else:
            target = client.register_prompt(
                name,
                template=[dict(m) for m in template.messages],
                commit_message=f"synced from the catalog ({digest[:12]})",
                tags={**template.tags, CONTENT_TAG: digest, "llmops.description": template.description},
            )
            created = True
        client.set_prompt_alias(name, PRODUCTION, int(target.version))
        results[name] = SyncResult(name, str(target.version), created, True)
    return results


def _alias_version(client, name: str, alias: str = PRODUCTION):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_prompt_version_by_alias(name, alias)
    except MlflowException:
        return None


def load_registered(tracking_uri: str, name: str, alias: str = PRODUCTION) -> PromptTemplate:
    """A template from the registry by alias, with its registry version as ``version``."""
    client = _client(tracking_uri)
    version = _alias_version(client, name, alias)
    if version is None:
        raise PromptCatalogError(
            f"prompt {name!r} has no alias {alias!r} in the registry at {tracking_uri}; run sync_prompts first"
            " (the first task of llm_data_prep and llm_finetune does)"
        )
    template = version.template
    if isinstance(template, str):
        template = [{"role": "user", "content": template}]
    tags = {k: v for k, v in version.tags.items() if not k.startswith(("llmops.", "mlflow.", "_mlflow"))}
    result = PromptTemplate(
        name=name,
        messages=tuple({"role": m["role"], "content": m["content"]} for m in template),
        tags=tags,
        description=version.tags.get("llmops.description", ""),
        version=str(version.version),
    )
    validate_template(result, f"registry {tracking_uri}: {name}@{version.version}")
    return result


def link_to_run(tracking_uri: str, run_id: str, refs: list[str]) -> None:
    """Record on an MLflow run which registered prompt versions (``name@version``) it used."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    for ref in refs:
        name, _, version = ref.rpartition("@")
        if version == FILE_VERSION or not name:
            continue
        try:
            prompt_version = client.get_prompt_version(name, version)
        except MlflowException:
            # A dataset formatted against another registry: its records still name the version.
            continue
        if prompt_version is not None:
            client.link_prompt_version_to_run(run_id, prompt_version)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import os

    parser = argparse.ArgumentParser(prog="python -m llmops.prompts", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["sync"])
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    args = parser.parse_args(argv)
    if not args.tracking_uri:
        args.tracking_uri = get_settings().mlflow.tracking_uri
    for result in sync_prompts(args.tracking_uri).values():
        state = "registered" if result.created else ("alias moved" if result.alias_moved else "unchanged")
        print(f"{result.name}@{result.version}: {state}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
