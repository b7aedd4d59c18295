"""Creates the fleet's token pair once, with a random token, if it does not exist yet:
the Secret cache-sidecar-follower-token (key ``token``: what followers present) and the
Secret cache-sidecar-hub-tokens (key ``tokens``: what the hubs accept). Runs in the
cache-sidecar image (Python's standard library only) as the Job cache-sidecar-tokens,
with a ServiceAccount that may read those two Secrets and create Secrets.

Never overwrites: existing Secrets are kept as they are (rotate by hand, deploy/README.md).
The follower's Secret is created first, so a run cut short between the two is completed
by the next from the follower's token. A hub Secret without the follower's is refused:
which of its lines the followers should get is the operator's call.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path

ACCOUNT = Path(os.environ.get("SERVICEACCOUNT_DIR", "/var/run/secrets/kubernetes.io/serviceaccount"))
HUB = os.environ.get("HUB_TOKENS_SECRET", "cache-sidecar-hub-tokens")
FOLLOWER = os.environ.get("FOLLOWER_TOKEN_SECRET", "cache-sidecar-follower-token")


class Api:
    """The few calls to the Kubernetes API this needs, as the pod's ServiceAccount."""

    def __init__(self) -> None:
        host = os.environ["KUBERNETES_SERVICE_HOST"]
        host = f"[{host}]" if ":" in host else host
        self.base = f"https://{host}:{os.environ['KUBERNETES_SERVICE_PORT']}"
        self.namespace = (ACCOUNT / "namespace").read_text().strip()
        self.context = ssl.create_default_context(cafile=str(ACCOUNT / "ca.crt"))

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        request = urllib.request.Request(
            self.base + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={
                "Authorization": "Bearer " + (ACCOUNT / "token").read_text().strip(),
                "Content-Type": "application/json",
                "Accept": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(request, context=self.context, timeout=30) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as error:
            if error.code in (404, 409):
                return error.code, {}
            raise SystemExit(f"{method} {path}: HTTP {error.code} {error.read()[:500]!r}") from None

    def secret(self, name: str) -> dict | None:
        status, body = self.call("GET", f"/api/v1/namespaces/{self.namespace}/secrets/{name}")
        return body if status == 200 else None

    def create(self, name: str, data: dict[str, str]) -> bool:
        """Creates the Secret; False when one of that name appeared meanwhile."""
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "cache-sidecar-tokens"}},
            "type": "Opaque",
            "stringData": data,
        }
        status, _ = self.call("POST", f"/api/v1/namespaces/{self.namespace}/secrets", body)
        return status != 409


def main() -> int:
    api = Api()
    follower, hub = api.secret(FOLLOWER), api.secret(HUB)
    if follower and hub:
        print(f"{FOLLOWER} and {HUB} exist: kept as they are")
        return 0
    if hub:
        print(
            f"{HUB} exists but {FOLLOWER} does not: create {FOLLOWER} (key token) with the token of "
            f"{HUB} the followers should present, or delete {HUB} to have a new pair generated",
            file=sys.stderr,
        )
        return 1
    if follower:
        token = base64.b64decode(follower["data"]["token"]).decode().strip()
        print(f"{FOLLOWER} exists: {HUB} gets its token")
    else:
        token = secrets.token_hex(32)  # 64 characters of [0-9a-f]: what the daemon accepts
        if not api.create(FOLLOWER, {"token": token}):
            print(f"{FOLLOWER} appeared meanwhile: run again", file=sys.stderr)
            return 1
        print(f"{FOLLOWER} created")
    if not api.create(HUB, {"tokens": f"# followers (read-only)\n{token}\n"}):
        print(f"{HUB} appeared meanwhile: run again", file=sys.stderr)
        return 1
    print(f"{HUB} created")
    return 0


if __name__ == "__main__":
    sys.exit(main())
