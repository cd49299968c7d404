"""gres: Generalized Referring Expression Segmentation (GRES, CVPR 2023) in pure PyTorch.

Modules (one per idea of the paper):
  config      frozen config dataclasses and named presets
  data        gRefCOCO / RefCOCO index, the sample Dataset, the synthetic GRES dataset, statistics
  model       language-fused Swin, text encoder, pixel decoder, ReLA decoder (RIA + RLA + heads)
  losses      the weighted two-class cross-entropies of the official criterion
  metrics     the official GRES evaluator (gIoU, cIoU, Pr@X, N-acc, T-acc), streaming
  convert     official checkpoint and timm Swin weights -> ours
  engine      training / evaluation loops; predict: single-image Predictor; cli: `gres ...`
  viz, paper, widgets, book   figures, the paper's tables, the classroom demo, the book builder

Submodules are imported lazily so that `import gres` stays cheap.
"""

from __future__ import annotations

__version__ = "0.1.0"
