"""LoRA-Probe features: which ΔLoRA tensors a probe reads, and how they become one vector.

Selections (``shared/reference/safe-fedllm.md`` §2.1):
* ``first_B``: the paper's choice, the lora_B tensors of the lowest-numbered layer (q and v by default);
* ``all_B``: every lora_B tensor;
* ``all``: every LoRA tensor, A and B;
* ``projection``: every LoRA tensor, L2-normalised, then a seeded very sparse random projection
  (Li, Hastie & Church 2006: entries ±sqrt(s/k) with probability 1/(2s) each, s = sqrt(D)) to
  ``projection_dim`` = k dimensions. Johnson-Lindenstrauss: angles survive, the probe stays small,
  and the projection costs a sparse product with about D·k/s non-zeros.

Keys are sorted, tensors flattened row-major and concatenated, and the vector is L2-normalised.
Unlike the official code, a missing key or a wrong shape is an error, never silent zero-padding.
"""

from __future__ import annotations

import re
from functools import lru_cache
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

    def _project(self, v: torch.Tensor) -> torch.Tensor:
        return torch.sparse.mm(_sparse_projection(self.projection_seed, v.numel(), self.projection_dim), v[:, None])[:, 0]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["keys"], d["shapes"] = list(self.keys), [list(s) for s in self.shapes]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FeatureSpec:
        return cls(d["selection"], tuple(d["keys"]), tuple(tuple(s) for s in d["shapes"]),
                   int(d.get("projection_dim", 0)), int(d.get("projection_seed", 0)))


@lru_cache(maxsize=4)
def _sparse_projection(seed: int, d: int, k: int) -> torch.Tensor:
    """The [k, d] very sparse random projection matrix for ``seed`` (built once, cached)."""
    s = max(1.0, d**0.5)
    nnz = max(k, int(round(d * k / s)))
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, k, (nnz,), generator=g)
    cols = torch.randint(0, d, (nnz,), generator=g)
    signs = torch.randint(0, 2, (nnz,), generator=g).float().mul_(2).sub_(1).mul_((s / k) ** 0.5)
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), signs, (k, d), check_invariants=True).coalesce()


def adapter_delta(current: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                  keys: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """current - reference, for ``keys`` (all keys of ``reference`` by default)."""
    return {k: current[k].float() - reference[k].float() for k in (keys or reference)}
