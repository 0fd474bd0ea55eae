from __future__ import annotations

import pytest

from llmops.prompts import PromptCatalogError, load_template


def test_catalog_template_renders_with_and_without_context():
    template = load_template("python_docs_qa")
    assert template.ref == "python_docs_qa@1"
    assert template.render("What is x?") == "What is x?"
    assert template.render("What is x?", "Signature: x()") == "What is x?\n\nSignature: x()"
    assert template.system


def test_unknown_template_lists_known_ones():
    with pytest.raises(PromptCatalogError, match=r"no template 'nope'.*python_docs_qa"):
        load_template("nope")


def test_template_with_an_unknown_placeholder_is_rejected(tmp_path):
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(
        "templates:\n  t:\n    version: 1\n    system: s\n    prompt: '{instruction} {label}'\n"
        "    prompt_with_context: '{instruction} {context}'\n"
    )
    with pytest.raises(PromptCatalogError, match=r"t'.prompt uses \['instruction', 'label'\]"):
        load_template("t", catalog)
