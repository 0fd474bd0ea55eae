"""A real raw instruction corpus built from the installed Python's own documentation.

The pipeline needs genuine input text that nobody on the project wrote, so that cleaning, dedup
and split stages are exercised on prose with real quirks (code blocks, odd punctuation, very long
paragraphs). The standard library ships such text with every interpreter, offline:

* ``pydoc_data.topics.topics``: the language-reference topics behind ``help("assert")``. Every
  titled section becomes one record ("Explain the "assert" statement in Python.").
* the docstrings of public functions, classes and methods of ``DEFAULT_MODULES``, a fixed list
  of side-effect-free stdlib modules. Each docstring becomes one record, with the call
  signature as context where ``inspect`` can produce one.

The output is raw records ``{"id", "instruction", "context", "response", "source"}`` (see
``llmops.data.records``), sorted by id. The corpus is deterministic for a given Python build,
but differs between Python versions, because the documentation does.

Write it as JSON lines::

    PYTHONPATH=plugins python -m llmops.data.corpus out.jsonl
"""

from __future__ import annotations

import argparse
import enum
import hashlib
import importlib
import inspect
import json
import pydoc_data.topics
import re
import sys
import types
import warnings
from collections.abc import Iterator, Sequence

DEFAULT_MODULES: tuple[str, ...] = (
    "abc",
    "argparse",
    "array",
    "ast",
    "base64",
    "binascii",
    "bisect",
    "builtins",
    "calendar",
    "cmath",
    "codecs",
    "collections",
    "colorsys",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email.utils",
    "enum",
    "fnmatch",
    "fractions",
    "functools",
    "glob",
    "graphlib",
    "gzip",
    "hashlib",
    "heapq",
    "html",
    "html.parser",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "locale",
    "logging",
    "math",
    "numbers",
    "operator",
    "os",
    "pathlib",
    "pickle",
    "platform",
    "posixpath",
    "pprint",
    "queue",
    "random",
    "re",
    "sched",
    "secrets",
    "shlex",
    "shutil",
    "sqlite3",
    "statistics",
    "string",
    "struct",
    "sys",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "time",
    "timeit",
    "tokenize",
    "traceback",
    "types",
    "typing",
    "unicodedata",
    "unittest",
    "urllib.parse",
    "uuid",
    "warnings",
    "weakref",
    "xml.etree.ElementTree",
    "zipfile",
    "zlib",
    "zoneinfo",
)

# The label is what appears in ids and instructions, so it is the name users write in code:
# os.path rather than posixpath, and builtins unqualified (``len``, ``str.split``).
_LABELS = {"posixpath": "os.path", "builtins": ""}

# Public objects whose ``__module__`` names a private implementation module still belong to the
# public one (heapq.heappush lives in _heapq, os.getcwd in posix); re-exports from other public
# modules do not, so each object is documented once, under the module that owns it.
_IMPLEMENTATION_MODULES = {
    "datetime": ("_datetime", "_pydatetime"),
    "decimal": ("_decimal", "_pydecimal"),
    "hashlib": ("_hashlib", "_blake2", "_md5", "_sha1", "_sha2", "_sha256", "_sha512", "_sha3"),
    "os": ("posix", "nt"),
    "posixpath": ("genericpath",),
    "threading": ("_thread",),
}

MIN_SECTION_CHARS = 80
MIN_DOCSTRING_CHARS = 40

_TOPIC_TEMPLATES = (
    "Explain {title} in Python.",
    "What does the Python language reference say about {title}?",
    "Summarize the Python documentation on {title}.",
)
_DOC_TEMPLATES = (
    "What does `{name}` do?",
    "Explain the Python {kind} `{name}`.",
    "Describe what the {kind} `{name}` is for.",
)

# The reST adornment characters the topics use for titles and transitions.
_RULE = re.compile(r"^([*=\-~^#])\1*[ \t]*$")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_SENTENCE_END = re.compile(r"\.\s")
_WHITESPACE = re.compile(r"\s")
# Default-value reprs such as ``<object object at 0x7f...>`` change between processes.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")

_ROUTINE_TYPES = (
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodDescriptorType,
    types.ClassMethodDescriptorType,
)


def cut_paragraphs(text: str, limit: int) -> str:
    """The leading paragraphs of ``text`` that fit in ``limit`` characters, joined by blank lines.

    When even the first paragraph is too long it is cut at the last sentence end before the
    limit, else at the last word boundary, else hard at the limit, so the result never exceeds
    ``limit`` and never ends mid-word unless there is no other choice.
    """
    if limit <= 0:
        return ""
    # rstrip only: the leading indentation of a paragraph marks a code block and must survive.
    paragraphs = [p.rstrip() for p in _PARAGRAPH_BREAK.split(text.strip("\n")) if p.strip()]
    if not paragraphs:
        return ""
    kept: list[str] = []
    size = 0
    for paragraph in paragraphs:
        added = len(paragraph) + (2 if kept else 0)
        if size + added > limit:
            break
        kept.append(paragraph)
        size += added
    if kept:
        return "\n\n".join(kept)
    return _cut_long_paragraph(paragraphs[0], limit)


def _cut_long_paragraph(paragraph: str, limit: int) -> str:
    # Looking one character past the limit lets a sentence end or space sitting exactly at the
    # limit count, while the kept text itself stays within it.
    window = paragraph[: limit + 1]
    sentence_ends = [m.start() + 1 for m in _SENTENCE_END.finditer(window)]
    if sentence_ends:
        return paragraph[: sentence_ends[-1]]
    spaces = [m.start() for m in _WHITESPACE.finditer(window) if m.start() > 0]
    for cut in reversed(spaces):
        head = paragraph[:cut].rstrip()
        if head.strip():
            return head
    return paragraph[:limit]


def _pick(templates: Sequence[str], record_id: str) -> str:
    # hashlib rather than hash(): str hashes are salted per process and would break determinism.
    digest = hashlib.sha256(record_id.encode("utf-8")).digest()
    return templates[int.from_bytes(digest[:4], "big") % len(templates)]


def _is_heading(title: str, underline: str) -> bool:
    return (
        bool(title.strip())
        and not title[0].isspace()
        and _RULE.match(title) is None
        and _RULE.match(underline) is not None
        and len(underline.strip()) >= len(title.strip())
    )


def split_topic_sections(text: str) -> list[tuple[str, str]]:
    """``(title, body)`` for every titled section of a pydoc topic, underline lines removed."""
    lines = text.splitlines()
    heads = [i for i in range(len(lines) - 1) if _is_heading(lines[i], lines[i + 1])]
    sections = []
    for n, start in enumerate(heads):
        end = heads[n + 1] if n + 1 < len(heads) else len(lines)
        # Lines that look like underlines but follow no title are transitions (horizontal rules).
        body = "\n".join(line for line in lines[start + 2 : end] if _RULE.match(line) is None)
        sections.append((lines[start].strip(), body))
    return sections


def _topic_title(title: str) -> str:
    # Titles read as "The "if" statement"; mid-sentence that capital T looks wrong.
    return "the " + title[4:] if title.startswith("The ") else title


def _pydoc_records(max_response_chars: int) -> Iterator[dict]:
    topics = pydoc_data.topics.topics
    for topic in sorted(topics):
        for index, (title, body) in enumerate(split_topic_sections(topics[topic])):
            body = body.strip("\n")
            if len(body.strip()) < MIN_SECTION_CHARS:
                continue
            record_id = f"pydoc:{topic}:{index}"
            yield {
                "id": record_id,
                "instruction": _pick(_TOPIC_TEMPLATES, record_id).format(title=_topic_title(title)),
                "context": "",
                "response": cut_paragraphs(body, max_response_chars),
                "source": f"pydoc_data.topics/{topic}",
            }


def _public_names(module: types.ModuleType) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [name for name in vars(module) if not name.startswith("_")]
    return sorted(set(names))


def _own_doc(obj: object) -> str | None:
    """The cleaned docstring written for ``obj`` itself, not one inherited from a parent."""
    # A class's __doc__ attribute can come from its metaclass or a base; its own lives in vars().
    raw = vars(obj).get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    if not isinstance(raw, str):
        return None
    doc = inspect.cleandoc(raw)
    return doc if len(doc) >= MIN_DOCSTRING_CHARS else None


class _Elided:
    def __repr__(self) -> str:
        return "..."


_ELIDED = _Elided()
_PLAIN_DEFAULTS = (type(None), bool, int, float, complex, str, bytes, type(Ellipsis), enum.Enum)


def _stable_default(value: object) -> bool:
    """Whether ``value``'s repr is the same in every process, whatever the program has done.

    Containers are not: ``logging.shutdown``'s default is the live list of handlers, and set
    order follows the per-process string hash. Functions, classes and modules are named by their
    repr once the address is removed.
    """
    if isinstance(value, tuple):
        return all(_stable_default(item) for item in value)
    return isinstance(value, _PLAIN_DEFAULTS) or inspect.isroutine(value) or inspect.isclass(value)


def _signature_context(obj: object, name: str) -> str:
    try:
        signature = inspect.signature(obj)
    except (ValueError, TypeError):
        return ""
    parameters = [
        p if p.default is p.empty or _stable_default(p.default) else p.replace(default=_ELIDED)
        for p in signature.parameters.values()
    ]
    text = str(signature.replace(parameters=parameters))
    return f"Signature: {name}{_ADDRESS.sub('', text)}"


def _owned_by(obj: object, module_name: str, owners: set[str]) -> bool:
    owner = getattr(obj, "__module__", None)
    # A package's submodules are part of its public API (json.JSONEncoder lives in json.encoder).
    return isinstance(owner, str) and (owner in owners or owner.startswith(module_name + "."))


def _original(module: types.ModuleType, name: str) -> object:
    # Hooks such as sys.excepthook are routinely replaced by test runners, debuggers and REPLs;
    # the module keeps the original as __excepthook__, and the corpus must not depend on who runs it.
    # vars(), not getattr(): every module object answers __str__, __repr__, ... from its type.
    original = vars(module).get(f"__{name}__")
    return original if inspect.isroutine(original) else getattr(module, name, None)


def _is_function(obj: object) -> bool:
    if not callable(obj):
        return False
    try:
        # lru_cache and similar wrappers (urllib.parse.urlsplit) are plain functions to a user.
        obj = inspect.unwrap(obj)
    except ValueError:
        return False
    return isinstance(obj, (types.FunctionType, types.BuiltinFunctionType))


def _unwrap_method(raw: object) -> object | None:
    if isinstance(raw, (staticmethod, classmethod)):
        raw = raw.__func__
    return raw if isinstance(raw, _ROUTINE_TYPES) else None


def _documented_objects(module_name: str) -> Iterator[tuple[str, str, object, object]]:
    """``(qualified name, kind, object, callable for the signature)`` for one module."""
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        # Some stdlib modules are optional builds (e.g. without zlib); the corpus just shrinks.
        return
    label = _LABELS.get(module_name, module_name)
    prefix = f"{label}." if label else ""
    owners = {module_name, "_" + module_name, *_IMPLEMENTATION_MODULES.get(module_name, ())}
    for name in _public_names(module):
        obj = _original(module, name)
        if not _owned_by(obj, module_name, owners):
            continue
        if inspect.isclass(obj):
            yield f"{prefix}{name}", "class", obj, obj
            for attr, raw in sorted(vars(obj).items()):
                method = _unwrap_method(raw)
                if attr.startswith("_") or method is None:
                    continue
                # getattr binds classmethods, so their signature drops the implicit cls.
                yield f"{prefix}{name}.{attr}", "method", method, getattr(obj, attr, method)
        elif _is_function(obj):
            yield f"{prefix}{name}", "function", obj, obj


def _docstring_records(modules: Sequence[str], max_response_chars: int) -> Iterator[dict]:
    # Aliases (two public names bound to one object) would otherwise give identical responses.
    seen: set[int] = set()
    for module_name in modules:
        for qualname, kind, obj, signed in _documented_objects(module_name):
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            doc = _own_doc(obj)
            if doc is None:
                continue
            record_id = f"doc:{qualname}"
            yield {
                "id": record_id,
                "instruction": _pick(_DOC_TEMPLATES, record_id).format(name=qualname, kind=kind),
                "context": _signature_context(signed, qualname),
                "response": cut_paragraphs(doc, max_response_chars),
                "source": f"docstring/{qualname}",
            }


def build_python_docs_corpus(modules: Sequence[str] = DEFAULT_MODULES, max_response_chars: int = 1200) -> list[dict]:
    """Raw instruction records from pydoc topics and the docstrings of ``modules``, sorted by id.

    Every response is at most ``max_response_chars`` long (see ``cut_paragraphs``). Ids are
    unique: on a collision the first record produced wins.
    """
    records: dict[str, dict] = {}
    with warnings.catch_warnings():
        # Importing a module or touching a deprecated public name may warn; the build must stay
        # silent, and reading a docstring uses nothing that is deprecated.
        warnings.simplefilter("ignore")
        produced = [*_pydoc_records(max_response_chars), *_docstring_records(modules, max_response_chars)]
    for record in produced:
        if record["response"].strip():
            records.setdefault(record["id"], record)
    return [records[key] for key in sorted(records)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llmops.data.corpus", description="Write the Python-docs instruction corpus as JSON lines."
    )
    parser.add_argument("output", help="path of the .jsonl file to write, or - for standard output")
    parser.add_argument("--max-response-chars", type=int, default=1200)
    args = parser.parse_args(argv)
    records = build_python_docs_corpus(max_response_chars=args.max_response_chars)
    lines = (json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n" for record in records)
    if args.output == "-":
        sys.stdout.reconfigure(encoding="utf-8")
        sys.stdout.writelines(lines)
    else:
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.writelines(lines)
    return 0


def build_in_fresh_interpreter(timeout: float = 120) -> bytes:
    """The corpus as JSON lines, built by a new, isolated interpreter (``python -I``).

    Docstrings and signatures are read from live objects, and libraries loaded in a long-lived
    worker patch some of them (transformers adds methods to ``logging.Logger``; Airflow replaces
    ``warnings.showwarning``). Building in a fresh process keeps the corpus, and so the dataset
    version, a function of the Python build alone."""
    import subprocess

    result = subprocess.run([sys.executable, "-I", __file__, "-"], capture_output=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"building the bundled corpus failed: {result.stderr.decode(errors='replace')[-2000:]}")
    return result.stdout


if __name__ == "__main__":
    sys.exit(main())
