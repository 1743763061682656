"""A real Flower deployment on localhost: a SuperLink and SuperNodes as separate processes, TLS and SuperNode
authentication on, fedguard's apps submitted with `flwr run`. Every process is ended by PID."""

import socket
import time

import pytest

from conftest import tiny_config
from fedguard.io import read_ndjson

NODES = 3


def _free_port_block(n: int) -> int:
    """A port p with p..p+n free (the SuperLink's, then one per SuperNode)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65535:
            continue
        try:
            for p in range(base, base + n + 1):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise RuntimeError("no block of free ports")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    from fedguard.pki import make_credentials, write_node_key
    from fedguard.deploy.launch import Deployment

    work = tmp_path_factory.mktemp("deploy")
    creds = make_credentials(work / "credentials", NODES)
    rogue = write_node_key(work / "credentials" / "rogue")  # a key pair nobody registered
    port = _free_port_block(NODES + 3)
    dep = Deployment(work, creds.ca_cert, superlink=f"127.0.0.1:{port}")
    try:
        dep.start_superlink(creds.server_cert, creds.server_key)
        node_ids = {dep.register(creds.node_public_key(k)) for k in range(NODES)}
        assert len(node_ids) == NODES
        for k in range(NODES):
            dep.start_supernode(f"supernode-{k}", creds.node_key(k), k, num_partitions=NODES, port=port + 1 + k)
        for k in range(NODES):
            assert dep.wait_for_log(f"supernode-{k}", r"SuperNode ID", 120), f"node {k} did not connect"
        yield dep, creds, rogue, port
    finally:
        dep.stop_all()
        assert all(p.poll() is not None for p in dep.procs.values())  # nothing left running


def test_a_run_over_tls_with_node_auth_survives_a_killed_node(deployment, tmp_path):
    """3 SuperNodes, the audit defense on; SuperNode 2 is killed after round 1: round 2 completes with the other
    two (its instructions come back as Flower's node error or time out) and the run finishes."""
    import signal

    dep, _, _, _ = deployment
    cfg = tiny_config(federation={"num_clients": NODES, "clients_per_round": NODES, "rounds": 2,
                                  "round_timeout": 150, "node_wait": 120},
                      defense={"level": "audit", "audit": {"harmful_examples": 4, "benign_examples": 2}})
    run_dir = tmp_path / "run"
    flwr = dep.submit(cfg.to_yaml(), run_dir, stream=False, wait=False)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and "round 1/2: train loss" not in _text(run_dir / "run.log"):
        assert flwr.poll() in (None, 0), dep.log_path("run").read_text()[-2000:]
        time.sleep(1)
    assert "round 1/2: train loss" in _text(run_dir / "run.log"), _text(run_dir / "run.log")[-3000:]
    dep.stop("supernode-2", sig=signal.SIGKILL)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not (run_dir / "final_metrics.json").is_file():
        time.sleep(2)
    assert (run_dir / "final_adapter" / "adapter_model.safetensors").is_file(), _text(run_dir / "run.log")[-3000:]
    rounds = [r for r in read_ndjson(run_dir / "metrics.ndjson") if r["round"] > 0]
    assert [r["round"] for r in rounds] == [1, 2]
    assert sorted(rounds[0]["accepted"]) == ["0", "1", "2"]
    for r in rounds[1:]:
        assert sorted(r["accepted"]) == ["0", "1"]
        assert r["rejected"]["2"].startswith(("node_error", "no_reply")), r["rejected"]
    assert all(len(r["defense"]["verdicts"]) == len(r["accepted"]) for r in rounds)
    assert all(r["transport_bytes"]["0"]["up"] > 0 for r in rounds)


def test_an_unregistered_node_is_refused(deployment):
    dep, _, rogue, port = deployment
    proc = dep.start_supernode("rogue", rogue, 0, port=port + NODES + 1)
    proc.wait(120)
    assert proc.returncode != 0
    assert "Failed to activate SuperNode" in dep.log_path("rogue").read_text()


def test_a_node_without_the_ca_certificate_cannot_connect(deployment):
    dep, creds, _, port = deployment
    proc = dep.start_supernode("no-ca", creds.node_key(0), 0, port=port + NODES + 2, root_certificates=False)
    proc.wait(120)
    assert proc.returncode != 0
    assert "CERTIFICATE_VERIFY_FAILED" in dep.log_path("no-ca").read_text()


def _text(path) -> str:
    return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""


def test_credentials_from_the_cli_verify_and_keep_private_keys_private(tmp_path):
    import stat

    from cryptography import x509

    from conftest import run_cli

    done = run_cli("deploy", "certs", str(tmp_path / "c"), "--nodes", "1", "--host", "fl.example.org")
    assert done.returncode == 0, done.stderr
    ca = x509.load_pem_x509_certificate((tmp_path / "c" / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "c" / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"fl.example.org", "localhost"} <= set(names.get_values_for_type(x509.DNSName))
    assert "127.0.0.1" in {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}  # the ServerApp's own link
    for private in ("ca.key", "server.key", "nodes/node-0"):
        assert stat.S_IMODE((tmp_path / "c" / private).stat().st_mode) == 0o600
    assert (tmp_path / "c" / "nodes" / "node-0.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
