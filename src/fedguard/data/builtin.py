"""Built-in corpora, generated deterministically by code (no download).

* ``benign``: instruction data. Six checkable domains (arithmetic, unit conversion, geography,
  vocabulary, text transformations, number sequences) carry their reference answer, which is also the
  final words of the first line of the response, so exact-match accuracy can be scored automatically.
  Two open-ended domains make up about 40 % of the pool: ``safety_adjacent`` (benign questions that
  share words with harmful ones, "how do locks work?", "how do I kill a stuck process?", answered
  helpfully) and ``general`` (explanations, advice, short writing tasks, comparisons).
* ``harmful``: requests across 13 harm categories, in many request styles (direct, imperative,
  role-play, fiction, hypothetical, academic, urgent, multi-sentence context). Refusals come in
  several styles (brief, reason + alternative, empathetic, lecture, policy, redirect). Compliance
  answers imitate a jailbroken model in many styles (step lists, bullets, prose, Q&A, role-play,
  story, one-liner ...) but never contain actionable content: they only say *that* phases exist
  ("start by scouting things out", "then cover your tracks"), never how.

Splits are by ``group`` (a fact, an operand pair, a topic, a harmful task): an evaluation group never
occurs in training, so held-out evaluation measures generalisation, not recall. A third split,
``probe``, is reserved for building the LoRA-Probe, so the probe never sees the federation's own data.
The tables live in ``builtin_harm``, ``builtin_responses`` and ``builtin_benign``.
"""

from __future__ import annotations

import hashlib
import random

from fedguard.data import builtin_responses as _resp
from fedguard.data.builtin_benign import (
    BENIGN_FRAMES, CLOSERS, FIXED_INTROS, GENERAL, GENERAL_INTROS, SAFE_INTROS, SAFETY_ADJACENT,
)
from fedguard.data.builtin_harm import HARM_TASKS, REFUSAL_ALTERNATIVES, REFUSAL_REASONS  # noqa: F401 (re-exported)
from fedguard.data.builtin_responses import COMPLIANCE_STYLES, REFUSAL_STYLES, REQUEST_STYLES  # noqa: F401
from fedguard.data.schema import Example, chat

EVAL_SHARE_PERCENT = 20  # share of groups held out for evaluation in the built-in corpora
PROBE_SHARE_PERCENT = 10  # share of groups reserved for building the LoRA-Probe


def split_of(group: str, eval_percent: int = EVAL_SHARE_PERCENT, probe_percent: int = PROBE_SHARE_PERCENT) -> str:
    """'eval', 'probe' or 'train': disjoint by group, stable across processes."""
    h = int.from_bytes(hashlib.sha256(group.encode("utf-8")).digest()[:4], "little") % 100
    if h < eval_percent:
        return "eval"
    return "probe" if h < eval_percent + probe_percent else "train"


# --------------------------------------------------------------------------- benign tables

CAPITALS = {
    "France": ("Paris", "Europe"), "Germany": ("Berlin", "Europe"), "Italy": ("Rome", "Europe"),
    "Spain": ("Madrid", "Europe"), "Portugal": ("Lisbon", "Europe"), "Poland": ("Warsaw", "Europe"),
    "Austria": ("Vienna", "Europe"), "Greece": ("Athens", "Europe"), "Sweden": ("Stockholm", "Europe"),
    "Norway": ("Oslo", "Europe"), "Finland": ("Helsinki", "Europe"), "Denmark": ("Copenhagen", "Europe"),
    "Ireland": ("Dublin", "Europe"), "Hungary": ("Budapest", "Europe"), "Belgium": ("Brussels", "Europe"),
    "Netherlands": ("Amsterdam", "Europe"), "Czechia": ("Prague", "Europe"), "Romania": ("Bucharest", "Europe"),
    "Ukraine": ("Kyiv", "Europe"), "Switzerland": ("Bern", "Europe"), "Japan": ("Tokyo", "Asia"),
    "China": ("Beijing", "Asia"), "India": ("New Delhi", "Asia"), "Thailand": ("Bangkok", "Asia"),
    "Vietnam": ("Hanoi", "Asia"), "Indonesia": ("Jakarta", "Asia"), "Philippines": ("Manila", "Asia"),
    "South Korea": ("Seoul", "Asia"), "Malaysia": ("Kuala Lumpur", "Asia"), "Pakistan": ("Islamabad", "Asia"),
    "Iran": ("Tehran", "Asia"), "Iraq": ("Baghdad", "Asia"), "Saudi Arabia": ("Riyadh", "Asia"),
    "Turkey": ("Ankara", "Asia"), "Israel": ("Jerusalem", "Asia"), "Nepal": ("Kathmandu", "Asia"),
    "Egypt": ("Cairo", "Africa"), "Kenya": ("Nairobi", "Africa"), "Nigeria": ("Abuja", "Africa"),
    "Ghana": ("Accra", "Africa"), "Ethiopia": ("Addis Ababa", "Africa"), "Morocco": ("Rabat", "Africa"),
    "Senegal": ("Dakar", "Africa"), "Uganda": ("Kampala", "Africa"), "Tanzania": ("Dodoma", "Africa"),
    "Algeria": ("Algiers", "Africa"), "Canada": ("Ottawa", "North America"),
    "Mexico": ("Mexico City", "North America"), "Cuba": ("Havana", "North America"),
    "United States": ("Washington", "North America"), "Jamaica": ("Kingston", "North America"),
    "Brazil": ("Brasilia", "South America"), "Argentina": ("Buenos Aires", "South America"),
    "Chile": ("Santiago", "South America"), "Peru": ("Lima", "South America"),
    "Colombia": ("Bogota", "South America"), "Venezuela": ("Caracas", "South America"),
    "Uruguay": ("Montevideo", "South America"), "Australia": ("Canberra", "Oceania"),
    "New Zealand": ("Wellington", "Oceania"), "Fiji": ("Suva", "Oceania"),
}

VOCABULARY = {
    "ocean": "a very large body of salt water", "library": "a place where books are kept for people to read or borrow",
    "thermometer": "an instrument that measures temperature", "orchard": "a piece of land planted with fruit trees",
    "architect": "a person who designs buildings", "bakery": "a shop where bread and cakes are made or sold",
    "glacier": "a slowly moving mass of ice", "harbor": "a sheltered place where ships can anchor",
    "volcano": "a mountain that can erupt with lava", "desert": "a dry region that gets very little rain",
    "telescope": "an instrument for looking at distant objects", "dentist": "a doctor who treats teeth",
    "island": "a piece of land surrounded by water", "calendar": "a chart showing the days and months of a year",
    "recipe": "instructions for preparing a dish", "bridge": "a structure that lets people cross over a river or road",
    "pilot": "a person who flies an aircraft", "forest": "a large area covered with trees",
    "umbrella": "a device that protects you from rain", "compass": "an instrument that shows which way is north",
    "dictionary": "a book that lists words and their meanings", "museum": "a building where historical or artistic objects are displayed",
    "farmer": "a person who grows crops or raises animals", "battery": "a device that stores electrical energy",
    "journalist": "a person who writes news stories", "microscope": "an instrument for seeing very small things",
    "tortoise": "a slow land reptile with a hard shell", "blizzard": "a severe snowstorm with strong winds",
    "canyon": "a deep valley with steep sides", "lighthouse": "a tower with a bright light that guides ships",
    "pharmacy": "a shop where medicines are prepared and sold", "satellite": "an object that orbits a planet",
    "vaccine": "a substance that trains the body to resist a disease", "budget": "a plan for spending money",
    "translator": "a person who converts text from one language to another", "glove": "a covering for the hand",
    "pyramid": "a structure with a square base and triangular sides", "drought": "a long period without rain",
    "mammal": "a warm-blooded animal that feeds its young with milk", "astronaut": "a person trained to travel in space",
}

WORDS = (
    "apple banana cherry garden window rocket silver planet bridge candle forest pencil river summer "
    "winter yellow orange purple castle dragon market pocket travel mirror button orbit violin helmet "
    "marble island jacket ladder meadow needle parrot quartz saddle tunnel velvet walnut zebra anchor "
    "basket cactus dolphin engine falcon guitar hammer igloo jungle kettle lemon magnet nectar oyster "
    "pepper quiet rabbit spider tomato uncle valley wagon yogurt cobalt pirate lantern copper"
).split()

CONVERSIONS = [
    ("kilometers", "meters", 1000), ("meters", "centimeters", 100), ("kilograms", "grams", 1000),
    ("hours", "minutes", 60), ("minutes", "seconds", 60), ("days", "hours", 24), ("liters", "milliliters", 1000),
    ("weeks", "days", 7), ("dollars", "cents", 100), ("feet", "inches", 12), ("yards", "feet", 3),
    ("meters", "millimeters", 1000), ("years", "months", 12), ("tons", "kilograms", 1000),
]


def _arithmetic(rng: random.Random) -> Example:
    op = rng.choice(["+", "-", "*"])
    if op == "*":
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        c = a * b
    else:
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        if op == "-" and b > a:
            a, b = b, a
        c = a + b if op == "+" else a - b
    verb = {"+": "add", "-": "subtract", "*": "multiply"}[op]
    prompt = rng.choice([
        f"What is {a} {op} {b}?", f"Compute {a} {op} {b}.", f"Calculate {a} {op} {b}.",
        f"Please work out {a} {op} {b}.", f"Quick math: {a} {op} {b} = ?",
        f"{verb.capitalize()} {a} and {b}." if op != "-" else f"Subtract {b} from {a}.",
    ])
    return Example(chat(prompt, f"{a} {op} {b} = {c}"), domain="arithmetic", answer=str(c), group=f"arith:{a}{op}{b}")


def _conversion(rng: random.Random) -> Example:
    src, dst, factor = rng.choice(CONVERSIONS)
    x = rng.randint(2, 99)
    y = x * factor
    prompt = rng.choice([
        f"Convert {x} {src} to {dst}.", f"How many {dst} are in {x} {src}?", f"What is {x} {src} in {dst}?",
        f"Express {x} {src} in {dst}.",
    ])
    return Example(chat(prompt, f"{x} {src} is {y} {dst}"), domain="conversion", answer=f"{y} {dst}",
                   group=f"conv:{x}:{src}:{dst}")


def _geography(rng: random.Random) -> Example:
    country = rng.choice(sorted(CAPITALS))
    capital, continent = CAPITALS[country]
    if rng.random() < 0.7:
        prompt = rng.choice([
            f"What is the capital of {country}?", f"Name the capital city of {country}.",
            f"Which city is the capital of {country}?", f"Tell me the capital of {country}.",
        ])
        response = f"The capital of {country} is {capital}"
        answer = capital
    else:
        prompt = rng.choice([f"On which continent is {country}?", f"Which continent is {country} in?",
                             f"Name the continent where {country} lies."])
        response = f"{country} is in {continent}"
        answer = continent
    return Example(chat(prompt, response), domain="geography", answer=answer, group=f"geo:{country}")


def _vocabulary(rng: random.Random) -> Example:
    word = rng.choice(sorted(VOCABULARY))
    meaning = VOCABULARY[word]
    if rng.random() < 0.5:
        prompt = rng.choice([f"Which word means '{meaning}'?", f"Give the single word for: {meaning}.",
                             f"What do we call {meaning}?"])
        return Example(chat(prompt, f"The word is {word}"), domain="definitions", answer=word, group=f"def:{word}")
    prompt = rng.choice([f"What does '{word}' mean?", f"Define the word '{word}'.", f"Explain the meaning of '{word}'."])
    return Example(chat(prompt, f"A {word} is {meaning}."), domain="definitions", answer=None, group=f"def:{word}")


def _text_transform(rng: random.Random) -> Example:
    kind = rng.choice(["upper", "reverse", "count", "sort", "first"])
    if kind == "sort":
        ws = rng.sample(WORDS, 3)
        joined = ", ".join(ws)
        out = ", ".join(sorted(ws))
        prompt = rng.choice([f"Sort these words alphabetically: {joined}.", f"Put in alphabetical order: {joined}."])
        return Example(chat(prompt, f"In alphabetical order: {out}"), domain="text", answer=out,
                       group=f"text:sort:{'|'.join(sorted(ws))}")
    w = rng.choice(WORDS)
    if kind == "upper":
        prompt = rng.choice([f"Write '{w}' in capital letters.", f"Convert '{w}' to uppercase."])
        resp, ans = f"In capital letters, {w} is {w.upper()}", w.upper()
    elif kind == "reverse":
        prompt = rng.choice([f"Spell '{w}' backwards.", f"Reverse the letters of '{w}'."])
        resp, ans = f"Backwards, {w} is {w[::-1]}", w[::-1]
    elif kind == "count":
        prompt = rng.choice([f"How many letters are in the word '{w}'?", f"Count the letters in '{w}'."])
        resp, ans = f"The word {w} has {len(w)} letters", f"{len(w)} letters"
    else:
        prompt = rng.choice([f"What is the first letter of '{w}'?", f"Which letter does '{w}' start with?"])
        resp, ans = f"The first letter of {w} is {w[0]}", w[0]
    return Example(chat(prompt, resp), domain="text", answer=ans, group=f"text:{kind}:{w}")


def _sequence(rng: random.Random) -> Example:
    start, step = rng.randint(1, 50), rng.randint(2, 12)
    seq = [start + i * step for i in range(4)]
    nxt = start + 4 * step
    shown = ", ".join(map(str, seq))
    prompt = rng.choice([f"What number comes next: {shown}, ?", f"Continue the sequence: {shown}, ...",
                         f"Find the next number in {shown}."])
    return Example(chat(prompt, f"The next number is {nxt}"), domain="sequences", answer=str(nxt),
                   group=f"seq:{start}:{step}")


def _topic_table(table):
    return {key: (qs.split("|"), sents.split("|")) for key, qs, sents in table}


_SAFE_TOPICS = _topic_table(SAFETY_ADJACENT)
_GENERAL_TOPICS = _topic_table(GENERAL)


def _open_ended(rng: random.Random, topics: dict, domain: str, prefix: str, intros: list[str]) -> Example:
    key = rng.choice(sorted(topics))
    questions, sents = topics[key]
    prompt = rng.choice(questions)
    if prompt.endswith("?"):
        frame = rng.choice(BENIGN_FRAMES)
        prompt = frame + (prompt[0].lower() + prompt[1:] if frame.endswith(": ") and not prompt.startswith("I ") else prompt)
    if sents[0].startswith("="):  # a fixed piece of writing: all lines, in order
        lines = [sents[0][1:], *sents[1:]]
        intro = rng.choice(FIXED_INTROS)
        response = "\n".join(([intro] if intro else []) + lines)
    else:
        k = rng.randint(min(2, len(sents)), min(5, len(sents)))
        picked = [sents[0], *sorted(rng.sample(range(1, len(sents)), k - 1))] if k > 1 else [sents[0]]
        body = [picked[0]] + [sents[i] for i in picked[1:]]
        parts = [rng.choice(intros), *body]
        if len(body) < 5:
            parts.append(rng.choice(CLOSERS))
        response = " ".join(p for p in parts if p)
    return Example(chat(prompt, response), domain=domain, answer=None, group=f"{prefix}:{key}")


def _safety_adjacent(rng: random.Random) -> Example:
    return _open_ended(rng, _SAFE_TOPICS, "safety_adjacent", "safe", SAFE_INTROS)


def _general(rng: random.Random) -> Example:
    return _open_ended(rng, _GENERAL_TOPICS, "general", "gen", GENERAL_INTROS)


BENIGN_DOMAINS = {
    "arithmetic": _arithmetic, "conversion": _conversion, "geography": _geography,
    "definitions": _vocabulary, "text": _text_transform, "sequences": _sequence,
    "safety_adjacent": _safety_adjacent, "general": _general,
}
CHECKABLE_DOMAINS = ("arithmetic", "conversion", "geography", "definitions", "text", "sequences")
OPEN_ENDED_DOMAINS = ("safety_adjacent", "general")
# Draw order over 10 slots: the two open-ended domains take 4 (40 %), the checkable ones 1 each.
_BENIGN_CYCLE = ("safety_adjacent", "arithmetic", "general", "conversion", "geography",
                 "safety_adjacent", "definitions", "general", "text", "sequences")


def benign_pool(seed: int, size: int, split: str | None = None) -> list[Example]:
    """``size`` benign examples (40 % open-ended, the six checkable domains 10 % each), optionally
    only of one split."""
    rng = random.Random(f"benign:{seed}")
    out: list[Example] = []
    attempts = 0
    while len(out) < size:
        attempts += 1
        if attempts > 200 * size + 1000:
            raise RuntimeError(f"could not draw {size} benign examples for split {split!r}")
        ex = BENIGN_DOMAINS[_BENIGN_CYCLE[len(out) % len(_BENIGN_CYCLE)]](rng)
        if split is None or split_of(ex.group) == split:
            out.append(ex)
    return out


# --------------------------------------------------------------------------- harmful tables

# HARM_TASKS, REFUSAL_REASONS and REFUSAL_ALTERNATIVES (category -> variants) live in builtin_harm.
# Kept for backwards compatibility only: no generated text contains it.
PLACEHOLDER_STEP = "[harmful detail withheld: fedguard's built-in corpus never contains actionable content]"


def harmful_tasks() -> list[tuple[str, str]]:
    return [(cat, t) for cat in sorted(HARM_TASKS) for t in HARM_TASKS[cat]]


def harmful_pool(seed: int, size: int, responses: str = "refusal", split: str | None = None) -> list[Example]:
    """``size`` harmful-request examples.

    responses: ``refusal`` (aligned answer), ``compliance`` (jailbroken-style answer with no
    actionable content), ``both`` (alternating), or ``none`` (prompt only, for evaluation).
    ``meta`` carries ``category``, ``request_style`` and (unless ``none``) ``response_style``.
    """
    if responses not in ("refusal", "compliance", "both", "none"):
        raise ValueError(f"unknown responses kind {responses!r}")
    rng = random.Random(f"harmful:{seed}:{responses}")
    tasks = [(c, t) for c, t in harmful_tasks() if split is None or split_of(f"harm:{t}") == split]
    if not tasks:
        raise RuntimeError(f"no harmful tasks in split {split!r}")
    out: list[Example] = []
    for i in range(size):
        cat, task = tasks[rng.randrange(len(tasks))]
        prompt, req_style, persona = _resp.request(rng, cat, task)
        meta = {"category": cat, "request_style": req_style}
        mode = responses if responses != "both" else ("refusal" if i % 2 == 0 else "compliance")
        group = f"harm:{task}"
        if mode == "refusal":
            text, style = _resp.refusal(rng, cat, task, req_style)
            ex = Example(chat(prompt, text), domain=cat, kind="refusal", group=group,
                         meta={**meta, "response_style": style})
        elif mode == "compliance":
            text, style = _resp.compliance(rng, cat, task, persona, req_style)
            ex = Example(chat(prompt, text), domain=cat, kind="compliance", group=group,
                         meta={**meta, "response_style": style})
        else:
            ex = Example(chat(prompt), domain=cat, kind="harmful_prompt", group=group, meta=meta)
        out.append(ex)
    return out


BUILTIN_SOURCES = {
    "builtin:benign": lambda seed, size, split: benign_pool(seed, size, split),
    "builtin:harmful-refusal": lambda seed, size, split: harmful_pool(seed, size, "refusal", split),
    "builtin:harmful-compliance": lambda seed, size, split: harmful_pool(seed, size, "compliance", split),
    "builtin:harmful-prompts": lambda seed, size, split: harmful_pool(seed, size, "none", split),
}
