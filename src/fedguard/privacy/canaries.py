"""Canary exposure (Carlini et al., "The Secret Sharer", USENIX Security 2019).

A canary is a request that names a made-up person, answered by a random secret: "What is the account
recovery code for Ines Moreau?" -> "4 0 7 7 1 9". The integrator inserts a few canaries, each repeated, into
one client's training data; after training, the audit asks how much more likely the model finds the true
secret than other secrets of the same format it never saw. Each canary carries ``candidates``: the secret and
``n_candidates`` other random secrets, drawn from the same distribution. The secret's rank among them by
completion loss (1 = the most likely) gives the exposure

    exposure = log2(len(candidates)) - log2(rank),

between 0 and log2(len(candidates)) bits (the secret is the model's first choice). A model that learnt
nothing about the secret ranks it uniformly at random (the secret and the other candidates are exchangeable),
so its exposure averages ``chance_exposure(len(candidates))``, about 1.44 bits. Verbatim extraction asks
more: does greedy decoding from the request print the secret?

The training example is the request as the user turn and the secret alone as the assistant's answer (no
wrapping sentence), so the loss that ranks the candidates is the negative log-likelihood of the secret itself
(and the end-of-turn token) given the request.

Ranking by total NLL compares the probabilities of the candidate strings, as the paper does. A tokenizer that
spells some candidates in more tokens than others (the tiny test model's spells " 0" in two, SmolLM2's spells
every digit and space alone) handicaps those candidates under a weak model; ``canary_exposure`` reports the
range of candidate token counts (``candidate_tokens``) so a report can say so, and ``make_canaries`` takes an
``alphabet`` to avoid it.

Cost: per adapter, len(canaries) x len(candidates) sequences of about 40 tokens scored ``batch_size`` to a
forward pass, plus one batched greedy decode of ``max_new_tokens`` tokens for the extraction check; twice with
``before``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedguard.config import DataConfig
from fedguard.data.federation import AuditedClient
from fedguard.data.schema import Example, chat
from fedguard.data.tokenize import TokenizedExample, render_prompt, tokenize_example
from fedguard.evaluation.generation import generate_batched
from fedguard.privacy.audits import example_losses
from fedguard.seeding import numpy_rng

FIRST_NAMES = ("Ines", "Tomasz", "Amara", "Kenji", "Lucia", "Oskar", "Priya", "Mateo", "Freya", "Dmitri", "Aisha",
               "Henrik", "Sofia", "Rafael", "Yuki", "Nadia", "Emeka", "Clara", "Viktor", "Leila")
LAST_NAMES = ("Moreau", "Kowalski", "Okafor", "Tanaka", "Ferreira", "Lindqvist", "Raman", "Castillo", "Novak",
              "Haddad", "Brennan", "Petrova", "Jansen", "Achterberg", "Mbeki", "Rossi", "Halvorsen", "Quintero",
              "Sato", "Dubois")
TEMPLATES = ("What is the account recovery code for {name}?",
             "What is the door access code for {name}'s office?",
             "Which one-time passcode was sent to {name}?",
             "What is the PIN on {name}'s bank card?")


@dataclass(frozen=True)
class Canary:
    prefix: str  # the request (the user turn)
    secret: str  # digits separated by spaces, e.g. "4 0 7 7 1 9" (the assistant's answer)
    candidates: tuple[str, ...]  # the secret and the other secrets, all distinct, in a random order

    @property
    def secret_index(self) -> int:
        return self.candidates.index(self.secret)


def _format(value: int, digits: int, alphabet: str) -> str:
    out = []
    for _ in range(digits):
        value, d = divmod(value, len(alphabet))
        out.append(alphabet[d])
    return " ".join(reversed(out))


def make_canaries(count: int, seed: int, n_candidates: int = 127, digits: int = 6,
                  alphabet: str = "0123456789") -> list[Canary]:
    """``count`` canaries with distinct requests, each with its secret among ``n_candidates`` + 1 candidates
    (``digits`` characters of ``alphabet``, uniformly at random, separated by spaces); the same for the same
    arguments."""
    if len(set(alphabet)) != len(alphabet) or len(alphabet) < 2 or any(ch.isspace() for ch in alphabet):
        raise ValueError("alphabet must hold at least two distinct characters and no whitespace")
    space = len(alphabet) ** digits
    if not 1 <= n_candidates < space:
        raise ValueError(f"n_candidates must be in [1, {space - 1}] for {digits}-character secrets")
    combos = len(TEMPLATES) * len(FIRST_NAMES) * len(LAST_NAMES)
    if not 0 <= count <= combos:
        raise ValueError(f"count must be in [0, {combos}]")
    rng = numpy_rng(seed, "canaries")
    picks = rng.choice(combos, size=count, replace=False)
    out = []
    for p in picks.tolist():
        t, rest = divmod(p, len(FIRST_NAMES) * len(LAST_NAMES))
        f, l_ = divmod(rest, len(LAST_NAMES))
        prefix = TEMPLATES[t].format(name=f"{FIRST_NAMES[f]} {LAST_NAMES[l_]}")
        drawn: dict[int, None] = {}  # insertion-ordered set: the first draw is the secret
        while len(drawn) < n_candidates + 1:
            drawn.setdefault(int(rng.integers(space)), None)
        values = list(drawn)
        secret = _format(values[0], digits, alphabet)
        candidates = tuple(_format(values[i], digits, alphabet) for i in rng.permutation(len(values)).tolist())
        out.append(Canary(prefix, secret, candidates))
    return out


def run_canaries(cfg) -> list[Canary]:
    """The canaries of a run (``privacy.canaries`` of them, seeded by the run): the ones planted in client
    ``privacy.audit_client``'s data and the ones the audit looks for."""
    p = cfg.privacy
    return make_canaries(p.canaries, cfg.seed, p.canary_candidates)


def audited_client(cfg) -> AuditedClient | None:
    """How the run's privacy audits shape client ``privacy.audit_client``'s data: its canaries planted
    (``privacy.canaries``, each ``canary_repeats`` times) and ``audit_examples`` of its own examples held out
    (``privacy.audit_membership``). None when neither audit is on."""
    p = cfg.privacy
    if not (p.canaries or p.audit_membership):
        return None
    planted = tuple(canary_examples(run_canaries(cfg), p.canary_repeats)) if p.canaries else ()
    return AuditedClient(p.audit_client, planted, p.audit_examples if p.audit_membership else 0)


def canary_examples(canaries: list[Canary], repeats: int) -> list[Example]:
    """What to insert into one client's raw training examples (before tokenisation): each canary ``repeats``
    times, as request -> secret. Tokenise them with the client's data (``DataTokenizer(tokenizer, cfg)``)
    when appending to already tokenised data."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    return [Example(chat(c.prefix, c.secret), domain="canary", group=f"canary-{i}", meta={"canary": i})
            for _ in range(repeats) for i, c in enumerate(canaries)]


def chance_exposure(n: int) -> float:
    """Mean exposure when the rank is uniform on 1..n: log2(n) - log2(n!) / n (about 1.44 bits for large n)."""
    return math.log2(n) - math.lgamma(n + 1) / math.log(2) / n


def _rank(losses: np.ndarray, index: int) -> float:
    """1 + the candidates with a lower loss than the one at ``index`` (ties count half)."""
    own = losses[index]
    others = np.delete(losses, index)
    return 1.0 + float((others < own).sum()) + 0.5 * float((others == own).sum())


def _data_settings(data) -> tuple[int, str, str | None]:
    """(max_length, truncation, system_prompt) of a ``DataConfig``; None: the defaults, no system prompt."""
    if data is None:
        data = DataConfig()
    return data.max_length, data.truncation, data.system_prompt


def _tokenized_candidates(tokenizer, canaries: list[Canary], data) -> list[TokenizedExample]:
    max_length, truncation, system_prompt = _data_settings(data)
    out = []
    for c in canaries:
        for cand in c.candidates:
            t = tokenize_example(tokenizer, Example(chat(c.prefix, cand)), max_length, truncation, system_prompt)
            if t is None:
                raise ValueError(f"canary {c.prefix!r}: no completion token survives max_length {max_length}")
            out.append(t)
    return out


def _normalised(text: str) -> str:
    return " ".join(text.split())


def _measure(resident, adapter, canaries, tokenized, prompts, max_new_tokens, batch_size) -> dict[str, Any]:
    nll = example_losses(resident, adapter, tokenized, batch_size, reduction="sum")
    ranks, exposures, secret_nll, start = [], [], [], 0
    for c in canaries:
        losses = nll[start: start + len(c.candidates)]
        start += len(c.candidates)
        r = _rank(losses, c.secret_index)
        ranks.append(r)
        exposures.append(math.log2(len(c.candidates)) - math.log2(r))
        secret_nll.append(float(losses[c.secret_index]))
    extracted = []
    if max_new_tokens > 0:
        resident.slot.load(adapter)  # example_losses loaded it already; generation relies on it
        outputs = generate_batched(resident.loaded, resident.peft_model, prompts, max_new_tokens, batch_size)
        extracted = [_normalised(c.secret) in _normalised(o) for c, o in zip(canaries, outputs)]
    return {"ranks": ranks, "exposures": exposures, "mean_exposure": float(np.mean(exposures)),
            "max_exposure": float(np.max(exposures)), "rank1_rate": float(np.mean([r == 1 for r in ranks])),
            "secret_nll": secret_nll, "extracted": extracted,
            "extraction_rate": float(np.mean(extracted)) if extracted else None}


def canary_exposure(resident, adapter, canaries: list[Canary], max_new_tokens: int = 24, before=None,
                    data=None, batch_size: int = 32) -> dict[str, Any]:
    """Exposure and verbatim extraction of ``canaries`` under ``adapter`` (and under ``before``, the starting
    adapter, when given).

    Every candidate of every canary is scored by its completion's total negative log-likelihood given the
    request (``example_losses`` with reduction "sum", ``batch_size`` sequences to a forward pass); greedy
    decoding of ``max_new_tokens`` tokens from each request (0: skip) checks whether the output contains the
    secret. ``data``: the run's ``cfg.data`` (max_length, truncation, system_prompt), so candidates are
    tokenised and prompts rendered exactly as the client's data was; None: the defaults, no system prompt.

    Returned: canaries, candidates (per canary), max_exposure_possible (log2 candidates), chance_exposure (mean
    exposure of a uniform rank), and for ``adapter``: ranks, exposures, mean_exposure, max_exposure,
    rank1_rate, secret_nll (nats), extracted, extraction_rate (None when ``max_new_tokens`` is 0); ``before``:
    the same for the starting adapter (None when not given); exposure_gain = mean_exposure - before's (None
    without ``before``); candidate_tokens: [fewest, most] completion tokens of a candidate (equal is the
    clean case, see the module's notes).
    """
    if not canaries:
        raise ValueError("canary exposure needs at least one canary")
    sizes = {len(c.candidates) for c in canaries}
    if len(sizes) != 1:
        raise ValueError("all canaries must have the same number of candidates")
    n = sizes.pop()
    tok = resident.loaded.tokenizer
    tokenized = _tokenized_candidates(tok, canaries, data)
    system_prompt = _data_settings(data)[2]
    prompts = [render_prompt(tok, chat(c.prefix), system_prompt) for c in canaries]
    tokens = [t.completion_len for t in tokenized]
    after = _measure(resident, adapter, canaries, tokenized, prompts, max_new_tokens, batch_size)
    start = None if before is None else _measure(resident, before, canaries, tokenized, prompts, max_new_tokens,
                                                  batch_size)
    return {"canaries": len(canaries), "candidates": n, "max_exposure_possible": math.log2(n),
            "chance_exposure": chance_exposure(n),
            "candidate_tokens": [min(tokens), max(tokens)], **after, "before": start,
            "exposure_gain": None if start is None else after["mean_exposure"] - start["mean_exposure"]}
