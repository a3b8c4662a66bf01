"""DVC code dependencies cannot drift: every project module a stage's process can import, at
any depth (imports inside functions included), is a declared dependency of that stage.

The import graph is read with `ast`, not by importing anything: every Import / ImportFrom
node anywhere in a module (function bodies, `if` branches, `try` blocks) whose name resolves
to a file of a project package counts. The entry of `python -m pipeline <subcommand>` is
pipeline/__main__.py, pipeline/cli.py and their module-level imports, plus the modules
`pipeline.cli.STAGE_MODULES[<subcommand>]` names (the ones `dispatch` imports for it).
"""
from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

PROJECT_PACKAGES = ("pipeline", "sweeps")  # pyproject.toml: packages pipeline*, sweeps*
CLI_ENTRY = ("pipeline.__main__", "pipeline.cli")


# --------------------------------------------------------------------------- import graph
def module_file(name: str, root: Path) -> Path | None:
    """The file of module `name` under `root` (a module or a package's __init__.py), or None."""
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _walk_outside_functions(tree: ast.AST):
    """The nodes that run on import: everything but function (and lambda) bodies."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))


def imported_names(path: Path, name: str, nested: bool = True) -> set[str]:
    """Dotted names module `name` (at `path`) may import: every Import/ImportFrom at any depth
    (only those that run on import, outside function bodies, when `nested` is false). For `from a import b` both
    `a` and `a.b` are returned (b may be a submodule); relative imports are resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    nodes = ast.walk(tree) if nested else _walk_outside_functions(tree)
    package = name if _is_package(path) else name.rpartition(".")[0]
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                if node.level - 1 >= len(parts):
                    continue  # beyond the top-level package: not ours
                base = ".".join(parts[:len(parts) - (node.level - 1)])
                source = f"{base}.{node.module}" if node.module and base else (node.module or base)
            else:
                source = node.module or ""
            if source:
                found.add(source)
            found.update(f"{source}.{alias.name}" if source else alias.name
                         for alias in node.names if alias.name != "*")
    return found


def _with_parents(name: str) -> list[str]:
    """Importing a.b.c runs a/__init__.py, a/b/__init__.py, then a/b/c."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def import_closure(entries, root: Path, packages=PROJECT_PACKAGES, top_level_only=(),
                   importers: dict[str, str] | None = None) -> dict[str, Path]:
    """Project modules (name -> file) that importing `entries` can reach, transitively.

    Modules in `top_level_only` contribute only their module-level imports (the CLI's
    dispatch imports every stage's module inside functions; which of those run is decided
    per subcommand by the caller). Names that resolve to no file under `root`, or lie
    outside `packages`, are ignored (third-party and standard library). `importers`, if
    given, receives for each module found the module that first imported it."""
    seen: dict[str, Path] = {}
    todo = [(name, None) for name in entries]
    while todo:
        target, importer = todo.pop(0)
        for name in _with_parents(target):
            if name in seen or name.split(".")[0] not in packages:
                continue
            path = module_file(name, root)
            if path is None:
                continue  # `from pkg import function`: pkg.function is no module
            seen[name] = path
            if importers is not None and importer is not None:
                importers[name] = importer
            imports = imported_names(path, name, nested=name not in top_level_only)
            todo.extend((imported, name) for imported in sorted(imports))
    return seen


def _has_code(path: Path) -> bool:
    body = ast.parse(path.read_text(encoding="utf-8")).body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]  # a docstring alone executes nothing
    return bool(body)


def stage_closure(entry_modules, root: Path = ROOT) -> dict[str, str]:
    """Repository-relative files a `python -m pipeline` process running `entry_modules` imports,
    each with the module that imports it ("" for an entry). An __init__.py with no code (empty,
    or only a docstring) is left out: it cannot change a result."""
    importers: dict[str, str] = {}
    closure = import_closure([*CLI_ENTRY, *entry_modules], root, top_level_only=CLI_ENTRY, importers=importers)
    return {p.relative_to(root).as_posix(): importers.get(name, "") for name, p in closure.items()
            if not _is_package(p) or _has_code(p)}


# --------------------------------------------------------------------------- dvc.yaml
def _lookup(params: dict, key: str):
    value = params
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value if isinstance(value, (str, int, float)) else None


def _interpolate(text: str, params: dict) -> str:
    """${a.b} from params.yaml where it resolves; ${item.x} and unknown keys stay as they are."""
    return re.sub(r"\$\{\s*([\w.]+)\s*\}",
                  lambda m: str(v) if (v := _lookup(params, m.group(1))) is not None else m.group(0), text)


def _dep_path(dep) -> str:
    return next(iter(dep)) if isinstance(dep, dict) else str(dep)


def dvc_stage_definitions(dvc_yaml: Path = ROOT / "dvc.yaml", params_yaml: Path = ROOT / "params.yaml"):
    """(stage name, [command], [dep path]) per stage definition; a foreach/matrix stage is one
    definition: its commands and code deps do not vary with ${item}."""
    spec = yaml.safe_load(dvc_yaml.read_text())
    params = yaml.safe_load(params_yaml.read_text()) if params_yaml.exists() else {}
    for name, stage in (spec.get("stages") or {}).items():
        body = stage.get("do", stage) if "foreach" in stage else stage
        cmds = body.get("cmd", [])
        cmds = [cmds] if isinstance(cmds, str) else list(cmds)
        deps = [_interpolate(_dep_path(d), params).rstrip("/") for d in body.get("deps", [])]
        yield name, [_interpolate(c, params) for c in cmds], deps


def entry_modules(cmd: str, stage_modules: dict) -> tuple[str, ...] | None:
    """The project modules `cmd` runs: `python -m pipeline SUB` -> STAGE_MODULES[SUB] (plus the
    CLI, added by stage_closure), `python -m pkg.mod` -> pkg.mod; None for another command."""
    words = shlex.split(cmd)
    if len(words) < 3 or not re.fullmatch(r"python[\d.]*", Path(words[0]).name) or words[1] != "-m":
        return None
    if words[2] != "pipeline":
        return (words[2],)
    sub = next((w for w in words[3:] if not w.startswith("-")), None)
    if sub not in stage_modules:
        raise AssertionError(f"`{cmd}`: subcommand {sub!r} has no entry in pipeline.cli.STAGE_MODULES")
    value = stage_modules[sub]
    return (value,) if isinstance(value, str) else tuple(value)


def covered(path: str, deps) -> bool:
    return any(path == d or path.startswith(d + "/") for d in deps)


# --------------------------------------------------------------------------- tests
def test_every_imported_module_is_a_stage_dependency():
    from pipeline.cli import STAGE_MODULES

    missing: dict[str, dict[str, str]] = {}
    checked = 0
    for name, cmds, deps in dvc_stage_definitions():
        for cmd in cmds:
            modules = entry_modules(cmd, STAGE_MODULES)
            if modules is None:
                continue
            if any(module_file(m, ROOT) is None for m in modules):
                continue  # a subcommand whose module is not written yet (STAGE_MODULES runs ahead)
            checked += 1
            for file, importer in stage_closure(modules).items():
                if not covered(file, deps):
                    missing.setdefault(name, {})[file] = importer
    assert checked, "no `python -m pipeline ...` stage found in dvc.yaml"
    assert not missing, "dvc.yaml stages miss code they import (add to their deps):\n" + "\n".join(
        f"  {stage}: " + ", ".join(f + (f" (imported by {files[f]})" if files[f] else "") for f in sorted(files))
        for stage, files in missing.items())


def _dispatch_branches() -> dict[str, set[str]]:
    """Per `args.stage == "X"` branch of cli.dispatch: the project modules it imports, and
    pipeline.config when it calls _load."""
    tree = ast.parse((ROOT / "pipeline" / "cli.py").read_text())
    dispatch = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "dispatch")
    branches: dict[str, set[str]] = {}
    todo = [n for n in dispatch.body if isinstance(n, ast.If)]
    while todo:
        node = todo.pop()
        test = node.test
        if (isinstance(test, ast.Compare) and isinstance(test.left, ast.Attribute) and test.left.attr == "stage"
                and isinstance(test.comparators[0], ast.Constant)):
            mods = branches.setdefault(test.comparators[0].value, set())
            for sub in (n for stmt in node.body for n in ast.walk(stmt)):
                if isinstance(sub, ast.ImportFrom) and sub.module and sub.module.split(".")[0] in PROJECT_PACKAGES:
                    mods.add(sub.module)
                elif isinstance(sub, ast.Call) and isinstance(sub.func, ast.Name) and sub.func.id == "_load":
                    mods.add("pipeline.config")
        todo.extend(n for n in node.orelse if isinstance(n, ast.If))
    return branches


def test_stage_modules_cover_what_dispatch_imports():
    """STAGE_MODULES is what the dependency test trusts: it must name every module a
    subcommand's branch of `dispatch` imports, and every subcommand must have an entry."""
    from pipeline.cli import STAGE_MODULES, build_parser

    branches = _dispatch_branches()
    assert branches, "no `args.stage == ...` branch found in pipeline.cli.dispatch"
    sub_actions = next(a for a in build_parser()._actions if a.dest == "stage")
    problems = [f"{sub}: no STAGE_MODULES entry" for sub in sub_actions.choices if sub not in STAGE_MODULES]
    for sub, mods in branches.items():
        listed = STAGE_MODULES.get(sub, ())
        listed = {listed} if isinstance(listed, str) else set(listed)
        if mods - listed:
            problems.append(f"{sub}: dispatch imports {sorted(mods - listed)} not in STAGE_MODULES")
    assert not problems, "\n".join(problems)


def test_closure_finds_imports_inside_functions(tmp_path):
    pkg = tmp_path / "fakepkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text('"""docstring only"""\n')
    (pkg / "entry.py").write_text(
        "import os\nfrom fakepkg import helper\n\n"
        "def run():\n    from fakepkg.lazy import thing\n    return thing()\n")
    (pkg / "helper.py").write_text("from . import rel\n")
    (pkg / "rel.py").write_text("from .sub.deep import x\n")
    (pkg / "lazy.py").write_text(
        "def thing():\n    if True:\n        try:\n            import fakepkg.sub.nested\n"
        "        except ImportError:\n            pass\n")
    (pkg / "sub" / "deep.py").write_text("from .. import unused_name  # pkg attribute, not a module\nx = 1\n")
    (pkg / "sub" / "nested.py").write_text("import json\n")
    (pkg / "never.py").write_text("raise SystemExit\n")
    (pkg / "cli.py").write_text("if True:\n    import fakepkg.helper\n\ndef main():\n    import fakepkg.never\n")

    found = import_closure(["fakepkg.entry"], tmp_path, packages=("fakepkg",))
    assert set(found) == {"fakepkg", "fakepkg.entry", "fakepkg.helper", "fakepkg.rel", "fakepkg.lazy",
                          "fakepkg.sub", "fakepkg.sub.deep", "fakepkg.sub.nested"}
    assert found["fakepkg.lazy"] == pkg / "lazy.py"
    # top_level_only: the function-level import of `never` is not followed
    top = import_closure(["fakepkg.cli"], tmp_path, packages=("fakepkg",), top_level_only=("fakepkg.cli",))
    assert set(top) == {"fakepkg", "fakepkg.cli", "fakepkg.helper", "fakepkg.rel", "fakepkg.sub", "fakepkg.sub.deep"}
    assert "fakepkg.never" in import_closure(["fakepkg.cli"], tmp_path, packages=("fakepkg",))


def test_dep_coverage_and_command_parsing():
    assert covered("pipeline/data.py", ["pipeline"]) and covered("pipeline/data.py", ["pipeline/data.py"])
    assert not covered("pipeline/data.py", ["pipe", "pipeline/data"])
    modules = {"train": ("pipeline.config", "pipeline.train")}
    assert entry_modules("python -m pipeline train --experiment x --evaluate", modules) == modules["train"]
    assert entry_modules("python -m benchmarks.quality", modules) == ("benchmarks.quality",)
    assert entry_modules("dvc plots show", modules) is None
    with pytest.raises(AssertionError, match="'nope'"):
        entry_modules("python -m pipeline nope", modules)
