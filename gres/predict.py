"""Single-image demo: set an image once, segment many expressions (official ReLA#4 request).

    predictor = Predictor.from_checkpoint("runs/tiny")        # or Predictor(model, cfg.model)
    predictor.set_image("photo.jpg")                          # path, PIL image or numpy array
    p = predictor.predict("the two dogs on the left")
    p.mask           # (H, W) bool at the original resolution; empty when p.no_target
    p.no_target, p.nt_prob, p.minimap (R, R), p.region_masks (P, h, w)
    preds = predictor.predict(["the dog", "the cat"])       # a list, batched

Semantics (spec §4). The mask is the per-pixel argmax of the sigmoids of the two mask channels
(ties, e.g. two saturated channels, go to background), with the 2-channel logits bilinearly
resized straight to the original image size, exactly as :func:`gres.model.postprocess` does at
480x480. "No target" is the argmax of the sigmoids of the two NT logits. ``nt_prob`` is the
two-class softmax probability of "no target" (the NT head is trained with a softmax
cross-entropy), so apart from sigmoid saturation ties the official rule is ``nt_prob > 0.5``.
(``postprocess`` returns ``sigmoid(nt_logits)[:, 1]``, the official ``nt_label`` channel.)
Following the paper (not the official evaluator, which keeps the mask), the returned ``mask`` is
**empty** when the answer is no-target; ``raw_mask`` keeps the model's mask. ``nt_threshold`` /
``mask_threshold`` replace the argmax rules by probability thresholds.

Caching. The image is read, resized (square, PIL bilinear, like the official mapper) and moved to
the device once per :meth:`Predictor.set_image`; the tokenizer is built once and tokenised
expressions are memoised. The backbone is language-fused (a PWAM at the end of each Swin stage),
so almost everything depends on the expression and must rerun; the only expression-independent
computation is the patch embedding and the Swin blocks of stage 1 (before the first PWAM), which
are computed once per image and reused (``cache_stem=True``) when the model has that structure.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from gres.config import ModelConfig


@dataclass
class Prediction:
    """The answer for one expression on the current image."""

    expression: str
    mask: np.ndarray  # (H, W) bool at the original resolution; all False when no_target
    no_target: bool  # the model says the expression refers to nothing
    nt_prob: float  # softmax probability of "no target"
    raw_mask: np.ndarray  # (H, W) bool, the model's mask before emptying on no-target
    minimap: np.ndarray  # (R, R) float, softmax probability that each region holds a target
    region_masks: np.ndarray  # (P, h, w) float, sigmoid of the region-mask logits (h = S / 4)


# --------------------------------------------------------------------------------------------------
# Images and tokens
# --------------------------------------------------------------------------------------------------
def load_image(image: Any) -> np.ndarray:
    """Read an image given as a path, a PIL image, a numpy array or a torch tensor.

    Arrays may be ``(H, W, 3)``, ``(H, W, 4)`` (alpha dropped), ``(H, W)`` grey, or a ``(3, H, W)``
    tensor; floats in ``[0, 1]`` are scaled to 0..255.

    Returns:
        ``(H, W, 3)`` uint8 RGB.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file is not a readable image, or the array has an unusable shape.
    """
    from gres.data.dataset import load_rgb, to_rgb

    if isinstance(image, (str, os.PathLike)):
        return np.asarray(load_rgb(image))  # FileNotFoundError / ValueError naming the file
    if isinstance(image, Image.Image):
        return np.asarray(to_rgb(image))
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (3, 4):
            image = image.permute(1, 2, 0)
        image = image.numpy()
    if not isinstance(image, np.ndarray):
        raise ValueError(f"unsupported image type {type(image).__name__}: use a path, PIL or numpy")
    arr = image
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image array must be (H, W), (H, W, 3) or (H, W, 4); got {arr.shape}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    arr = arr[..., :3]
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"image is empty: shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        if not np.isfinite(arr).all():
            raise ValueError("image array contains NaN or infinite values")
        if arr.max(initial=0.0) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def resize_image(rgb: np.ndarray, size: int) -> torch.Tensor:
    """The training pipeline's square PIL-bilinear resize (official ``T.Resize((S, S))``).

    Returns:
        ``(3, S, S)`` uint8.
    """
    from gres.data.dataset import resize_square

    arr = resize_square(Image.fromarray(rgb), size)  # (S, S, 3)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


# --------------------------------------------------------------------------------------------------
# Stem cache: patch embedding + stage-1 Swin blocks do not depend on the expression
# --------------------------------------------------------------------------------------------------
class _ConstantStem(nn.Module):
    """Stands in for ``patch_embed``: returns the cached stage-1 block output for every row."""

    def __init__(self, tokens: torch.Tensor) -> None:
        super().__init__()
        self.tokens = tokens  # (1, H/4, W/4, C)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.tokens.expand(images.shape[0], *self.tokens.shape[1:])


def _find_fused_swin(model: nn.Module) -> nn.Module | None:
    """The language-fused Swin inside ``model`` if it has the expected structure, else None."""
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if (
            hasattr(module, "patch_embed")
            and isinstance(layers, nn.ModuleList)
            and len(layers) > 0
            and isinstance(getattr(layers[0], "blocks", None), nn.ModuleList)
            and getattr(layers[0], "fusion", None) is not None
        ):
            return module
    return None


@contextlib.contextmanager
def _cached_stem(swin: nn.Module, tokens: torch.Tensor) -> Iterator[None]:
    patch_embed, blocks = swin.patch_embed, swin.layers[0].blocks
    swin.patch_embed = _ConstantStem(tokens)
    swin.layers[0].blocks = nn.ModuleList()
    try:
        yield
    finally:
        swin.patch_embed = patch_embed
        swin.layers[0].blocks = blocks


# --------------------------------------------------------------------------------------------------
# Predictor
# --------------------------------------------------------------------------------------------------
class Predictor:
    """Segment referring expressions on one image at a time.

    Args:
        model: a :class:`gres.model.GRESModel` (put in eval mode here).
        cfg: its :class:`ModelConfig` (image size, text settings); default ``model.cfg``.
        device: where to run.
        nt_threshold: no-target iff ``nt_prob >= nt_threshold``; ``None`` = the official argmax.
        mask_threshold: a pixel is target iff ``P(target) >= mask_threshold`` (softmax of the two
            channels); ``None`` = the official argmax of the two sigmoids.
        tokenizer: a ``transformers`` tokenizer; default from ``cfg.text``.
        batch_size: expressions per forward pass.
        cache_stem: reuse the expression-independent patch embedding + stage-1 blocks.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: ModelConfig | None = None,
        *,
        device: str | torch.device = "cpu",
        nt_threshold: float | None = None,
        mask_threshold: float | None = None,
        tokenizer: Any = None,
        batch_size: int = 8,
        cache_stem: bool = True,
    ) -> None:
        cfg = cfg if cfg is not None else getattr(model, "cfg", None)
        if not isinstance(cfg, ModelConfig):
            raise ValueError("Predictor needs the model's ModelConfig (pass cfg=...)")
        for name, thr in (("nt_threshold", nt_threshold), ("mask_threshold", mask_threshold)):
            if thr is not None and not 0.0 <= thr <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {thr}")
        self.cfg = cfg
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.nt_threshold = nt_threshold
        self.mask_threshold = mask_threshold
        self.batch_size = batch_size
        self._tokenizer = tokenizer
        self._tokens: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._swin = _find_fused_swin(model) if cache_stem else None
        self._stem: torch.Tensor | None = None
        self._image: np.ndarray | None = None
        self._tensor: torch.Tensor | None = None

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | os.PathLike,
        preset: str | None = None,
        device: str = "auto",
        **kw: Any,
    ) -> Predictor:
        """Build the model from a weights file, checkpoint folder or run folder and load it."""
        from gres.cli import config_for_checkpoint, resolve_checkpoint
        from gres.engine import load_weights, prepare_model, resolve_device

        weights, run_dir = resolve_checkpoint(checkpoint)
        cfg = config_for_checkpoint(weights, run_dir, preset)
        model = prepare_model(cfg, load_pretrained=False)  # all weights come from the file
        load_weights(model, weights)
        return cls(model, cfg.model, device=resolve_device(device), **kw)

    # ------------------------------------------------------------------------------- inputs --
    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from gres.data.dataset import build_tokenizer

            text = self.cfg.text
            self._tokenizer = build_tokenizer(text.tokenizer or text.name_or_path)
        return self._tokenizer

    @property
    def image(self) -> np.ndarray:
        """The current image, ``(H, W, 3)`` uint8 at its original resolution."""
        if self._image is None:
            raise ValueError("no image set: call set_image(...) first")
        return self._image

    def set_image(self, image: Any) -> None:
        """Read, resize and upload ``image`` (path, PIL image, numpy array or tensor) once."""
        rgb = load_image(image)
        self._image = rgb
        self._tensor = resize_image(rgb, self.cfg.image_size).unsqueeze(0).to(self.device)
        self._stem = None  # filled by the first forward pass on this image

    def encode(self, expressions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids ``(B, L)`` and masks ``(B, L)`` (memoised per expression)."""
        ids, masks = [], []
        for e in expressions:
            if not isinstance(e, str) or not e.strip():
                raise ValueError(f"expression must be a non-empty string, got {e!r}")
            if e not in self._tokens:
                from gres.data.dataset import tokenize

                self._tokens[e] = tokenize(self.tokenizer, e, self.cfg.text.max_tokens)
            ids.append(self._tokens[e][0])
            masks.append(self._tokens[e][1])
        return torch.stack(ids).to(self.device), torch.stack(masks).to(self.device)

    # ---------------------------------------------------------------------------- inference --
    @torch.no_grad()
    def forward(self, expressions: Sequence[str]):
        """The raw :class:`gres.model.GRESOutput` for ``expressions`` on the current image."""
        if self._tensor is None:
            raise ValueError("no image set: call set_image(...) first")
        input_ids, text_mask = self.encode(expressions)
        images = self._tensor.expand(len(expressions), -1, -1, -1)  # (B, 3, S, S) uint8
        if self._swin is not None and self._stem is not None:
            with _cached_stem(self._swin, self._stem):
                return self.model(images, input_ids, text_mask)
        if self._swin is None:
            return self.model(images, input_ids, text_mask)
        captured: list[torch.Tensor] = []
        last_block = self._swin.layers[0].blocks[-1]
        hook = last_block.register_forward_hook(lambda m, i, o: captured.append(o[:1].detach()))
        try:
            out = self.model(images, input_ids, text_mask)
        finally:
            hook.remove()
        self._stem = captured[0] if captured else None
        return out

    def predict(self, expression: str | Sequence[str]) -> Prediction | list[Prediction]:
        """Segment one expression (returns a :class:`Prediction`) or several (a list)."""
        single = isinstance(expression, str)
        exprs = [expression] if single else list(expression)
        if not exprs:
            raise ValueError("no expression given")
        preds: list[Prediction] = []
        h, w = self.image.shape[:2]
        for s in range(0, len(exprs), self.batch_size):
            chunk = exprs[s : s + self.batch_size]
            out = self.forward(chunk)
            nt_logits = out.nt_logits.float()  # (B, 2)
            nt_prob = nt_logits.softmax(-1)[:, 1]  # (B,)
            if self.nt_threshold is None:  # official: argmax of the sigmoids, ties -> target
                nt_sig = nt_logits.sigmoid()
                no_target = nt_sig[:, 1] > nt_sig[:, 0]
            else:
                no_target = nt_prob >= self.nt_threshold
            region_p = out.region_logits.float().softmax(-1)[..., 1]  # (B, P)
            grid = int(round(region_p.shape[1] ** 0.5))
            region_masks = out.region_masks.float().sigmoid()  # (B, P, h4, w4)
            for k, e in enumerate(chunk):
                logits = F.interpolate(
                    out.mask_logits[k : k + 1].float(), size=(h, w), mode="bilinear",
                    align_corners=False,
                )[0]  # (2, H, W)
                if self.mask_threshold is None:  # official: argmax of the sigmoids, ties -> 0
                    sig = logits.sigmoid()
                    raw = sig[1] > sig[0]
                else:  # P(target) of the two-class softmax = sigmoid(logit_1 - logit_0)
                    raw = torch.sigmoid(logits[1] - logits[0]) >= self.mask_threshold
                raw_np = raw.cpu().numpy()
                nt = bool(no_target[k])
                preds.append(
                    Prediction(
                        expression=e,
                        mask=np.zeros_like(raw_np) if nt else raw_np,
                        no_target=nt,
                        nt_prob=float(nt_prob[k]),
                        raw_mask=raw_np,
                        minimap=region_p[k].reshape(grid, grid).cpu().numpy(),
                        region_masks=region_masks[k].cpu().numpy(),
                    )
                )
        return preds[0] if single else preds


# --------------------------------------------------------------------------------------------------
# Overlay
# --------------------------------------------------------------------------------------------------
def save_overlay(
    image: np.ndarray, predictions: Prediction | Sequence[Prediction], path: str | os.PathLike
) -> Path:
    """Write the predictions over ``image`` (one panel per expression) with :mod:`gres.viz`.

    The predicted mask is drawn in blue with its contour, the expression is the panel title and a
    "no target" badge marks no-target answers (with the probability in the title).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from gres import viz

    preds = [predictions] if isinstance(predictions, Prediction) else list(predictions)
    n = len(preds)
    h, w = image.shape[:2]
    side = 3.4
    fig, axes = plt.subplots(1, n, figsize=(side * n, side * h / max(w, 1) + 0.5), squeeze=False)
    for ax, p in zip(axes[0], preds):
        viz.overlay(
            image, pred_mask=p.mask, title=f"{p.expression}  (P(no target) = {p.nt_prob:.2f})",
            pred_no_target=p.no_target, ax=ax, legend=False,
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return path
