"""The fleet-mode Kubernetes files (deploy/kubernetes/fleet), checked offline: schema
validation, and the promises the layout makes -- hubs that survive a drain, reachable
only from the app's pods, over TLS with tokens; app pods that hold no database
credentials, whose sidecars follow the hubs through their Service."""

from __future__ import annotations

import tomllib
from pathlib import Path, PurePosixPath

import pytest
import yaml

from tests.e2e.test_deploy import K8S, KUBERNETES_VERSIONS, validate

FLEET = K8S / "fleet"


def manifests() -> list[Path]:
    return [p for p in sorted(FLEET.glob("*.yaml")) if p.name != "kustomization.yaml"]


def load(name: str) -> dict:
    return yaml.safe_load((FLEET / name).read_text())


def config(name: str) -> dict:
    return tomllib.loads(load(name)["data"]["sidecar.toml"])


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_fleet_manifests_validate_strictly(version):
    validate(manifests(), version)


def test_kustomization_lists_every_manifest():
    assert sorted(load("kustomization.yaml")["resources"]) == sorted(p.name for p in manifests())


def pod(name: str) -> dict:
    return load(name)["spec"]["template"]["spec"]


def mounted(container: dict, volumes: list[dict], path: str) -> dict:
    """The volume a file path lies in (by the container's mounts), or fail."""
    for mount in container["volumeMounts"]:
        root = PurePosixPath(mount["mountPath"])
        if PurePosixPath(path) == root or root in PurePosixPath(path).parents:
            return next(v for v in volumes if v["name"] == mount["name"])
    raise AssertionError(f"{path} is not in any volume of {container['name']}")


def test_hubs_survive_a_drain_and_spread_over_nodes():
    hub = load("hub-deployment.yaml")
    labels = hub["spec"]["selector"]["matchLabels"]
    assert hub["spec"]["replicas"] >= 2
    pdb = load("hub-pdb.yaml")["spec"]
    assert pdb["selector"]["matchLabels"] == labels and pdb["minAvailable"] >= 1
    anti = hub["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    (term,) = anti["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == labels
    assert hub["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_followers_reach_the_hubs_through_their_service_over_tls_with_a_token():
    service = load("hub-service.yaml")
    hub_pod = pod("hub-deployment.yaml")
    (hub,) = hub_pod["containers"]
    hub_config = config("hub-configmap.yaml")
    assert service["spec"]["selector"] == load("hub-deployment.yaml")["spec"]["selector"]["matchLabels"]
    (port,) = service["spec"]["ports"]
    grpc_port = next(p["containerPort"] for p in hub["ports"] if p["name"] == port["targetPort"])
    assert hub_config["server"]["listen"] == [f"0.0.0.0:{grpc_port}"]

    upstream = config("follower-configmap.yaml")["upstream"]
    assert upstream["target"] == f"{service['metadata']['name']}:{port['port']}"

    # The hub's TLS and token files come from their Secrets; the follower trusts the CA
    # (a ConfigMap: the app's pods never mount the hub's key) and presents its token.
    for key, secret in (("tls_cert_file", "cache-sidecar-hub-tls"), ("tls_key_file", "cache-sidecar-hub-tls")):
        assert mounted(hub, hub_pod["volumes"], hub_config["server"][key])["secret"]["secretName"] == secret
    tokens_volume = mounted(hub, hub_pod["volumes"], hub_config["server"]["auth_token_file"])
    tokens_secret = load("hub-tokens-secret.yaml")
    assert tokens_volume["secret"]["secretName"] == tokens_secret["metadata"]["name"]

    follower_pod = pod("follower-deployment.yaml")
    (sidecar,) = follower_pod["initContainers"]
    assert (
        mounted(sidecar, follower_pod["volumes"], upstream["tls_ca_file"])["configMap"]["name"]
        == (load("hub-ca-configmap.yaml")["metadata"]["name"])
    )
    token_volume = mounted(sidecar, follower_pod["volumes"], upstream["token_file"])
    token_secret = load("follower-token-secret.yaml")
    assert token_volume["secret"]["secretName"] == token_secret["metadata"]["name"]
    accepted = [
        line.split()[-1]
        for line in tokens_secret["stringData"]["tokens"].splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert token_secret["stringData"]["token"] in accepted  # the pair is in step
    assert not [line for line in tokens_secret["stringData"]["tokens"].splitlines() if line.startswith("admin ")]


def test_only_the_apps_pods_reach_the_hubs_cache_port():
    policy = load("hub-networkpolicy.yaml")["spec"]
    assert policy["podSelector"]["matchLabels"] == load("hub-deployment.yaml")["spec"]["selector"]["matchLabels"]
    grpc_rules = [rule for rule in policy["ingress"] if {"port": "grpc", "protocol": "TCP"} in rule["ports"]]
    (rule,) = grpc_rules
    app_labels = load("follower-deployment.yaml")["spec"]["template"]["metadata"]["labels"]
    assert rule["from"] == [{"podSelector": {"matchLabels": app_labels}}]
    assert policy["policyTypes"] == ["Ingress"]


def test_the_apps_pods_hold_no_database_credentials():
    follower_pod = pod("follower-deployment.yaml")
    containers = follower_pod["initContainers"] + follower_pod["containers"]
    for container in containers:
        for env in container.get("env", []):
            assert "secretKeyRef" not in env.get("valueFrom", {}), (container["name"], env["name"])
            assert env["name"] not in {"DATABASE_URL", "CACHE_SIDECAR_DATABASE_DSN", "PGPASSWORD"}
    secrets = {v["secret"]["secretName"] for v in follower_pod["volumes"] if "secret" in v}
    assert secrets == {"cache-sidecar-follower-token"}
    follower_config = config("follower-configmap.yaml")
    assert "database" not in follower_config and "dsn" not in follower_config
    assert follower_pod["automountServiceAccountToken"] is False
    # the hub is where the database credentials are
    (hub,) = pod("hub-deployment.yaml")["containers"]
    refs = [e["valueFrom"]["secretKeyRef"]["name"] for e in hub["env"] if "valueFrom" in e]
    assert refs == [load("hub-db-secret.yaml")["metadata"]["name"]]


def test_probes_use_the_plaintext_health_port():
    for name, kind in (("hub-deployment.yaml", "containers"), ("follower-deployment.yaml", "initContainers")):
        spec = pod(name)
        container = spec[kind][0]
        health = next(p["containerPort"] for p in container["ports"] if p["name"] == "health")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == health, (name, probe)
        toml = config("hub-configmap.yaml" if name.startswith("hub") else "follower-configmap.yaml")
        assert toml["server"]["health_listen"] == [f"0.0.0.0:{health}"]
        assert spec["terminationGracePeriodSeconds"] > toml["server"]["grace_period"]


def test_the_cert_manager_example_issues_the_hubs_secret_for_the_service_names():
    certificate = yaml.safe_load((FLEET / "cert-manager" / "certificate.yaml").read_text())
    assert certificate["apiVersion"] == "cert-manager.io/v1" and certificate["kind"] == "Certificate"
    assert certificate["spec"]["secretName"] == load("hub-tls-secret.yaml")["metadata"]["name"]
    service = load("hub-service.yaml")["metadata"]["name"]
    assert {service, f"{service}.default.svc", f"{service}.default.svc.cluster.local"} <= set(
        certificate["spec"]["dnsNames"]
    )


def test_the_fleet_configurations_load_as_a_hub_and_a_follower(tmp_path):
    from sidecar import config as cfg

    loaded = {}
    for name in ("hub-configmap.yaml", "follower-configmap.yaml"):
        path = tmp_path / name.replace(".yaml", ".toml")
        path.write_text(load(name)["data"]["sidecar.toml"])
        loaded[name] = cfg.load(path, env={})
    hub, follower = loaded["hub-configmap.yaml"], loaded["follower-configmap.yaml"]
    assert hub.upstream_target is None and hub.tables and hub.tls_cert_file and hub.auth_token_file
    assert follower.upstream_target == "cache-sidecar-hub:50051" and not follower.tables
    assert follower.dsn is None and follower.upstream_tls_ca_file and follower.upstream_token_file


def test_the_fleet_configurations_serve_a_follower_over_tls_with_a_token(postgres, schema, tmp_path):
    """The two ConfigMaps' sidecar.toml, exactly but for paths and ports: a hub serving over
    TLS with tokens, and a follower of it (no DSN anywhere in its environment) serving the
    app over the Unix socket."""
    import asyncio
    import os
    import signal
    import subprocess

    import asyncpg
    import grpc
    from cache_sidecar_client import Client
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tests.e2e.test_deploy import BIN, free_port
    from tests.support.certs import Authority
    from tests.support.waiting import wait_until

    async def setup() -> None:
        conn = await asyncpg.connect(postgres.dsn)
        await conn.execute(f"CREATE TABLE {schema}.patron (id int PRIMARY KEY, name text)")
        await conn.execute(f"INSERT INTO {schema}.patron VALUES (1, 'Ada')")
        await conn.close()

    asyncio.run(setup())
    authority = Authority(tmp_path / "ca", "fleet CA")
    issued = authority.issue("hub", hosts=("127.0.0.1", "localhost"))
    tokens = load("hub-tokens-secret.yaml")["stringData"]["tokens"]
    token = load("follower-token-secret.yaml")["stringData"]["token"]
    (tmp_path / "tokens").write_text(tokens)
    (tmp_path / "token").write_text(token)
    hub_port, hub_health, follower_health = free_port(), free_port(), free_port()
    socket_path = tmp_path / "grpc.sock"
    hub_text = (
        load("hub-configmap.yaml")["data"]["sidecar.toml"]
        .replace("0.0.0.0:50051", f"127.0.0.1:{hub_port}")
        .replace("0.0.0.0:50052", f"127.0.0.1:{hub_health}")
        .replace('listen = "0.0.0.0:9464"', 'listen = ""')
        .replace("/etc/cache-sidecar/tls/tls.crt", str(issued.cert))
        .replace("/etc/cache-sidecar/tls/tls.key", str(issued.key))
        .replace("/etc/cache-sidecar/tokens/tokens", str(tmp_path / "tokens"))
        .replace("public.patron", f"{schema}.patron")
    )
    follower_text = (
        load("follower-configmap.yaml")["data"]["sidecar.toml"]
        .replace("unix:///run/cache-sidecar/grpc.sock", f"unix://{socket_path}")
        .replace("0.0.0.0:50052", f"127.0.0.1:{follower_health}")
        .replace('listen = "0.0.0.0:9464"', 'listen = ""')
        .replace("cache-sidecar-hub:50051", f"localhost:{hub_port}")
        .replace("/etc/cache-sidecar/hub-ca/ca.crt", str(authority.cert_file))
        .replace("/etc/cache-sidecar/token/token", str(tmp_path / "token"))
    )
    (tmp_path / "hub.toml").write_text(hub_text)
    (tmp_path / "follower.toml").write_text(follower_text)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "CACHE_SIDECAR_"))}
    exe = str(BIN / "cache-sidecar")
    installed = subprocess.run(
        [exe, "triggers", "install", "--config", str(tmp_path / "hub.toml")],
        env={**env, "CACHE_SIDECAR_DATABASE_DSN": postgres.dsn},
        capture_output=True,
        text=True,
    )
    assert installed.returncode == 0, installed.stderr
    hub = subprocess.Popen(
        [exe, "serve", "--config", str(tmp_path / "hub.toml")],
        env={**env, "CACHE_SIDECAR_DATABASE_DSN": postgres.dsn},
        stderr=subprocess.PIPE,
        text=True,
    )
    follower = subprocess.Popen(
        [exe, "serve", "--config", str(tmp_path / "follower.toml")], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        for process, port in ((hub, hub_health), (follower, follower_health)):
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                probe = health_pb2_grpc.HealthStub(channel)

                def ready(process: subprocess.Popen[str] = process, probe: object = probe) -> bool:
                    if process.poll() is not None:
                        raise RuntimeError(process.stderr.read() if process.stderr else "exited")
                    try:
                        return probe.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1  # type: ignore[attr-defined]
                    except grpc.RpcError:
                        return False

                wait_until(ready, 60, 0.05, what="ready")
        with Client(f"unix://{socket_path}") as cache:
            assert cache.get(f"{schema}.patron", 1) == {"id": 1, "name": "Ada"}
            assert cache.list_tables()[0].name == f"{schema}.patron"
        with grpc.insecure_channel(f"127.0.0.1:{hub_port}") as plain, pytest.raises(grpc.RpcError):
            plain.unary_unary("/cachesidecar.v1.Cache/ListTables")(b"", timeout=2)
        for process in (follower, hub):
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=20) == 0
    finally:
        for process in (follower, hub):
            if process.poll() is None:
                process.kill()
