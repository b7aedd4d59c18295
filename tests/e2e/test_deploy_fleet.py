"""The fleet layouts (deploy/kubernetes/overlays/hubs and overlays/followers), rendered as
``kubectl apply -k`` would and checked offline: hubs that survive a drain, reachable only
from the app's pods, over TLS with tokens; app pods that hold no database credentials,
whose sidecars follow the hubs through their Service; cert-manager's certificate for the
namespace the overlay deploys to; and the tokens Job's script, run against a stand-in for
the Kubernetes API, whose token pair a real hub and follower then use."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets as secrets_module
import signal
import ssl
import subprocess
import sys
import threading
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from typing import Any

import asyncpg
import grpc
import pytest
from cache_sidecar_client import Client
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar.edge import tokens
from tests.e2e.test_deploy import BIN, K8S, check, free_port, one, pod_spec, render, sidecar_toml
from tests.support.certs import Authority
from tests.support.waiting import wait_until

GENERATOR = K8S / "components" / "generated-tokens" / "generate-tokens.py"
FLEET = ("hub-cert-manager", "generated-tokens", "monitoring")


def hubs(components: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    return render("hubs", components)


def followers(components: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    return render("followers", components)


def hub_pod() -> dict[str, Any]:
    return pod_spec(hubs(), "Deployment", "cache-sidecar-hub")


def follower_pod(components: tuple[str, ...] = ()) -> dict[str, Any]:
    return pod_spec(followers(components), "Deployment", "patron-service")


def config(objects: list[dict[str, Any]], spec: dict[str, Any], container: dict[str, Any]) -> dict[str, Any]:
    return tomllib.loads(sidecar_toml(objects, spec, container))


def mounted(container: dict, volumes: list[dict], path: str) -> dict:
    """The volume a file path lies in (by the container's mounts), or fail."""
    for mount in container["volumeMounts"]:
        root = PurePosixPath(mount["mountPath"])
        if PurePosixPath(path) == root or root in PurePosixPath(path).parents:
            return next(v for v in volumes if v["name"] == mount["name"])
    raise AssertionError(f"{path} is not in any volume of {container['name']}")


def test_hubs_and_followers_deploy_to_one_namespace():
    """Followers dial the hubs' Service by its short name: the two overlays must agree."""
    namespaces = {o["metadata"]["namespace"] for o in hubs() + followers()}
    assert len(namespaces) == 1


def test_hubs_survive_a_drain_and_spread_over_nodes():
    hub = one(hubs(), "Deployment", "cache-sidecar-hub")
    labels = hub["spec"]["selector"]["matchLabels"]
    assert hub["spec"]["replicas"] >= 2
    pdb = one(hubs(), "PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"] == labels and pdb["minAvailable"] >= 1
    anti = hub["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    (term,) = anti["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == labels
    assert hub["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_followers_reach_the_hubs_through_their_service_over_tls_with_a_token():
    service = one(hubs(), "Service", "cache-sidecar-hub")
    spec = hub_pod()
    (hub,) = spec["containers"]
    hub_config = config(hubs(), spec, hub)
    assert service["spec"]["selector"] == one(hubs(), "Deployment")["spec"]["selector"]["matchLabels"]
    (port,) = service["spec"]["ports"]
    grpc_port = next(p["containerPort"] for p in hub["ports"] if p["name"] == port["targetPort"])
    assert hub_config["server"]["listen"] == [f"0.0.0.0:{grpc_port}"]

    fspec = follower_pod()
    (sidecar,) = fspec["initContainers"]
    upstream = config(followers(), fspec, sidecar)["upstream"]
    assert upstream["target"] == f"{service['metadata']['name']}:{port['port']}"

    # The hub's TLS and token files come from their Secrets (which the tokens Job
    # generates); the follower trusts the CA (a ConfigMap: the app's pods never mount the
    # hubs' key) and presents its token.
    for key in ("tls_cert_file", "tls_key_file"):
        tls_volume = mounted(hub, spec["volumes"], hub_config["server"][key])
        assert tls_volume["secret"]["secretName"] == "cache-sidecar-hub-tls"
    tokens_volume = mounted(hub, spec["volumes"], hub_config["server"]["auth_token_file"])
    assert tokens_volume["secret"]["secretName"] == "cache-sidecar-hub-tokens"
    assert mounted(sidecar, fspec["volumes"], upstream["tls_ca_file"])["configMap"]["name"] == "cache-sidecar-hub-ca"
    token_volume = mounted(sidecar, fspec["volumes"], upstream["token_file"])
    assert token_volume["secret"]["secretName"] == "cache-sidecar-follower-token"
    generator = GENERATOR.read_text()
    assert '"cache-sidecar-hub-tokens"' in generator and '"cache-sidecar-follower-token"' in generator
    role = one(hubs(FLEET), "Role", "cache-sidecar-tokens")
    assert set(role["rules"][0]["resourceNames"]) == {"cache-sidecar-hub-tokens", "cache-sidecar-follower-token"}
    # the file names the configurations read are the Secrets' keys the Job writes
    assert PurePosixPath(hub_config["server"]["auth_token_file"]).name == "tokens"
    assert PurePosixPath(upstream["token_file"]).name == "token"


def test_only_the_apps_pods_reach_the_hubs_cache_port():
    policy = one(hubs(), "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"] == one(hubs(), "Deployment")["spec"]["selector"]["matchLabels"]
    grpc_rules = [rule for rule in policy["ingress"] if {"port": "grpc", "protocol": "TCP"} in rule["ports"]]
    (rule,) = grpc_rules
    app = one(followers(), "Deployment", "patron-service")
    assert rule["from"] == [{"podSelector": {"matchLabels": app["spec"]["selector"]["matchLabels"]}}]
    assert policy["policyTypes"] == ["Ingress"]


def test_the_apps_pods_hold_no_database_credentials():
    spec = follower_pod()
    for container in spec["initContainers"] + spec["containers"]:
        for env in container.get("env", []):
            assert "secretKeyRef" not in env.get("valueFrom", {}), (container["name"], env["name"])
            assert env["name"] not in {"DATABASE_URL", "CACHE_SIDECAR_DATABASE_DSN", "PGPASSWORD"}
    secrets = {v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
    assert secrets == {"cache-sidecar-follower-token"}
    follower_config = config(followers(), spec, spec["initContainers"][0])
    assert "database" not in follower_config and "dsn" not in follower_config
    assert spec["automountServiceAccountToken"] is False
    # the hub is where the database credentials are
    (hub,) = hub_pod()["containers"]
    refs = [e["valueFrom"]["secretKeyRef"]["name"] for e in hub["env"] if "valueFrom" in e]
    assert refs == ["cache-sidecar-hub-db"]
    assert hub_pod()["automountServiceAccountToken"] is False


def test_probes_use_the_plaintext_health_port():
    for objects, spec, container in (
        (hubs(), hub_pod(), hub_pod()["containers"][0]),
        (followers(), follower_pod(), follower_pod()["initContainers"][0]),
    ):
        health = next(p["containerPort"] for p in container["ports"] if p["name"] == "health")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == health, probe
        toml = config(objects, spec, container)
        assert toml["server"]["health_listen"] == [f"0.0.0.0:{health}"]
        assert spec["terminationGracePeriodSeconds"] > toml["server"]["grace_period"]


@pytest.mark.parametrize("namespace", [None, "shop"])
def test_cert_manager_issues_the_hubs_secret_for_the_service_names_in_its_namespace(namespace):
    objects = check.render("hubs", ("hub-cert-manager",), namespace=namespace)
    namespace = namespace or one(hubs(), "Service")["metadata"]["namespace"]
    certificate = one(objects, "Certificate", "cache-sidecar-hub")
    assert certificate["spec"]["secretName"] == "cache-sidecar-hub-tls"
    service = one(objects, "Service")["metadata"]["name"]
    assert certificate["spec"]["dnsNames"] == [
        service,
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
    ]
    # the issuer chain is in the component: a self-signed CA, and a CA Issuer of it
    issuer = one(objects, "Issuer", certificate["spec"]["issuerRef"]["name"])
    ca = one(objects, "Certificate", "cache-sidecar-ca")
    assert issuer["spec"]["ca"]["secretName"] == ca["spec"]["secretName"] and ca["spec"]["isCA"]
    assert one(objects, "Issuer", ca["spec"]["issuerRef"]["name"])["spec"] == {"selfSigned": {}}


def test_followers_trust_cert_managers_ca_without_the_hubs_key():
    spec = follower_pod(("follower-cert-manager",))
    (sidecar,) = spec["initContainers"]
    upstream = config(followers(("follower-cert-manager",)), spec, sidecar)["upstream"]
    ca_volume = mounted(sidecar, spec["volumes"], upstream["tls_ca_file"])
    assert set(ca_volume) == {"name", "secret"}  # the ConfigMap is gone
    assert ca_volume["secret"] == {
        "secretName": "cache-sidecar-hub-tls",
        "items": [{"key": "ca.crt", "path": PurePosixPath(upstream["tls_ca_file"]).name}],
    }


# -- hubs on a read replica (components/hubs-on-replica) ---------------------------------

REPLICA = ("logical-capture", "hubs-on-replica")  # in this order: the component needs logical capture
REPLICA_SECRETS = {  # dummy Secrets, as an operator creates them (deploy/README.md)
    ("cache-sidecar-hub-replica-db", "dsn"): "postgresql://cache_sidecar:replica-pw@db-replica/app",
    ("cache-sidecar-hub-db", "dsn"): "postgresql://cache_sidecar:primary-pw@db/app",
}


def without_hub_env(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The objects with the hub container's environment left out."""
    copied = json.loads(json.dumps(objects))
    for container in pod_spec(copied, "Deployment", "cache-sidecar-hub")["containers"]:
        container.pop("env")
    return copied  # type: ignore[no-any-return]


def resolved_env(container: dict[str, Any], secrets: dict[tuple[str, str], str]) -> dict[str, str]:
    """The container's environment as the kubelet gives it, the Secrets' keys from ``secrets``."""
    env = {}
    for entry in container["env"]:
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            env[entry["name"]] = secrets[(ref["name"], ref["key"])]
    return env


def test_hubs_on_a_replica_read_it_and_send_barriers_to_the_primary():
    objects = hubs(REPLICA)
    (hub,) = pod_spec(objects, "Deployment", "cache-sidecar-hub")["containers"]
    env = {e["name"]: e for e in hub["env"]}
    assert len(env) == len(hub["env"]), "a variable set twice"
    assert env["CACHE_SIDECAR_DATABASE_DSN"]["valueFrom"] == {
        "secretKeyRef": {"name": "cache-sidecar-hub-replica-db", "key": "dsn"}
    }
    assert env["CACHE_SIDECAR_DATABASE_PRIMARY_DSN"]["valueFrom"] == {
        "secretKeyRef": {"name": "cache-sidecar-hub-db", "key": "dsn"}
    }
    assert env["CACHE_SIDECAR_DATABASE_CAPTURE"] == {"name": "CACHE_SIDECAR_DATABASE_CAPTURE", "value": "logical"}
    # Nothing else changes: probes (readiness: every table loaded), resources, the Service
    # the followers dial, the PDB, the NetworkPolicy, the ConfigMap; and the install Job
    # stays on the primary as the tables' owner (the publication is made there).
    assert without_hub_env(objects) == without_hub_env(hubs(("logical-capture",)))
    (job,) = pod_spec(objects, "Job", "cache-sidecar-triggers")["containers"]
    refs = [e["valueFrom"]["secretKeyRef"] for e in job["env"] if "valueFrom" in e]
    assert refs == [{"name": "cache-sidecar-owner-db", "key": "dsn"}]


def test_hubs_on_a_replica_leave_the_followers_as_they_are():
    """The followers' overlay is not touched (they follow the same Service); the component
    cannot land on it (no hubs there: it would never put a DSN into an app's pod)."""
    assert one(hubs(REPLICA), "Service", "cache-sidecar-hub") == one(hubs(), "Service", "cache-sidecar-hub")
    assert one(hubs(REPLICA), "NetworkPolicy") == one(hubs(), "NetworkPolicy")
    with pytest.raises(RuntimeError, match="cache-sidecar-hub"):
        check.render("followers", ("hubs-on-replica",))


@pytest.mark.parametrize("components", [("hubs-on-replica",), ("hubs-on-replica", "logical-capture")])
def test_hubs_on_a_replica_do_not_render_without_logical_capture_before_them(components):
    """A standby has no triggers and no LISTEN: without capture logical the hubs would
    refuse to start (exit 2, database.primary_dsn); the render says so first."""
    with pytest.raises(RuntimeError, match="CACHE_SIDECAR_DATABASE_CAPTURE"):
        check.render("hubs", components)


def test_the_hubs_command_on_a_replica_takes_both_dsns(tmp_path):
    """The hub container's exact command, with its environment (dummy Secrets) and its
    sidecar.toml, run here with --print-config: both DSNs and logical capture are taken."""
    objects = hubs(REPLICA)
    spec = pod_spec(objects, "Deployment", "cache-sidecar-hub")
    (hub,) = spec["containers"]
    (tmp_path / "sidecar.toml").write_text(sidecar_toml(objects, spec, hub))
    args = [a.replace("/etc/cache-sidecar/sidecar.toml", str(tmp_path / "sidecar.toml")) for a in hub["args"]]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "CACHE_SIDECAR_"))}
    container_env = resolved_env(hub, REPLICA_SECRETS)
    printed = subprocess.run(
        [str(BIN / "cache-sidecar"), *args, "--print-config"],
        env={**env, **container_env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert printed.returncode == 0, printed.stderr
    database = tomllib.loads(printed.stdout)["database"]
    assert database["dsn"] == "postgresql://cache_sidecar@db-replica/app"  # the password is never printed
    assert database["primary_dsn"] == "postgresql://cache_sidecar@db/app"
    assert database["capture"] == "logical"
    assert "-pw" not in printed.stdout
    # the daemon's own check, which the render guard spares the operator
    del container_env["CACHE_SIDECAR_DATABASE_CAPTURE"]
    refused = subprocess.run(
        [str(BIN / "cache-sidecar"), *args, "--print-config"],
        env={**env, **container_env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2 and "database.primary_dsn" in refused.stderr


@pytest.fixture(scope="module")
def standby_pair() -> Any:
    """A primary and its streaming hot standby (tests/support/standby.py), both local."""
    from tests.support.standby import start_standby_pair

    pair = start_standby_pair()
    yield pair
    pair.stop()


def test_the_hubs_on_a_replica_serve_from_it_with_barriers_on_the_primary(standby_pair, tmp_path):
    """The composition's install Job and hub, their exact commands and environments (the
    Secrets: the owner's and the hubs' DSN the primary, the replica's the standby) and the
    overlay's sidecar.toml but for paths and ports: the Job installs the publication on the
    primary, the hub becomes ready (the probe's health) with its slot on the standby, serves
    over TLS with a token, and a STRONG read sees a commit just made on the primary."""
    primary_dsn, replica_dsn = standby_pair.primary.dsn, standby_pair.standby.dsn
    standby_pair.query(primary_dsn, "CREATE TABLE public.patron (id int PRIMARY KEY, name text)")
    standby_pair.query(primary_dsn, "INSERT INTO public.patron VALUES (1, 'Ada')")
    objects = hubs(REPLICA)
    spec = pod_spec(objects, "Deployment", "cache-sidecar-hub")
    (hub,) = spec["containers"]
    authority = Authority(tmp_path / "ca", "fleet CA")
    issued = authority.issue("hub", hosts=("127.0.0.1", "localhost"))
    token = secrets_module.token_hex(32)
    (tmp_path / "tokens").write_text(token + "\n")
    hub_port, hub_health = free_port(), free_port()
    (tmp_path / "hub.toml").write_text(
        sidecar_toml(objects, spec, hub)
        .replace("0.0.0.0:50051", f"127.0.0.1:{hub_port}")
        .replace("0.0.0.0:50052", f"127.0.0.1:{hub_health}")
        .replace('listen = "0.0.0.0:9464"', 'listen = ""')
        .replace("/etc/cache-sidecar/tls/tls.crt", str(issued.cert))
        .replace("/etc/cache-sidecar/tls/tls.key", str(issued.key))
        .replace("/etc/cache-sidecar/tokens/tokens", str(tmp_path / "tokens"))
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "CACHE_SIDECAR_"))}
    exe = str(BIN / "cache-sidecar")

    def command(args: list[str]) -> list[str]:
        return [exe, *(a.replace("/etc/cache-sidecar/sidecar.toml", str(tmp_path / "hub.toml")) for a in args)]

    (installer,) = pod_spec(objects, "Job", "cache-sidecar-triggers")["containers"]
    job_env = resolved_env(installer, {("cache-sidecar-owner-db", "dsn"): primary_dsn})
    installed = subprocess.run(command(installer["args"]), env={**env, **job_env}, capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr
    hub_env = resolved_env(
        hub, {("cache-sidecar-hub-replica-db", "dsn"): replica_dsn, ("cache-sidecar-hub-db", "dsn"): primary_dsn}
    )
    process = subprocess.Popen(command(hub["args"]), env={**env, **hub_env}, stderr=subprocess.PIPE, text=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{hub_health}") as channel:
            probe = health_pb2_grpc.HealthStub(channel)

            def ready() -> bool:
                if process.poll() is not None:
                    raise RuntimeError(process.stderr.read() if process.stderr else "exited")
                try:
                    return bool(probe.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1)
                except grpc.RpcError:
                    return False

            wait_until(ready, 120, 0.05, what="the hub on the replica ready")
        logical_slots = "SELECT count(*) FROM pg_replication_slots WHERE slot_type = 'logical'"
        assert standby_pair.query(replica_dsn, logical_slots) == [(1,)]
        assert standby_pair.query(primary_dsn, logical_slots) == [(0,)]
        credentials = grpc.composite_channel_credentials(
            grpc.ssl_channel_credentials(root_certificates=authority.cert_file.read_bytes()),
            grpc.access_token_call_credentials(token),
        )
        target = f"localhost:{hub_port}"
        with Client(target, channel=grpc.secure_channel(target, credentials)) as cache:
            assert cache.get("public.patron", 1) == {"id": 1, "name": "Ada"}
            standby_pair.query(primary_dsn, "UPDATE public.patron SET name = 'Grace' WHERE id = 1")
            before = standby_pair.statements("cache-sidecar")
            assert cache.get("public.patron", 1, consistency="strong") == {"id": 1, "name": "Grace"}
            barriers = standby_pair.statements("cache-sidecar")[len(before) :]
            assert barriers and all("pg_logical_emit_message(true" in text for text in barriers), barriers
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()


# -- the tokens Job's script, against a stand-in for the Kubernetes API ---------------------


class FakeApi(ThreadingHTTPServer):
    """The two Secret calls the script makes (GET one, POST to create), over TLS, checking
    the ServiceAccount's bearer token; Secrets kept as the API server keeps them (data,
    base64)."""

    def __init__(self, account_token: str, namespace: str) -> None:
        self.secrets: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str, bool]] = []
        self.account_token = account_token
        self.namespace = namespace
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: FakeApi

    def log_message(self, *args: object) -> None:
        pass

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        ok = self.headers.get("Authorization") == f"Bearer {self.server.account_token}"
        self.server.calls.append((self.command, self.path, ok))
        if not ok:
            self._reply(401, {})
        return ok

    def do_GET(self) -> None:
        prefix = f"/api/v1/namespaces/{self.server.namespace}/secrets/"
        if not self._authorized():
            return
        name = self.path.removeprefix(prefix)
        if self.path.startswith(prefix) and name in self.server.secrets:
            self._reply(200, self.server.secrets[name])
        else:
            self._reply(404, {})

    def do_POST(self) -> None:
        if not self._authorized():
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != f"/api/v1/namespaces/{self.server.namespace}/secrets":
            self._reply(404, {})
            return
        name = body["metadata"]["name"]
        if name in self.server.secrets:
            self._reply(409, {})
            return
        data = {k: base64.b64encode(v.encode()).decode() for k, v in body.pop("stringData").items()}
        self.server.secrets[name] = {**body, "data": data}
        self._reply(201, self.server.secrets[name])


@pytest.fixture
def api(tmp_path):
    authority = Authority(tmp_path / "api-ca", "cluster CA")
    issued = authority.issue("kubernetes", hosts=("127.0.0.1",))
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "namespace").write_text("patron")
    (account / "token").write_text("service-account-token")
    (account / "ca.crt").write_bytes(authority.cert_file.read_bytes())
    server = FakeApi("service-account-token", "patron")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(issued.cert, issued.key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, name="fake-kubernetes-api", daemon=True)
    thread.start()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")},
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": str(server.server_address[1]),
        "SERVICEACCOUNT_DIR": str(account),
    }
    yield server, env
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def generate(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The Job's command (its script from the component's ConfigMap), run here."""
    (job,) = pod_spec(hubs(FLEET), "Job", "cache-sidecar-tokens")["containers"]
    assert job["command"][0] == "python" and PurePosixPath(job["command"][1]).name == GENERATOR.name
    return subprocess.run([sys.executable, str(GENERATOR)], env=env, capture_output=True, text=True, timeout=60)


def secret_text(server: FakeApi, name: str, key: str) -> str:
    return base64.b64decode(server.secrets[name]["data"][key]).decode()


def test_the_tokens_job_generates_a_valid_random_pair_once(api):
    server, env = api
    first = generate(env)
    assert first.returncode == 0, first.stderr
    token = secret_text(server, "cache-sidecar-follower-token", "token")
    accepted = tokens.parse_token_set(secret_text(server, "cache-sidecar-hub-tokens", "tokens").encode())
    # the daemon's own validation takes both files, and the pair is in step
    assert tokens.parse_client_token(token.encode()) == token
    assert accepted.role(token) == tokens.Role.READ and len(accepted) == 1
    assert len(token) >= 64 and all(call[2] for call in server.calls)
    # again: nothing is replaced
    before = json.dumps(server.secrets, sort_keys=True)
    second = generate(env)
    assert second.returncode == 0 and "kept" in second.stdout
    assert json.dumps(server.secrets, sort_keys=True) == before
    assert not [call for call in server.calls[len(server.calls) - 2 :] if call[0] == "POST"]


def test_the_tokens_job_is_random_per_cluster(api, tmp_path):
    server, env = api
    assert generate(env).returncode == 0
    first = secret_text(server, "cache-sidecar-follower-token", "token")
    server.secrets.clear()
    assert generate(env).returncode == 0
    assert secret_text(server, "cache-sidecar-follower-token", "token") != first


def test_the_tokens_job_completes_a_pair_cut_short_and_refuses_a_lone_hub_secret(api):
    server, env = api
    token = "f" * 64
    server.secrets["cache-sidecar-follower-token"] = {"data": {"token": base64.b64encode(token.encode()).decode()}}
    assert generate(env).returncode == 0
    assert tokens.parse_token_set(secret_text(server, "cache-sidecar-hub-tokens", "tokens").encode()).role(token)
    del server.secrets["cache-sidecar-follower-token"]
    refused = generate(env)
    assert refused.returncode == 1 and "cache-sidecar-follower-token" in refused.stderr
    assert "cache-sidecar-follower-token" not in server.secrets


# -- the configurations, run ------------------------------------------------------------


def test_the_fleet_configurations_load_as_a_hub_and_a_follower(tmp_path):
    from sidecar import config as cfg

    loaded = {}
    for name, objects, spec, container in (
        ("hub", hubs(), hub_pod(), hub_pod()["containers"][0]),
        ("follower", followers(), follower_pod(), follower_pod()["initContainers"][0]),
    ):
        path = tmp_path / f"{name}.toml"
        path.write_text(sidecar_toml(objects, spec, container))
        loaded[name] = cfg.load(path, env={})
    hub, follower = loaded["hub"], loaded["follower"]
    assert hub.upstream_target is None and hub.tables and hub.tls_cert_file and hub.auth_token_file
    assert follower.upstream_target == "cache-sidecar-hub:50051" and not follower.tables
    assert follower.dsn is None and follower.upstream_tls_ca_file and follower.upstream_token_file


def test_the_fleet_configurations_serve_a_follower_over_tls_with_generated_tokens(postgres, schema, tmp_path, api):
    """The two overlays' sidecar.toml, exactly but for paths and ports, with the token pair
    the tokens Job generated and the triggers the trigger Job's command installed: a hub
    serving over TLS with tokens, and a follower of it (no DSN anywhere in its environment)
    serving the app over the Unix socket and exporting the series its alert watches."""
    import urllib.request

    from tests.e2e.test_deploy import ALERTS, scraped_names

    server, api_env = api
    assert generate(api_env).returncode == 0

    async def setup() -> None:
        conn = await asyncpg.connect(postgres.dsn)
        await conn.execute(f"CREATE TABLE {schema}.patron (id int PRIMARY KEY, name text)")
        await conn.execute(f"INSERT INTO {schema}.patron VALUES (1, 'Ada')")
        await conn.close()

    asyncio.run(setup())
    authority = Authority(tmp_path / "ca", "fleet CA")
    issued = authority.issue("hub", hosts=("127.0.0.1", "localhost"))
    (tmp_path / "tokens").write_text(secret_text(server, "cache-sidecar-hub-tokens", "tokens"))
    (tmp_path / "token").write_text(secret_text(server, "cache-sidecar-follower-token", "token"))
    hub_port, hub_health, follower_health, follower_metrics = free_port(), free_port(), free_port(), free_port()
    socket_path = tmp_path / "grpc.sock"
    hub_text = (
        sidecar_toml(hubs(), hub_pod(), hub_pod()["containers"][0])
        .replace("0.0.0.0:50051", f"127.0.0.1:{hub_port}")
        .replace("0.0.0.0:50052", f"127.0.0.1:{hub_health}")
        .replace('listen = "0.0.0.0:9464"', 'listen = ""')
        .replace("/etc/cache-sidecar/tls/tls.crt", str(issued.cert))
        .replace("/etc/cache-sidecar/tls/tls.key", str(issued.key))
        .replace("/etc/cache-sidecar/tokens/tokens", str(tmp_path / "tokens"))
        .replace("public.patron", f"{schema}.patron")
    )
    follower_text = (
        sidecar_toml(followers(), follower_pod(), follower_pod()["initContainers"][0])
        .replace("unix:///run/cache-sidecar/grpc.sock", f"unix://{socket_path}")
        .replace("0.0.0.0:50052", f"127.0.0.1:{follower_health}")
        .replace("0.0.0.0:9464", f"127.0.0.1:{follower_metrics}")
        .replace("cache-sidecar-hub:50051", f"localhost:{hub_port}")
        .replace("/etc/cache-sidecar/hub-ca/ca.crt", str(authority.cert_file))
        .replace("/etc/cache-sidecar/token/token", str(tmp_path / "token"))
    )
    (tmp_path / "hub.toml").write_text(hub_text)
    (tmp_path / "follower.toml").write_text(follower_text)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "CACHE_SIDECAR_"))}
    exe = str(BIN / "cache-sidecar")
    (installer,) = pod_spec(hubs(), "Job", "cache-sidecar-triggers")["containers"]
    job_args = [a.replace("/etc/cache-sidecar/sidecar.toml", str(tmp_path / "hub.toml")) for a in installer["args"]]
    installed = subprocess.run(
        [exe, *job_args], env={**env, "CACHE_SIDECAR_DATABASE_DSN": postgres.dsn}, capture_output=True, text=True
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

                def ready(process: subprocess.Popen[str] = process, probe: Any = probe) -> bool:
                    if process.poll() is not None:
                        raise RuntimeError(process.stderr.read() if process.stderr else "exited")
                    try:
                        return bool(probe.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1)
                    except grpc.RpcError:
                        return False

                wait_until(ready, 60, 0.05, what="ready")
        with Client(f"unix://{socket_path}") as cache:
            assert cache.get(f"{schema}.patron", 1) == {"id": 1, "name": "Ada"}
            assert cache.list_tables()[0].name == f"{schema}.patron"
        with grpc.insecure_channel(f"127.0.0.1:{hub_port}") as plain, pytest.raises(grpc.RpcError):
            plain.unary_unary("/cachesidecar.v1.Cache/ListTables")(b"", timeout=2)
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{follower_metrics}/metrics", timeout=5).read().decode()
        assert ALERTS["CacheSidecarFollowerBehind"] <= scraped_names(scraped)
        for process in (follower, hub):
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=20) == 0
    finally:
        for process in (follower, hub):
            if process.poll() is None:
                process.kill()


def test_the_generator_runs_on_the_images_python():
    """The script needs nothing beyond the standard library of the image's Python (3.11)."""
    source = GENERATOR.read_text()
    imports = {line.split()[1].split(".")[0] for line in source.splitlines() if line.startswith(("import ", "from "))}
    assert imports <= set(sys.stdlib_module_names) | {"__future__"}
    assert Path(GENERATOR).is_file()
