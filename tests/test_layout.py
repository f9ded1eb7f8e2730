"""The package's architecture: the core stands apart from experiments and tests, imports no cycle."""
import ast
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import tomllib

import setuptools

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("klq_jax", "experiments", "convert")


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(pkg: str) -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(path: pathlib.Path, module: str, *, top_level_only: bool) -> set[str]:
    """Modules of ours that ``path`` imports (at module level only, or anywhere)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # module-level statements, including those inside if/try blocks
        nodes = [n for stmt in tree.body for n in ast.walk(stmt)
                 if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    out = set()
    is_pkg = path.name == "__init__.py"
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return {m for m in out if m.split(".")[0] in PACKAGES + ("tests",)}


def test_core_imports_without_experiment_code_or_heavy_optional_dependencies():
    names = sorted(_modules("klq_jax"))
    code = (
        "import importlib, sys\n"
        f"for n in {names!r}:\n"
        "    importlib.import_module(n)\n"
        "bad = [m for m in ('matplotlib', 'tyro', 'torch', 'experiments', 'convert', 'tests') if m in sys.modules]\n"
        "print('LOADED', bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT / "tests")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LOADED []" in out.stdout, out.stdout


def test_library_core_never_imports_experiments_convert_or_tests():
    for name, path in _modules("klq_jax").items():
        bad = {m for m in _imports(path, name, top_level_only=False) if not m.startswith("klq_jax")}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_module_level_import_graph_is_acyclic():
    modules = {}
    for pkg in PACKAGES:
        modules.update(_modules(pkg))
    graph = {}
    for name, path in modules.items():
        deps = set()
        for m in _imports(path, name, top_level_only=True):
            # ``from pkg import sub`` names a module when ``pkg.sub`` is one; else the package.
            while m and m not in modules:
                m = m.rpartition(".")[0]
            if m and m != name:
                deps.add(m)
        graph[name] = deps
    # A package's __init__ re-exporting its submodules is not a cycle of logic: drop edges from a
    # submodule up to its own parent package.
    for name, deps in graph.items():
        graph[name] = {d for d in deps if not name.startswith(d + ".")}
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_no_test_only_module_ships_in_the_wheel():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    find = cfg["tool"]["setuptools"]["packages"]["find"]
    shipped = setuptools.find_packages(where=str(ROOT), include=find["include"])
    assert {"klq_jax", "klq_jax.models", "klq_jax.train", "klq_jax.data", "experiments", "convert"} <= set(shipped)
    assert not [p for p in shipped if p.split(".")[0] == "tests"], shipped
    scripts = cfg["project"]["scripts"]
    assert scripts["klq"] == "experiments.cli:main"


def test_no_unused_imports_or_variables():
    # ruff's F401 (an unused import) and F841 (a local assigned, never used): dead code that
    # reads as if it mattered (and an import that costs start-up time).
    # The ruff binary: next to this interpreter, else on PATH or in the base environment's scripts
    # (a venv made with --system-site-packages imports ruff from the base but has no binary).
    import ruff

    candidates = [os.path.join(os.path.dirname(sys.executable), "ruff"), shutil.which("ruff"),
                  os.path.join(sysconfig.get_path("scripts", vars={"base": sys.base_prefix}), "ruff"),
                  os.path.normpath(os.path.join(os.path.dirname(ruff.__file__), *[".."] * 4, "bin", "ruff"))]
    ruff_bin = next((c for c in candidates if c and os.path.isfile(c)), None)
    assert ruff_bin, f"no ruff binary found (looked at {candidates}); pip install -e '.[test]'"
    out = subprocess.run(
        [ruff_bin, "check", "--no-cache", "--select", "F401,F841",
         "--output-format", "concise", *PACKAGES, "tests"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
