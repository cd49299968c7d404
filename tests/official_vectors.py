"""Where the official ReLA test vectors live, for the tests that compare against them.

``$GRES_OFFICIAL_VECTORS`` or, by default, ``<repo>/../shared/reference/rela_official_tiny/public``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parents[1]
DEFAULT_VECTORS = _REPO.parent / "shared/reference/rela_official_tiny/public"
VECTORS = Path(os.environ.get("GRES_OFFICIAL_VECTORS", str(DEFAULT_VECTORS)))

needs_vectors = pytest.mark.skipif(
    not (VECTORS / "state_dict.safetensors").is_file(),
    reason=f"official test vectors not found at {VECTORS} (set GRES_OFFICIAL_VECTORS)",
)
