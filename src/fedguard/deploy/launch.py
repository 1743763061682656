"""Start and stop the processes of a real Flower deployment (flwr 1.41 and 1.42) running fedguard's apps.

One SuperLink (TLS, SuperNode authentication, no runtime dependency installation) listens on one HTTPS port
that carries the Fleet API (SuperNodes), the Control API (the ``flwr`` CLI) and the Runtime API (its own
ServerApp process). Each SuperNode authenticates with its own key, registered with the SuperLink beforehand,
trusts only the federation's CA, and runs fedguard's ClientApp for one client (``partition-id``, or its own
file with ``data-path``). ``flwr run`` submits the app (a one-file Flower project whose components are the
installed fedguard modules) with the experiment's YAML in the run config; the ServerApp writes the usual run
folder.

Every process is started in its own session and tracked by PID; ``stop`` ends it (TERM, then KILL).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedguard.pki import make_credentials
from fedguard.flower import OFFLINE_ENV

log = logging.getLogger("fedguard")

PROFILE = "fedguard"  # the connection profile the flwr CLI uses (FLWR_HOME/config.toml)
APP_PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedguard-app"
version = "0.1.0"
description = "fedguard's ServerApp and ClientApp (the code is the installed fedguard package)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedguard"

[tool.flwr.app.components]
serverapp = "fedguard.flower.server_app:app"
clientapp = "fedguard.flower.client_app:app"

[tool.flwr.app.config]
config = ""   # the experiment YAML text, given per run
run-dir = ""  # where the ServerApp writes the run folder, given per run
"""


def _bin(name: str) -> str:
    """A console script of this interpreter's environment (Flower starts its helpers by bare name, so the
    folder is also put first on PATH)."""
    return str(Path(sys.executable).parent / name)


@dataclass
class Deployment:
    """The processes of one deployment on this machine, and the files they share (``workdir``)."""

    workdir: Path
    ca_cert: Path  # the federation's CA: the only authority anyone here trusts
    superlink: str = "127.0.0.1:9093"  # host:port the SuperNodes and the CLI reach the SuperLink at
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self):
        self.workdir = Path(self.workdir).resolve()
        self.ca_cert = Path(self.ca_cert).resolve()
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)

    @property
    def flwr_home(self) -> Path:
        return self.workdir / "flwr-home"

    def env(self) -> dict[str, str]:
        env = {**os.environ, **{k: os.environ.get(k, v) for k, v in OFFLINE_ENV.items()},
               "FLWR_HOME": str(self.flwr_home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        return env

    def log_path(self, name: str) -> Path:
        return self.workdir / "logs" / f"{name}.log"

    def _start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        if name in self.procs and self.procs[name].poll() is None:
            raise RuntimeError(f"{name} is already running (pid {self.procs[name].pid})")
        out = open(self.log_path(name), "ab")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=self.env(), start_new_session=True)
        out.close()
        self.procs[name] = proc
        log.info("started %s (pid %d): %s", name, proc.pid, " ".join(cmd))
        return proc

    def wait_for_log(self, name: str, pattern: str, timeout: float = 60.0) -> bool:
        """Wait until ``name``'s log matches ``pattern``; False when the process ended or time ran out first."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while time.monotonic() < deadline:
            if rx.search(self.log_path(name).read_text(errors="replace")):
                return True
            if self.procs[name].poll() is not None:
                return False
            time.sleep(0.2)
        return False

    # -- the server side ---------------------------------------------------------------------------
    def superlink_command(self, cert: Path, key: Path, listen: str | None = None,
                          database: Path | None = None) -> list[str]:
        """``listen``: host:port to bind (default: the address it is reached at; 0.0.0.0:PORT for every
        interface)."""
        host, port = (listen or self.superlink).rsplit(":", 1)
        cmd = [_bin("flower-superlink"), "--ssl-ca-certfile", str(self.ca_cert), "--ssl-certfile", str(cert),
               "--ssl-keyfile", str(key), "--enable-supernode-auth", "--disable-runtime-dependency-installation",
               "--host", host, "--port", port]
        return cmd + (["--database", str(database)] if database is not None else [])

    def start_superlink(self, cert: Path, key: Path, database: Path | None = None) -> None:
        self._start("superlink", self.superlink_command(cert, key, database=database))
        if not self.wait_for_log("superlink", r"Application startup complete", 90):
            raise RuntimeError(f"the SuperLink did not start; see {self.log_path('superlink')}")
        self.write_profile()

    def write_profile(self) -> None:
        """The flwr CLI's connection to the SuperLink: its address and the CA that signed it."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{PROFILE}"\n\n[superlink.{PROFILE}]\naddress = "{self.superlink}"\n'
            f'root-certificates = "{Path(self.ca_cert).resolve()}"\n', encoding="utf-8")

    def register(self, public_key: Path) -> str:
        """Enrol a SuperNode's public key with the SuperLink; returns the node id it was given."""
        done = subprocess.run([_bin("flwr"), "supernode", "register", str(public_key), PROFILE],
                              capture_output=True, text=True, env=self.env(), timeout=120)
        m = re.search(r"SuperNode (\d+) registered", done.stdout + done.stderr)
        if done.returncode != 0 or not m:
            raise RuntimeError(f"registering {public_key} failed: {(done.stdout + done.stderr)[-800:]}")
        return m.group(1)

    # -- the client side -----------------------------------------------------------------------------
    def supernode_command(self, key: Path, partition_id: int, *, data_path: str | None = None,
                          num_partitions: int | None = None, port: int = 9094,
                          root_certificates: Path | bool = True) -> list[str]:
        """A SuperNode for client ``partition_id`` (or the node's own file ``data_path``), authenticated with
        ``key``, trusting ``root_certificates`` (default the federation CA; False: none given, the system's).
        ``port``: the node's local runtime API (one per node on a machine)."""
        node_config = f"partition-id={partition_id}"
        if num_partitions:
            node_config += f" num-partitions={num_partitions}"
        if data_path:
            node_config += f' data-path="{Path(data_path).resolve()}"'
        cmd = [_bin("flower-supernode"), "--superlink", self.superlink, "--auth-supernode-private-key", str(key),
               "--node-config", node_config, "--port", str(port), "--max-retries", "3", "--max-wait-time", "30"]
        if root_certificates is not False:
            cmd += ["--root-certificates", str(self.ca_cert if root_certificates is True else root_certificates)]
        return cmd

    def start_supernode(self, name: str, key: Path, partition_id: int, **options) -> subprocess.Popen:
        return self._start(name, self.supernode_command(key, partition_id, **options))

    # -- runs -------------------------------------------------------------------------------------------
    def app_dir(self) -> Path:
        app = self.workdir / "app"
        app.mkdir(parents=True, exist_ok=True)
        (app / "pyproject.toml").write_text(APP_PYPROJECT, encoding="utf-8")
        return app

    def submit(self, config_yaml: str, run_dir: Path, *, stream: bool = True, wait: bool = True):
        """``flwr run`` the app with this experiment; ``wait``: block until it ends (``--stream`` prints its
        log), else return the running ``flwr`` process."""
        import tomli_w

        run_config = self.workdir / "run-config.toml"
        run_config.write_text(tomli_w.dumps({"config": config_yaml, "run-dir": str(Path(run_dir).resolve())}),
                              encoding="utf-8")
        cmd = [_bin("flwr"), "run", str(self.app_dir()), PROFILE, "--run-config", str(run_config)]
        if stream:
            cmd.append("--stream")
        if not wait:
            return self._start("run", cmd)
        return subprocess.run(cmd, env=self.env())

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def stop_all(self) -> None:
        for name in [n for n in self.procs if n != "superlink"] + ["superlink"]:
            self.stop(name)


def local(config_yaml: str, run_dir: Path, workdir: Path, nodes: int, port: int = 9093) -> int:
    """Everything on this machine: credentials, SuperLink, node registration, ``nodes`` SuperNodes, the run;
    then every process is stopped. Returns ``flwr run``'s exit status."""
    creds = make_credentials(Path(workdir) / "credentials", nodes)
    dep = Deployment(Path(workdir), creds.ca_cert, superlink=f"127.0.0.1:{port}")
    try:
        dep.start_superlink(creds.server_cert, creds.server_key)
        for k in range(nodes):
            dep.register(creds.node_public_key(k))
        for k in range(nodes):
            dep.start_supernode(f"supernode-{k}", creds.node_key(k), k, num_partitions=nodes, port=port + 1 + k)
        return dep.submit(config_yaml, run_dir).returncode
    finally:
        dep.stop_all()
