"""The command line's modules form layers without a cycle: the entry point imports the registry,
command modules import shared helpers, helpers import earlier helpers, and nothing imports back up.

A cycle held together by imports inside functions works until someone moves one of them; these
tests read every import (at module level and inside functions) and import each command module alone
in a fresh interpreter, where a hidden dependency on import order would fail.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from service.commands import GROUPS, HELPERS

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ROOT / "service" / "commands"


def imported_modules(path: Path) -> set[str]:
    """Every `service.*` module that the file imports anywhere, as dotted names."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            # `from service.commands import tasksfile` imports the module tasksfile.
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("service.")}


def commands_imported_by(path: Path) -> set[str]:
    prefix = "service.commands."
    return {name[len(prefix):].split(".")[0] for name in imported_modules(path)
            if name.startswith(prefix)}


def test_every_module_is_a_registered_command_group_or_a_shared_helper() -> None:
    modules = {path.stem for path in COMMANDS.glob("*.py")} - {"__init__"}
    assert modules == set(GROUPS) | set(HELPERS)
    assert not set(GROUPS) & set(HELPERS)


def test_command_modules_import_only_helpers_and_never_the_entry_point() -> None:
    for name in GROUPS:
        path = COMMANDS / f"{name}.py"
        assert "service.cli" not in imported_modules(path), name
        assert commands_imported_by(path) <= set(HELPERS), (
            f"{name} imports command modules {commands_imported_by(path) - set(HELPERS)}: move "
            "what they share into a helper")


def test_helpers_import_only_earlier_helpers() -> None:
    """HELPERS is in dependency order, so no helper can take part in a cycle."""
    for index, name in enumerate(HELPERS):
        path = COMMANDS / f"{name}.py"
        assert "service.cli" not in imported_modules(path), name
        assert commands_imported_by(path) <= set(HELPERS[:index]), (
            f"helper {name} imports {commands_imported_by(path) - set(HELPERS[:index])}")


def test_nothing_outside_the_command_line_imports_its_entry_point_or_commands() -> None:
    """The gateway and the factory never depend on the command line (the demo's runner, which
    raises its errors, lives in it)."""
    for path in (ROOT / "service").rglob("*.py"):
        if path.parent == COMMANDS or path == ROOT / "service" / "cli.py":
            continue
        used = imported_modules(path)
        assert "service.cli" not in used, path
        assert not commands_imported_by(path), path


def test_each_command_module_imports_and_registers_alone_in_a_fresh_interpreter() -> None:
    """Alone: no other command module, nor the entry point, is loaded along with it."""
    probe = (
        "import argparse, importlib, sys\n"
        "module = importlib.import_module('service.commands.' + sys.argv[1])\n"
        "parser = argparse.ArgumentParser(prog='classifier-gateway')\n"
        "module.register(parser.add_subparsers())\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('service.'))))\n"
    )
    runs = {name: subprocess.Popen([sys.executable, "-c", probe, name], cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name in GROUPS}
    for name, run in runs.items():
        out, err = run.communicate(timeout=60)
        assert run.returncode == 0, f"service.commands.{name} alone: {err}"
        loaded = set(out.split())
        others = {f"service.commands.{other}" for other in GROUPS if other != name}
        assert not loaded & (others | {"service.cli"}), (name, sorted(loaded & others))
