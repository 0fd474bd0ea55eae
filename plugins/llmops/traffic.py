"""Synthetic traffic that is plainly not what the assistant was trained for, for trying drift
monitoring without production users (the demo) and for its tests.

- ``off_domain_prompts``: everyday questions (cooking, travel, gardening, money, sport...);
- ``foreign_prompts``: Python questions in German, Spanish or Russian;
- ``longer_prompts``: in-domain prompts padded with pasted context, several times longer.

Each is deterministic for a seed, so a test or a demo run sends the same requests every time.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

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
