"""The prompt catalog (``include/prompts/catalog.yaml``): named, versioned templates.

A template turns a raw ``instruction`` (+ optional ``context``) into the ``prompt`` of a curated
record, and names the system message that training and serving put in front of it.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

import yaml

from llmops.config import INCLUDE_DIR

CATALOG_PATH = INCLUDE_DIR / "prompts" / "catalog.yaml"
_FIELDS = {"prompt": {"instruction"}, "prompt_with_context": {"instruction", "context"}}


class PromptCatalogError(ValueError):
    """The catalog or a template in it is unusable."""


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    version: int
    system: str
    prompt: str
    prompt_with_context: str
    description: str = ""

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def render(self, instruction: str, context: str = "") -> str:
        if context:
            return self.prompt_with_context.format(instruction=instruction, context=context)
        return self.prompt.format(instruction=instruction)


def _placeholders(text: str) -> set[str]:
    return {field for _, field, _, _ in string.Formatter().parse(text) if field is not None}


def load_template(name: str, path: Path = CATALOG_PATH) -> PromptTemplate:
    try:
        catalog = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise PromptCatalogError(f"{path}: cannot read the prompt catalog: {exc}") from exc
    templates = catalog.get("templates") or {}
    if name not in templates:
        raise PromptCatalogError(f"{path}: no template {name!r} (known: {', '.join(sorted(templates)) or 'none'})")
    entry = templates[name]
    try:
        template = PromptTemplate(name=name, **entry)
    except TypeError as exc:
        raise PromptCatalogError(f"{path}: template {name!r}: {exc}") from None
    for field, allowed in _FIELDS.items():
        try:
            used = _placeholders(getattr(template, field))
        except ValueError as exc:
            raise PromptCatalogError(f"{path}: template {name!r}.{field}: malformed ({exc})") from None
        if not used <= allowed or "instruction" not in used:
            raise PromptCatalogError(
                f"{path}: template {name!r}.{field} uses {sorted(used)}; it must use {{instruction}}"
                f" and may only use {sorted(allowed)}"
            )
    return template
