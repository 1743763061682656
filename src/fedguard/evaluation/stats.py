"""Noise on rates measured on a few dozen prompts: Wilson intervals and an exact paired test."""

from __future__ import annotations

import math


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial proportion, as fractions in [0, 1] ((0, 1) for n = 0)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value for paired outcomes on the same prompts: ``only_a`` prompts counted by
    run A and not B, ``only_b`` the reverse (a binomial test of the discordant pairs at 1/2)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


# A rate in an evaluation result -> the key of the number of prompts it was measured on.
RATE_N = {"refusal_rate": "harmful_n", "compliance_rate": "harmful_n", "neither_rate": "harmful_n",
          "refusal_rate_keyword": "harmful_n", "overrefusal_rate": "overrefusal_n",
          "refusal_rate_triggered": "refusal_triggered_n"}


def rate_interval(ev: dict, key: str) -> tuple[float, float] | None:
    """95 % Wilson interval, in percent, of the rate ``ev[key]`` (a percentage over ``ev[RATE_N[key]]``
    prompts); None where the rate or its prompt count is missing."""
    v, n = ev.get(key), ev.get(RATE_N.get(key, ""))
    if not isinstance(v, int | float) or not n:
        return None
    lo, hi = wilson_interval(round(v * n / 100), n)
    return 100 * lo, 100 * hi


def format_rate(ev: dict, key: str, nd: int = 1) -> str:
    """'52.1 [38.4, 65.5]': a rate with its 95 % Wilson interval ('–' if missing; no bracket without n)."""
    v = ev.get(key)
    if not isinstance(v, int | float):
        return "–"
    ci = rate_interval(ev, key)
    return f"{v:.{nd}f}" if ci is None else f"{v:.{nd}f} [{ci[0]:.{nd}f}, {ci[1]:.{nd}f}]"


def paired_refusals(a: list[int] | None, b: list[int] | None) -> dict | None:
    """Two evaluations of the same prompts, per prompt 1 = refused: how many only A refused, only B refused,
    and the exact McNemar p of the difference; None if they were not measured on the same prompts."""
    if not a or not b or len(a) != len(b):
        return None
    only_a = sum(x > y for x, y in zip(a, b))
    only_b = sum(y > x for x, y in zip(a, b))
    return {"only_a": only_a, "only_b": only_b, "p": mcnemar_exact(only_a, only_b)}
