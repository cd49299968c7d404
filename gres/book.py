"""Build the book: jupytext -> papermill (with per-chapter parameters) -> Jupyter Book v1 HTML.

    python -m gres.book [--mode full|smoke] [--only 05_training] [--no-html]

Steps (papermill only executes .ipynb):
1. the synthetic dataset is generated if missing (``data_prep/make_synthetic.py``);
2. every chapter of ``_toc.yml`` is converted from ``book/<name>.md`` (jupytext MyST) to
   ``_build/src/<name>.ipynb`` with the kernel set, then executed by papermill into
   ``_build/executed/book/<name>.ipynb`` with the parameters of ``book/params/<mode>.yaml``;
3. ``_config.yml`` and ``_toc.yml`` are copied beside the executed notebooks and Jupyter Book
   builds HTML there with execution off, then the site is moved to ``_build/html``.
A chapter that fails keeps its partially executed notebook as the report and fails the build.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "book"
BUILD = ROOT / "_build"


def chapters() -> list[str]:
    """Chapter names (``book/<name>``) in table-of-contents order."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    names = [toc["root"]]
    for part in toc.get("parts", []):
        names += [c["file"] for c in part.get("chapters", [])]
    names += [c["file"] for c in toc.get("chapters", [])]
    return names


def load_params(mode: str) -> dict[str, dict]:
    path = BOOK / "params" / f"{mode}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"no parameter file for mode {mode!r}: {path}")
    return yaml.safe_load(path.read_text()) or {}


def execute_chapter(name: str, params: dict, kernel: str = "python3") -> Path:
    """Convert one chapter with jupytext and execute it with papermill; return the executed path."""
    import jupytext
    import papermill

    src_md = ROOT / f"{name}.md"
    if not src_md.exists():
        raise FileNotFoundError(f"chapter listed in _toc.yml is missing: {src_md}")
    src_nb = BUILD / "src" / f"{name}.ipynb"
    out_nb = BUILD / "executed" / f"{name}.ipynb"
    src_nb.parent.mkdir(parents=True, exist_ok=True)
    out_nb.parent.mkdir(parents=True, exist_ok=True)
    nb = jupytext.read(src_md)
    nb.metadata["kernelspec"] = {"name": kernel, "display_name": "Python 3", "language": "python"}
    jupytext.write(nb, src_nb, fmt="ipynb")
    papermill.execute_notebook(
        str(src_nb), str(out_nb), parameters=params, cwd=str(src_md.parent), kernel_name=kernel,
        progress_bar=False,
    )
    return out_nb


def ensure_synthetic(mode: str) -> None:
    script = ROOT / "data_prep" / "make_synthetic.py"
    if script.exists():
        subprocess.run([sys.executable, str(script), "--preset", "tiny" if mode == "smoke" else "default"],
                       check=True, cwd=ROOT)


def build_html() -> Path:
    exe = BUILD / "executed"
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy2(ROOT / name, exe / name)
    for extra in BOOK.glob("*.png"):  # static pictures referenced by chapters
        shutil.copy2(extra, exe / "book" / extra.name)
    subprocess.run([sys.executable, "-m", "jupyter_book", "build", str(exe), "--path-output", str(BUILD / "jb")],
                   check=True, cwd=ROOT)
    html = BUILD / "html"
    if html.exists():
        shutil.rmtree(html)
    shutil.copytree(BUILD / "jb" / "_build" / "html", html)
    return html


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", default="full", choices=["full", "smoke"])
    ap.add_argument("--only", nargs="*", help="execute only these chapters (names as in _toc.yml)")
    ap.add_argument("--no-html", action="store_true", help="execute only, do not build HTML")
    args = ap.parse_args(argv)

    ensure_synthetic(args.mode)
    params = load_params(args.mode)
    names = chapters()
    for name in names:
        if args.only and name not in args.only and Path(name).name not in args.only:
            continue
        t0 = time.time()
        print(f"[book] executing {name} ({args.mode})", flush=True)
        execute_chapter(name, params.get(Path(name).name, {}))
        print(f"[book] {name} done in {time.time() - t0:.1f} s", flush=True)
    if not args.no_html:
        html = build_html()
        print(f"[book] HTML: {html / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
