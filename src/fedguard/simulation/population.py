"""Who the simulated clients are. Ground truth (which clients are malicious) lives here and only here;
the simulation uses it to run attackers and to score detection, the server never sees it."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from fedguard.attacks import Attacker
from fedguard.config import ExperimentConfig
from fedguard.data.federation import ClientData, DataTokenizer, sample_examples
from fedguard.data.readers import load_source
from fedguard.seeding import numpy_rng


@dataclass
class Population:
    attackers: dict[int, Attacker] = field(default_factory=dict)  # keyed by the malicious client ids
    benign_data: dict[int, ClientData] = field(default_factory=dict)  # a malicious client's benign data

    def is_malicious(self, client_id: int | str) -> bool:
        return int(client_id) in self.attackers


def choose_malicious(num_clients: int, count: int, seed: int) -> list[int]:
    if count == 0:
        return []
    return sorted(numpy_rng(seed, "malicious-clients").choice(num_clients, size=count, replace=False).tolist())


def build_population(cfg: ExperimentConfig, tokenizer, clients: list[ClientData], attack_probe=None) -> Population:
    """Turn ``attack.malicious_clients`` of ``clients`` into attackers (their data is replaced in place)."""
    a = cfg.attack
    tok = DataTokenizer(tokenizer, cfg)
    pop = Population()
    for cid in choose_malicious(len(clients), a.malicious_clients, cfg.seed):
        pop.attackers[cid] = Attacker(a, cid, cfg.seed, attack_probe)
        original = clients[cid]
        pop.benign_data[cid] = original
        if a.kind in ("sign_flip", "gaussian"):
            continue  # untargeted attacks train on the client's own benign data
        n = len(original)
        n_harm = max(1, int(round(n * a.harmful_ratio)))
        pool = load_source(a.source, "train", n_harm, cfg.seed + 31 * (cid + 1))
        harmful = tok(sample_examples(pool, n_harm, numpy_rng(cfg.seed, "attacker-data", cid), a.source))
        mixed = harmful + original.examples[: n - n_harm]
        order = numpy_rng(cfg.seed, "attacker-order", cid).permutation(len(mixed))
        comp = Counter({"compliance": len(harmful)})
        if n > n_harm:
            comp["benign"] = n - n_harm
        clients[cid] = ClientData(cid, [mixed[i] for i in order], dict(comp))
    return pop
