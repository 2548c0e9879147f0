"""The package's import graph reads top-down: every module imports its package neighbours at the top (no
function-level imports hiding a cycle), the graph has no cycle, and each module imports on its own."""
import ast
import subprocess
import sys

from tests.helpers import FILES, MODULES, PACKAGE, graph, package_imports


def test_package_imports_are_at_module_level():
    for m in MODULES:
        tree = ast.parse(FILES[m].read_text())
        top = {id(node) for node in tree.body}
        hidden = [f"{FILES[m]}:{node.lineno} imports {name}" for name, node in package_imports(tree, m)
                  if id(node) not in top]
        assert not hidden, hidden


def cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of g (depth-first search), or None."""
    state = {}

    def visit(m, path):
        if state.get(m) == "open":
            return path[path.index(m):] + [m]
        if state.get(m) is None:
            state[m] = "open"
            for n in sorted(g.get(m, ())):
                if found := visit(n, path + [m]):
                    return found
            state[m] = "done"
        return None

    return next(filter(None, (visit(m, []) for m in sorted(g))), None)


def test_import_graph_has_no_cycle():
    looped = {"load": {"convert"}, "convert": {"errors", "load"}, "errors": set()}
    assert cycle(looped) == ["convert", "load", "convert"]
    g = graph()
    assert cycle(g) is None, " -> ".join(cycle(g))
    # the bottom and the top of the graph (above cli only `python -m minledits`)
    assert g["errors"] == set() and "cli" not in set().union(*(v for m, v in g.items() if m != "__main__"))
    assert g["__main__"] == {"cli"}


def test_every_module_imports_on_its_own():
    """Each module imported first, in a fresh set of minledits modules (torch stays loaded: fast)."""
    code = ("import importlib, sys, torch\n"
            f"for m in {MODULES!r}:\n"
            "    for name in [n for n in sys.modules if n == 'minledits' or n.startswith('minledits.')]:\n"
            "        del sys.modules[name]\n"
            "    importlib.import_module('minledits.' + m)\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent)


def test_the_method_modules_are_attributes_of_the_package():
    """import minledits; minledits.leditspp.edit(...) works, as do minledits.ledits, p2p and parity."""
    code = ("import minledits as m\n"
            "print(all(callable(x.edit) for x in (m.ledits, m.leditspp, m.p2p)), callable(m.parity.embed))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=PACKAGE.parent)
    assert out.stdout.split() == ["True", "True"]
