"""Packaging: what pyproject.toml declares, and what the Docker image's build would compile.

No Docker engine runs here, so the image is checked by its parts: the build context is computed from
docker/Dockerfile.dockerignore with Docker's matching rules (the last matching pattern decides; a pattern
that matches a directory takes everything under it), the build stage's COPY lines are replayed into a
temporary directory from that context only, and the package is built there as the stage builds it (pip,
setup.py, mypyc), offline with this venv's setuptools and mypy. The installed core must then say
`compiled`, and the image's own check (the `python3 -c` line of the Dockerfile) must accept it and refuse a
pure-Python build.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())


# ------------------------------------------------------------------------------------ dependencies


def _imported_roots(paths: list[Path]) -> set[str]:
    """The top-level module names imported anywhere in these files (also inside functions)."""
    roots: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                roots |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                roots.add(node.module.split(".")[0])
    return roots


def _modules_of(dist: str) -> set[str]:
    """The top-level modules a distribution provides (from its installed metadata, or its name)."""
    key = re.sub(r"[-_.]+", "-", dist).lower()
    mods = {
        mod
        for mod, dists in importlib.metadata.packages_distributions().items()
        if key in {re.sub(r"[-_.]+", "-", d).lower() for d in dists}
    }
    return mods or {key.replace("-", "_")}


def _py_files(*dirs: str) -> list[Path]:
    return [p for d in dirs for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts]


# Installed for what they do as programs, not imported; each reason is checked below.
TOOLS = {
    "mypy": "the type checker (`mypy`, [tool.mypy]); its mypyc compiles the core in setup.py",
    "ruff": "the linter (`ruff check`, [tool.ruff])",
    "types-pyyaml": "PyYAML's type stubs, read by mypy",
}


def test_every_declared_dependency_is_imported() -> None:
    """No library installed that nothing imports: each runtime and daemon dependency is imported by the
    package, each test dependency by the tests, each build requirement by setup.py."""
    groups = {
        "dependencies": (PYPROJECT["project"]["dependencies"], _py_files("tcpguard")),
        "daemon": (PYPROJECT["project"]["optional-dependencies"]["daemon"], _py_files("tcpguard")),
        "test": (PYPROJECT["project"]["optional-dependencies"]["test"], _py_files("tests", "tools")),
        "build-system": (PYPROJECT["build-system"]["requires"], [ROOT / "setup.py"]),
    }
    unused = []
    for group, (reqs, files) in groups.items():
        imported = _imported_roots(files)
        for req in map(Requirement, reqs):
            name = re.sub(r"[-_.]+", "-", req.name).lower()
            if name in TOOLS and group in ("test", "build-system"):
                continue
            if not _modules_of(req.name) & imported:
                modules = ", ".join(sorted(_modules_of(req.name)))
                unused.append(f"{group}: {req.name} (nothing imports {modules})")
    assert unused == []
    assert {"mypy", "ruff"} <= set(PYPROJECT["tool"])  # the tools above are configured here
    assert "yaml" in _imported_roots(_py_files("tcpguard")) and PYPROJECT["tool"]["mypy"]["strict"]


def test_license_is_an_spdx_expression_the_build_backend_reads() -> None:
    """`license = {text = ...}` is deprecated (setuptools warns at every build); the SPDX string needs
    setuptools 77, which the build requirements and setup.py's own check both ask for."""
    assert PYPROJECT["project"]["license"] == "MIT"
    build = [Requirement(r) for r in PYPROJECT["build-system"]["requires"]]
    (setuptools,) = [r for r in build if r.name == "setuptools"]
    assert not setuptools.specifier.contains("76.9") and setuptools.specifier.contains("77.0")
    tree = ast.parse((ROOT / "setup.py").read_text())
    (minimum,) = [
        node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and [getattr(t, "id", None) for t in node.targets] == ["SETUPTOOLS_MIN"]
        and isinstance(node.value, ast.Constant)
    ]
    assert minimum == 77


def test_setup_py_with_an_old_setuptools_says_which_one_is_needed(tmp_path: Path) -> None:
    """`python setup.py build_ext --inplace` runs with the venv's setuptools, and a new venv brings an old
    one (Python 3.11's ensurepip: 65.5): it gets a sentence with the fix, not setuptools' schema dump."""
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True, timeout=120)
    python = str(tmp_path / "venv" / "bin" / "python")
    old = subprocess.run([python, "-c", "import setuptools; print(setuptools.__version__)"],
                         capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    assert int(old.split(".")[0]) < 77, old
    r = subprocess.run([python, str(ROOT / "setup.py"), "--name"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=60, check=False)  # fmt: skip
    assert r.returncode == 1, r.stdout + r.stderr
    said = f"setup.py: needs setuptools >= 77 (pyproject.toml's license is an SPDX string), this is {old}"
    assert said in r.stderr
    assert "pip install -U 'setuptools>=77'" in r.stderr


# ------------------------------------------------------------------------------------ the image

DOCKERFILE = ROOT / "docker" / "Dockerfile"
IGNORE = ROOT / "docker" / "Dockerfile.dockerignore"


def _pattern(text: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: `*` and `?` stay within a path element, `**` crosses them."""
    out, i = "", 0
    while i < len(text):
        if text.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif text.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            out += {"*": "[^/]*", "?": "[^/]"}.get(text[i], re.escape(text[i]))
            i += 1
    return re.compile(out + r"\Z")


def _ignore_rules(path: Path) -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        rules.append((negated, _pattern(os.path.normpath(line.lstrip("!")).lstrip("/"))))
    return rules


def excluded(rel: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent directories decides."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    out = False
    for negated, rx in rules:
        if any(rx.match(p) for p in prefixes):
            out = not negated
    return out


def context_files() -> list[str]:
    """The checkout's files that the build context holds (tracked files, as a fresh clone has them)."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    rules = _ignore_rules(IGNORE)
    return sorted(f for f in tracked.decode().split("\0") if f and not excluded(f, rules))


def _instructions(stage: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of one stage of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        word, _, rest = line.strip().partition(" ")
        if word.upper() == "FROM":
            current = []
            m = re.search(r"\bAS\s+(\S+)", rest, re.IGNORECASE)
            stages[m.group(1) if m else f"stage{len(stages)}"] = current
        current.append((word.upper(), rest.strip()))
    return stages[stage]


def replay_build_copies(dest: Path) -> Path:
    """Do the build stage's COPY lines into `dest` (its WORKDIR), from the build context only."""
    files = context_files()
    workdir = dest
    for word, args in _instructions("build"):
        if word == "WORKDIR":
            workdir = dest / args.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        if word != "COPY" or "--from" in args:
            continue
        *sources, target = shlex.split(args)
        for source in sources:
            src = source.rstrip("/")
            for f in files:
                if f == src:  # a file: into the target directory (`./`), or as the target
                    to = workdir / target / Path(f).name if target.endswith("/") else workdir / target
                elif f.startswith(src + "/"):  # a directory: its contents into the target
                    to = workdir / target / f[len(src) + 1 :]
                else:
                    continue
                to.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / f, to)
    return workdir


def _compiled_sources() -> list[str]:
    """setup.py's MYPYC_MODULES and C_SOURCES: what the build compiles."""
    out: list[str] = []
    for node in ast.parse((ROOT / "setup.py").read_text()).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] in (
            ["MYPYC_MODULES"],
            ["C_SOURCES"],
        ):
            out += ast.literal_eval(node.value)
    return out


def test_build_context_holds_what_compiles_the_core(tmp_path: Path) -> None:
    files = set(context_files())
    needed = ["pyproject.toml", "setup.py", *_compiled_sources()]
    assert "tcpguard/core/_sum16.c" in needed and "tcpguard/core/engine.py" in needed
    assert [f for f in needed if f not in files] == []
    # ... and the build stage copies them where it runs pip.
    src = replay_build_copies(tmp_path)
    assert [f for f in needed if not (src / f).is_file()] == []


def test_build_context_leaves_out_local_state() -> None:
    rules = _ignore_rules(IGNORE)
    local = [".venv/bin/python", ".git/HEAD", "build/lib/x.py", "tests/devtools/test_lab.py",
             "tcpguard/core/engine.cpython-311-x86_64-linux-gnu.so", "tcpguard/core/_compiled_sources.json",
             "tcpguard/app/__pycache__/cli.cpython-311.pyc"]  # fmt: skip
    for path in local:
        assert excluded(path, rules), path
    for path in ("setup.py", "tcpguard/core/_sum16.c", "tcpguard/core/engine.py", "rules/firewall.py"):
        assert not excluded(path, rules), path
    # The classic builder and docker-compose v1 read only the context root's .dockerignore.
    assert (ROOT / ".dockerignore").resolve() == IGNORE.resolve()


def _image_core_check() -> str:
    """The Python the image runs to refuse a pure core (the final stage's `python3 -c "..."`)."""
    for word, args in _instructions("stage1"):
        if word == "RUN" and (m := re.search(r'python3 -c "([^"]*tcpguard\.core[^"]*)"', args)):
            return m.group(1)
    raise AssertionError("the final stage no longer checks which core it installed")


@pytest.mark.parametrize("pure", [False, True], ids=["compiled", "pure"])
def test_the_build_stage_compiles_the_core_and_the_image_checks_it(tmp_path: Path, pure: bool) -> None:
    """The build stage's steps from the context alone, then the image's check. Offline and without Docker:
    pip builds with this venv's setuptools and mypy (the stage fetches the same requirements) at mypyc's
    opt level 0, to save time; `pure` (TCPGUARD_PURE=1, as a build without a compiler) must be refused."""
    src = replay_build_copies(tmp_path / "image")
    target = tmp_path / "site"
    env = {**os.environ, "TCPGUARD_MYPYC_OPT_LEVEL": "0", "PIP_NO_INDEX": "1"}
    env.pop("TCPGUARD_PURE", None)
    if pure:
        env["TCPGUARD_PURE"] = "1"
    argv = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
            "--target", str(target), "."]  # fmt: skip
    r = subprocess.run(argv, cwd=src, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k != "TCPGUARD_PURE"}
    env["PYTHONPATH"] = str(target)
    # -P and cwd=/: the installed package, never a source tree (as the image runs it from /).
    check = subprocess.run([sys.executable, "-P", "-c", _image_core_check()], cwd="/", env=env,
                           capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    if pure:
        assert check.returncode == 1 and check.stdout.strip() == "tcpguard core: pure", check
    else:
        assert check.returncode == 0 and check.stdout.strip() == "tcpguard core: compiled", check
        assert sorted(p.name.split(".")[0] for p in (target / "tcpguard" / "core").glob("*.so")) == sorted(
            ["_compiled__mypyc", *(Path(f).stem for f in _compiled_sources())]
        )
