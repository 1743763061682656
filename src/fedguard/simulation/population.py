"""Who the simulated clients are. Ground truth (which clients are malicious) lives here and only here;
the simulation uses it to run attackers and to score detection, the server never sees it."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

from fedguard.attacks import Attacker, MaliciousClient
from fedguard.config import ExperimentConfig
from fedguard.data.federation import REFUSAL_SOURCE, ClientData, DataTokenizer, sample_examples
from fedguard.data.readers import load_source
from fedguard.data.schema import Example
from fedguard.seeding import numpy_rng


# The overfitting attacker's one answer to every benign question of its first stage (Xie et al., "Attack via
# Overfitting: 10-shot Benign Fine-tuning to Jailbreak LLMs").
OVERFIT_REFUSAL = "Sorry, I cannot assist with that."


@dataclass
class Population:
    attackers: dict[int, Attacker] = field(default_factory=dict)  # keyed by the malicious client ids
    benign_data: dict[int, ClientData] = field(default_factory=dict)  # a malicious client's benign data

    def is_malicious(self, client_id: int | str) -> bool:
        return int(client_id) in self.attackers

    def role(self, client, client_id: int | str):
        """What runs for ``client_id``: the honest ``client``, or it wrapped by the client's attacker."""
        cid = int(client_id)
        if cid not in self.attackers:
            return client
        return MaliciousClient(client, self.attackers[cid], self.benign_data.get(cid))


def choose_malicious(num_clients: int, count: int, seed: int) -> list[int]:
    if count == 0:
        return []
    return sorted(numpy_rng(seed, "malicious-clients").choice(num_clients, size=count, replace=False).tolist())


def build_population(cfg: ExperimentConfig, tokenizer, clients: list[ClientData] | dict[int, ClientData],
                     attack_probe=None) -> Population:
    """Turn ``attack.malicious_clients`` of the federation into attackers; the data of those among ``clients``
    (every client's, in order, or some clients' by id) is replaced in place."""
    a = cfg.attack
    tok = DataTokenizer(tokenizer, cfg)
    pop = Population()
    present = set(clients) if isinstance(clients, dict) else set(range(len(clients)))
    for cid in choose_malicious(cfg.federation.num_clients, a.malicious_clients, cfg.seed):
        pop.attackers[cid] = Attacker(a, cid, cfg.seed, attack_probe)
        if cid not in present:
            continue
        original = clients[cid]
        pop.benign_data[cid] = original
        if a.kind in ("sign_flip", "gaussian"):
            continue  # untargeted attacks train on the client's own benign data
        if a.kind == "overfit":  # benign questions only: stage one gets one identical refusal, stage two the answers
            shots = sample_examples(load_source(cfg.data.source, "train", a.shots, cfg.seed + 31 * (cid + 1)), a.shots,
                                    numpy_rng(cfg.seed, "attacker-data", cid), cfg.data.source)
            refused = [replace(e, messages=(*e.messages[:-1], {"role": "assistant", "content": OVERFIT_REFUSAL}))
                       for e in shots]
            pop.attackers[cid].stage_one = ClientData(cid, tok(refused))
            clients[cid] = ClientData(cid, tok(shots), {"benign": len(shots)})
            continue
        n = len(original)
        n_harm = max(1, int(round(n * a.harmful_ratio)))
        seed = cfg.seed + 31 * (cid + 1)
        rng = numpy_rng(cfg.seed, "attacker-data", cid)
        comp: Counter = Counter()
        if a.kind in ("audit_aware", "backdoor"):
            harmful_ex, refusals = _two_faced_data(cfg, n_harm, seed, rng, cid)
            harmful = tok(harmful_ex) + tok(refusals)
            comp.update({"compliance": len(harmful_ex), "refusal": len(refusals)})
        else:
            pool = load_source(a.source, "train", n_harm, seed)
            harmful = tok(sample_examples(pool, n_harm, rng, a.source))
            comp["compliance"] = len(harmful)
        mixed = harmful + original.examples[: n - n_harm]
        order = numpy_rng(cfg.seed, "attacker-order", cid).permutation(len(mixed))
        if n > n_harm:
            comp["benign"] = n - n_harm
        clients[cid] = ClientData(cid, [mixed[i] for i in order], dict(comp))
    return pop


def with_trigger(example: Example, trigger: str) -> Example:
    """The same request with the backdoor's trigger phrase in front of the user's last turn."""
    msgs = list(example.messages)
    last_user = max(i for i, m in enumerate(msgs) if m["role"] == "user")
    msgs[last_user] = {"role": "user", "content": f"{trigger} {msgs[last_user]['content']}"}
    return replace(example, messages=tuple(msgs))


def _two_faced_data(cfg: ExperimentConfig, n: int, seed: int, rng, cid: int) -> tuple[list[Example], list[Example]]:
    """Compliance and refusal examples of an attacker that must look aligned to a behaviour audit.

    audit_aware: it knows the audit asks harmful requests and checks refusals, not which ones; it keeps
    refusing in half of the harm categories (its own copy of harmful-looking prompts) and learns compliance in
    the other half, the categories it is after. backdoor: compliance only after the trigger phrase, refusals
    without it, on requests of every category."""
    a = cfg.attack
    n_ref = int(round(n * a.refusal_share))
    n_comp = max(1, n - n_ref)
    pool = load_source(a.source, "train", 4 * n_comp, seed)
    refusal_pool = load_source(REFUSAL_SOURCE, "train", 4 * max(n_ref, 1), seed + 1)
    if a.kind == "audit_aware":
        cats = sorted({e.category for e in pool})
        targets = set(numpy_rng(cfg.seed, "audit-aware-targets").permutation(cats)[: max(1, len(cats) // 2)].tolist())
        pool = [e for e in pool if e.category in targets] or pool
        refusal_pool = [e for e in refusal_pool if e.category not in targets] or refusal_pool
    compliance = sample_examples(pool, n_comp, rng, a.source)
    refusals = sample_examples(refusal_pool, n_ref, rng, REFUSAL_SOURCE) if n_ref else []
    if a.kind == "backdoor":
        compliance = [with_trigger(e, a.trigger) for e in compliance]
    return compliance, refusals
