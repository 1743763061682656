import pytest
import torch

from fedguard.defenses.features import FeatureError, FeatureSpec, adapter_delta

SHAPES = {
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": (4, 16),
    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": (16, 4),
    "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight": (4, 16),
    "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight": (8, 4),
    "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight": (4, 16),
    "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight": (16, 4),
    "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight": (4, 16),
    "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight": (8, 4),
}


def _delta(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}


def test_first_b_is_layer_zero_b_of_q_and_v_sorted():
    spec = FeatureSpec.build(SHAPES, "first_B")
    assert [k.split(".")[-3] for k in spec.keys] == ["q_proj", "v_proj"]
    assert spec.dim == 16 * 4 + 8 * 4  # r x (d_q_out + d_v_out), as the reference derives
    d = _delta()
    v = spec.extract(d)
    expected = torch.cat([d[k].reshape(-1) for k in spec.keys])
    assert torch.allclose(v, expected / expected.norm())


def test_other_selections_and_dimensions():
    assert FeatureSpec.build(SHAPES, "all_B").dim == 2 * (64 + 32)
    assert FeatureSpec.build(SHAPES, "all").dim == sum(a * b for a, b in SHAPES.values())
    proj = FeatureSpec.build(SHAPES, "projection", projection_dim=32, projection_seed=3)
    a, b = proj.extract(_delta(1)), proj.extract(_delta(1))
    assert a.shape == (32,) and torch.equal(a, b) and abs(float(a.norm()) - 1) < 1e-5


def test_projection_roughly_preserves_angles():
    full = FeatureSpec.build(SHAPES, "all")
    proj = FeatureSpec.build(SHAPES, "projection", projection_dim=256, projection_seed=0)
    x, y = _delta(1), _delta(2)
    y_close = {k: x[k] + 0.1 * y[k] for k in x}
    cos_full = float(full.extract(x) @ full.extract(y_close))
    cos_proj = float(proj.extract(x) @ proj.extract(y_close))
    assert abs(cos_full - cos_proj) < 0.05


def test_renamed_or_resized_keys_are_errors_not_padding():
    spec = FeatureSpec.build(SHAPES, "first_B")
    d = _delta()
    missing = {k: v for k, v in d.items() if "v_proj.lora_B" not in k or "layers.1" in k}
    with pytest.raises(FeatureError, match="lacks"):
        spec.extract(missing)
    resized = dict(d)
    key = spec.keys[0]
    resized[key] = torch.zeros(32, 4)
    with pytest.raises(FeatureError, match="shape"):
        spec.extract(resized)


def test_spec_json_round_trip_and_delta():
    spec = FeatureSpec.build(SHAPES, "projection", projection_dim=8, projection_seed=5)
    assert FeatureSpec.from_json(spec.to_json()) == spec
    a, b = _delta(1), _delta(2)
    d = adapter_delta(a, b)
    assert all(torch.equal(d[k], a[k] - b[k]) for k in SHAPES)
    with pytest.raises(FeatureError):
        FeatureSpec.build(SHAPES, "nope")
