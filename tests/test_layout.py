"""The codebase's shape: dependencies point one way (models/ never imports stages/), no module of stages/ or
models/ imports itself back through others (function-level imports included), and the project speaks of itself,
not of how it was made."""

import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("stages", "models")


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules `path` imports anywhere in its body (`from a import b` counts a.b when that is a module)."""
    found = set()
    package = _module(path) if path.name == "__init__.py" else _module(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            # `from package import module` uses that module; the package itself only where a name is its own
            named = {f"{base}.{a.name}" for a in node.names}
            found |= named if named <= modules else {base} | named
    return {m for m in found if m in modules}


def _graph() -> dict[str, set[str]]:
    files = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")]
    modules = {_module(p) for p in files}
    return {_module(p): _imports(p, modules) - {_module(p)} for p in files}


def test_models_never_import_stages():
    offenders = {
        m: sorted(i for i in deps if i.split(".")[0] == "stages")
        for m, deps in _graph().items()
        if m.split(".")[0] == "models"
    }
    assert not {m: d for m, d in offenders.items() if d}


def test_no_import_cycles():
    assert not _cycles(_graph())


def _package(module: str) -> str:
    """The concern a module belongs to: models, a stage file, or a package of stages/ (stages.attacks, ...)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "stages" else parts[0]


def test_no_cycles_between_packages():
    """The concerns are layers: no package imports, through any of its modules, a package that imports it back."""
    packages: dict[str, set[str]] = {}
    for module, deps in _graph().items():
        packages.setdefault(_package(module), set()).update(_package(d) for d in deps)
    assert not _cycles({p: deps - {p} for p, deps in packages.items()})


def test_stages_root_holds_the_commands_only():
    """Every module at the root of stages/ is a command with a public `run`; helpers live in packages."""
    for path in sorted((ROOT / "stages").glob("*.py")):
        if path.name != "__init__.py":
            tree = ast.parse(path.read_text())
            assert any(isinstance(n, ast.FunctionDef) and n.name == "run" for n in tree.body), path.name


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    return cycles


def test_the_project_speaks_of_itself():
    tracked = subprocess.run(
        ["git", "ls-files", "*.py", "*.md", "*.sh", "*.yaml"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.split()
    if not tracked:  # not a git checkout (an unpacked archive): read the files themselves
        tracked = [
            str(p.relative_to(ROOT))
            for ext in ("py", "md", "sh", "yaml")
            for p in ROOT.rglob(f"*.{ext}")
            if ".venv" not in p.parts and "artifacts" not in p.parts
        ]
    # Text about how the work was done rather than about the project: its tickets and milestones, the runs it is
    # still waiting for, the machines it was or was not given. Case-insensitive. "session" alone stays allowed
    # (a pytest session, an ONNX Runtime session); the phrases are split so that the same grep finds nothing here.
    phrases = [
        r"stop [0-9]",
        r"(this|last|next|previous) " "stop",
        r"issue [0-9#]",
        r"INI_" "SPEC",
        r"not (been )?(run|measured|tried) " "yet",
        r"\b(was|were|been|is|not) " "lent",
        r"no gpu was " "given",
        r"(this|last|next|previous|earlier|later|another|one) " "session",
        r"session [0-9]",
        r"/work/" "shared",
    ]
    pattern = re.compile("|".join(phrases), re.IGNORECASE)
    hits = [
        f"{name}:{i}"
        for name in tracked
        if (ROOT / name).is_file()
        for i, line in enumerate((ROOT / name).read_text(errors="replace").splitlines(), 1)
        if pattern.search(line)
    ]
    assert not hits


def test_every_markdown_link_resolves():
    """Each relative link and image of the tracked Markdown files names a file of the tree (published reports
    link their plots under the study's prefix)."""
    tracked = subprocess.run(["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True, check=False)
    names = tracked.stdout.split() or [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.md") if ".venv" not in p.parts]
    broken = [
        f"{name}: {target}"
        for name in names
        if (ROOT / name).is_file()
        for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", (ROOT / name).read_text(errors="replace"))
        if not re.match(r"[a-z]+://|mailto:|#", target) and not ((ROOT / name).parent / target.split("#")[0]).exists()
    ]
    assert not broken
