"""Flower's deployment runtime on this machine: one SuperLink, one SuperNode process per site, over
127.0.0.1 (docs/federated.md: on a real federation each SuperNode runs in its hospital, against
the SuperLink's address, with TLS and node authentication).

The processes are Flower's own programs from the runtime ehrlake is installed in: the SuperLink
(``flower-superlink``, which starts the ServerApp through ``flower-superexec``), a SuperNode per
site (``flower-supernode``, each starting a ``flwr-clientapp`` per message), and ``flwr run``
submitting the app bundle. Their logs stay in the run's folder; a failure shows their last lines.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from ehrlake.errors import EhrlakeError
from ehrlake.ports import free_port

APP = Path(__file__).parent / "app"
FEDERATION = "ehrlake"
START_TIMEOUT_S = 60


def _wait_for_port(port: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise EhrlakeError(f"the SuperLink exited with status {process.returncode}:\n{_tail(log)}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise EhrlakeError(
        f"the SuperLink did not listen on 127.0.0.1:{port} in {START_TIMEOUT_S} s:\n{_tail(log)}"
    )


def _tail(path: Path, lines: int = 15) -> str:
    if not path.exists():
        return f"(no {path.name})"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def run(folder: Path, sites: dict[str, Path], timeout_s: int) -> None:
    """Run the app with one SuperNode per site (``site -> its extracted rows``); the ServerApp
    writes its outputs under ``folder / "server"``. Every process is stopped on return."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "FLWR_HOME": str(folder / "flwr"), "PYTHONUNBUFFERED": "1"}  # fmt: skip
    (folder / "flwr").mkdir(parents=True, exist_ok=True)
    (folder / "server").mkdir(exist_ok=True)
    ports: set[int] = set()
    port = free_port(taken=ports)
    (folder / "flwr" / "config.toml").write_text(
        f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    processes: list[subprocess.Popen] = []
    logs: list[Path] = []

    def start(name: str, argv: list[str]) -> subprocess.Popen:
        log = folder / f"{name}.log"
        logs.append(log)
        with log.open("w") as out:
            p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=folder,
                                 start_new_session=True)  # fmt: skip
        processes.append(p)
        return p

    try:
        link = start("superlink", [str(bin_dir / "flower-superlink"), "--insecure", "--port", str(port),
                                   "--database", str(folder / "superlink.db")])  # fmt: skip
        _wait_for_port(port, link, folder / "superlink.log")
        for site, data in sites.items():
            start(f"site-{site}", [str(bin_dir / "flower-supernode"), "--insecure",
                                   "--superlink", f"127.0.0.1:{port}", "--port", str(free_port(taken=ports)),
                                   "--node-config", f"site='{site}' data='{data}'"])  # fmt: skip
        log = folder / "flwr-run.log"
        logs.append(log)
        argv = [str(bin_dir / "flwr"), "run", str(APP), FEDERATION, "--stream",
                "--run-config", f"work='{folder / 'server'}'"]  # fmt: skip
        with log.open("w") as out:
            try:
                done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=folder,
                                      timeout=timeout_s)  # fmt: skip
            except subprocess.TimeoutExpired:
                raise EhrlakeError(f"the federated run took over {timeout_s} s:\n{_tail(log)}") from None
        if done.returncode != 0 or not (folder / "server" / "final.npz").exists():
            shown = "\n".join(f"--- {p.name}\n{_tail(p, 8)}" for p in logs)
            raise EhrlakeError(f"the federated run failed (flwr run exit {done.returncode}):\n{shown}")
    finally:
        for p in reversed(processes):
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, 15)
        for p in processes:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
