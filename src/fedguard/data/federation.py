"""Assemble each client's local data and the held-out evaluation sets from the config."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from fedguard.config import ExperimentConfig
from fedguard.data.partition import partition_dirichlet, partition_iid
from fedguard.data.prompts import load_checkable_prompts, load_prompts
from fedguard.data.readers import load_source
from fedguard.data.schema import DataError, Example
from fedguard.data.tokenize import TokenizedExample, tokenize_example
from fedguard.seeding import numpy_rng

log = logging.getLogger(__name__)

REFUSAL_SOURCE = "builtin:harmful-refusal"


@dataclass
class ClientData:
    client_id: int
    examples: list[TokenizedExample]
    composition: dict[str, int] = field(default_factory=dict)  # domain/kind -> count, for the report
    # the membership audit's non-members: examples of this client's own data held out of its training (same
    # distribution as its training examples; only the audited client, only when the audit is on)
    held_out: list[TokenizedExample] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)


@dataclass(frozen=True)
class AuditedClient:
    """How a privacy audit shapes one client's data (``fedguard.privacy.canaries.audited_client`` builds it from the
    config): ``planted`` examples join its training data (the canaries), and up to ``held_out`` of its own
    examples (at most half) are kept out of training as the membership audit's non-members."""

    client_id: int
    planted: tuple[Example, ...] = ()
    held_out: int = 0


@dataclass
class EvalData:
    harmful_prompts: list[Example]
    benign_prompts: list[Example]  # checkable (with a reference answer)
    loss_examples: list[TokenizedExample]
    overrefusal_prompts: list[Example] = field(default_factory=list)  # benign requests that look harmful
    # simulation only: the harmful prompts with a backdoor attacker's trigger (attack success, never the server's)
    triggered_prompts: list[Example] = field(default_factory=list)


def sample_examples(examples: list[Example], n: int, rng: np.random.Generator, what: str) -> list[Example]:
    if len(examples) >= n:
        return [examples[i] for i in sorted(rng.choice(len(examples), size=n, replace=False).tolist())]
    log.warning("%s has %d examples, fewer than the %d asked for; using all of them", what, len(examples), n)
    return list(examples)


def _split_counts(n: int, share: float) -> tuple[int, int]:
    refusals = int(round(n * share))
    return n - refusals, refusals


class DataTokenizer:
    """Tokenises examples with the run's data settings, dropping (and counting) those whose
    completion does not survive truncation."""

    def __init__(self, tokenizer, cfg: ExperimentConfig):
        self.tok, self.d = tokenizer, cfg.data
        self.dropped = 0

    def __call__(self, examples: list[Example]) -> list[TokenizedExample]:
        out = []
        for ex in examples:
            t = tokenize_example(self.tok, ex, self.d.max_length, self.d.truncation, self.d.system_prompt)
            if t is None:
                self.dropped += 1
            else:
                out.append(t)
        return out


def build_client_data(cfg: ExperimentConfig, tokenizer, audited: AuditedClient | None = None) -> list[ClientData]:
    """Every client's local data, in client order; ``audited``: the client a privacy audit plants in or holds
    out from (None: no audit)."""
    return _build_clients(cfg, tokenizer, range(cfg.federation.num_clients), audited)


def build_one_client_data(cfg: ExperimentConfig, tokenizer, client_id: int,
                          audited: AuditedClient | None = None) -> ClientData:
    """One client's local data, identical to its entry in ``build_client_data`` but tokenising only its own
    examples (what a node of a real deployment builds)."""
    if not 0 <= client_id < cfg.federation.num_clients:
        raise ValueError(f"client {client_id} is not one of the federation's {cfg.federation.num_clients} clients")
    return _build_clients(cfg, tokenizer, [client_id], audited)[0]


def _build_clients(cfg: ExperimentConfig, tokenizer, wanted_ids, audited: AuditedClient | None) -> list[ClientData]:
    d, n_clients = cfg.data, cfg.federation.num_clients
    wanted_ids = list(wanted_ids)
    rng = numpy_rng(cfg.seed, "partition")
    tok = DataTokenizer(tokenizer, cfg)
    if d.partition.method == "explicit":
        specs = d.partition.clients or []
        wanted = [_split_counts(s.examples or d.examples_per_client,
                                d.refusal_share if s.refusal_share is None else s.refusal_share) for s in specs]
        per_client = []
        # one stream draws every client's sample in turn: clients up to the last one wanted are drawn
        for cid, (spec, (n_main, _)) in enumerate(zip(specs, wanted)):
            if cid > max(wanted_ids):
                break
            pool = load_source(spec.source, "train", n_main, cfg.seed + cid)
            per_client.append(sample_examples(pool, n_main, rng, spec.source))
    else:
        n_main, n_ref = _split_counts(d.examples_per_client, d.refusal_share)
        wanted = [(n_main, n_ref)] * n_clients
        pool = load_source(d.source, "train", n_main * n_clients, cfg.seed)
        pool = sample_examples(pool, n_main * n_clients, rng, d.source)
        if d.partition.method == "iid":
            parts = partition_iid(len(pool), n_clients, rng)
        else:
            parts = partition_dirichlet([e.domain for e in pool], n_clients, d.partition.alpha, rng)
        per_client = [[pool[i] for i in idx] for idx in parts]

    n_refusals = sum(r for _, r in wanted)
    refusal_pool = load_source(REFUSAL_SOURCE, "train", n_refusals, cfg.seed) if n_refusals else []
    offsets = [sum(r for _, r in wanted[:cid]) for cid in range(len(wanted))]
    clients = []
    for cid in wanted_ids:
        n_ref = wanted[cid][1]
        own, held = per_client[cid], []
        audit = audited if audited is not None and audited.client_id == cid else AuditedClient(cid)
        if audit.held_out:  # never trained on: non-members
            keep = max(len(own) - audit.held_out, len(own) // 2)
            own, held = own[:keep], own[keep:]
        mixed = own + refusal_pool[offsets[cid]: offsets[cid] + n_ref] + list(audit.planted)
        order = numpy_rng(cfg.seed, "client-order", cid).permutation(len(mixed))
        mixed = [mixed[i] for i in order]
        examples = tok(mixed)
        if not examples:
            raise DataError(f"client {cid} has no usable examples after tokenisation (data.max_length={d.max_length})")
        comp = Counter(e.domain if e.kind == "benign" else e.kind for e in mixed)
        clients.append(ClientData(cid, examples, dict(sorted(comp.items())), tok(held)))
    if tok.dropped:
        log.warning("dropped %d examples with no completion token left after truncation", tok.dropped)
    return clients


def build_eval_data(cfg: ExperimentConfig, tokenizer) -> EvalData:
    e = cfg.eval
    seed = cfg.seed + 1_000_003  # evaluation draws never coincide with training draws

    harmful = load_prompts(e.harmful_source, e.harmful_prompts, seed) if e.harmful_prompts else []
    overrefusal = load_prompts(e.overrefusal_source, e.overrefusal_prompts, seed, "benign") \
        if e.overrefusal_prompts else []
    benign = load_checkable_prompts(e.benign_source, e.benign_prompts, seed) if e.benign_prompts else []
    loss_examples = heldout_loss_examples(cfg, tokenizer, e.loss_examples, "eval-loss", "held-out loss set")
    return EvalData(harmful, benign, loss_examples, overrefusal)


def heldout_loss_examples(cfg: ExperimentConfig, tokenizer, n: int, stream: str, what: str
                          ) -> list[TokenizedExample]:
    """``n`` tokenized examples of the data source's eval split (built-in benign for explicit partitions), drawn
    with the seeded ``stream``: the held-out loss set of federated runs and of split runs."""
    if not n:
        return []
    pool = load_source(cfg.data.source if cfg.data.partition.method != "explicit" else "builtin:benign",
                       "eval", n, cfg.seed + 1_000_003)
    return DataTokenizer(tokenizer, cfg)(sample_examples(pool, n, numpy_rng(cfg.seed, stream), what))
