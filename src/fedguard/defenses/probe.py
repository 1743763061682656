"""The LoRA-Probe: a small classifier over a client's ΔLoRA features, and its artifact.

An artifact is a folder with ``probe.safetensors`` (weights) and ``probe.json`` (feature spec,
classifier kind, threshold, metrics, and the *compatibility stamp*: base-model fingerprint, LoRA
config, A-seed, learning rate, tensor shapes). A probe is valid only for the exact configuration it
was trained on (features depend on A₀, the learning rate and the model), so loading it against
anything else is refused with a message naming every difference.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedguard.defenses.features import FeatureSpec
from fedguard.io import atomic_write_json, load_tensors, publish_dir, save_tensors

ARTIFACT_VERSION = 2  # 2: content fingerprint, training settings, calibrated threshold
CLASSIFIERS = ("logistic", "mlp")


class ProbeMismatch(ValueError):
    pass


LORA_STAMP_KEYS = ("r", "alpha", "dropout", "target_modules", "init_seed", "variant")


def compat_stamp(fingerprint: dict[str, Any], lora: dict[str, Any], lr: float, shapes: dict[str, tuple[int, ...]],
                 training: dict[str, Any] | None = None) -> dict:
    """Everything a probe's features depend on: the model by content, the LoRA config, the learning rate, the
    adapter's tensors, and how clients train (batch size, local steps)."""
    return {
        "model": fingerprint,
        "lora": {k: lora[k] for k in LORA_STAMP_KEYS if k in lora},
        "lr": float(lr),
        "training": dict(training or {}),
        "adapter_shapes": {k: list(v) for k, v in sorted(shapes.items())},
    }


def _differences(expected: dict, found: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(expected) | set(found)):
        a, b = expected.get(key), found.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict) and key != "adapter_shapes":
            out += _differences(a, b, name + ".")
        elif a != b:
            if key == "adapter_shapes":
                out.append(f"{name}: the LoRA tensors differ in names or shapes")
            else:
                out.append(f"{name}: probe built for {b!r}, this run has {a!r}")
    return out


@dataclass
class LoRAProbe:
    spec: FeatureSpec
    kind: str
    tensors: dict[str, torch.Tensor]
    threshold: float
    compat: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    # tau per defense level ("step", "client", "shadow"), calibrated on the statistic each reads; ``threshold``
    # (the step level's) where a level has none (artifacts built before per-level calibration)
    thresholds: dict[str, float] = field(default_factory=dict)

    def threshold_for(self, level: str) -> float:
        key = "shadow" if level == "evidence" else level
        return float(self.thresholds.get(key, self.threshold))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        x = features.to(torch.float32)
        if self.kind == "logistic":
            return x @ self.tensors["weight"] + self.tensors["bias"]
        h = torch.relu(x @ self.tensors["w1"] + self.tensors["b1"])
        return h @ self.tensors["w2"] + self.tensors["b2"]

    def probability(self, delta: dict[str, torch.Tensor]) -> float:
        """P(malicious) for one ΔLoRA."""
        return float(torch.sigmoid(self.logits(self.spec.extract(delta)[None]))[0])

    def probabilities(self, features: torch.Tensor) -> np.ndarray:
        return torch.sigmoid(self.logits(features)).numpy()

    # -- artifact --------------------------------------------------------------------------------
    def save(self, out_dir: str | Path) -> Path:
        out_dir = Path(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        try:
            save_tensors(staging / "probe.safetensors", self.tensors)
            atomic_write_json(staging / "probe.json", {
                "artifact_version": ARTIFACT_VERSION, "kind": self.kind, "threshold": self.threshold,
                "thresholds": self.thresholds,
                "features": self.spec.to_json(), "compat": self.compat, "metrics": self.metrics,
            })
            publish_dir(staging, out_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return out_dir

    @classmethod
    def load(cls, path: str | Path, expect: dict[str, Any] | None = None) -> LoRAProbe:
        path = Path(path)
        meta_path = path / "probe.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{path} is not a probe artifact (no probe.json)")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("artifact_version") != ARTIFACT_VERSION:
            raise ProbeMismatch(f"{path}: artifact version {meta.get('artifact_version')} is not {ARTIFACT_VERSION}")
        if meta.get("kind") not in CLASSIFIERS:
            raise ProbeMismatch(f"{path}: unknown classifier kind {meta.get('kind')!r}")
        if expect is not None:
            diffs = _differences(expect, meta["compat"])
            if diffs:
                raise ProbeMismatch(f"probe {path} does not match this run:\n  " + "\n  ".join(diffs))
        probe = cls(FeatureSpec.from_json(meta["features"]), meta["kind"], load_tensors(path / "probe.safetensors"),
                    float(meta["threshold"]), meta["compat"], meta.get("metrics", {}),
                    {k: float(v) for k, v in meta.get("thresholds", {}).items()})
        expected_in = probe.spec.dim
        got_in = probe.tensors["weight" if probe.kind == "logistic" else "w1"].shape[0]
        if got_in != expected_in:
            raise ProbeMismatch(f"{path}: weights take {got_in} features, the feature spec gives {expected_in}")
        return probe


# -- training -------------------------------------------------------------------------------------

def detection_metrics(y_true: np.ndarray, prob: np.ndarray, threshold: float) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    y_true = np.asarray(y_true).astype(int)
    pred = np.asarray(prob) >= threshold
    tp = int((pred & (y_true == 1)).sum())
    fp = int((pred & (y_true == 0)).sum())
    fn = int((~pred & (y_true == 1)).sum())
    tn = int((~pred & (y_true == 0)).sum())
    # Undefined ratios are None (JSON null), never NaN.
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
    auroc = float(roc_auc_score(y_true, prob)) if len(set(y_true.tolist())) == 2 else None
    return {"auroc": auroc, "precision": precision, "recall": recall, "f1": f1,
            "fpr": fp / (fp + tn) if fp + tn else None, "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def fit_probe(features: np.ndarray, labels: np.ndarray, kind: str, seed: int, c: float = 1.0,
              hidden: int = 64) -> dict[str, torch.Tensor]:
    """Class-balanced logistic regression (scikit-learn) or a one-hidden-layer MLP (torch)."""
    if kind == "logistic":
        from sklearn.linear_model import LogisticRegression

        clf = LogisticRegression(C=c, class_weight="balanced", max_iter=5000, random_state=seed)
        clf.fit(features, labels)
        return {"weight": torch.tensor(clf.coef_[0], dtype=torch.float32),
                "bias": torch.tensor(float(clf.intercept_[0]), dtype=torch.float32)}
    if kind != "mlp":
        raise ValueError(f"unknown probe classifier {kind!r} (known: {', '.join(CLASSIFIERS)})")
    g = torch.Generator().manual_seed(seed)
    x = torch.tensor(features, dtype=torch.float32)
    y = torch.tensor(labels, dtype=torch.float32)
    d = x.shape[1]
    w1 = (torch.randn(d, hidden, generator=g) / d**0.5).requires_grad_()
    b1 = torch.zeros(hidden, requires_grad=True)
    w2 = (torch.randn(hidden, generator=g) / hidden**0.5).requires_grad_()
    b2 = torch.zeros((), requires_grad=True)
    pos = float(y.sum())
    pos_weight = torch.tensor((len(y) - pos) / max(pos, 1.0))
    opt = torch.optim.AdamW([w1, b1, w2, b2], lr=1e-2, weight_decay=1e-2)
    for _ in range(300):
        logits = torch.relu(x @ w1 + b1) @ w2 + b2
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"w1": w1.detach(), "b1": b1.detach(), "w2": w2.detach(), "b2": b2.detach()}
