"""LoRA-Probe features: which ΔLoRA tensors a probe reads, and how they become one vector.

Selections (``shared/reference/safe-fedllm.md`` §2.1):
* ``first_B``: the paper's choice, the lora_B tensors of the lowest-numbered layer (q and v by default);
* ``all_B``: every lora_B tensor;
* ``all``: every LoRA tensor, A and B;
* ``projection``: every LoRA tensor, L2-normalised, then a seeded Gaussian random projection to
  ``projection_dim`` dimensions (Johnson-Lindenstrauss: distances survive, the probe stays small).

Keys are sorted, tensors flattened row-major and concatenated, and the vector is L2-normalised.
Unlike the official code, a missing key or a wrong shape is an error, never silent zero-padding.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import torch

SELECTIONS = ("first_B", "all_B", "all", "projection")
_LAYER = re.compile(r"layers\.(\d+)\.")


class FeatureError(ValueError):
    pass


@dataclass(frozen=True)
class FeatureSpec:
    selection: str
    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    projection_dim: int = 0
    projection_seed: int = 0

    @classmethod
    def build(cls, shapes: dict[str, tuple[int, ...]], selection: str = "first_B", projection_dim: int = 256,
              projection_seed: int = 0) -> FeatureSpec:
        if selection not in SELECTIONS:
            raise FeatureError(f"unknown feature selection {selection!r} (known: {', '.join(SELECTIONS)})")
        keys = sorted(shapes)
        if selection == "first_B":
            layers = [int(m.group(1)) for k in keys if (m := _LAYER.search(k))]
            if not layers:
                raise FeatureError("no 'layers.<i>.' in the adapter keys; cannot find the first layer")
            first = min(layers)
            keys = [k for k in keys if f"layers.{first}." in k and k.endswith("lora_B.weight")]
        elif selection == "all_B":
            keys = [k for k in keys if k.endswith("lora_B.weight")]
        if not keys:
            raise FeatureError(f"selection {selection!r} matches no adapter tensor")
        dim = projection_dim if selection == "projection" else 0
        return cls(selection, tuple(keys), tuple(tuple(shapes[k]) for k in keys), dim, projection_seed)

    @property
    def raw_dim(self) -> int:
        return sum(int(torch.Size(s).numel()) for s in self.shapes)

    @property
    def dim(self) -> int:
        return self.projection_dim if self.selection == "projection" else self.raw_dim

    def extract(self, delta: dict[str, torch.Tensor]) -> torch.Tensor:
        """One L2-normalised fp32 feature vector from a ΔLoRA (current minus reference)."""
        parts = []
        for key, shape in zip(self.keys, self.shapes):
            t = delta.get(key)
            if t is None:
                raise FeatureError(f"ΔLoRA lacks {key}, which the probe reads")
            if tuple(t.shape) != shape:
                raise FeatureError(f"{key} has shape {tuple(t.shape)}, the probe expects {shape}")
            parts.append(t.detach().to(torch.float32).reshape(-1))
        v = torch.nan_to_num(torch.cat(parts), nan=0.0, posinf=1e6, neginf=-1e6)
        v = v / max(float(v.norm()), 1e-12)
        if self.selection == "projection":
            v = self._project(v)
            v = v / max(float(v.norm()), 1e-12)
        return v

    def _project(self, v: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
        # The projection matrix is regenerated chunk by chunk from its seed instead of being stored:
        # at SmolLM2's 460,800 LoRA values and 256 dims it would be 470 MB.
        g = torch.Generator().manual_seed(self.projection_seed)
        out = torch.zeros(self.projection_dim)
        for start in range(0, v.numel(), chunk):
            part = v[start: start + chunk]
            r = torch.randn(self.projection_dim, part.numel(), generator=g)
            out += r @ part
        return out / self.projection_dim**0.5

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["keys"], d["shapes"] = list(self.keys), [list(s) for s in self.shapes]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FeatureSpec:
        return cls(d["selection"], tuple(d["keys"]), tuple(tuple(s) for s in d["shapes"]),
                   int(d.get("projection_dim", 0)), int(d.get("projection_seed", 0)))


def adapter_delta(current: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                  keys: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """current - reference, for ``keys`` (all keys of ``reference`` by default)."""
    return {k: current[k].float() - reference[k].float() for k in (keys or reference)}
