from __future__ import annotations

import pytest

from llmops.prompts import (
    PromptCatalogError,
    load_catalog,
    load_eval_catalog,
    load_registered,
    load_template,
    sync_prompts,
)


def test_catalog_template_renders_with_and_without_context():
    template = load_template("python_docs_qa")
    assert template.ref == "python_docs_qa@catalog"
    assert template.render_instruction("What is x?") == (template.system, "What is x?")
    assert template.render_instruction("What is x?", "Signature: x()")[1] == "What is x?\n\nSignature: x()"
    assert template.system.startswith("You are a concise assistant")


def test_unknown_template_lists_known_ones():
    with pytest.raises(PromptCatalogError, match=r"no template 'nope'.*python_docs_qa"):
        load_template("nope")


def write_catalog(folder, user_content: str, task: str = "instruction", name: str = "t") -> None:
    (folder / "templates.yaml").write_text(
        f"templates:\n  {name}:\n    tags: {{task: {task}}}\n    messages:\n"
        "      - {role: system, content: s}\n"
        f"      - role: user\n        content: {user_content!r}\n"
    )


def test_template_with_an_unknown_variable_is_rejected(tmp_path):
    write_catalog(tmp_path, "{{ instruction }} {{ label }}")
    with pytest.raises(PromptCatalogError, match=r"'t' uses \['instruction', 'label'\]"):
        load_catalog(tmp_path)


def test_template_without_its_required_variable_is_rejected(tmp_path):
    write_catalog(tmp_path, "{{ question }}", task="judge")
    with pytest.raises(PromptCatalogError, match=r"must use \['answer', 'question'\]"):
        load_catalog(tmp_path)


def test_malformed_jinja_is_rejected_with_the_template_name(tmp_path):
    write_catalog(tmp_path, "{% if instruction %}{{ instruction }}")
    with pytest.raises(PromptCatalogError, match=r"'t' message 1 is malformed"):
        load_catalog(tmp_path)


def test_rendering_an_unknown_variable_fails():
    with pytest.raises(PromptCatalogError, match="takes no variable"):
        load_template("python_docs_qa").render(instruction="q", label="x")


def test_judge_rubric_names_its_criteria_and_renders_all_inputs():
    judge = load_template("judge_rubric")
    assert judge.tags["criteria"].split(",") == ["helpfulness", "relevance", "accuracy", "detail"]
    user = judge.render(question="Q?", reference="R.", answer="A.")[-1]["content"]
    assert "Q?" in user and "R." in user and "A." in user


def test_eval_catalog_loads_and_its_hash_follows_content(tmp_path):
    catalog = load_eval_catalog()
    assert len(catalog.items) >= 20
    assert {i.kind for i in catalog.items} == {"short_answer", "open"}
    assert catalog.template in load_catalog()
    copy = tmp_path / "eval.yaml"
    text = (catalog_path := __import__("pathlib").Path(catalog.path)).read_text()
    copy.write_text(text)
    assert load_eval_catalog(copy).content_sha256 == catalog.content_sha256
    copy.write_text(text.replace('reference: "3"', 'reference: "4"', 1))
    assert load_eval_catalog(copy).content_sha256 != catalog.content_sha256
    assert catalog_path.exists()


def test_eval_catalog_rejects_duplicate_ids_and_unknown_kinds(tmp_path):
    path = tmp_path / "eval.yaml"
    path.write_text(
        "template: python_docs_qa\nitems:\n"
        "  - {id: a, instruction: q, reference: r}\n  - {id: a, instruction: q, reference: r}\n"
    )
    with pytest.raises(PromptCatalogError, match=r"items\[1\]: id 'a' is used twice"):
        load_eval_catalog(path)
    path.write_text("template: python_docs_qa\nitems:\n  - {id: a, kind: essay, instruction: q, reference: r}\n")
    with pytest.raises(PromptCatalogError, match=r"kind 'essay'"):
        load_eval_catalog(path)


@pytest.fixture
def registry(tmp_path):
    return f"sqlite:///{tmp_path}/mlflow.db"


def test_sync_registers_once_and_only_changes_make_new_versions(registry, tmp_path):
    folder = tmp_path / "prompts"
    folder.mkdir()
    write_catalog(folder, "{{ instruction }}")
    first = sync_prompts(registry, folder)
    assert first["t"].version == "1" and first["t"].created
    again = sync_prompts(registry, folder)
    assert again["t"].version == "1" and not again["t"].created and not again["t"].alias_moved

    write_catalog(folder, "Question: {{ instruction }}")
    changed = sync_prompts(registry, folder)
    assert changed["t"].version == "2" and changed["t"].created
    assert load_registered(registry, "t").render_instruction("x")[1] == "Question: x"

    # Going back to earlier content points the alias at the earlier version; nothing new is registered.
    write_catalog(folder, "{{ instruction }}")
    reverted = sync_prompts(registry, folder)
    assert reverted["t"].version == "1" and not reverted["t"].created and reverted["t"].alias_moved
    assert load_registered(registry, "t").ref == "t@1"


def test_loading_an_unsynced_prompt_says_what_to_do(registry):
    with pytest.raises(PromptCatalogError, match="run sync_prompts first"):
        load_registered(registry, "python_docs_qa")


def test_eval_catalog_must_name_an_instruction_template(tmp_path):
    path = tmp_path / "eval.yaml"
    path.write_text("template: judge_rubric\nitems:\n  - {id: a, instruction: q, reference: r}\n")
    with pytest.raises(PromptCatalogError, match=r"'judge_rubric' is not an instruction template.*python_docs_qa"):
        load_eval_catalog(path)


def test_an_instruction_template_must_end_with_its_only_user_message(tmp_path):
    (tmp_path / "templates.yaml").write_text(
        "templates:\n  t:\n    tags: {task: instruction}\n    messages:\n"
        "      - {role: user, content: '{{ instruction }}'}\n      - {role: assistant, content: ok}\n"
    )
    with pytest.raises(PromptCatalogError, match="must end with its only user message"):
        load_catalog(tmp_path)
