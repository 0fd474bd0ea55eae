"""Synthetic traffic that is plainly not what the assistant was trained for, for trying drift
monitoring without production users (the demo) and for its tests.

- ``off_domain_prompts``: everyday questions (cooking, travel, gardening, money, sport...);
- ``foreign_prompts``: Python questions in German, Spanish or Russian;
- ``longer_prompts``: in-domain prompts padded with pasted context, several times longer.

Each is deterministic for a seed, so a test or a demo run sends the same requests every time.
``send`` puts prompts through the serving endpoint with boto3's ``invoke_endpoint``, as a client
would (with the callers' ``invoke`` key where ``make up`` made one, else the gateway's API key; see
``llmops.backends.endpoints.gateway.LocalGatewayBackend``), so the gateway
captures them; from a shell:

    python -m devtools.traffic off-domain --count 60      # or: in-domain, longer, de, es, ru
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from devtools.localstack import INVOKE_KEY_ENV, apply_environment
from llmops import storage
from llmops.backends.endpoints import backend_for
from llmops.backends.endpoints.gateway import LocalGatewayBackend
from llmops.config import get_settings
from llmops.data import versioning
from llmops.data.corpus import build_python_docs_corpus
from llmops.orchestration import storage_options_for
from llmops.prompts import load_template

_SUBJECTS = {
    "cooking": ["a sourdough loaf", "risotto", "a lemon tart", "pad thai", "a vegetable curry", "pancakes"],
    "travel": ["Lisbon", "the Scottish Highlands", "Kyoto", "a road trip in Norway", "Patagonia", "Marrakesh"],
    "gardening": ["tomatoes", "a lavender hedge", "an apple tree", "orchids", "a vegetable patch", "roses"],
    "money": ["a pension plan", "index funds", "a mortgage", "a household budget", "credit card debt", "a car loan"],
    "sport": ["a first marathon", "tennis serves", "a swimming technique", "cycling in winter", "yoga", "climbing"],
    "health": ["better sleep", "a sore back", "seasonal allergies", "drinking more water", "jet lag", "a cold"],
    "pets": ["a new puppy", "an older cat", "a rabbit's diet", "an aquarium", "a parrot", "dog training"],
}
_ASKS = [
    "What is the best way to get started with {subject}?",
    "Give me three tips about {subject} for a beginner.",
    "How much time should I plan for {subject} this weekend?",
    "What mistakes do people usually make with {subject}?",
    "Can you recommend something about {subject} for my family?",
    "I have a question about {subject}: where should I begin?",
]

_FOREIGN = {
    "de": [
        "Wie kann ich in Python eine Liste umkehren, ohne eine neue Liste zu erzeugen?",
        "Was ist der Unterschied zwischen einem Tupel und einer Liste in Python?",
        "Wie öffne ich eine Datei und lese sie Zeile für Zeile?",
        "Erkläre mir bitte, wie Dekoratoren in Python funktionieren.",
        "Wie fange ich eine Ausnahme ab und gebe eine verständliche Meldung aus?",
        "Was macht die Funktion enumerate, und wann sollte ich sie benutzen?",
        "Wie sortiere ich ein Wörterbuch nach seinen Werten?",
        "Warum ist eine Mengenabfrage schneller als die Suche in einer Liste?",
    ],
    "es": [
        "¿Cómo puedo invertir una lista en Python sin crear una lista nueva?",
        "¿Cuál es la diferencia entre una tupla y una lista en Python?",
        "¿Cómo abro un archivo y lo leo línea por línea?",
        "Explícame, por favor, cómo funcionan los decoradores en Python.",
        "¿Cómo capturo una excepción y muestro un mensaje comprensible?",
        "¿Qué hace la función enumerate y cuándo debería usarla?",
        "¿Cómo ordeno un diccionario por sus valores?",
        "¿Por qué buscar en un conjunto es más rápido que buscar en una lista?",
    ],
    "ru": [
        "Как в Python развернуть список, не создавая новый список?",
        "В чём разница между кортежем и списком в Python?",
        "Как открыть файл и прочитать его построчно?",
        "Объясни, пожалуйста, как работают декораторы в Python.",
        "Как перехватить исключение и вывести понятное сообщение?",
        "Что делает функция enumerate и когда её использовать?",
        "Как отсортировать словарь по значениям?",
        "Почему поиск в множестве быстрее, чем поиск в списке?",
    ],
}
_FOREIGN_TAILS = {
    "de": ["", " Bitte mit einem kurzen Beispiel.", " Ich benutze Python 3.12.", " Danke im Voraus!"],
    "es": ["", " Por favor, con un ejemplo corto.", " Uso Python 3.12.", " ¡Gracias de antemano!"],
    "ru": ["", " Пожалуйста, с коротким примером.", " Я использую Python 3.12.", " Заранее спасибо!"],
}
LANGUAGES = tuple(_FOREIGN)


def off_domain_prompts(count: int, seed: int = 0) -> list[str]:
    """``count`` everyday questions that have nothing to do with Python."""
    rng = random.Random(seed)
    pool = [ask.format(subject=s) for subjects in _SUBJECTS.values() for s in subjects for ask in _ASKS]
    rng.shuffle(pool)
    return [pool[i % len(pool)] for i in range(count)]


def foreign_prompts(count: int, language: str = "de", seed: int = 0) -> list[str]:
    """``count`` Python questions in ``language`` (one of ``LANGUAGES``)."""
    if language not in _FOREIGN:
        raise ValueError(f"language must be one of {', '.join(LANGUAGES)}, got {language!r}")
    rng = random.Random(seed)
    return [rng.choice(_FOREIGN[language]) + rng.choice(_FOREIGN_TAILS[language]) for _ in range(count)]


def longer_prompts(prompts: Sequence[str], count: int, factor: int = 6, seed: int = 0) -> list[str]:
    """``count`` prompts from ``prompts``, each followed by ``factor`` - 1 others pasted as context:
    the same domain, several times the length."""
    if not prompts:
        raise ValueError("longer_prompts needs prompts to lengthen")
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        head, *pasted = rng.choices(list(prompts), k=factor)
        out.append(head + "\n\nHere is what I have so far:\n\n" + "\n\n".join(pasted))
    return out


KINDS = ("in-domain", "off-domain", "longer", *LANGUAGES)
_REFUSED_KEY = ("MissingAuthenticationTokenException", "UnrecognizedClientException")


class GatewayRefusedKey(PermissionError):
    """The endpoint refused the API key: every further call would be refused too."""


def bundled_records(template_name: str) -> list[dict]:
    """The bundled Python-docs corpus as curated records would hold it (``prompt`` rendered with
    the template, ``response``), without running the pipeline: for calibrating and benchmarking
    drift checks on the training distribution."""

    template = load_template(template_name)
    records = []
    for raw in build_python_docs_corpus():
        _, prompt = template.render_instruction(raw["instruction"], raw.get("context", ""))
        records.append({"prompt": prompt, "response": raw["response"]})
    return records


def in_domain_prompts(settings, count: int, seed: int = 0) -> list[str]:
    """Prompts of the newest curated dataset's held-out splits (validation and test): the
    training distribution, never trained on."""

    options = storage_options_for(settings.store_uri, settings)
    manifest = versioning.latest_version(settings.datasets_uri(), settings.data.dataset_name, options)
    if manifest is None:
        raise LookupError(f"no curated version of {settings.data.dataset_name!r} yet; run llm_data_prep first")
    prompts = [
        r["prompt"]
        for split in ("validation", "test")
        for r in storage.read_jsonl(manifest["files"][split]["uri"], options)
    ]
    if not prompts:
        raise LookupError(
            f"{settings.data.dataset_name}@{manifest['version'][:12]} has no validation or test records to send"
        )
    random.Random(seed).shuffle(prompts)
    return [prompts[i % len(prompts)] for i in range(count)]


def prompts_of(settings, kind: str, count: int, seed: int = 0) -> list[str]:
    if kind == "in-domain":
        return in_domain_prompts(settings, count, seed)
    if kind == "off-domain":
        return off_domain_prompts(count, seed)
    if kind == "longer":
        return longer_prompts(in_domain_prompts(settings, max(count, 50), seed), count, seed=seed)
    if kind in LANGUAGES:
        return foreign_prompts(count, kind, seed)
    raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")


def caller_runtime(settings):
    """The runtime client a caller uses: on the local gateway with the ``invoke`` key ``make up``
    made (``LLMOPS_GATEWAY_INVOKE_KEY``), which may call models and nothing else; otherwise the
    serving backend's own (the gateway's key, or AWS credentials on SageMaker)."""
    invoke_key = os.environ.get(INVOKE_KEY_ENV)
    if settings.serving.backend == "local" and invoke_key:
        return LocalGatewayBackend(
            settings.serving.gateway_url, region=settings.aws.region, api_key=invoke_key
        ).runtime()
    return backend_for(settings).runtime()


def send(settings, prompts: Sequence[str], max_new_tokens: int = 16, log: Callable[[str], None] = print) -> dict:
    """Each prompt through the endpoint (a chat with the assistant's system prompt), one at a
    time; returns when it started and ended and how many calls succeeded or failed."""
    from botocore.exceptions import BotoCoreError, ClientError

    system, _ = load_template(settings.data.template).render_instruction("-")  # the assistant's system prompt
    runtime = caller_runtime(settings)
    started = datetime.now(UTC)
    ok = failed = 0
    for index, prompt in enumerate(prompts, start=1):
        body = {
            "inputs": [
                {"role": "system", "content": system},
                {"role": "user", "content": prompt},
            ],
            "parameters": {"max_new_tokens": max_new_tokens, "temperature": 0.0},
        }
        try:
            response = runtime.invoke_endpoint(
                EndpointName=settings.serving.endpoint_name,
                Body=json.dumps(body).encode(),
                ContentType="application/json",
                Accept="application/json",
            )
            response["Body"].read()
            ok += 1
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _REFUSED_KEY:
                raise GatewayRefusedKey(
                    f"{settings.serving.gateway_url} refused the API key ({exc.response['Error'].get('Message')});"
                    f" set the password of the Airflow connection {settings.serving.gateway_conn_id} or"
                    " LLMOPS_GATEWAY_API_KEY (or LLMOPS_GATEWAY_INVOKE_KEY) to a key it accepts (`make up` keeps"
                    " its own in $LLMOPS_HOME/secrets/)"
                ) from None
            failed += 1
            log(f"  call {index} failed: {exc}")
        except BotoCoreError as exc:
            failed += 1
            log(f"  call {index} failed: {exc}")
        if index % 20 == 0 or index == len(prompts):
            log(f"  sent {index}/{len(prompts)}")
    time.sleep(1.0)  # the gateway's capture writer flushes every 0.2 s
    return {"start": started.isoformat(), "end": datetime.now(UTC).isoformat(), "ok": ok, "failed": failed}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.traffic", description="Send synthetic traffic through the serving endpoint."
    )
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--count", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")

    apply_environment()

    settings = get_settings()
    try:
        prompts = prompts_of(settings, args.kind, args.count, args.seed)
    except LookupError as exc:
        print(exc, file=sys.stderr)
        return 1
    where = f"{settings.serving.endpoint_name} at {settings.serving.gateway_url}"
    print(f"Sending {len(prompts)} {args.kind} prompts to {where}")
    try:
        sent = send(settings, prompts, args.max_new_tokens)
    except GatewayRefusedKey as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"{sent['ok']} answered, {sent['failed']} failed, between {sent['start']} and {sent['end']}")
    print(
        "Analyse that window: trigger llm_drift_monitor with "
        + json.dumps({"window_start": sent["start"], "window_end": sent["end"]})
    )
    return 0 if sent["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
