"""The repository stands on its own: a user who clones it has nothing beside it, so no tracked
file may point outside it (the design documents and data it was built from sat in a sibling
folder once, and a clone then failed 15 tests and seeded a 33-product catalog)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Patterns and examples are spelled so that this file does not match itself.
UP = "." + "./"
SIBLING_SHARED = re.compile(r"\.\./shared\b|\bparent\s*/\s*[\"']shared[\"']")
# A run of parent steps in a path: "../", "../../x" (a bare ".." without a slash is prose).
CLIMB = re.compile(r"(?<![\w.])((?:\.\./)+)")
# Folders of a working copy that are not the project (an unversioned tree has no git to ask).
UNTRACKED_DIRS = {".git", ".venv", ".vurksha", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis"}


def tracked_files() -> Iterator[PurePosixPath]:
    """Files under version control, or every project file when this is not a git checkout."""
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        for folder, dirs, files in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in UNTRACKED_DIRS and not d.endswith(".egg-info")]
            for name in files:
                yield PurePosixPath(Path(folder, name).relative_to(ROOT).as_posix())
        return
    for name in out.decode().split("\0"):
        if name:
            yield PurePosixPath(name)


def text_of(path: PurePosixPath) -> str | None:
    data = (ROOT / path).read_bytes()
    if b"\0" in data[:8192]:
        return None  # binary (the Parquet seed)
    return data.decode("utf-8", errors="replace")


def climbs_out(file: PurePosixPath, ups: int) -> bool:
    """Whether `ups` parent steps taken from `file`'s folder leave the repository."""
    return ups > len(file.parent.parts)


def escapes(path: PurePosixPath) -> list[str]:
    """What in this file refers outside the repository, one line each."""
    found = []
    if (ROOT / path).is_symlink():
        target = (ROOT / path).resolve()
        if not target.is_relative_to(ROOT):
            found.append(f"{path}: symlink to {target}")
        return found
    text = text_of(path)
    if text is None:
        return found
    for number, line in enumerate(text.splitlines(), 1):
        if SIBLING_SHARED.search(line):
            found.append(f"{path}:{number}: refers to the shared folder beside it: {line.strip()[:120]}")
            continue
        for match in CLIMB.finditer(line):
            if climbs_out(path, match.group(1).count("../")):
                found.append(f"{path}:{number}: climbs out of the repository: {line.strip()[:120]}")
                break
    return found


def test_no_tracked_file_points_outside_the_repository():
    problems = [problem for path in tracked_files() for problem in escapes(path)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("file", "line", "bad"),
    [
        ("README.md", f"The design is in [DESIGN.md]({UP}shared/DESIGN.md).", True),
        ("pipelines/catalog.py", 'DEFAULT = REPO_ROOT.parent / "sh' 'ared" / "data"', True),
        ("k8s/README.md", f"runs the same [serve.yaml]({UP}serve.yaml)", False),
        ("k8s/README.md", f"see [notes]({UP * 2}notes.md)", True),
        ("tests/unit/x.py", f'ROOT / "{UP * 2}pyproject.toml"', False),
        ("tests/unit/x.py", f'open("{UP * 3}etc/passwd")', True),
        ("Makefile", f"cd {UP}elsewhere && make", True),
        ("README.md", "see [the catalog](pipelines/data/online_retail/SOURCE.md)", False),
    ],
)
def test_the_check_tells_inside_from_outside(tmp_path, monkeypatch, file, line, bad):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / file).write_text(f"first line\n{line}\n")
    assert bool(escapes(PurePosixPath(file))) is bad


def test_the_check_follows_symlinks(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path / "repo")
    (tmp_path / "repo").mkdir()
    (tmp_path / "outside.txt").write_text("x")
    (tmp_path / "repo" / "inside.txt").write_text("x")
    (tmp_path / "repo" / "out").symlink_to(tmp_path / "outside.txt")
    (tmp_path / "repo" / "in").symlink_to(tmp_path / "repo" / "inside.txt")
    assert escapes(PurePosixPath("out"))
    assert not escapes(PurePosixPath("in"))
