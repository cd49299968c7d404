"""Build the book: jupytext -> papermill (with per-chapter parameters) -> Jupyter Book v1 HTML.

    python -m gres.book [--mode full|smoke] [--only 05_training] [--no-html] [--strict]

Steps (papermill only executes .ipynb):
1. the synthetic dataset is generated if missing (``data_prep/make_synthetic.py``);
1b. when ``book/params/<mode>.yaml`` has a ``_train`` section, every configuration the chapters
   train (:func:`training_plan`) is trained first by :func:`gres.experiments.train_all`, all in
   parallel 1-thread processes packed longest-first; the chapters then load them from the cache
   (a chapter that trains alone leaves a core idle);
2. every chapter of ``_toc.yml`` is converted from ``book/<name>.md`` (jupytext MyST) to
   ``_build/src/<name>.ipynb`` with the kernel set, then executed by papermill into
   ``_build/executed/book/<name>.ipynb`` with the parameters of ``book/params/<mode>.yaml``;
3. ``_config.yml`` and ``_toc.yml`` are copied beside the executed notebooks and Jupyter Book
   builds HTML there with execution off, then the site is moved to ``_build/html``.
A chapter that fails keeps its partially executed notebook as the report and fails the build.
``--strict`` builds with Jupyter Book's ``-W -n --keep-going`` (warnings are errors, every broken
reference is reported), as CI does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "book"
BUILD = ROOT / "_build"


STATIC_SUFFIXES = (".png", ".svg", ".jpg", ".gif")  # pictures referenced by chapters
INLINE_MPL = "module://matplotlib_inline.backend_inline"


def toc() -> list[tuple[str | None, str]]:
    """``(part caption or None, chapter name)`` for every chapter, in reading order."""
    data = yaml.safe_load((ROOT / "_toc.yml").read_text())
    entries: list[tuple[str | None, str]] = [(None, data["root"])]
    for part in data.get("parts", []):
        entries += [(part.get("caption"), c["file"]) for c in part.get("chapters", [])]
    entries += [(None, c["file"]) for c in data.get("chapters", [])]
    return entries


def chapters() -> list[str]:
    """Chapter names (``book/<name>``) in table-of-contents order."""
    return [name for _, name in toc()]


def chapter_title(name: str) -> str:
    """The first ``# `` heading of a chapter's MyST source (its title in the book)."""
    src = ROOT / f"{name}.md"
    if not src.exists():
        raise FileNotFoundError(f"chapter listed in _toc.yml is missing: {src}")
    in_code = False
    for line in src.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and re.match(r"#\s", line):
            return line[1:].strip()
    raise ValueError(f"{src} has no '# ' title")


def training_plan(spec: dict) -> list:
    """Every (configuration, seed) the chapters train, from a ``_train`` parameter section.

    Args:
        spec: ``main`` and ``ablation`` preset names (the chapters' ``preset`` parameters: the
            ablation chapters 6-8 use ``ablation``, chapters 4, 5, 9-13 ``main``), ``seeds``,
            optional ``dataset``, ``data_root`` and ``device`` (as the chapters' parameters of
            those names; the chapters' ``device`` default is "auto").

    Returns:
        The distinct :class:`gres.config.ExperimentConfig` to train, one per seed, built exactly
        as the chapters build theirs (same config hash, so the chapters find them in the cache).
    """
    from gres import experiments as ex

    unknown = sorted(set(spec) - {"main", "ablation", "seeds", "workers", "cache_root",
                                  "dataset", "data_root", "device"})
    if unknown:
        raise ValueError(f"_train section: unknown keys {unknown}")

    def base(name: str):
        return ex.book_config(name, dataset=spec.get("dataset"), data_root=spec.get("data_root"),
                              device=spec.get("device", "auto"))

    specs = ex.book_specs(base(spec["main"]), base(spec["ablation"]))
    cfgs = ex.unique_configs([s for rows in specs.values() for s in rows])
    return [ex.with_seed(c, s) for c in cfgs for s in spec.get("seeds", [0])]


def train_experiments(spec: dict) -> float:
    """Train the :func:`training_plan` of ``spec`` (``workers`` processes, default 2) into the
    experiment cache (``cache_root``, default ``outputs/experiments``); return the wall seconds."""
    from gres import experiments as ex

    t0 = time.time()
    plan = training_plan(spec)
    workers = int(spec.get("workers", 2))
    print(f"[book] training {len(plan)} configuration(s) with {workers} worker(s) (cached ones "
          "are skipped)", flush=True)
    ex.train_all(plan, workers=workers, root=spec.get("cache_root"))
    return time.time() - t0


def load_params(mode: str) -> dict[str, dict]:
    path = BOOK / "params" / f"{mode}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"no parameter file for mode {mode!r}: {path}")
    return yaml.safe_load(path.read_text()) or {}


@contextlib.contextmanager
def _inline_figures():
    """Kernels inherit our environment; ``MPLBACKEND=Agg`` (set for tests and CI) would stop
    figures from being captured as cell outputs, so the kernel gets the inline backend."""
    old = os.environ.get("MPLBACKEND")
    os.environ["MPLBACKEND"] = INLINE_MPL
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MPLBACKEND", None)
        else:
            os.environ["MPLBACKEND"] = old


def execute_chapter(name: str, params: dict, kernel: str = "python3", build: Path = BUILD) -> Path:
    """Convert one chapter with jupytext and execute it with papermill; return the executed path.

    Args:
        name: chapter as in ``_toc.yml`` (``book/01_task``).
        params: papermill parameters (override the chapter's ``parameters`` cell).
        kernel: Jupyter kernel name.
        build: build folder; the notebook goes to ``<build>/executed/<name>.ipynb`` (also when
            execution fails: the partially executed notebook is the error report).
    """
    import jupytext
    import papermill

    src_md = ROOT / f"{name}.md"
    if not src_md.exists():
        raise FileNotFoundError(f"chapter listed in _toc.yml is missing: {src_md}")
    build = Path(build)
    src_nb = build / "src" / f"{name}.ipynb"
    out_nb = build / "executed" / f"{name}.ipynb"
    src_nb.parent.mkdir(parents=True, exist_ok=True)
    out_nb.parent.mkdir(parents=True, exist_ok=True)
    nb = jupytext.read(src_md)
    nb.metadata["kernelspec"] = {"name": kernel, "display_name": "Python 3", "language": "python"}
    jupytext.write(nb, src_nb, fmt="ipynb")
    with _inline_figures():
        papermill.execute_notebook(
            str(src_nb), str(out_nb), parameters=params, cwd=str(src_md.parent),
            kernel_name=kernel, progress_bar=False,
        )
    return out_nb


def ensure_synthetic(mode: str) -> None:
    script = ROOT / "data_prep" / "make_synthetic.py"
    if script.exists():
        preset = "tiny" if mode == "smoke" else "default"
        subprocess.run([sys.executable, str(script), "--preset", preset], check=True, cwd=ROOT)


def build_html(build: Path = BUILD, strict: bool = False) -> Path:
    """Build the HTML site from ``<build>/executed`` into ``<build>/html`` (execution off).

    Args:
        build: build folder holding the executed notebooks.
        strict: warnings are errors (``-W -n --keep-going``).

    Raises:
        FileNotFoundError: a chapter of ``_toc.yml`` has no executed notebook.
        subprocess.CalledProcessError: Jupyter Book failed (or warned, in strict mode).
    """
    build = Path(build)
    exe = build / "executed"
    missing = [n for n in chapters() if not (exe / f"{n}.ipynb").exists()]
    if missing:
        raise FileNotFoundError(f"no executed notebook for {missing} in {exe}; execute them first")
    for name in ("_config.yml", "_toc.yml", "references.bib"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, exe / name)
    for extra in BOOK.iterdir():  # static pictures referenced by chapters
        if extra.is_file() and extra.suffix.lower() in STATIC_SUFFIXES:
            shutil.copy2(extra, exe / "book" / extra.name)
    if (BOOK / "figures").is_dir():
        shutil.copytree(BOOK / "figures", exe / "book" / "figures", dirs_exist_ok=True)
    jb = build / "jb"
    if (jb / "_build").exists():  # no stale pages from chapters that were renamed or removed
        shutil.rmtree(jb / "_build")
    # jupyter-book 1.0.4 has no ``__main__``: call its click entry point with this interpreter
    cmd = [sys.executable, "-c", "from jupyter_book.cli.main import main; main()",
           "build", str(exe), "--path-output", str(jb)]
    if strict:
        cmd += ["-W", "-n", "--keep-going"]
    subprocess.run(cmd, check=True, cwd=ROOT)
    html = build / "html"
    if html.exists():
        shutil.rmtree(html)
    shutil.copytree(jb / "_build" / "html", html)
    return html


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", default="full", choices=["full", "smoke"])
    ap.add_argument("--only", nargs="*", help="execute only these chapters (names as in _toc.yml)")
    ap.add_argument("--no-html", action="store_true", help="execute only, do not build HTML")
    ap.add_argument("--strict", action="store_true",
                    help="Jupyter Book warnings are errors (-W -n --keep-going), as in CI")
    args = ap.parse_args(argv)

    ensure_synthetic(args.mode)
    params = load_params(args.mode)
    names = chapters()
    unknown = sorted(set(params) - {Path(n).name for n in names} - {"_train"})
    if unknown:  # a chapter's parameters may land before its _toc.yml entry: warn only
        print(f"[book] warning: book/params/{args.mode}.yaml has sections for chapters not in "
              f"_toc.yml: {unknown}", flush=True)
    timings: dict[str, float] = {}
    if params.get("_train") and not args.only:
        timings["_train"] = round(train_experiments(params["_train"]), 1)
        print(f"[book] trainings done in {timings['_train']:.1f} s", flush=True)
    for name in names:
        if args.only and name not in args.only and Path(name).name not in args.only:
            continue
        t0 = time.time()
        print(f"[book] executing {name} ({args.mode})", flush=True)
        try:
            execute_chapter(name, params.get(Path(name).name) or {})
        except Exception:
            print(f"[book] {name} FAILED; report: {BUILD / 'executed' / (name + '.ipynb')}",
                  flush=True)
            raise
        timings[name] = round(time.time() - t0, 1)
        print(f"[book] {name} done in {timings[name]:.1f} s", flush=True)
    if timings:
        (BUILD / "executed").mkdir(parents=True, exist_ok=True)
        (BUILD / "executed" / f"timings-{args.mode}.json").write_text(json.dumps(timings, indent=1))
        print(f"[book] trained and executed in {sum(timings.values()):.1f} s")
    if not args.no_html:
        html = build_html(strict=args.strict)
        print(f"[book] HTML: {html / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
