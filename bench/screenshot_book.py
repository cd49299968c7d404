#!/usr/bin/env python
"""Headless-Chromium screenshots of built book pages (a visual check of the HTML build).

    python bench/screenshot_book.py [--html _build/html] [--out _build/screenshots]
                                    [--pages 00_intro 03_metrics] [--window-size 1280,1600]

Needs a Chromium binary (``chromium``, ``chromium-browser`` or ``google-chrome`` on PATH, or
``--chromium PATH``; on Debian: ``apt-get install chromium``). Each page is opened from disk
(``file://``) in a fresh throw-away profile with networking features off, and saved as
``<out>/<page>.png``. The script then reports, per page, the image size and how many distinct
colours it holds: a blank or failed render has only a handful. Exit status 1 if any page is
missing or looks blank.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)
MIN_COLOURS = 16  # fewer distinct colours than this = blank page


def find_chromium(explicit: str | None = None) -> str:
    """Path of a Chromium binary, or raise FileNotFoundError saying how to get one."""
    if explicit:
        if not Path(explicit).exists() and shutil.which(explicit) is None:
            raise FileNotFoundError(f"--chromium {explicit!r} does not exist")
        return explicit
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    raise FileNotFoundError(
        f"no Chromium found (tried {', '.join(CANDIDATES)}); install it, e.g. "
        "`apt-get install chromium`, or pass --chromium PATH"
    )


def default_pages(html: Path) -> list[str]:
    """Every chapter page of the built book (``<html>/book/*.html``), sorted."""
    return sorted(p.stem for p in (html / "book").glob("*.html"))


def screenshot(chromium: str, page: Path, out: Path, window: str, timeout: float) -> float:
    """Render ``page`` to ``out`` (PNG); returns the seconds it took."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gres-chromium-") as profile:
        cmd = [chromium, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={out}",
               f"--window-size={window}", "--virtual-time-budget=4000", page.resolve().as_uri()]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, timeout=timeout, capture_output=True)
        return time.perf_counter() - t0


def distinct_colours(png: Path) -> tuple[tuple[int, int], int]:
    """(width, height) and the number of distinct RGB colours of a PNG."""
    from PIL import Image

    with Image.open(png) as im:
        rgb = im.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 24) or []
        return rgb.size, len(colours)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--html", default=str(ROOT / "_build" / "html"), help="built site")
    ap.add_argument("--out", default=str(ROOT / "_build" / "screenshots"))
    ap.add_argument("--pages", nargs="*", help="chapter names (default: every page of book/)")
    ap.add_argument("--window-size", default="1280,1600")
    ap.add_argument("--chromium", default=None, help="Chromium binary")
    ap.add_argument("--timeout", type=float, default=90.0, help="seconds per page")
    args = ap.parse_args(argv)

    html, out = Path(args.html), Path(args.out)
    if not (html / "book").is_dir():
        print(f"no built book at {html}; run `python -m gres.book --mode smoke` first",
              file=sys.stderr)
        return 1
    chromium = find_chromium(args.chromium)
    pages = args.pages or default_pages(html)
    failed = []
    for name in pages:
        name = Path(name).stem
        page = html / "book" / f"{name}.html"
        if not page.exists():
            print(f"{name}: MISSING ({page})")
            failed.append(name)
            continue
        png = out / f"{name}.png"
        try:
            secs = screenshot(chromium, page, png, args.window_size, args.timeout)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            print(f"{name}: chromium failed: {exc}")
            failed.append(name)
            continue
        size, n_colours = distinct_colours(png)
        verdict = "ok" if n_colours >= MIN_COLOURS else "BLANK?"
        if verdict != "ok":
            failed.append(name)
        print(f"{name}: {png} {size[0]}x{size[1]}, {n_colours} colours, {secs:.1f} s [{verdict}]")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
