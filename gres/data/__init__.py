"""Data: the gRefCOCO / RefCOCO index, the sample Dataset, the synthetic GRES set, statistics.

* :mod:`gres.data.grefer` -- :class:`GRefer`, an index over ``grefs(unc).json`` (or classic
  ``refs(unc).p``) + ``instances.json`` with the official grefer semantics (spec §6.1, §6.4).
* :mod:`gres.data.dataset` -- :class:`GRESDataset` (one sample per expression, as ReLA's mapper
  builds it, spec §6.3), :func:`collate` / :class:`Batch`, :func:`build_tokenizer`,
  :func:`make_dataloader`, :func:`build_dataset`.
* :mod:`gres.data.synthetic` -- the embedded synthetic GRES dataset in gRefCOCO's file format
  (:func:`generate`, :class:`SyntheticConfig`, presets "default" and "tiny").
* :mod:`gres.data.stats` -- dataset tables (paper Table 1 / §3.2) and the text-only no-target
  check.

Names are imported lazily (``from gres.data import GRESDataset`` works) so that importing the
package stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "GRefer": "grefer",
    "GRESDataset": "dataset",
    "Batch": "dataset",
    "collate": "dataset",
    "build_tokenizer": "dataset",
    "build_dataset": "dataset",
    "make_dataloader": "dataset",
    "SyntheticConfig": "synthetic",
    "generate": "synthetic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"gres.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'gres.data' has no attribute {name!r}")
