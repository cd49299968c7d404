"""The book's chapters execute with their smoke parameters, and the HTML builds from them.

Each chapter of ``_toc.yml`` is converted with jupytext and executed with papermill exactly as
``python -m gres.book --mode smoke`` does (``gres.book.execute_chapter``), into a temporary build
folder; then ``gres.book.build_html`` builds the site from those notebooks and the key pages are
checked. Marked ``notebook`` (deselect with ``-m "not notebook"``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from gres import book

pytestmark = pytest.mark.notebook

CHAPTERS = book.chapters()
SMOKE = book.load_params("smoke")


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory) -> Path:
    book.ensure_synthetic("smoke")  # as `python -m gres.book --mode smoke` does first
    return tmp_path_factory.mktemp("book-build")


def _execute(name: str, build: Path) -> Path:
    return book.execute_chapter(name, SMOKE.get(Path(name).name) or {}, build=build)


def _outputs(nb_path: Path) -> list[dict]:
    nb = json.loads(nb_path.read_text())
    return [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]


def test_toc_and_params_are_consistent():
    assert CHAPTERS[0] == "book/00_intro"
    assert len(set(CHAPTERS)) == len(CHAPTERS)
    for name in CHAPTERS:
        assert (book.ROOT / f"{name}.md").exists(), name
        assert book.chapter_title(name)
    for mode in ("smoke", "full"):
        unknown = set(book.load_params(mode)) - {Path(n).name for n in CHAPTERS} - {"_train"}
        assert not unknown, f"book/params/{mode}.yaml: sections without a chapter: {unknown}"


def _chapter_preset(name: str) -> str:
    """The default of a chapter's ``preset`` parameter (or its override in the full params)."""
    override = (book.load_params("full").get(Path(name).name) or {}).get("preset")
    if override:
        return override
    m = re.search(r'^preset = "([^"]+)"', (book.ROOT / f"{name}.md").read_text(), re.M)
    return m.group(1) if m else ""


def test_full_build_trains_what_the_chapters_train():
    """The ``_train`` pre-step must build the chapters' exact configs, or the chapters would
    retrain them one at a time (cache key = config hash)."""
    from gres import experiments as ex
    from gres.config import config_hash

    spec = book.load_params("full")["_train"]
    for name in CHAPTERS:
        p = _chapter_preset(name)
        if Path(name).name[:2] in ("06", "07", "08"):
            assert p == spec["ablation"], name
        elif Path(name).name[:2] in ("04", "05", "09", "10", "11", "12", "13"):
            assert p == spec["main"], name
    plan = book.training_plan(spec)
    main, abl = ex.preset(spec["main"]), ex.preset(spec["ablation"])
    expected = {config_hash(ex.with_seed(s.cfg, 0))
                for t in ex.TABLES for s in ex.table_specs(
                    t, abl if t in ("table2", "table3", "table4") else main)}
    assert {config_hash(c) for c in plan} == expected
    assert len(plan) == len(expected) == 14  # 10 ablation rows (shared ReLA once) + 4 main ones
    assert config_hash(main) in expected  # chapters 4, 5, 12, 13 load the main model
    with pytest.raises(ValueError, match="unknown keys"):
        book.training_plan({**spec, "preset": "cpu-small"})


@pytest.mark.parametrize("name", CHAPTERS)
def test_chapter_source_follows_conventions(name):
    text = (book.ROOT / f"{name}.md").read_text()
    assert "format_name: myst" in text and "name: python3" in text  # jupytext header
    assert re.search(r"```\{code-cell\} ipython3\n:tags: \[parameters\]", text), \
        "first code cell must be tagged `parameters`"
    assert "start_run(" in text, "every chapter records its parameters and environment"
    assert "sys.path" not in text and "pip install" not in text
    in_code = False
    for i, line in enumerate(text.splitlines(), 1):  # prose only: MyST drops "%" lines
        if line.startswith("```"):
            in_code = not in_code
        assert in_code or not line.startswith("%"), \
            f"line {i} starts with '%': MyST reads it as a comment and drops it from the page"


@pytest.mark.parametrize("name", CHAPTERS)
def test_chapter_executes_with_smoke_parameters(name, build_dir):
    out = _execute(name, build_dir)
    outputs = _outputs(out)
    errors = [o for o in outputs if o.get("output_type") == "error"]
    assert not errors, errors[0].get("ename") if errors else ""
    nb = json.loads(out.read_text())
    tags = [t for c in nb["cells"] for t in c.get("metadata", {}).get("tags", [])]
    assert "injected-parameters" in tags or not SMOKE.get(Path(name).name)


def test_build_html_renders_glue_and_figures(build_dir):
    exe = build_dir / "executed"
    for name in CHAPTERS:  # chapters deselected above (-k) are executed here
        if not (exe / f"{name}.ipynb").exists():
            _execute(name, build_dir)
    html = book.build_html(build=build_dir, strict=True)
    assert (html / "index.html").exists()
    pages = {name: html / f"{name}.html" for name in CHAPTERS}
    for name, page in pages.items():
        assert page.exists(), f"no page for {name}"
        text = page.read_text()
        assert "Traceback" not in text, f"an error output is shown in {name}"
        assert not re.search(r"\{glue:?\w*\}", text), f"unrendered glue role in {name}"
    intro = pages["book/00_intro"].read_text()
    # glued paper numbers: Table 5 ReLA val gIoU and the §3.2 expression count
    assert "63.60" in intro and "278,232" in intro
    assert "gres_overview.png" in intro
    if "book/03_metrics" in pages:
        metrics = pages["book/03_metrics"].read_text()
        assert "<img" in metrics and "empty-on-nt" in metrics
