"""Split learning across processes (fedguard.split.network): `fedguard split serve` in one process,
`fedguard split train|generate --server` in others, over localhost mutual TLS. Training and generation equal
the in-process path bit for bit; both sides meter the same bytes per kind; one server serves several clients
at once (sequential turns); a client with other settings, another model, a certificate from another CA or
someone else's certificate is refused with a message naming why, and the server keeps serving."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from fedguard.pki import make_client_cert, make_credentials

STARTUP_TIMEOUT = 240  # the machine may be busy: a fresh interpreter imports torch and transformers

pytestmark = pytest.mark.usefixtures("one_thread")  # torch on one thread (conftest)


@pytest.fixture(scope="module")
def models(tmp_path_factory, one_thread):
    """A 4-layer tiny LLaMA with sharpened weights (greedy paths that vary), and a copy with one weight changed
    (the same architecture and tokenizer, another fingerprint)."""
    from safetensors.torch import load_file, save_file

    from fedguard.model.tiny import build_tiny_llama

    root = tmp_path_factory.mktemp("split-net-models")
    path = root / "tiny4"
    build_tiny_llama(path, layers=4)
    weights = path / "model.safetensors"
    state = load_file(weights)
    save_file({k: v * 8 if v.ndim == 2 else v for k, v in state.items()}, weights, metadata={"format": "pt"})
    other = root / "tiny4-other"
    shutil.copytree(path, other)
    state = load_file(other / "model.safetensors")
    key = next(k for k in sorted(state) if "layers.2.mlp" in k)
    state[key] = state[key] * 1.01
    save_file(state, other / "model.safetensors", metadata={"format": "pt"})
    return path, other


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("split-net-pki")
    creds = make_credentials(root / "federation", 0)
    for cid in ("0", "1", "2"):
        make_client_cert(creds, cid)
    other = make_credentials(root / "other", 0)  # another federation's CA
    make_client_cert(other, "0")
    return creds, other


def write_config(tmp: Path, model: Path, name: str = "net", **split) -> Path:
    cfg = {
        "name": name, "seed": 3, "output_dir": str(tmp / "runs"),
        "model": {"name_or_path": str(model), "precision": "fp32", "num_threads": 1},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "init_seed": 5},
        "data": {"examples_per_client": 12, "max_length": 64},
        "federation": {"num_clients": 2, "clients_per_round": 2},
        "train": {"batch_size": 4, "lr": 1e-2, "weight_decay": 0.01, "max_grad_norm": None},
        "eval": {"max_new_tokens": 6, "batch_size": 4, "harmful_prompts": 4, "overrefusal_prompts": 2,
                 "benign_prompts": 4},
        "split": {"k_a": 1, "k_c": 1, "steps": 3, "eval_examples": 0, "noise": {"mode": "relative", "scale": 0.3},
                  "barrier_timeout": 60,  # a server that cannot serve two clients at once fails in bounded time
                  **split},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def fedguard(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedguard", *map(str, args)]


def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(fedguard(*args), capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


class Server:
    """`fedguard split serve` in a child process (stdout/stderr to files)."""

    def __init__(self, config: Path, creds, run_dir: Path, *extra: str):
        self.run_dir = run_dir
        self.out, self.err = run_dir.with_suffix(".out"), run_dir.with_suffix(".err")
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(fedguard("split", "serve", config, "--address", "127.0.0.1:0",
                                                  "--credentials", creds.root, "--run-dir", run_dir, "--quiet",
                                                  "--flush-seconds", "0.2", *extra),
                                         stdout=out, stderr=err, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while "listening on" not in self.out.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"the split server did not start:\n{self.out.read_text()}\n{self.err.read_text()}")
            time.sleep(0.2)
        self.address = self.out.read_text().split("listening on ", 1)[1].split()[0]

    def metrics(self) -> dict:
        return json.loads((self.run_dir / "server_metrics.json").read_text())

    def events(self) -> list[dict]:
        return [json.loads(line) for line in (self.run_dir / "metrics.ndjson").read_text().splitlines()]

    def wait_for(self, what, timeout: float = 60):
        """Poll server_metrics.json (rewritten every 0.2 s) until ``what(metrics)`` is truthy."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                m = self.metrics()
                if what(m):
                    return m
            except (FileNotFoundError, json.JSONDecodeError):
                m = None
            if time.monotonic() > deadline:
                raise AssertionError(f"server metrics never satisfied the condition: {m}")
            time.sleep(0.2)

    def log(self) -> str:
        return (self.run_dir / "run.log").read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


def client(verb: str, config: Path, server: Server, creds_root: Path, cid: str, *extra: str):
    return run("split", verb, config, "--server", server.address, "--client-id", cid, "--credentials", creds_root,
               *extra)


def bytes_sum(*parts: dict) -> dict:
    out: dict = {}
    for part in parts:
        for kind, v in part.items():
            o = out.setdefault(kind, {"up": 0, "down": 0})
            o["up"] += v["up"]
            o["down"] += v["down"]
    return out


# --- 1. two processes give what one process gives -----------------------------------------------------------

def test_train_and_generate_across_processes_equal_the_in_process_path(models, pki, tmp_path, capsys):
    """A server process and a client process over mutual TLS: the client's losses and adapters are bit-identical
    to client 0's in the in-process recipe (same data, batches, noise and dropout streams), `split generate`
    through the live server gives the in-process tokens with the same adapters, and the bytes per kind that the
    client metered equal what the server metered for it."""
    from fedguard.cli import main
    from fedguard.config import load_config
    from fedguard.io import load_tensors, read_ndjson
    from fedguard.split.train import train_split

    creds, _ = pki
    config = write_config(tmp_path, models[0])
    server = Server(config, creds, tmp_path / "server")
    try:
        trained = client("train", config, server, creds.root, "0", "--run-dir", tmp_path / "client0", "--quiet")
        assert trained.returncode == 0, trained.stderr
        assert "run directory" in trained.stdout
        prompts = ["Name three colours.", "What is two plus two?"]
        # generation from this process (the CLI's code, a gRPC client of the server process): one start-up less
        capsys.readouterr()
        assert main(["split", "generate", str(config), "--server", server.address, "--client-id", "0",
                     "--credentials", str(creds.root), "--adapters", str(tmp_path / "client0" / "adapters"),
                     "--prompt", prompts[0], "--prompt", prompts[1], "--json", str(tmp_path / "gen.json")]) == 0
        out = capsys.readouterr().out
        assert "> Name three colours." in out and "decode" in out
    finally:
        assert server.stop() == 0, server.err.read_text()
    remote = json.loads((tmp_path / "gen.json").read_text())
    final = json.loads((tmp_path / "client0" / "final_metrics.json").read_text())
    steps = [r for r in read_ndjson(tmp_path / "client0" / "metrics.ndjson") if "step" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in steps)
    assert all(set(r["bytes"]) == {"forward", "backward"} for r in steps)

    # the in-process recipe: client 0 trains first (sequential), on the same data partition
    ip = train_split(load_config(config, []), tmp_path / "in-process", quiet=True)
    ip_steps = [r for r in read_ndjson(ip.run_dir / "metrics.ndjson") if r.get("client") == "0" and "step" in r]
    assert [r["loss"] for r in steps] == [r["loss"] for r in ip_steps]  # bit-identical
    ours = load_tensors(tmp_path / "client0" / "adapters" / "client-0.safetensors")
    theirs = load_tensors(ip.run_dir / "adapters" / "client-0.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    # the server's B after client 0's steps + client 0's parts -> in-process generation = remote generation
    served = load_tensors(tmp_path / "server" / "adapters" / "server.safetensors")
    assert served and all(".layers.1." in k or ".layers.2." in k for k in served)
    assert all(".layers.0." in k or ".layers.3." in k for k in ours)
    both = tmp_path / "both"
    both.mkdir()
    shutil.copy(tmp_path / "client0" / "adapters" / "client-0.safetensors", both)
    shutil.copy(tmp_path / "server" / "adapters" / "server.safetensors", both)
    assert main(["split", "generate", str(config), "--adapters", str(both), "--prompt", prompts[0], "--prompt",
                 prompts[1], "--json", str(tmp_path / "gen-ip.json")]) == 0
    local = json.loads((tmp_path / "gen-ip.json").read_text())
    assert remote["tokens"] == local["tokens"] and remote["answers"] == local["answers"]
    assert len({t for row in remote["tokens"] for t in row}) > 2  # a greedy path that varies
    assert remote["decode_steps"] == len(remote["tokens"][0]) - 1

    # bytes per kind, on both sides: the client's (training + generation) are the server's for client 0
    metrics = json.loads((tmp_path / "server" / "server_metrics.json").read_text())
    assert metrics["running"] is False and metrics["server_optimizer_steps"] == 3
    mine = metrics["clients"]["0"]
    assert mine["steps"] == 3 and mine["generations"] == 1 and mine["refusals"] == 0
    assert set(mine["bytes"]) == {"hello", "forward", "backward", "prefill", "decode", "end"}
    assert mine["bytes"] == bytes_sum(final["bytes"], remote["bytes"])
    assert final["bytes"]["forward"]["up"] > 3 * 4 * 64 * 4  # at least the hidden states themselves
    assert sum(r["bytes"]["forward"]["up"] for r in steps) == final["bytes"]["forward"]["up"]
    # the server held only its part: no embedding, no client blocks, no head
    assert metrics["resident_parameter_bytes"] < final["resident_parameter_bytes"]
    events = [json.loads(x) for x in (tmp_path / "server" / "metrics.ndjson").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3]
    assert "client '0' joined" in (tmp_path / "server" / "run.log").read_text()


@pytest.mark.parametrize("mode", ["batch_parallel", "hierarchical"])
def test_parallel_modes_across_processes_equal_the_in_process_path(mode, models, pki, tmp_path):
    """batch_parallel (one B step over both clients' batches) and hierarchical (a B copy per client, averaged
    every 2 steps) with two client processes against one server process: each client's losses and adapters, and
    the server's B, equal the in-process recipe's with the same config."""
    from fedguard.config import load_config
    from fedguard.io import load_tensors, read_ndjson
    from fedguard.split.train import train_split

    creds, _ = pki
    # batch_parallel also evaluates (safety and utility, decoded through the server) after its last joint step
    config = write_config(tmp_path, models[0], name=mode, mode=mode, average_every=2,
                          evaluate=mode == "batch_parallel")
    server = Server(config, creds, tmp_path / "server", "--clients", "0,1")
    try:
        procs = {cid: subprocess.Popen(fedguard("split", "train", config, "--server", server.address, "--client-id",
                                                cid, "--credentials", creds.root, "--run-dir", tmp_path / f"client{cid}",
                                                "--quiet"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for cid in ("0", "1")}
        results = {cid: p.communicate(timeout=600) for cid, p in procs.items()}
        for cid, p in procs.items():
            assert p.returncode == 0, results[cid][1]
        metrics = server.wait_for(lambda m: all(m["clients"].get(c, {}).get("steps") == 3 for c in "01"))
    finally:
        assert server.stop() == 0, server.err.read_text()
    assert metrics["server_optimizer_steps"] == (3 if mode == "batch_parallel" else 6)

    ip = train_split(load_config(config, []), tmp_path / "in-process", quiet=True)
    assert ip.final_metrics["server_optimizer_steps"] == metrics["server_optimizer_steps"]
    ip_records = [r for r in read_ndjson(ip.run_dir / "metrics.ndjson") if "step" in r and "loss" in r]
    for cid in "01":
        remote = [r["loss"] for r in read_ndjson(tmp_path / f"client{cid}" / "metrics.ndjson") if "step" in r]
        local = [r["loss"] for r in ip_records if r["client"] == cid]
        assert len(remote) == 3 and remote == pytest.approx(local, rel=1e-5, abs=1e-6), cid
        ours = load_tensors(tmp_path / f"client{cid}" / "adapters" / f"client-{cid}.safetensors")
        theirs = load_tensors(ip.run_dir / "adapters" / f"client-{cid}.safetensors")
        assert ours.keys() == theirs.keys()
        for k in ours:
            torch.testing.assert_close(ours[k], theirs[k], rtol=1e-5, atol=1e-6, msg=f"client {cid} {k}")
        if mode == "batch_parallel":
            remote_eval = json.loads((tmp_path / f"client{cid}" / "final_metrics.json").read_text())["evaluation"]
            local_eval = ip.final_metrics["evaluation"][cid]
            assert remote_eval["harmful_n"] == local_eval["harmful_n"] > 0
            for key in ("harmful_samples", "benign_samples"):
                assert [x["response"] for x in remote_eval[key]] == [x["response"] for x in local_eval[key]], key
            assert remote_eval["refusal_rate"] == local_eval["refusal_rate"]
    served = load_tensors(tmp_path / "server" / "adapters" / "server.safetensors")
    theirs = load_tensors(ip.run_dir / "adapters" / "server.safetensors")
    assert served.keys() == theirs.keys() and any(t.abs().max() > 0 for k, t in served.items() if "lora_B" in k)
    for k in served:
        torch.testing.assert_close(served[k], theirs[k], rtol=1e-5, atol=1e-6, msg=k)


# --- 2 and 3: one server, several clients --------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared(models, pki, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("split-net-shared")
    creds, _ = pki
    config = write_config(tmp, models[0], name="shared")
    server = Server(config, creds, tmp / "server")
    yield server, config, tmp
    assert server.stop() == 0, server.err.read_text()


def test_one_server_serves_two_client_processes_at_once(shared, pki, models):
    """Sequential mode: while a third client holds the server's turn (a forward without its backward), client
    processes 0 and 1 both connect and wait inside the server at once; released, both finish their steps."""
    from fedguard.config import load_config
    from fedguard.split.network import connect, hello, remote_client

    server, config, tmp = shared
    creds, _ = pki
    cfg = load_config(config, [])
    with connect(cfg, server.address, "2", creds.root) as transport:
        _, holder = remote_client(cfg, transport, "2")
        hello(holder)
        hidden = torch.randn(1, 4, 64)
        out, _ = transport.call("forward", "2", {"hidden": hidden, "counts": torch.tensor([4])},
                                {"step": 1, "train": True})
        assert out["hidden"].shape == (1, 4, 64)
        procs = {cid: subprocess.Popen(fedguard("split", "train", config, "--server", server.address, "--client-id",
                                                cid, "--credentials", creds.root, "--run-dir", tmp / f"client{cid}",
                                                "--quiet"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for cid in ("0", "1")}
        try:
            # both training forwards wait for client 2's turn, each in its own server thread
            server.wait_for(lambda m: m["in_flight"] == {"0": "forward", "1": "forward"}, timeout=STARTUP_TIMEOUT)
        finally:
            transport.call("backward", "2", {"grad": torch.zeros(1, 4, 64)}, {"step": 1})
        results = {cid: p.communicate(timeout=600) for cid, p in procs.items()}
    for cid, p in procs.items():
        assert p.returncode == 0, results[cid][1]
        final = json.loads((tmp / f"client{cid}" / "final_metrics.json").read_text())
        assert final["client_steps"] == 3 and all(math.isfinite(x) for x in final["losses"])
    m = server.wait_for(lambda m: {c: m["clients"].get(c, {}).get("steps") for c in "012"} == {"0": 3, "1": 3, "2": 1})
    assert m["server_optimizer_steps"] >= 7 and m["in_flight"] == {}
    steps = [(e["client"], e["step"]) for e in server.events() if e["event"] == "step"]
    assert steps[0] == ("2", 1) and sorted(steps[1:]) == [(c, s) for c in "01" for s in (1, 2, 3)]


def test_wrong_settings_model_or_certificate_are_refused_and_the_server_keeps_serving(shared, pki, models,
                                                                                     tmp_path, capsys):
    """The CLI's own code path, in this process (a process per refusal costs seconds of imports each)."""
    server, config, _ = shared

    def client(verb, config, server, creds_root, cid, *extra):
        from fedguard.cli import main

        capsys.readouterr()
        code = main(["split", verb, str(config), "--server", server.address, "--client-id", cid,
                     "--credentials", str(creds_root), *map(str, extra)])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess([], code, out, err)

    creds, other = pki
    refusals = server.metrics()["refusals"]

    # another partition point: both sides say which field differs
    r = client("train", config, server, creds.root, "0", "--set", "split.k_a=2", "--run-dir", tmp_path / "ka")
    assert r.returncode == 2 and "k_a differs: client 2, server 1" in r.stderr, r.stderr
    assert not (tmp_path / "ka").exists()  # refused before it wrote anything
    # another base model (same architecture, one weight changed)
    wrong = write_config(tmp_path, models[1], name="other-model")
    r = client("generate", wrong, server, creds.root, "0", "--prompt", "hi", "--max-new-tokens", "2")
    assert r.returncode == 2 and "model.weights_sha256_16 differs" in r.stderr, r.stderr
    server.wait_for(lambda m: m["refusals"] >= refusals + 2)
    log = server.log()
    assert "refused hello from client '0'" in log and "k_a differs: client 2, server 1" in log
    assert "model.weights_sha256_16 differs" in log

    def as_client_0(name: str, pair_from: Path) -> Path:
        """A credentials folder with our CA and ``pair_from``'s certificate and key filed as client 0's."""
        folder = tmp_path / name
        (folder / "clients").mkdir(parents=True)
        shutil.copy(creds.ca_cert, folder / "ca.crt")
        for suffix in ("pem", "key"):
            shutil.copy(pair_from.with_suffix(f".{suffix}"), folder / "clients" / f"0.{suffix}")
        return folder

    # a certificate from another CA: the TLS handshake fails (a clean error: the call returns 2, nothing raised)
    foreign = as_client_0("foreign", other.root / "clients" / "0")
    r = client("generate", config, server, foreign, "0", "--prompt", "hi", "--max-new-tokens", "2")
    assert r.returncode == 2 and "refused the connection" in r.stderr, r.stderr
    # client 1's valid certificate, claiming to be client 0
    stolen = as_client_0("stolen", creds.root / "clients" / "1")
    r = client("generate", config, server, stolen, "0", "--prompt", "hi", "--max-new-tokens", "2")
    assert r.returncode == 2 and "certificate is for 1, not '0'" in r.stderr, r.stderr
    assert "certificate is for 1, not '0'" in server.log()

    # and the server still serves a client in good standing
    r = client("generate", config, server, creds.root, "1", "--prompt", "hi", "--max-new-tokens", "3")
    assert r.returncode == 0 and "> hi" in r.stdout, r.stderr
    assert server.proc.poll() is None
    server.wait_for(lambda m: m["clients"].get("1", {}).get("generations", 0) >= 1)


# --- 4. SmolLM2 across two processes ----------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_across_two_processes(pki, tmp_path):
    """SmolLM2-135M-Instruct, k_a = k_c = 2, fp32: a few training steps of client 0 through a server process over
    mutual TLS and a short generation; the losses are finite and the tokens equal in-process generation with
    the same adapters."""
    from fedguard.cli import main

    creds, _ = pki
    cfg = {
        "name": "smol", "seed": 2023, "output_dir": str(tmp_path / "runs"),
        "model": {"name_or_path": "smollm2-135m-instruct", "precision": "fp32", "num_threads": 2},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"], "init_seed": 2023},
        "data": {"source": "builtin:benign", "examples_per_client": 16, "max_length": 128},
        "federation": {"num_clients": 2, "clients_per_round": 2},
        "train": {"batch_size": 4, "lr": 2e-4, "max_grad_norm": 1.0},
        "eval": {"max_new_tokens": 8, "batch_size": 4},
        "split": {"k_a": 2, "k_c": 2, "steps": 4, "eval_examples": 0, "noise": {"mode": "relative", "scale": 0.5}},
    }
    config = tmp_path / "smol.yaml"
    config.write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    server = Server(config, creds, tmp_path / "server")
    try:
        r = client("train", config, server, creds.root, "0", "--run-dir", tmp_path / "client0", "--quiet")
        assert r.returncode == 0, r.stderr
        r = client("generate", config, server, creds.root, "0", "--adapters", tmp_path / "client0" / "adapters",
                   "--prompt", "Name three colours.", "--json", tmp_path / "gen.json")
        assert r.returncode == 0, r.stderr
    finally:
        assert server.stop() == 0, server.err.read_text()
    final = json.loads((tmp_path / "client0" / "final_metrics.json").read_text())
    remote = json.loads((tmp_path / "gen.json").read_text())
    assert len(final["losses"]) == 4 and all(math.isfinite(x) for x in final["losses"])
    both = tmp_path / "both"
    both.mkdir()
    shutil.copy(tmp_path / "client0" / "adapters" / "client-0.safetensors", both)
    shutil.copy(tmp_path / "server" / "adapters" / "server.safetensors", both)
    assert main(["split", "generate", str(config), "--adapters", str(both), "--prompt", "Name three colours.",
                 "--json", str(tmp_path / "gen-ip.json")]) == 0
    local = json.loads((tmp_path / "gen-ip.json").read_text())
    assert remote["tokens"] == local["tokens"], (remote["answers"], local["answers"])
    server_metrics = json.loads((tmp_path / "server" / "server_metrics.json").read_text())
    decode = remote["bytes"]["decode"]
    report = {
        "wall_seconds": time.perf_counter() - t0, "losses": final["losses"],
        "seconds_per_step": final["seconds_per_step"], "bytes_per_step": final["bytes_per_step"],
        "bytes_per_decode_step": (decode["up"] + decode["down"]) / max(remote["decode_steps"], 1),
        "decode_steps": remote["decode_steps"], "generation_seconds": remote["seconds"], "answer": remote["answers"],
        "server_resident_MB": server_metrics["resident_parameter_bytes"] / 1e6,
        "client_resident_MB": final["resident_parameter_bytes"] / 1e6,
        "server_steps": [e for e in (json.loads(x) for x in (tmp_path / "server" / "metrics.ndjson").read_text()
                                     .splitlines()) if e["event"] == "step"],
    }
    print(json.dumps(report, indent=1))
