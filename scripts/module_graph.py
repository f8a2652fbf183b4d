"""Print the import graph of the ``drtune`` package as a Mermaid flowchart (or plain text).

    python scripts/module_graph.py                 # the working tree
    python scripts/module_graph.py --rev HEAD~12   # as it was at a git revision
    python scripts/module_graph.py --text          # one "module -> imports" line per module

Imports are read with ``ast``, so nothing is imported. Edges of imports made inside functions
(kept there so that TensorFlow stays out of light commands) are drawn dashed.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "drtune"
SKIP = {"__init__", "__main__", "errors"}  # everyone imports errors; it would only add noise


def sources(rev: str | None) -> dict[str, str]:
    """Module name -> source text of ``drtune/*.py``, from the working tree or a git revision."""
    if rev is None:
        return {p.stem: p.read_text() for p in sorted((REPO / PACKAGE).glob("*.py"))}
    names = subprocess.run(["git", "ls-tree", "--name-only", rev, f"{PACKAGE}/"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    return {Path(n).stem: subprocess.run(["git", "show", f"{rev}:{n}"], cwd=REPO, capture_output=True,
                                         text=True, check=True).stdout
            for n in sorted(names) if n.endswith(".py")}


def edges(modules: dict[str, str]) -> dict[tuple[str, str], bool]:
    """(importer, imported) -> whether every such import is at module level."""
    out: dict[tuple[str, str], bool] = {}
    for name, text in modules.items():
        tree = ast.parse(text)
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == PACKAGE:
                    targets = [a.name for a in node.names]
                elif node.module.startswith(PACKAGE + "."):
                    targets = [node.module.split(".")[1]]
            elif isinstance(node, ast.Import):
                targets = [a.name.split(".")[1] for a in node.names if a.name.startswith(PACKAGE + ".")]
            for target in targets:
                if target in modules and target != name and name not in SKIP and target not in SKIP:
                    out[(name, target)] = out.get((name, target), False) or id(node) in top
    return out


def mermaid(modules: dict[str, str], graph: dict[tuple[str, str], bool]) -> str:
    lines = ["flowchart LR"]
    for (a, b), top in sorted(graph.items()):
        lines.append(f"    {a} {'-->' if top else '-.->'} {b}")
    lonely = sorted(m for m in modules if m not in SKIP and not any(m in e for e in graph))
    lines += [f"    {m}" for m in lonely]
    return "\n".join(lines)


def text(modules: dict[str, str], graph: dict[tuple[str, str], bool]) -> str:
    rows = []
    for m in sorted(modules):
        if m in SKIP:
            continue
        deps = [f"{b}{'' if top else '*'}" for (a, b), top in sorted(graph.items()) if a == m]
        rows.append(f"{m:10} -> {' '.join(deps) or '-'}")
    return "\n".join(rows + ["(* imported inside a function)"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", help="a git revision instead of the working tree")
    parser.add_argument("--text", action="store_true", help="plain text instead of Mermaid")
    args = parser.parse_args()
    modules = sources(args.rev)
    graph = edges(modules)
    print(text(modules, graph) if args.text else mermaid(modules, graph))


if __name__ == "__main__":
    main()
