import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Model conversions are cached once per checkout, shared by tests and `make run`.
os.environ.setdefault("FEDGUARD_CACHE", str(REPO / ".cache" / "fedguard"))

# pytest runs on two xdist workers (addopts in pyproject.toml). Each then computes on one thread, and so do the
# processes its tests start, through the environment: two 2-thread jobs on 2 cores slow each other many times over.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = "1"
    import torch

    torch.set_num_threads(1)

# Files whose tests start SuperLinks, SuperNodes or Ray share one xdist group, and so do the files that start split
# servers, so none of them runs beside another of its kind (port probes, Ray instances, round timeouts); every other
# file is a group of its own (module fixtures built once). The SmolLM2 probe test, the suite's longest, is a group of
# its own, and the longest groups are handed out first, so no worker is left with a long one at the end.
GROUPS = {"test_deploy.py": "flower", "test_engines.py": "flower", "test_flower_secagg.py": "flower",
          "test_split_network.py": "split-servers", "test_split_grpc.py": "split-servers"}
FIRST = ["smollm2-probe", "flower", "split-servers", "test_smollm2.py"]


def _group(item) -> str:
    name = item.path.name
    if name == "test_smollm2.py" and item.name.startswith("test_probe"):
        return "smollm2-probe"
    return GROUPS.get(name, name)


def pytest_collection_modifyitems(config, items):
    if not hasattr(config, "workerinput"):  # not an xdist worker (`-n 0`): file order
        return
    order = {g: i for i, g in enumerate(FIRST)}
    items.sort(key=lambda it: order.get(_group(it), len(FIRST)))  # stable: file order kept within a group
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_group(item)))



@pytest.fixture(scope="session")
def tiny_loaded():
    """The tiny LLaMA model, loaded once for the session, with LoRA attached."""
    from fedguard.config import LoraSettings, ModelConfig
    from fedguard.model import attach_lora, load_base_model

    loaded = load_base_model(ModelConfig(name_or_path="tiny-llama", precision="fp32"))
    peft_model, slot = attach_lora(loaded.model, LoraSettings(r=4, alpha=8, dropout=0.0, init_seed=5))
    return loaded, peft_model, slot


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module's tests (the tiny models are faster so on 2 shared cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny4_path(tmp_path_factory, one_thread):
    """A 4-layer tiny LLaMA (the split tests need a middle between the client's blocks)."""
    from fedguard.model.tiny import build_tiny_llama

    path = tmp_path_factory.mktemp("tiny4")
    build_tiny_llama(path, layers=4)
    return path


def tiny_config(**sections):
    from fedguard.config import build_config

    raw = {
        "name": "t", "seed": 3,
        "model": {"name_or_path": "tiny-llama", "precision": "fp32"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "init_seed": 5},
        "data": {"examples_per_client": 24, "max_length": 96},
        "federation": {"num_clients": 4, "clients_per_round": 2, "rounds": 3},
        "train": {"local_steps": 2, "batch_size": 4, "lr": 5e-3},
        "eval": {"every": 0, "harmful_prompts": 4, "benign_prompts": 4, "loss_examples": 4,
                 "max_new_tokens": 4, "answer_max_new_tokens": 4, "batch_size": 4},
    }
    for k, v in sections.items():
        if isinstance(v, dict):
            raw.setdefault(k, {}).update(v)
        else:
            raw[k] = v
    return build_config(raw)


def run_cli(*args, env=None):
    """``fedguard ARGS`` in a fresh interpreter (the way a user runs it)."""
    return subprocess.run([sys.executable, "-m", "fedguard", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def killed_and_resumed(cfg, tmp_path, stop_after_round=2):
    """Run ``cfg`` straight through, and again SIGKILLed after ``stop_after_round`` then resumed;
    returns both run directories (the uninterrupted one first)."""
    from fedguard.io import load_tensors

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(cfg.to_yaml())
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert run_cli("run", str(cfg_path), "--run-dir", str(full), "--quiet").returncode == 0
    crash = run_cli("run", str(cfg_path), "--run-dir", str(killed), "--quiet", "--stop-after-round",
                    str(stop_after_round))
    assert crash.returncode == -9  # SIGKILL: nothing after the round was written
    assert not (killed / "final_adapter").exists()
    resumed = run_cli("resume", str(killed), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    # A resume that ignored the checkpoint and recomputed from round 1 would end identical; it would not
    # train the rounds before the checkpoint only once (run.log is appended to by both processes).
    log = (killed / "run.log").read_text(encoding="utf-8")
    assert f"resuming after round {stop_after_round}" in log
    for r in range(1, cfg.federation.rounds + 1):
        assert log.count(f"round {r}/{cfg.federation.rounds}: train loss") == 1, f"round {r} trained twice"
    a = load_tensors(full / "final_adapter" / "adapter_model.safetensors")
    b = load_tensors(killed / "final_adapter" / "adapter_model.safetensors")
    assert set(a) == set(b) and all(a[k].equal(b[k]) for k in a)
    return full, killed
