"""docs/architecture.md stays true: every module under service/ is in its package's row of the
"Packages" table, and every import follows an arrow of the "Modules and their directions" diagram.

Modelled on test_cli_structure.py: imports are read from the source (at module level and inside
functions, where a hidden edge would otherwise hide), never executed. The diagram is the allowlist:
an import it does not draw fails here, naming the module, the import and the rule it breaks; a new
direction is a new arrow on the page, where a reviewer sees it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICE = ROOT / "service"
PAGE = (ROOT / "docs" / "architecture.md").read_text()

#: The diagram's nodes, by module prefix (the longest prefix wins). "shared" and the demo's
#: generator are not drawn: every module may import the first, the second imports nothing.
AREAS = {
    "service": "shared",
    "service.cli": "cli",
    "service.commands": "cli",
    "service.gateway": "gateway",
    "service.gateway.app": "gw_app",
    "service.gateway.routes": "gw_routes",
    "service.gateway.protocols": "protocols",
    "service.factory": "factory",
    "service.factory.app": "f_app",
    "service.factory.routes": "f_routes",
    "service.factory.data": "data",
    "service.factory.models": "models",
    "service.factory.demo": "demo",
    "service.export": "export",
    "service.export.writer": "export",
    "service.export.kserve_model": "runtime",
    "service.export.hf_modeling": "runtime",
}
#: What may import nothing of the project, not even the shared modules: files copied into
#: exports and run elsewhere, and the demo's dataset generator.
STANDALONE = {"runtime", "demo"}


def section(heading: str) -> str:
    return PAGE.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def drawn_arrows() -> set[tuple[str, str]]:
    """`a --> b` edges of the modules diagram (node labels in brackets are skipped)."""
    block = section("Modules and their directions").split("```mermaid\n", 1)[1].split("```", 1)[0]
    return {(a, b) for a, b in re.findall(r"(\w+)(?:\[[^\]]*\])?\s*-->\s*(\w+)", block)}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def area(module: str) -> str:
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        found = AREAS.get(".".join(parts[:end]))
        if found is not None:
            return found
    raise AssertionError(f"{module} is outside service/")


def imports(path: Path) -> set[str]:
    """Every project module the file imports anywhere, as dotted names of modules that exist
    (`from service.gateway import cache` is the module service.gateway.cache)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        for name in names:
            target = ROOT.joinpath(*name.split("."))
            if name.startswith("service") and (target.with_suffix(".py").exists()
                                               or (target / "__init__.py").exists()):
                found.add(name)
    return found


def edges() -> list[tuple[str, str, str, str]]:
    """(importing module, imported module, their areas) for every import across areas."""
    out = []
    for path in sorted(SERVICE.rglob("*.py")):
        source = module_name(path)
        for target in sorted(imports(path)):
            a, b = area(source), area(target)
            if a != b:
                out.append((source, target, a, b))
    return out


def test_every_module_is_in_its_packages_row_of_the_table() -> None:
    rows = {}
    for line in section("Packages").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| `service"):
            rows[cells[0].strip("`")] = set(re.findall(r"`([\w.]+\.py)`", cells[2]))
    packages = {path.parent for path in SERVICE.rglob("*.py")}
    listed = {ROOT / name for name in rows}
    assert listed == packages, (
        f"packages missing from the table: {sorted(str(p.relative_to(ROOT)) for p in packages - listed)}; "
        f"rows without a package: {sorted(str(p.relative_to(ROOT)) for p in listed - packages)}")
    for name, modules in rows.items():
        present = {p.name for p in (ROOT / name).glob("*.py")} - {"__init__.py"}
        assert modules == present, (
            f"docs/architecture.md, row {name}: add {sorted(present - modules)}, "
            f"remove {sorted(modules - present)}")


def test_every_import_follows_an_arrow_of_the_diagram() -> None:
    arrows = drawn_arrows()
    drawn = {node for arrow in arrows for node in arrow}
    assert set(AREAS.values()) - {"shared"} - STANDALONE <= drawn, "a node is missing"
    wrong = [f"{source} imports {target} ({a} -> {b})" for source, target, a, b in edges()
             if not (b == "shared" and a not in STANDALONE) and (a, b) not in arrows]
    assert not wrong, ("imports that no arrow of docs/architecture.md allows:\n"
                       + "\n".join(wrong))


def test_the_server_side_never_imports_the_command_line() -> None:
    wrong = [f"{s} imports {t}" for s, t, a, b in edges() if b == "cli"]
    assert not wrong, wrong


def test_protocols_know_no_cache() -> None:
    """Protocols import only each other and the shared wire format: no cache, Redis, settings."""
    wrong = [f"{s} imports {t}" for s, t, a, b in edges() if a == "protocols" and b != "shared"]
    assert not wrong, wrong


def test_models_know_no_routes() -> None:
    """Base models import the examples (data.py) and the export runtime, nothing of the
    factory's processes or routes, nor of the gateway."""
    wrong = [f"{s} imports {t}" for s, t, a, b in edges()
             if a == "models" and b not in {"data", "runtime", "shared"}]
    assert not wrong, wrong


def test_the_gateway_and_the_factory_never_import_each_other() -> None:
    sides = {"gateway": "gateway", "gw_app": "gateway", "gw_routes": "gateway",
             "protocols": "gateway", "factory": "factory", "f_app": "factory",
             "f_routes": "factory", "data": "factory", "models": "factory", "export": "factory"}
    wrong = [f"{s} imports {t}" for s, t, a, b in edges()
             if a in sides and b in sides and sides[a] != sides[b]]
    assert not wrong, wrong
