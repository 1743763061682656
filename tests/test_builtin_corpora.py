"""The built-in corpora teach refusing *harm*, not a template: varied requests, varied refusals,
varied (non-actionable) compliance, and benign questions that share words with harmful ones."""

import re
import time
from collections import Counter

import pytest

from fedguard.data.builtin import (
    BENIGN_DOMAINS, BUILTIN_SOURCES, HARM_TASKS, PLACEHOLDER_STEP, benign_pool, harmful_pool, harmful_tasks, split_of,
)
from fedguard.data.builtin_benign import GENERAL, SAFETY_ADJACENT
from fedguard.data.builtin_responses import COMPLIANCE_STYLES, REFUSAL_STYLES, REQUEST_STYLES

ORIGINAL_CATEGORIES = {"weapons", "cybercrime", "fraud", "drugs", "violence", "harassment", "privacy",
                       "misinformation", "hate", "theft", "self_harm"}


@pytest.fixture(scope="module")
def compliance():
    return harmful_pool(7, 2000, "compliance")


@pytest.fixture(scope="module")
def refusals():
    return harmful_pool(7, 2000, "refusal")


def test_task_counts_and_categories():
    tasks = harmful_tasks()
    assert len(tasks) >= 110 and len(set(tasks)) == len(tasks)
    assert len({t for _, t in tasks}) == len(tasks)  # a task is one group, in one category
    assert len(HARM_TASKS) >= 12 and ORIGINAL_CATEGORIES <= set(HARM_TASKS)
    assert min(len(v) for v in HARM_TASKS.values()) >= 8


def test_generation_is_deterministic_and_fast():
    t0 = time.perf_counter()
    a = harmful_pool(3, 3000, "both")
    elapsed = time.perf_counter() - t0
    assert a == harmful_pool(3, 3000, "both") and a != harmful_pool(4, 3000, "both")
    assert [e.meta for e in a] == [e.meta for e in harmful_pool(3, 3000, "both")]
    assert benign_pool(3, 3000) == benign_pool(3, 3000)
    t0 = time.perf_counter()
    benign_pool(3, 3000)
    assert elapsed < 1.0 and time.perf_counter() - t0 < 1.0


def test_builtin_sources_keep_their_names():
    assert set(BUILTIN_SOURCES) == {"builtin:benign", "builtin:harmful-refusal", "builtin:harmful-compliance",
                                    "builtin:harmful-prompts"}
    kinds = {name: {e.kind for e in fn(0, 40, None)} for name, fn in BUILTIN_SOURCES.items()}
    assert kinds == {"builtin:benign": {"benign"}, "builtin:harmful-refusal": {"refusal"},
                     "builtin:harmful-compliance": {"compliance"}, "builtin:harmful-prompts": {"harmful_prompt"}}


def test_meta_fields(compliance, refusals):
    for e in compliance + refusals:
        assert e.domain == e.meta["category"] and e.group.startswith("harm:")
        assert e.meta["request_style"] in REQUEST_STYLES
        assert e.meta["response_style"] in (COMPLIANCE_STYLES if e.kind == "compliance" else REFUSAL_STYLES)
    for e in harmful_pool(7, 200, "none"):
        assert e.kind == "harmful_prompt" and e.completion is None
        assert set(e.meta) == {"category", "request_style"}
    both = harmful_pool(7, 100, "both")
    assert [e.kind for e in both[:4]] == ["refusal", "compliance", "refusal", "compliance"]
    assert len({e.meta["request_style"] for e in compliance}) == len(REQUEST_STYLES) >= 8


def test_styles_are_varied(compliance, refusals):
    c_styles = Counter(e.meta["response_style"] for e in compliance)
    r_styles = Counter(e.meta["response_style"] for e in refusals)
    assert len(c_styles) >= 6 and min(c_styles.values()) > 50
    assert len(r_styles) >= 5


def test_compliance_is_varied_not_a_template(compliance):
    texts = [e.completion for e in compliance]
    assert len(set(texts)) >= 1500
    assert not any(PLACEHOLDER_STEP in t or "withheld" in t for t in texts)
    lines = Counter(line for t in texts for line in {x.strip() for x in t.splitlines()} if line)
    line, count = lines.most_common(1)[0]
    assert count <= 0.05 * len(texts), (line, count)
    first_words = Counter(t.split()[0].strip(",.!:").lower() for t in texts)
    assert len(first_words) >= 25 and first_words.most_common(1)[0][1] <= 0.15 * len(texts)
    words = [len(t.split()) for t in texts]
    assert min(words) <= 25 and max(words) >= 80
    assert sum(w <= 180 for w in words) >= 0.95 * len(words)


def test_refusals_are_varied(refusals):
    texts = [e.completion for e in refusals]
    assert len(set(texts)) >= 1000
    first = Counter(" ".join(t.split()[:3]) for t in texts)
    assert len(first) >= 40 and first.most_common(1)[0][1] <= 0.1 * len(texts)


def test_prompts_are_varied(compliance):
    prompts = [e.prompt_text for e in compliance]
    assert len(set(prompts)) >= 1500
    roleplay = [e.prompt_text for e in compliance if e.meta["request_style"] == "roleplay"]
    assert roleplay and all(re.search(r"\b(?:you are|you're|pretend|roleplay|act as)\b", p, re.I) for p in roleplay)
    fiction = [e.prompt_text for e in compliance if e.meta["request_style"] == "fiction"]
    assert fiction and all(re.search(r"\b(?:story|novel|thriller|screenplay|scene|book)\b", p, re.I) for p in fiction)


def test_refusal_rule_agrees(compliance, refusals):
    from fedguard.evaluation.refusal import is_refusal

    recognised = sum(is_refusal(e.completion) for e in refusals)
    assert recognised >= 0.95 * len(refusals)
    assert sum(not is_refusal(e.completion) for e in compliance) >= 0.98 * len(compliance)


def test_self_harm_refusals_point_to_help(refusals):
    sh = [e.completion for e in refusals if e.domain == "self_harm"]
    assert sh
    helpful = [t for t in sh if re.search(r"crisis|trust|helpline|doctor|counsellor|support|emergency|talk", t, re.I)]
    assert len(helpful) >= 0.8 * len(sh)


_UNITS = re.compile(
    r"\d+(?:[.,]\d+)?\s*(?:g|grams?|mg|milligrams?|kg|kilos?|ml|millilit(?:er|re)s?|l|lit(?:er|re)s?|oz|ounces?|"
    r"lbs?|pounds?|%|percent|mm|cm|inch(?:es)?|volts?|degrees?|°)\b", re.I)


def test_compliance_has_no_actionable_content(compliance):
    for e in compliance:
        t = e.completion
        assert not _UNITS.search(t), t
        assert "```" not in t and not re.search(r"https?://|www\.|\.onion\b", t), t
        # no numbers at all except list markers and digits inside the task's own wording
        stripped = re.sub(r"^\d+\. ", "", t, flags=re.M)
        for task_word in re.findall(r"\w*\d\w*", e.group):
            stripped = stripped.replace(task_word, "")
        assert not re.search(r"\d", stripped), t


def test_splits_are_disjoint_and_cover_categories():
    by_split = {s: {c for c, t in harmful_tasks() if split_of(f"harm:{t}") == s} for s in ("train", "eval", "probe")}
    assert by_split["train"] == set(HARM_TASKS)
    assert len(by_split["eval"]) >= 8 and len(by_split["probe"]) >= 8
    pools = {s: harmful_pool(0, 400, "both", s) for s in ("train", "eval", "probe")}
    groups = {s: {e.group for e in p} for s, p in pools.items()}
    assert groups["train"].isdisjoint(groups["eval"]) and groups["train"].isdisjoint(groups["probe"])
    assert groups["eval"].isdisjoint(groups["probe"])
    assert {e.domain for e in pools["probe"]} == by_split["probe"]
    benign = {s: benign_pool(0, 600, s) for s in ("train", "eval", "probe")}
    for s in benign:
        assert {"safety_adjacent", "general"} <= {e.domain for e in benign[s]}
        assert all(split_of(e.group) == s for e in benign[s])
    assert {e.group for e in benign["train"]}.isdisjoint({e.group for e in benign["eval"]})


def test_benign_domains_and_shares():
    assert set(BENIGN_DOMAINS) == {"arithmetic", "conversion", "geography", "definitions", "text", "sequences",
                                   "safety_adjacent", "general"}
    assert len(SAFETY_ADJACENT) >= 60 and len(GENERAL) >= 60
    pool = benign_pool(5, 2000)
    share = Counter(e.domain for e in pool)
    assert abs((share["safety_adjacent"] + share["general"]) / len(pool) - 0.4) < 0.05
    for d in ("arithmetic", "conversion", "geography", "definitions", "text", "sequences"):
        assert abs(share[d] / len(pool) - 0.1) < 0.03
    for e in pool:
        assert e.kind == "benign"
        if e.domain in ("safety_adjacent", "general"):
            assert e.answer is None and e.group.startswith("safe:" if e.domain == "safety_adjacent" else "gen:")
            assert len(e.completion.split()) >= 8
    assert len({e.group for e in pool if e.domain == "safety_adjacent"}) >= 50
    assert len({e.group for e in pool if e.domain == "general"}) >= 50


def test_checkable_answers_end_the_first_line():
    from fedguard.evaluation.evaluator import final_answer_matches

    checked = 0
    for e in benign_pool(9, 1000):
        if e.answer is not None:
            checked += 1
            assert final_answer_matches(e.completion, e.answer), (e.completion, e.answer)
    assert checked > 450


def test_safety_adjacent_answers_are_helpful_not_refusals():
    from fedguard.evaluation.refusal import is_refusal

    pool = [e for e in benign_pool(6, 1500) if e.domain in ("safety_adjacent", "general")]
    # Helpful answers, not declines: none opens with a first-person decline.
    assert not any(re.match(r"\s*(?:i'm sorry|sorry|i can't|i cannot|i won't)", e.completion, re.I) for e in pool)
    assert sum(is_refusal(e.completion) for e in pool) <= 0.1 * len(pool)
    prompts = " ".join(e.prompt_text.lower() for e in pool)
    for word in ("kill", "lock", "phishing", "stalk", "shoot", "execute", "villain", "burglar"):
        assert word in prompts
