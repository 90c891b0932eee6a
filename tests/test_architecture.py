"""The structure docs/ARCHITECTURE.md describes is the structure of the code: spark/ never imports
decode/, decode/ imports run one way, and the map names every module."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# decode/ modules in import order: a module may import only modules listed before it
DECODE_ORDER = ["sampling", "verify", "goodput", "rollout", "generate", "spec_config", "speculative", "goodput_costs",
                "bild", "multidraft", "search_lib", "foresight", "baselines", "search"]


def imported_modules(path: pathlib.Path) -> set[str]:
    """Every module an `import` / `from … import` statement in the file names, at any depth
    (imports inside functions count too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def package_files(pkg: str):
    return sorted((ROOT / pkg).rglob("*.py"))


@pytest.mark.parametrize("path", package_files("spark"), ids=lambda p: str(p.relative_to(ROOT)))
def test_spark_never_imports_decode(path):
    bad = sorted(m for m in imported_modules(path) if m == "decode" or m.startswith("decode."))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_decode_imports_run_one_way():
    assert sorted(p.stem for p in package_files("decode") if p.stem != "__init__") == sorted(DECODE_ORDER)
    for i, name in enumerate(DECODE_ORDER):
        mods = imported_modules(ROOT / "decode" / f"{name}.py")
        later = [m for m in DECODE_ORDER[i:] if f"decode.{m}" in mods]
        assert not later, f"decode/{name}.py imports {later} (imports run {' -> '.join(DECODE_ORDER[::-1])})"


def test_architecture_names_every_module():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    missing = [str(p.relative_to(ROOT)) for pkg in ("spark", "decode") for p in package_files(pkg)
               if p.name != "__init__.py" or p.parent.name == "tasks"]
    missing = [m for m in missing if f"`{m}`" not in text]
    assert not missing, f"docs/ARCHITECTURE.md does not name {missing}"


def test_import_walk_sees_nested_imports(tmp_path):
    """The walk is not fooled by an import hidden inside a function (how the old circle hid)."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from decode import search\n    import decode.rollout\n")
    assert {"decode", "decode.search", "decode.rollout"} <= imported_modules(f)
