"""The shape of the house, enforced: which parts may import which (lazy imports included).

- Core, Sources and Exports never import the Hub or the CLI.
- The plugin API imports only the core.
- The Hub never imports an adapter or the CLI.
- An adapter imports nothing of ``kiki_billing`` but the plugin API (the file targets also use
  Exports to render their files); never the ledger or the retry modules.
- Nothing imports the CLI but the CLI.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {
    "kiki_billing": REPO / "kiki_billing",
    "kiki_billing_adapters": REPO / "adapters" / "kiki_billing_adapters",
}
CLI = (
    "kiki_billing.__main__",
    "kiki_billing.cli",
    "kiki_billing.cli_celery",
    "kiki_billing.cli_compute",
    "kiki_billing.cli_connect",
    "kiki_billing.cli_delivery",
    "kiki_billing.cli_metrics",
    "kiki_billing.cli_webhooks",
    "kiki_billing.cli_reconcile",
    "kiki_billing.cli_support",
    "kiki_billing.audit_cli",
)


def modules() -> dict[str, Path]:
    found = {}
    for package, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def imports_of(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports, at the top or inside a function, resolved."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def under(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def part_of(module: str) -> str:
    if under(module, *CLI):
        return "cli"
    if under(module, "kiki_billing_adapters"):
        return "adapter"
    if under(module, "kiki_billing.hub"):
        return "hub"
    if under(module, "kiki_billing.plugin"):
        return "plugin"
    if under(module, "kiki_billing.sources"):
        return "sources"
    if under(module, "kiki_billing.exports"):
        return "exports"
    if under(module, "kiki_billing.testing"):
        return "testing"
    return "core"


def violations() -> list[str]:
    found = []
    for name, path in sorted(modules().items()):
        part = part_of(name)
        for target in sorted(imports_of(name, path)):
            if not under(target, "kiki_billing", "kiki_billing_adapters"):
                continue
            wanted = part_of(target)
            problem = None
            if wanted == "cli" and part != "cli":
                problem = "only the CLI imports the CLI"
            elif part in ("core", "sources", "exports") and wanted in ("hub", "adapter", "testing"):
                problem = f"{part} never imports the {wanted}"
            elif part == "plugin" and wanted not in ("core", "plugin"):
                problem = "the plugin API imports only the core"
            elif part == "hub" and wanted == "adapter":
                problem = "the hub never imports an adapter"
            elif part == "adapter" and under(target, "kiki_billing"):
                allowed = under(target, "kiki_billing.plugin") or (
                    name.endswith(".files") and under(target, "kiki_billing.exports")
                )
                if not allowed:
                    problem = "an adapter imports only kiki_billing.plugin"
            if problem:
                found.append(f"{name} imports {target}: {problem}")
    return found


def test_every_part_imports_only_what_it_may() -> None:
    assert violations() == []


@pytest.mark.parametrize(
    ("name", "source", "rule"),
    [
        (
            "kiki_billing.models",
            "from kiki_billing.hub.ledger import Ledger",
            "core never imports the hub",
        ),
        (
            "kiki_billing.sources.x",
            "def f():\n    import kiki_billing.hub.runner",
            "sources never imports the hub",
        ),
        (
            "kiki_billing.exports.x",
            "from kiki_billing.hub import dispatcher",
            "exports never imports the hub",
        ),
        (
            "kiki_billing.hub.x",
            "import kiki_billing_adapters.stripe",
            "the hub never imports an adapter",
        ),
        (
            "kiki_billing_adapters.x.a",
            "from kiki_billing.hub.ledger import Ledger",
            "an adapter imports only",
        ),
        (
            "kiki_billing_adapters.x.a",
            "from kiki_billing.hub.retry import run_with_retry",
            "an adapter imports only",
        ),
        (
            "kiki_billing_adapters.x.a",
            "from kiki_billing.models import Invoice",
            "an adapter imports only",
        ),
        ("kiki_billing.hub.x", "from kiki_billing.cli import app", "only the CLI imports the CLI"),
        (
            "kiki_billing.plugin",
            "from kiki_billing.hub.keys import idempotency_key",
            "the plugin API imports only",
        ),
    ],
)
def test_the_rules_catch_a_forbidden_import(
    name: str, source: str, rule: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "module.py"
    path.write_text(source)
    monkeypatch.setattr(f"{__name__}.modules", lambda: {name: path})
    found = violations()
    assert found and all(rule in problem for problem in found), found
