"""Shared pytest fixtures."""
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest


# --- PostgreSQL server (tests/test_sweeps.py: workers sharing one Optuna study) ----------------------
# CI runs on a fresh machine with no services: install Debian's `postgresql` package when its binaries
# are missing, start a private server (initdb + pg_ctl, as the `postgres` user when running as root,
# since initdb refuses root) in a temporary folder on a free loopback port, create a database, and stop
# the server at the end of the session. Failing to install or start it fails the tests (never skips).
POSTGRES_DATABASE = "tdro_sweeps"


def _postgres_bindir() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb and pg_ctl (or initdb on PATH)."""
    candidates = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb") if (p.parent / "pg_ctl").exists()]
    if candidates:
        return max(candidates, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    on_path = shutil.which("initdb")
    return Path(on_path).resolve().parent if on_path and shutil.which("pg_ctl") else None


def _install_postgres() -> None:
    if os.geteuid() != 0:
        pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) are missing and installing them needs root: "
                    "run `apt-get install -y postgresql` (Debian) and run the tests again")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "postgresql"]):
        try:
            result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200)
        except (OSError, subprocess.TimeoutExpired) as err:
            pytest.fail(f"installing PostgreSQL failed: `{' '.join(command)}`: {err}")
        if result.returncode != 0:
            pytest.fail(f"installing PostgreSQL failed: `{' '.join(command)}` exited {result.returncode}:\n"
                        f"{(result.stdout + result.stderr)[-3000:]}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_url():
    """URL of a database on a private PostgreSQL server on 127.0.0.1 (started once per session)."""
    bindir = _postgres_bindir()
    if bindir is None:
        _install_postgres()
        bindir = _postgres_bindir()
        if bindir is None:
            pytest.fail("apt-get installed postgresql but no initdb/pg_ctl was found under /usr/lib/postgresql/*/bin")
    user = None
    root = Path(tempfile.mkdtemp(prefix="tdro-pg-"))
    if os.geteuid() == 0:
        user = "postgres"
        try:
            shutil.chown(root, user, user)
        except LookupError:
            shutil.rmtree(root, ignore_errors=True)
            pytest.fail("running as root, but there is no `postgres` user to run the server as "
                        "(it comes with Debian's postgresql package)")
    data, log, port = root / "data", root / "server.log", _free_port()

    def run(*args: str, timeout: int = 120) -> None:
        result = subprocess.run([str(a) for a in args], capture_output=True, text=True, user=user, cwd=root,
                                timeout=timeout)
        if result.returncode != 0:
            server_log = log.read_text()[-2000:] if log.exists() else ""
            pytest.fail(f"PostgreSQL: `{' '.join(map(str, args))}` exited {result.returncode}:\n"
                        f"{result.stdout}{result.stderr}\n{server_log}")

    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off"
    started = False
    try:
        run(bindir / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8", "--no-locale")
        run(bindir / "pg_ctl", "-D", data, "-l", log, "-o", options, "-w", "-t", "60", "start")
        started = True
        run(bindir / "createdb", "-h", "127.0.0.1", "-p", port, "-U", "postgres", POSTGRES_DATABASE)
        yield f"postgresql://postgres@127.0.0.1:{port}/{POSTGRES_DATABASE}"
    finally:
        if started:
            subprocess.run([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True,
                           user=user, cwd=root, timeout=120)
        shutil.rmtree(root, ignore_errors=True)
