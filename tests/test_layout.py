"""The folder tree is the architecture: every import inside the package points down the layers below.

Function-level (lazy) imports count too: an upward arrow is one whether it runs at import time or later.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "osediff"

# Lower layers never import higher ones; a part may import its own modules and anything strictly below.
# The root `__init__` is the facade: anyone may read `__version__` from it, and its lazy exports
# (`OSEDiffPipeline`, `OSEDiffModel`) reach down into `core`, so it is checked by neither rule.
LAYERS = {
    "osediff": 9,
    "files": 0, "weights": 0, "config": 0, "tiling": 0, "degradation": 0,
    "dape": 1,
    "core": 2,
    "evaluation": 3,
    "train": 4, "testing": 4,
    "ui": 5,
    "commands": 6, "cli": 7, "__main__": 8,
}


def part_of(module: str) -> str:
    """'osediff.core.model' -> 'core'; 'osediff' -> 'osediff'."""
    names = module.split(".")
    return names[1] if len(names) > 1 else names[0]


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "osediff"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "osediff":
            if node.module == "osediff":  # `from osediff import core, __version__`
                found |= {f"osediff.{a.name}" if f"osediff.{a.name}".split(".")[1] in LAYERS else "osediff"
                          for a in node.names}
            else:
                found.add(node.module)
    return found


def own_part(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return "osediff" if rel.parts == ("__init__",) else rel.parts[0]


def test_every_part_has_a_layer():
    parts = {own_part(p) for p in PACKAGE.rglob("*.py")}
    assert parts <= set(LAYERS), f"new top-level part(s) without a layer: {sorted(parts - set(LAYERS))}"


def test_imports_point_down():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = own_part(path)
        if me == "osediff":
            continue
        for target in imports_of(path):
            other = part_of(target)
            if other != me and LAYERS[other] >= LAYERS[me] and other != "osediff":
                upward.append(f"{path.relative_to(PACKAGE)} ({me}) imports {target} ({other})")
    assert not upward, "\n".join(upward)


def test_the_check_can_fail(tmp_path):
    """The walker sees a function-level import, so a lazy upward arrow would be caught."""
    src = tmp_path / "x.py"
    src.write_text("def f():\n    from osediff.core.pipeline import OSEDiffPipeline\n")
    assert imports_of(src) == {"osediff.core.pipeline"}


def test_package_inits_are_docstrings_and_imports_only():
    """Sub-package `__init__`s say what the concept is (a docstring) and hold no logic."""
    for init in PACKAGE.glob("*/__init__.py"):
        tree = ast.parse(init.read_text())
        assert ast.get_docstring(tree), f"{init.relative_to(PACKAGE)} has no docstring"
        body = tree.body[1:]
        allowed = (ast.Import, ast.ImportFrom, ast.Assign)  # re-exports and __all__
        assert all(isinstance(n, allowed) for n in body), f"logic in {init.relative_to(PACKAGE)}"


def test_root_stays_small():
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(modules) <= 10, modules
