"""The docs tell the truth: the README's line counts are the package's, its Python examples run, and no file
points to a document outside the repository."""
import re
from pathlib import Path

import pytest
import torch

import minledits
import minledits.nets.layers
from tests.helpers import MODULES, SIZE, SKIP, N, graph, photo

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
NETWORKS = ("layers", "unet", "vae", "clip", "tokenizer")


def lines(modules) -> int:
    """Non-blank lines of the given package modules."""
    return sum(1 for m in modules for line in (ROOT / "minledits" / f"{m}.py").read_text().splitlines() if line.strip())


def test_readme_line_counts_are_true():
    every = [p.stem for p in (ROOT / "minledits").glob("*.py")]
    said = re.search(r"networks \(([^)]*)\) are about ([\d,]+) lines .* whole package about ([\d,]+)", README, re.S)
    assert said, "the README states the line counts"
    assert said.group(1) == ", ".join(NETWORKS)
    for claim, actual in [(said.group(2), lines(NETWORKS)), (said.group(3), lines(every))]:
        assert abs(int(claim.replace(",", "")) - actual) <= 0.05 * actual, (claim, actual)  # "about": within 5%


def test_nothing_points_outside_the_repository():
    for path in [*ROOT.glob("minledits/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("*.md"), *ROOT.glob("docs/*.md")]:
        assert "DES" + "IGN" not in path.read_text(encoding="utf-8"), path  # (spelt so that this file passes)


def ablation_blocks() -> list[str]:
    section = README.split("### Ablations", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_ablation_examples_run(tiny_sd1, monkeypatch):
    monkeypatch.setattr(minledits.nets.layers, "attention", minledits.nets.layers.attention)  # put back in any case
    sd = minledits.load(tiny_sd1.folder)
    inv = minledits.invert(sd, photo(), steps=N, skip=SKIP, size=SIZE)
    blocks = ablation_blocks()
    assert len(blocks) == 3
    scope = {"sd": sd, "inv": inv, "minledits": minledits}
    for code in blocks:
        exec(compile(code, "README.md", "exec"), scope)
    plain = minledits.edit(sd, inv, concepts=["glasses"])
    for name in ("no_mask", "fresh_noise", "top_k", "fp64", "w0"):  # each example's edit ran, and changed something
        assert scope[name].shape == plain.shape and scope[name].isfinite().all(), name
    for name in ("no_mask", "fresh_noise", "top_k"):
        assert not torch.allclose(scope[name], plain, atol=1e-4), name
    torch.testing.assert_close(scope["fp64"], plain, atol=1e-4, rtol=1e-4)  # the same attention, more precise
    assert minledits.nets.layers.attention is scope["original"] and scope["maps"] == {}  # no 16x16 layer at 64 px


@pytest.mark.parametrize("path", ["README.md", "docs/design.md", "weights/README.md"])
def test_docs_name_only_modules_that_exist(path):
    text = (ROOT / path).read_text(encoding="utf-8")
    for module in set(re.findall(r"minledits/(\w+)\.py", text)) | set(re.findall(r"`(\w+)\.py`", text)):
        assert (ROOT / "minledits" / f"{module}.py").exists() or (ROOT / "tests" / f"{module}.py").exists(), module


def test_the_design_docs_module_table_is_the_import_graph():
    rows = re.findall(r"^\|[^|]*\| `(\w+)\.py`(?:, `(\w+)\.py`)?(?:, `(\w+)\.py`)? \|[^|]*\| ([^|]*) \|$",
                      (ROOT / "docs" / "design.md").read_text(encoding="utf-8"), re.M)
    g, seen = graph(), set()
    for *modules, imports in rows:
        for m in filter(None, modules):
            said = {"-": set(), "everything below": set(MODULES) - {"cli"}}.get(
                imports.strip(), set(imports.replace(" ", "").split(",")))
            assert said >= g[m] if m == "cli" else said == g[m], (m, sorted(said), sorted(g[m]))
            seen.add(m)
    assert seen == set(MODULES)


def test_the_leditspp_example_runs(tiny_sd1, tmp_path, monkeypatch):
    code, = re.findall(r"```python\n(.*?)```", README.split("### LEDITS++\n", 1)[1].split("\n### ", 1)[0], re.S)
    monkeypatch.chdir(tmp_path)
    photo(size=(64, 64)).save("portrait.jpg")
    scope = {"sd": minledits.load(tiny_sd1.folder), "minledits": minledits}
    exec(compile(code.replace('steps=57, skip=7', 'steps=57, skip=7, size=64'), "README.md", "exec"), scope)
    assert scope["inv"].settings.sampler == "dpmsolver++" and len(scope["inv"].zs) == 50
    assert scope["w0"].shape == scope["inv"].w0.shape and scope["w0"].isfinite().all()
