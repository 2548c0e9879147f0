"""The docs tell the truth: the README is a guide of at most 350 lines whose sizes, set-up commands and Python
examples hold; docs/design.md's module table is the import graph and its ablations run; the docs name files, tests,
sections and parity functions that exist; and no package docstring or comment holds a benchmark figure or a
machine name."""
import ast
import io
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest
import torch

import minledits
import minledits.nets.layers
from tests.helpers import FILES, MODULES, SIZE, SKIP, N, graph, photo

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
REPO_MAP = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
DOCS = ["README.md", "weights/README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
SETUP = ['python -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e ".[test]" '
         '&& pytest',
         "minledits edit examples/photo.jpg -o edited.png -e glasses --model random-tiny"]


def section(text: str, heading: str) -> str:
    """The body of the markdown section whose heading line ends with `heading`, up to the next heading of its level."""
    level, = re.findall(rf"^(#+) .*{re.escape(heading)}$", text, re.M)
    return re.split(rf"^{level} .*{re.escape(heading)}$", text, flags=re.M)[1].split(f"\n{level} ", 1)[0]


def non_blank_lines(modules) -> int:
    return sum(1 for m in modules for line in FILES[m].read_text().splitlines() if line.strip())


def imported_by(module: str) -> set[str]:
    """module and every package module it imports, transitively."""
    g, seen, todo = graph(), set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += g[m]
    return seen


def test_the_readme_is_a_guide_of_at_most_350_lines():
    assert len(README.splitlines()) <= 350
    for heading in ("Set up", "The commands", "The methods side by side", "Python", "How to read the code"):
        assert re.search(rf"^## {heading}$", README, re.M), heading
    assert len(re.findall(r"^\| command \|", section(README, "The methods side by side"), re.M)) == 1  # one table


def test_the_readme_sizes_are_true():
    said = re.search(r"learner's path, `ledits.py` and every package module it imports, is about ([\d,]+) non-blank "
                     r"lines; the whole package about ([\d,]+)", README.replace("\n", " "))
    assert said, "the README states the learner's path and the package's size"
    package = non_blank_lines(MODULES) + sum(1 for line in (ROOT / "minledits" / "__init__.py").read_text().splitlines()
                                             if line.strip())
    for claim, actual in [(said.group(1), non_blank_lines(imported_by("ledits"))), (said.group(2), package)]:
        assert abs(int(claim.replace(",", "")) - actual) <= 0.05 * actual, (claim, actual)  # "about": within 5%


def test_the_set_up_commands_and_the_suites_are_as_the_readme_says():
    """The README's two set-up lines as they must work on a fresh machine; `pytest` leaves the full-size tests out
    (pyproject's addopts) and CI runs them as its second step, as the README and docs/testing.md say."""
    assert all(line in README for line in SETUP)
    addopts, = re.findall(r'^addopts = "(.*)"$', (ROOT / "pyproject.toml").read_text(), re.M)
    assert "not slow" in addopts and "not heavy" in addopts
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert ci.index("pytest") < ci.index("pytest -m slow")
    assert "`pytest -m slow` runs those" in README.replace("\n", " ")


def marked(marker: str) -> set[str]:
    """"test_file.py::test_name" of every test function carrying @pytest.mark.<marker>."""
    out = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and f"pytest.mark.{marker}" in map(ast.unparse, node.decorator_list):
                out.add(f"{path.name}::{node.name}")
    return out


def test_testing_md_lists_exactly_the_slow_and_heavy_tests():
    rows = dict(re.findall(r"^\| `(slow|heavy)` \| ([^|]*) \|", (ROOT / "docs" / "testing.md").read_text(), re.M))
    for marker in ("slow", "heavy"):
        assert set(re.findall(r"`([\w.]+::\w+)`", rows[marker])) == marked(marker), marker


def test_nothing_points_outside_the_repository():
    for path in [*ROOT.glob("minledits/**/*.py"), *ROOT.glob("tests/*.py"), *[ROOT / d for d in DOCS]]:
        assert "DES" + "IGN" not in path.read_text(encoding="utf-8"), path  # (spelt so that this file passes)


def exists(name: str) -> bool:
    """A file the docs name: from the repository root, in minledits/ or in tests/."""
    return any((base / name).exists() for base in (ROOT, ROOT / "minledits", ROOT / "tests"))


@pytest.mark.parametrize("path", DOCS)
def test_docs_name_only_files_and_tests_that_exist(path):
    text = (ROOT / path).read_text(encoding="utf-8")
    for name in set(re.findall(r"`([\w/.]+\.py)(?:::\w+)?`", text)) | set(re.findall(r"minledits/([\w/]+\.py)", text)):
        assert exists(name), name
    for file, test in re.findall(r"`(?:tests/)?(test_\w+\.py)::(\w+)`", text):
        assert re.search(rf"^def {test}\(", (ROOT / "tests" / file).read_text(), re.M), (file, test)
    for test in re.findall(r"`(test_\w+)`", text):
        assert any(re.search(rf"^def {test}\(", p.read_text(), re.M) for p in (ROOT / "tests").glob("test_*.py")), test
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        assert target.startswith("http") or (ROOT / path).parent.joinpath(target).exists(), target


def test_design_md_sections_named_elsewhere_exist():
    headings = set(re.findall(r"^## (\d+)\. ", REPO_MAP, re.M))
    for path in [*ROOT.glob("minledits/**/*.py"), *ROOT.glob("tests/*.py"), *[ROOT / d for d in DOCS]]:
        for number in re.findall(r"design\.md\)? §(\d+)", path.read_text(encoding="utf-8")):
            assert number in headings, (path, number)


def module_of(path: str) -> str:
    """nets/layers.py -> "nets.layers"; cli/__init__.py -> "cli" (as tests/helpers.py's MODULES spells them)."""
    parts = path.split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_the_design_docs_module_table_is_the_import_graph():
    rows = re.findall(r"^\|[^|]*\| ((?:`[\w/]+\.py`(?:, )?)+) \|[^|]*\| ([^|]*) \|$", REPO_MAP, re.M)
    g, seen = graph(), set()
    for paths, imports in rows:
        said = set() if imports.strip() == "-" else set(imports.replace(" ", "").split(","))
        for m in map(module_of, re.findall(r"`([\w/]+)\.py`", paths)):
            assert said == g[m], (m, sorted(said), sorted(g[m]))
            seen.add(m)
    assert seen == set(MODULES)


def test_the_ablation_examples_run(tiny_sd1, monkeypatch):
    monkeypatch.setattr(minledits.nets.layers, "attention", minledits.nets.layers.attention)  # put back in any case
    sd = minledits.load(tiny_sd1.folder)
    inv = minledits.invert(sd, photo(), steps=N, skip=SKIP, size=SIZE)
    blocks = re.findall(r"```python\n(.*?)```", section(REPO_MAP, "Ablations"), re.S)
    assert len(blocks) == 3
    scope = {"sd": sd, "inv": inv, "minledits": minledits}
    for code in blocks:
        exec(compile(code, "docs/design.md", "exec"), scope)
    plain = minledits.edit(sd, inv, concepts=["glasses"])
    for name in ("no_mask", "fresh_noise", "top_k", "fp64", "w0"):  # each example's edit ran, and changed something
        assert scope[name].shape == plain.shape and scope[name].isfinite().all(), name
    for name in ("no_mask", "fresh_noise", "top_k"):
        assert not torch.allclose(scope[name], plain, atol=1e-4), name
    torch.testing.assert_close(scope["fp64"], plain, atol=1e-4, rtol=1e-4)  # the same attention, more precise
    assert minledits.nets.layers.attention is scope["original"] and scope["maps"] == {}  # no 16x16 layer at 64 px


def test_the_leditspp_example_runs(tiny_sd1, tmp_path, monkeypatch):
    code, = re.findall(r"```python\n(.*?)```", section(README, "LEDITS++"), re.S)
    monkeypatch.chdir(tmp_path)
    photo(size=(64, 64)).save("portrait.jpg")
    scope = {"sd": minledits.load(tiny_sd1.folder), "minledits": minledits}
    exec(compile(code.replace('steps=57, skip=7', 'steps=57, skip=7, size=64'), "README.md", "exec"), scope)
    assert scope["inv"].settings.sampler == "dpmsolver++" and len(scope["inv"].zs) == 50
    assert scope["w0"].shape == scope["inv"].w0.shape and scope["w0"].isfinite().all()


def test_the_parity_section_names_what_parity_py_holds():
    """docs/references.md's "Parity with the references" names every public function and class of minledits/parity.py,
    and nothing of it that does not exist; its bit-for-bit example uses the names as they are."""
    text = section((ROOT / "docs" / "references.md").read_text(encoding="utf-8"), "Parity with the references")
    public = {n.name for n in ast.parse(FILES["parity"].read_text()).body
              if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_")}
    first_cells = re.findall(r"^\| `[^|]*\|", text, re.M)
    named = {name for cell in first_cells for name in re.findall(r"`(\w+)[`(]", cell)}
    assert named == public
    assert "parity.pipeline_attention(sd)" in text and "batch_size=1" in text


BANNED = re.compile(r"H100|H200|EPYC|Xeon|GFLOP|[0-9]x faster|earlier|an hour")


def docstrings_and_comments(source: str) -> list[str]:
    tree = ast.parse(source)
    docs = [ast.get_docstring(n, clean=False) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    comments = [t.string for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT]
    return [d for d in docs if d] + comments


def test_no_package_docstring_or_comment_holds_a_benchmark_figure_or_a_machine_name():
    found = [(p.relative_to(ROOT), BANNED.search(text).group()) for p in sorted(ROOT.glob("minledits/**/*.py"))
             for text in docstrings_and_comments(p.read_text()) if BANNED.search(text)]
    assert not found


def test_the_banned_words_are_found_where_they_are():
    text = 'def f():\n    """2x faster on an H100."""\n    return "earlier"  # Xeon\n'
    assert [BANNED.search(t).group() for t in docstrings_and_comments(text)] == ["2x faster", "Xeon"]


def test_every_method_module_is_an_attribute_of_the_package():
    """`import minledits` alone makes minledits.<method>.edit work for every method module the docs name, and
    registers every sampler (a fresh interpreter: other tests have imported the modules already)."""
    code = ("import minledits; from minledits.sampler import SAMPLERS; "
            "assert all(callable(getattr(minledits, m).edit) for m in ('ledits', 'leditspp', 'p2p', 'flowedit', "
            "'rfinversion')); assert callable(minledits.rfinversion.invert); "
            "assert set(SAMPLERS) == {'ddpm', 'ddim', 'dpmsolver++', 'flow'}, SAMPLERS")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
