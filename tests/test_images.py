"""The container images' build stage holds the whole Cargo workspace and builds, without a Docker engine.

What a `docker build -f relay/Dockerfile .` would copy into the build stage is computed here from the same
inputs Docker uses: the context (the repository's files, as git lists them: tracked plus untracked-not-ignored),
`.dockerignore` with Docker's matching rules (patterns in order, `!` re-includes, the last match wins, a pattern
that matches a directory matches everything under it) and the stage's COPY instructions. Those files, laid out
as the stage would have them, must hold every member of the root Cargo.toml's `[workspace]` and pass
`cargo check --workspace --locked --offline`, and the packages the Dockerfile's `cargo build -p` names must be
among them. The check shares the repository's target/ so that only the workspace crates are rebuilt.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.relay import REPO

DOCKERFILES = ["relay/Dockerfile", "operator/Dockerfile"]
CARGO_TIMEOUT = 1200  # seconds: dependencies clippy has not checked yet (a fresh target/) take minutes


# ---------------------------------------------------------------------------------------------------------
# .dockerignore, as github.com/moby/patternmatcher reads and matches it


def dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern]]:
    """(is_exception, regex) per pattern, in file order."""
    rules = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        pattern = line.strip()
        if not pattern:
            continue
        exception = pattern.startswith("!")
        if exception:
            pattern = pattern[1:].strip()
        pattern = posixpath.normpath(pattern)  # as Go's filepath.Clean: "relay/" is "relay"
        if len(pattern) > 1 and pattern.startswith("/"):
            pattern = pattern[1:]
        rules.append((exception, re.compile(_pattern_regex(pattern))))
    return rules


def _pattern_regex(pattern: str) -> str:
    """Go filepath.Match syntax plus `**`: `*` and `?` stop at `/`, `**/` is any number of directories."""
    out, i = "^", 0
    while i < len(pattern):
        ch = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                i += 1
            out += ".*" if i == len(pattern) else "(.*/)?"
            continue
        if ch == "*":
            out += "[^/]*"
        elif ch == "?":
            out += "[^/]"
        elif ch in "[]":
            out += ch
        elif ch == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        else:
            out += re.escape(ch)
        i += 1
    return out + "$"


def in_context(path: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """Whether Docker sends `path` (relative, `/`-separated) to the builder: the last matching rule decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]  # the path's directories, then itself
    excluded = False
    for exception, regex in rules:
        if exception != excluded:  # an exclusion cannot change an excluded path, nor an exception an included one
            continue
        if any(regex.match(c) for c in candidates):
            excluded = not exception
    return not excluded


@pytest.mark.parametrize(
    "dockerignore, path, sent",
    [
        ("*\n!relay/\n", "relay/src/lib.rs", True),
        ("*\n!relay/\n", "Cargo.toml", False),
        ("*\n!relay/\n", "tests/relay/x.py", False),  # `*` and the exceptions are anchored at the top
        ("*\n!relay/\nrelay/target\n", "relay/target/debug/x", False),  # the last match wins
        ("*\n!relay/\nrelay/target\n!relay/target/keep\n", "relay/target/keep", True),
        ("**/*.orig\n", "relay/src/lib.rs.orig", False),
        ("# !relay\n*\n", "relay/src/lib.rs", False),
        ("/target\n", "target/debug/x", False),
        ("target\n", "relay/target/x", True),
    ],
)
def test_dockerignore_is_matched_as_docker_does(dockerignore, path, sent):
    assert in_context(path, dockerignore_rules(dockerignore)) is sent


# ---------------------------------------------------------------------------------------------------------
# The build stage of a Dockerfile


@dataclass
class BuildStage:
    dockerfile: str
    layout: dict[str, str]  # absolute path in the stage -> context path it was copied from
    workdir: str  # where the `cargo build` runs
    packages: list[str]  # its -p arguments
    missing: list[str]  # COPY sources the context does not have (docker build fails on them)


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        out.append((keyword.upper(), args.strip()))
        pending = ""
    return out


def build_stage(dockerfile: str, context: list[str]) -> BuildStage:
    """The stage whose RUN runs `cargo build`, with what its COPYs take from `context`."""
    dirs = {posixpath.dirname(f) for f in context}
    dirs |= {d for f in dirs for d in _ancestors(f)}
    stages, current = [], None
    for keyword, args in instructions((REPO / dockerfile).read_text()):
        if keyword == "FROM":
            current = BuildStage(dockerfile, {}, "/", [], [])
            stages.append(current)
        elif keyword == "WORKDIR":
            current.workdir = posixpath.normpath(posixpath.join(current.workdir, args))
        elif keyword in ("COPY", "ADD"):
            words = json.loads(args) if args.startswith("[") else shlex.split(args)
            flags = [w for w in words if w.startswith("--")]
            if any(f.startswith("--from") for f in flags):
                continue  # from another stage or image, not from the context
            unsupported = [f for f in flags if f.split("=")[0] not in ("--chown", "--chmod", "--link")]
            assert not unsupported, f"{dockerfile}: COPY {' '.join(unsupported)}: teach tests/test_images.py it"
            *sources, dest = [w for w in words if not w.startswith("--")]
            _copy(current, sources, dest, context, dirs)
        elif keyword == "RUN" and "cargo build" in args:
            words = shlex.split(args)
            current.packages += [words[i + 1] for i, w in enumerate(words[:-1]) if w in ("-p", "--package")]
            current.packages += [w.split("=", 1)[1] for w in words if w.startswith("--package=")]
            return current
    pytest.fail(f"{dockerfile} has no stage that runs `cargo build`")


def _ancestors(path: str) -> list[str]:
    parts = path.split("/") if path else []
    return ["/".join(parts[:i]) for i in range(len(parts) + 1)]


def _copy(stage: BuildStage, sources: list[str], dest: str, context: list[str], dirs: set[str]) -> None:
    """Docker's COPY: a directory's contents go into dest; a file goes into dest/ or becomes dest."""
    target = posixpath.normpath(posixpath.join(stage.workdir, dest))
    made_dirs = {d for p in stage.layout for d in _ancestors(posixpath.dirname(p).lstrip("/"))}
    dest_is_dir = dest.endswith("/") or len(sources) > 1 or target == stage.workdir or target[1:] in made_dirs
    for source in sources:
        src = posixpath.normpath(source).lstrip("/")
        src = "" if src == "." else src
        if re.search(r"[*?\[]", src):
            regex = re.compile(_pattern_regex(src))
            matches = sorted({p for p in context + list(dirs) if p and regex.match(p)})
            if matches:
                _copy(stage, matches, dest if dest.endswith("/") else dest + "/", context, dirs)
            else:
                stage.missing.append(source)
            continue
        if src in dirs:
            prefix = f"{src}/" if src else ""
            for f in context:
                if f.startswith(prefix):
                    stage.layout[posixpath.join(target, f[len(prefix):])] = f
        elif src in context:
            stage.layout[posixpath.join(target, posixpath.basename(src)) if dest_is_dir else target] = src
        else:
            stage.missing.append(source)


# ---------------------------------------------------------------------------------------------------------
# The context and the workspace


def repository_files() -> list[str]:
    """What git sees in the work tree: tracked and untracked-but-not-ignored files that exist."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, check=True, capture_output=True, text=True,
    ).stdout
    return sorted({p for p in out.split("\0") if p and (REPO / p).is_file()})


def workspace_members(root: Path) -> list[str]:
    """The root Cargo.toml's [workspace] members, globs expanded, as `/`-separated paths."""
    members = tomllib.loads((root / "Cargo.toml").read_text())["workspace"]["members"]
    found = []
    for member in members:
        paths = sorted(root.glob(member)) if re.search(r"[*?\[]", member) else [root / member]
        found += [p.relative_to(root).as_posix() for p in paths]
    return found


@pytest.fixture(scope="module")
def context() -> list[str]:
    rules = dockerignore_rules((REPO / ".dockerignore").read_text())
    return [f for f in repository_files() if in_context(f, rules)]


@pytest.fixture(scope="module")
def checked_layouts() -> dict:
    """cargo check results by layout: both Dockerfiles normally copy the same files, and one check is enough."""
    return {}


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_build_context_holds_every_workspace_member(dockerfile, context):
    stage = build_stage(dockerfile, context)
    assert not stage.missing, f"{dockerfile}: COPY sources not in the build context: {stage.missing}"
    copied = {src: dst for dst, src in stage.layout.items()}
    repo_files = repository_files()
    for member in ["Cargo.toml", "Cargo.lock", *workspace_members(REPO)]:
        wanted = [f for f in repo_files if f == member or f.startswith(member + "/")]
        assert wanted, f"workspace member {member} has no files in the repository"
        left_out = [f for f in wanted if copied.get(f) != posixpath.join(stage.workdir, f)]
        assert not left_out, (
            f"{dockerfile}: {member} is not in the build stage at {stage.workdir}/{member} "
            f"(allow it in .dockerignore: `!{member}/`); left out: {left_out[:5]}"
        )
    # What git ignores (target/ above all) has no business in the context; Docker would send it, git or not.
    ignored = subprocess.run(
        ["git", "ls-files", "-z", "--others", "--ignored", "--exclude-standard", "--directory"],
        cwd=REPO, check=True, capture_output=True, text=True,
    ).stdout
    rules = dockerignore_rules((REPO / ".dockerignore").read_text())
    sent = [p for p in ignored.split("\0") if p and in_context(p.rstrip("/"), rules)]
    assert not sent, f".dockerignore lets git-ignored paths into the build context: {sent}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_build_stage_checks_and_has_the_built_packages(dockerfile, context, checked_layouts, tmp_path):
    cargo = shutil.which("cargo")
    if not cargo:
        pytest.skip("cargo is not installed")
    stage = build_stage(dockerfile, context)
    assert stage.packages, f"{dockerfile}: its `cargo build` names no -p package"
    key = frozenset(stage.layout.items())
    if key not in checked_layouts:
        root = tmp_path / "stage"
        for dst, src in stage.layout.items():
            (root / dst.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / src, root / dst.lstrip("/"))
        workdir = root / stage.workdir.lstrip("/")
        env = {**os.environ, "CARGO_TARGET_DIR": str(REPO / "target")}
        check = subprocess.run(
            [cargo, "check", "--workspace", "--locked", "--offline", "--quiet"],
            cwd=workdir, env=env, capture_output=True, text=True, timeout=CARGO_TIMEOUT,
        )
        metadata = subprocess.run(
            [cargo, "metadata", "--no-deps", "--locked", "--offline", "--format-version", "1"],
            cwd=workdir, env=env, capture_output=True, text=True, timeout=120,
        )
        checked_layouts[key] = (check, metadata)
    check, metadata = checked_layouts[key]
    assert check.returncode == 0, (
        f"cargo check --workspace on {dockerfile}'s build stage failed:\n{check.stderr[-4000:]}"
    )
    assert metadata.returncode == 0, metadata.stderr[-2000:]
    members = json.loads(metadata.stdout)
    names = {p["name"] for p in members["packages"] if p["id"] in members["workspace_members"]}
    unknown = [p for p in stage.packages if p not in names]
    assert not unknown, f"{dockerfile} builds {unknown}, not a package of the workspace it copies ({sorted(names)})"
