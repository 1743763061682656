"""LoRA through PEFT, and the adapter as plain tensors.

Clients are simulated by swapping adapter tensors into one resident PEFT model: ``AdapterSlot.load``
copies a state into the live parameters in place, ``AdapterSlot.read`` copies it out. An
``AdapterState`` is a ``dict[str, Tensor]`` with PEFT's own state-dict keys (adapter name removed),
fp32 on the CPU: the same keys ``PeftModel.from_pretrained`` reads back.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

from fedguard.config import LoraSettings
from fedguard.model.keys import AdapterState, base_layer_key, is_lora_a, is_lora_b, module_of
from fedguard.io import publish_dir

ADAPTER_NAME = "default"


def attach_lora(model, settings: LoraSettings):
    """Wrap ``model`` with a LoRA adapter whose initial state theta_0 depends only on ``init_seed``."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        with warnings.catch_warnings():
            # PEFT calls a transformers API that transformers 5 deprecates; nothing for users to act on.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft_model = get_peft_model(model, config)
    except ValueError as exc:
        raise ValueError(f"lora.target_modules {settings.target_modules}: {exc}") from exc
    if settings.dropout > 0:
        _use_fast_dropout(peft_model, settings.dropout)
    slot = AdapterSlot(peft_model)
    slot.load(initial_adapter_state(slot.shapes(), settings.init_seed))
    return peft_model, slot


class FastDropout(torch.nn.Module):
    """Inverted dropout whose mask comes from 16-bit random integers.

    ``nn.Dropout`` on the CPU draws one Bernoulli sample per element, which costs more than the LoRA
    matmuls it feeds (about 9% of a SmolLM2 training step). Here one 64-bit draw yields four 16-bit
    uniforms, so the mask costs about a quarter of the draws. The drop probability is ``p`` rounded
    to a multiple of 1/65536 (0.05 becomes 0.0500031), and the stream comes from torch's seeded
    generator like ``nn.Dropout``'s.
    """

    _LO, _HI = torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max

    def __init__(self, p: float):
        super().__init__()
        self.threshold = round(p * 65536)
        self.p = self.threshold / 65536
        self.scale = 1.0 / (1.0 - self.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        n = x.numel()
        bits = torch.randint(self._LO, self._HI, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
        keep = bits.view(torch.int16)[:n].view(x.shape) >= (-32768 + self.threshold)
        return x * keep.to(x.dtype).mul_(self.scale)

    def extra_repr(self) -> str:
        return f"p={self.p:.7f}"


def _use_fast_dropout(peft_model, p: float) -> None:
    for module in peft_model.modules():
        drops = getattr(module, "lora_dropout", None)
        if isinstance(drops, torch.nn.ModuleDict):
            for name, d in drops.items():
                if isinstance(d, torch.nn.Dropout):
                    drops[name] = FastDropout(p)


def initial_adapter_state(shapes: dict[str, tuple[int, ...]], init_seed: int) -> AdapterState:
    """PEFT's default init (A Kaiming-uniform with a=sqrt(5), B zero) drawn from a private generator.

    Independent of the global RNG and of model-loading order, so theta_0 is the same in every process
    with the same seed (the LoRA-Probe of a later issue relies on that).
    """
    g = torch.Generator().manual_seed(int(init_seed))
    state: AdapterState = {}
    for key in sorted(shapes):
        t = torch.empty(shapes[key], dtype=torch.float32)
        if ".lora_A." in key:
            torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=g)
        else:
            t.zero_()
        state[key] = t
    return state


class AdapterSlot:
    """Maps PEFT state-dict keys to the live LoRA parameters of one resident model."""

    def __init__(self, peft_model):
        from peft import get_peft_model_state_dict

        self.model = peft_model
        params = dict(peft_model.named_parameters())
        self._params: dict[str, torch.nn.Parameter] = {}
        for key in get_peft_model_state_dict(peft_model, adapter_name=ADAPTER_NAME):
            name = key.replace(".lora_A.weight", f".lora_A.{ADAPTER_NAME}.weight").replace(
                ".lora_B.weight", f".lora_B.{ADAPTER_NAME}.weight"
            )
            if name not in params:
                raise RuntimeError(f"PEFT state key {key} has no matching parameter {name}")
            p = params[name]
            # LoRA weights are the trained master copy: always fp32, whatever the base dtype.
            if p.dtype != torch.float32:
                p.data = p.data.float()
            p.requires_grad_(True)
            self._params[key] = p
        if not self._params:
            raise RuntimeError("the model has no LoRA parameters")

    def keys(self) -> list[str]:
        return list(self._params)

    @contextmanager
    def scaled(self, scaling: float | None) -> Iterator[None]:
        """Run every LoRA layer with ``scaling`` instead of PEFT's alpha / r for the duration (None: as is).

        FLoRA simulates a rank-r_k client on the rank-r resident adapter, and that client's LoRA runs
        with alpha / r_k."""
        if scaling is None:
            yield
            return
        from peft.tuners.lora import LoraLayer

        layers = [m for m in self.model.modules() if isinstance(m, LoraLayer) and ADAPTER_NAME in m.scaling]
        before = [m.scaling[ADAPTER_NAME] for m in layers]
        try:
            for m in layers:
                m.scaling[ADAPTER_NAME] = float(scaling)
            yield
        finally:
            for m, b in zip(layers, before):
                m.scaling[ADAPTER_NAME] = b

    def base_weights(self) -> dict[str, torch.nn.Parameter]:
        """The frozen base weight under each LoRA module, by module name (FLoRA merges into these)."""
        params = dict(self.model.named_parameters())
        return {m: params[base_layer_key(m)] for m in sorted({module_of(k) for k in self._params})}

    def set_lora_a_trainable(self, trainable: bool) -> None:
        """Whether the lora_A weights take gradients (False for FFA-LoRA, which trains lora_B only)."""
        for k, p in self._params.items():
            if ".lora_A." in k:
                p.requires_grad_(trainable)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(p.shape) for k, p in self._params.items()}

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self._params.values())

    def named_parameters(self) -> dict[str, torch.nn.Parameter]:
        return dict(self._params)

    @torch.no_grad()
    def load(self, state: AdapterState) -> None:
        missing = set(self._params) - set(state)
        extra = set(state) - set(self._params)
        if missing or extra:
            raise KeyError(f"adapter keys differ: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
        for k, p in self._params.items():
            p.copy_(state[k])

    @torch.no_grad()
    def read(self) -> AdapterState:
        return {k: p.detach().to("cpu", torch.float32, copy=True) for k, p in self._params.items()}


def embed_rank(state: Mapping[str, torch.Tensor], r: int) -> AdapterState:
    """A rank-r_k adapter inside a rank-r one: A's extra rows and B's extra columns are zero.

    Those entries stay exactly zero under training (each one's gradient is a product with a zero
    partner, and AdamW moves nothing whose gradient and moments are zero), so the resident rank-r
    adapter trains exactly like a rank-r_k one (run it at the rank-r_k scaling, ``AdapterSlot.scaled``).
    """
    out: AdapterState = {}
    for k, t in state.items():
        rank = t.shape[0] if is_lora_a(k) else t.shape[1]
        if rank > r:
            raise ValueError(f"{k}: rank {rank} exceeds the resident rank {r}")
        padded = torch.zeros((r, t.shape[1]) if is_lora_a(k) else (t.shape[0], r), dtype=t.dtype)
        if is_lora_a(k):
            padded[:rank] = t
        else:
            padded[:, :rank] = t
        out[k] = padded
    return out


def truncate_rank(state: Mapping[str, torch.Tensor], rank: int) -> AdapterState:
    """The first ``rank`` rows of every A and columns of every B (inverse of ``embed_rank``)."""
    out: AdapterState = {}
    for k, t in state.items():
        if not (is_lora_a(k) or is_lora_b(k)):
            raise ValueError(f"{k} is not a LoRA A/B weight")
        out[k] = (t[:rank] if is_lora_a(k) else t[:, :rank]).clone()
    return out


def write_peft_adapter(slot: AdapterSlot, state: AdapterState, out_dir: str | Path, base_model: str) -> None:
    """Write ``state`` into ``out_dir`` as a PEFT adapter (adapter_model.safetensors + adapter_config.json).

    Uses PEFT's own writer so ``PeftModel.from_pretrained`` reads it back; the live adapter is restored.
    """
    previous = slot.read()
    try:
        slot.load(state)
        slot.model.peft_config[ADAPTER_NAME].base_model_name_or_path = base_model
        slot.model.save_pretrained(str(out_dir), safe_serialization=True)
    finally:
        slot.load(previous)


def export_peft_adapter(slot: AdapterSlot, state: AdapterState, out_dir: str | Path, base_model: str) -> Path:
    """``write_peft_adapter`` into a staging folder that is moved into place whole."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        write_peft_adapter(slot, state, staging, base_model)
        publish_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
