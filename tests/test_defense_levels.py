"""Golden values of the Safe-FedLLM weight functions (shared/reference/safe-fedllm.md §3, §7.2)."""

import pytest

from fedguard.defenses.levels import ClientLevel, EvidenceLevel, StepLevel, client_level_raw_weight, shadow_weight


def test_step_level_golden_values():
    lvl = StepLevel()
    assert lvl.weight("all", 0, flagged_steps=10, samples=160, samples_per_step=16) == pytest.approx(0.0059, abs=1e-4)
    assert lvl.weight("one", 0, flagged_steps=1, samples=160, samples_per_step=16) == pytest.approx(0.895, abs=1e-3)
    for r in range(1, 300):
        w = lvl.weight("one", r % 20, flagged_steps=1, samples=160, samples_per_step=16)
    assert w == pytest.approx(0.90, abs=1e-3)
    assert lvl.weight("never-seen", 25, 0, 160, 16) == 0.5  # after prefilter_round: prior mean
    assert lvl.weight("all", 25, 0, 160, 16) == pytest.approx(0.0059, abs=1e-4)  # frozen


@pytest.mark.parametrize("s,expected", [(0.0, 0.997), (0.4, 0.75), (0.8, 0.503), (0.80001, 0.497), (0.9, 0.25),
                                        (0.95, 0.038), (1.0, 0.003)])
def test_client_level_map_golden_values(s, expected):
    assert client_level_raw_weight(s) == pytest.approx(expected, abs=1e-3)


def test_client_level_running_mean_and_freeze():
    lvl = ClientLevel(prefilter_round=2)
    a = lvl.weight("c", 0, 0.0)
    b = lvl.weight("c", 1, 0.9)
    assert b == pytest.approx((a + 0.25) / 2, abs=1e-3)
    assert lvl.weight("c", 5, 1.0) == b  # frozen after prefilter_round
    assert lvl.weight("new", 5, 1.0) == 1.0


@pytest.mark.parametrize("rho,expected", [(0.1, 0.478), (0.2, 0.210), (0.3, 0.082), (0.5, 0.0078), (0.0, 1.0)])
def test_shadow_weight_golden_values(rho, expected):
    assert shadow_weight(rho) == pytest.approx(expected, abs=1e-3)


def test_evidence_level_freezes_malicious_after_three_verdicts():
    lvl = EvidenceLevel()
    for _ in range(2):
        lvl.weight("m", rho=1.0, last_step_probability=0.99)
    assert lvl.weight("m", rho=1.0, last_step_probability=0.99) == 0.0
    assert lvl.status["m"] == "malicious" and not lvl.needs_shadow("m")
    for _ in range(10):
        assert lvl.weight("m", None, None) == 0.0


def test_evidence_level_freezes_benign_with_mean_weight_and_audits_every_fifth():
    lvl = EvidenceLevel()
    ws = [lvl.weight("b", rho=r, last_step_probability=0.1) for r in (0.0, 0.1, 0.2)]
    assert lvl.status["b"] == "benign"
    assert ws[-1] == pytest.approx((1.0 + 0.9**7 + 0.8**7) / 3)
    audits = []
    for _ in range(10):
        audits.append(lvl.needs_shadow("b"))
        lvl.weight("b", None, 0.1 if audits[-1] else None)
    assert audits == [False, False, False, False, True] * 2


def test_evidence_level_mixed_verdicts_reset_and_failed_audit_unfreezes():
    lvl = EvidenceLevel()
    for p in (0.9, 0.1, 0.9):
        lvl.weight("x", 0.5, p)
    assert lvl.evidence["x"] == [] and lvl.status.get("x", "none") == "none"
    for _ in range(3):
        lvl.weight("y", 0.0, 0.0)
    for _ in range(4):
        lvl.weight("y", None, None)
    assert lvl.weight("y", 0.0, 0.99) == 0.0 and lvl.status["y"] == "none"


def test_evidence_level_reaudits_malicious_when_configured():
    lvl = EvidenceLevel(reaudit_malicious=2)
    for _ in range(3):
        lvl.weight("fp", 1.0, 0.95)
    assert lvl.status["fp"] == "malicious"
    assert not lvl.needs_shadow("fp")
    lvl.weight("fp", None, None)
    assert lvl.needs_shadow("fp")
    lvl.weight("fp", 0.0, 0.05)  # the audit says benign: evidence is collected again
    assert lvl.status["fp"] == "none"


def test_level_state_round_trips_through_json():
    import json

    for lvl, drive in ((StepLevel(), lambda l: l.weight("a", 0, 3, 160, 16)),
                       (ClientLevel(), lambda l: l.weight("a", 0, 0.7)),
                       (EvidenceLevel(), lambda l: l.weight("a", 0.2, 0.1))):
        drive(lvl)
        clone = type(lvl)()
        clone.load_state_dict(json.loads(json.dumps(lvl.state_dict())))
        assert clone.state_dict() == lvl.state_dict()
