"""Epsilon of a run, from Google's ``dp-accounting`` (never an accountant of our own).

A round of DP-FedAvg with Poisson client sampling at rate q and Gaussian noise of multiplier sigma is the
event ``PoissonSampled(q, Gaussian(sigma))``; a run composes one per round. The history is a list of
``(q, sigma)`` pairs, kept in the server state, so a resumed run reports exactly what an uninterrupted one does.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

# Integer orders (and a few large ones): the fractional orders below 2 do not converge for small sigma in
# dp-accounting's RDP series and add nothing at the deltas used here.
RDP_ORDERS = tuple(range(2, 65)) + (80, 96, 128, 192, 256, 512)


def round_event(q: float, sigma: float, count: int = 1):
    """``count`` Poisson-sampled Gaussian mechanisms (rounds of DP-FedAvg, or steps of DP-SGD)."""
    import dp_accounting

    event = dp_accounting.PoissonSampledDpEvent(float(q), dp_accounting.GaussianDpEvent(float(sigma)))
    return event if count == 1 else dp_accounting.SelfComposedDpEvent(event, int(count))


def epsilon(history: Sequence[Sequence[float]], delta: float, kind: str = "rdp") -> float:
    """Epsilon at ``delta`` after the events of ``history``: each ``(q, sigma)`` (one round) or
    ``(q, sigma, count)`` (``count`` steps at that rate and noise); 0 before any. The round loop asks for the
    same history twice (the round's record, then the next round's budget check): each history is composed once."""
    return _epsilon(tuple((float(h[0]), float(h[1]), int(h[2]) if len(h) > 2 else 1) for h in history),
                    float(delta), kind)


@lru_cache(maxsize=256)
def _epsilon(history: tuple[tuple[float, float, int], ...], delta: float, kind: str) -> float:
    import dp_accounting
    from dp_accounting import pld, rdp

    if not history:
        return 0.0
    events = [round_event(q, s, n) for q, s, n in history]
    event = dp_accounting.ComposedDpEvent(events) if len(set(history)) > 1 else \
        dp_accounting.SelfComposedDpEvent(events[0], len(events))
    accountant = rdp.RdpAccountant(list(RDP_ORDERS)) if kind == "rdp" else pld.PLDAccountant()
    accountant.compose(event)
    return float(accountant.get_epsilon(float(delta)))


def noise_for_epsilon(target_epsilon: float, rounds: int, q: float, delta: float, kind: str = "rdp") -> float:
    """The smallest noise multiplier sigma for which ``rounds`` rounds at sampling rate ``q`` spend at most
    ``target_epsilon`` at ``delta`` (dp-accounting's calibration, Brent's method on sigma)."""
    import dp_accounting
    from dp_accounting import pld, rdp

    def fresh():
        return rdp.RdpAccountant(list(RDP_ORDERS)) if kind == "rdp" else pld.PLDAccountant()

    sigma = dp_accounting.calibrate_dp_mechanism(
        fresh, lambda s: dp_accounting.SelfComposedDpEvent(round_event(q, s), rounds), float(target_epsilon),
        float(delta), dp_accounting.mechanism_calibration.LowerEndpointAndGuess(1e-3, 1.0), tol=1e-4)
    # the search stops within tol of the target: nudge up until the budget holds
    while epsilon([(q, sigma)] * rounds, delta, kind) > target_epsilon:
        sigma *= 1.001
    return float(sigma)
