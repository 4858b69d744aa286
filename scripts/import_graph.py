"""List the qoq-internal imports of every module and flag the ones that go against ARCHITECTURE.md's layers.

    python scripts/import_graph.py [--all]

Prints, per module, the qoq modules it imports (module level and inside functions alike), then the imports that
point upward in the layer order, the ones between different packages of one middle layer, and the import
cycles between packages. `--all` prints every module's imports,
not only the offending ones. Reads the source with `ast`; imports nothing from qoq.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "qoq"

# Layer of each top-level part of the package, lowest first (ARCHITECTURE.md, "Layers and imports").
LAYERS = {
    "errors": 0, "progress": 0, "signals": 0, "checks": 0, "hub": 0, "output": 0, "state": 0,
    "algorithm.progressive": 1,
    "formats": 2, "runtime_kernels": 2, "models": 2,
    "calibration": 3, "algorithm": 3, "runtime": 3,
    "pipeline": 4, "recipe": 4, "bench": 4, "verify": 4,
    "cli": 5, "__init__": 5,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


def qoq_imports(path: Path, name: str) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "qoq")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] == "qoq":
                # `from qoq.runtime import ops` imports the submodule qoq.runtime.ops, not the package.
                subs = {f"{base}.{a.name}" for a in node.names if is_module(f"{base}.{a.name}")}
                found.update(subs or {base})
    found.discard(name)
    return found


def layer_of(name: str) -> tuple[str, int]:
    rest = name.removeprefix("qoq").lstrip(".") or "__init__"
    for key in sorted(LAYERS, key=len, reverse=True):
        if rest == key or rest.startswith(key + "."):
            return key, LAYERS[key]
    return rest, -1


def package_of(name: str) -> str:
    return layer_of(name)[0]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Package-level cycles of length 2 or 3 (enough to name each tangle)."""
    found = []
    nodes = sorted(edges)
    for a in nodes:
        for b in sorted(edges[a]):
            if a < b and a in edges.get(b, ()):
                found.append([a, b])
            for c in sorted(edges.get(b, ())):
                if a < b and a < c and b != c and a in edges.get(c, ()) and [a, c] not in found:
                    found.append([a, b, c])
    return found


def main() -> None:
    show_all = "--all" in sys.argv
    graph = {}
    for path in sorted(ROOT.rglob("*.py")):
        name = module_name(path)
        graph[name] = qoq_imports(path, name)
    upward, sideways, package_edges = [], [], {}
    for name, targets in graph.items():
        src_pkg, src_layer = layer_of(name)
        if show_all:
            print(f"{name}: {', '.join(sorted(targets)) or '-'}")
        for target in sorted(targets):
            dst_pkg, dst_layer = layer_of(target)
            if dst_pkg != src_pkg:
                package_edges.setdefault(src_pkg, set()).add(dst_pkg)
            if dst_layer > src_layer:
                upward.append(f"{name} (layer {src_layer}) -> {target} (layer {dst_layer})")
            elif dst_layer == src_layer and dst_pkg != src_pkg and src_layer in (2, 3):
                sideways.append(f"{name} -> {target} (both layer {src_layer})")
    print("upward imports:" if upward else "upward imports: none")
    for line in upward:
        print("  " + line)
    print("sideways imports between packages of one layer:" if sideways else "sideways imports: none")
    for line in sideways:
        print("  " + line)
    tangles = cycles(package_edges)
    print("package cycles:" if tangles else "package cycles: none")
    for cycle in tangles:
        print("  " + " -> ".join(cycle + cycle[:1]))


if __name__ == "__main__":
    main()
