"""Which examples each local step trains on: the trainer's batch sampler, a part it is given.

A plan is, per optimizer step, the list of physical batches (arrays of example indices). Non-private training
draws fixed-size batches; DP-SGD draws Poisson batches, what its privacy amplification by sampling assumes.
Both are functions of (seed, round, client) only, so a resumed run and an audit replay the same plan.
"""

from __future__ import annotations

import numpy as np

from fedguard.messages import RoundConfig
from fedguard.seeding import numpy_rng

Plan = list[list[np.ndarray]]


def sample_rate(batch_size: int, grad_accum: int, examples: int) -> float:
    """q: the probability that one example joins one step (a step's expected size over the data)."""
    return min(1.0, batch_size * grad_accum / max(examples, 1))


def fixed_batches(rng: np.random.Generator, examples: int, batch_size: int, grad_accum: int, steps: int) -> Plan:
    """Non-private training: ``steps`` steps of ``grad_accum`` micro-batches of ``batch_size`` examples, drawn
    without replacement while the data lasts (with replacement when a round needs more than there is)."""
    per_step = batch_size * grad_accum
    order = rng.choice(examples, size=per_step * steps, replace=examples < per_step * steps)
    return [[order[s * per_step + m * batch_size: s * per_step + (m + 1) * batch_size] for m in range(grad_accum)]
            for s in range(steps)]


def poisson_batches(rng: np.random.Generator, examples: int, rate: float, physical: int, steps: int) -> Plan:
    """DP-SGD's sampling: each example joins each step with probability ``rate``, independently; a step's
    examples are split into physical batches of at most ``physical`` (a step may have none)."""
    plan = []
    for _ in range(steps):
        chosen = np.flatnonzero(rng.random(examples) < rate)
        plan.append([chosen[i: i + physical] for i in range(0, len(chosen), physical)])
    return plan


def batch_plan(rc: RoundConfig, examples: int, client_id: str) -> Plan:
    """The plan of one client's round: Poisson batches under DP-SGD, fixed-size ones otherwise."""
    rng = numpy_rng(rc.seed, "batches", rc.server_round, str(client_id))
    if rc.dpsgd_clip is not None:
        return poisson_batches(rng, examples, sample_rate(rc.batch_size, rc.grad_accum, examples), rc.batch_size,
                               rc.local_steps)
    return fixed_batches(rng, examples, rc.batch_size, rc.grad_accum, rc.local_steps)


def trained_on(plan: Plan) -> list[int]:
    """The distinct examples a plan trains on."""
    return sorted({int(i) for step in plan for batch in step for i in batch})
