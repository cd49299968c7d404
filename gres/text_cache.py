"""Word features of a frozen text encoder, computed once per dataset and shared (ours).

A frozen encoder (``TrainConfig.freeze_text_encoder``) maps a token row to the same features at
every step, so running it inside every training step only spends time: with the packaged MiniLM
(6 layers, width 384) on the ``cpu-small`` model it was about a quarter of a training step. With
``TrainConfig.text_feature_cache`` the engine instead computes the features of every sentence of
the training and validation splits once, in evaluation mode (no dropout), stores them beside the
pretrained backbones and serves them from memory (:meth:`gres.model.text.TextEncoder.use_memo`).
The paper fine-tunes BERT, so the paper preset never uses this.

The file is keyed by a hash of the encoder's weights and of the token rows, so a different text
model, tokenizer or dataset never reads a stale store; parallel trainings that need the same store
compute it once (a file lock)::

    <root>/text-<key>.safetensors    input_ids (N, L) int64, text_mask (N, L) uint8,
                                     features (N, L, Dt) float32, rows sorted by their bytes
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor

from gres.model.text import TextEncoder, token_key
from gres.utils import file_lock

STORE_PREFIX = "text-"


def dataset_sentences(dataset: Any) -> list[str]:
    """Every sentence of a :class:`gres.data.dataset.GRESDataset` or a ``Subset`` of one."""
    if isinstance(dataset, torch.utils.data.Subset):
        base, indices = dataset.dataset, list(dataset.indices)
    else:
        base, indices = dataset, range(len(dataset))
    if not hasattr(base, "meta"):
        raise TypeError(f"{type(base).__name__} has no meta(index); cannot list its sentences")
    return [base.meta(i)["sentence"] for i in indices]


def token_rows(datasets: Iterable[Any]) -> tuple[Tensor, Tensor]:
    """The distinct token rows of the datasets' sentences, sorted by their bytes (a stable order).

    Returns:
        ``input_ids`` (N, L) int64 and ``text_mask`` (N, L) bool.
    """
    from gres.data.dataset import tokenize

    rows: dict[bytes, tuple[Tensor, Tensor]] = {}
    for ds in datasets:
        base = ds.dataset if isinstance(ds, torch.utils.data.Subset) else ds
        seen: set[str] = set()
        for sentence in dataset_sentences(ds):
            if sentence in seen:
                continue
            seen.add(sentence)
            ids, mask = tokenize(base.tokenizer, sentence, base.max_tokens)
            rows.setdefault(token_key(ids, mask), (ids, mask))
    if not rows:
        raise ValueError("token_rows: the datasets hold no sentence")
    ordered = [rows[k] for k in sorted(rows)]
    return torch.stack([r[0] for r in ordered]), torch.stack([r[1] for r in ordered])


def store_key(encoder: TextEncoder, input_ids: Tensor, text_mask: Tensor, length: int = 10) -> str:
    """Hash of the encoder's weights (names, shapes, values) and of the token rows."""
    h = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    h.update(input_ids.numpy().tobytes())
    h.update(text_mask.numpy().tobytes())
    return h.hexdigest()[:length]


def compute_features(encoder: TextEncoder, input_ids: Tensor, text_mask: Tensor, *,
                     batch_size: int = 64, progress: bool = False) -> Tensor:
    """(N, L, Dt) float32 word features (:meth:`TextEncoder.frozen_features`: evaluation mode,
    no dropout), ``batch_size`` rows at a time in the given order (so the result does not depend
    on who asks)."""
    from tqdm.auto import tqdm

    device = next(encoder.parameters()).device
    out = []
    for start in tqdm(range(0, len(input_ids), batch_size), desc="text features",
                      disable=not progress, leave=False):
        ids = input_ids[start:start + batch_size].to(device)
        mask = text_mask[start:start + batch_size].to(device)
        out.append(encoder.frozen_features(ids, mask).float().cpu())
    return torch.cat(out)


def feature_store(encoder: TextEncoder, datasets: Iterable[Any], root: str | os.PathLike, *,
                  progress: bool = False) -> Path:
    """The store of ``encoder``'s features for every sentence of ``datasets`` under ``root``:
    read if present, else computed and written atomically (under a lock)."""
    from gres.checkpoint import save_tensors

    input_ids, text_mask = token_rows(datasets)
    path = Path(root) / f"{STORE_PREFIX}{store_key(encoder, input_ids, text_mask)}.safetensors"
    with file_lock(path.with_name(path.name + ".lock")):
        if not path.is_file():
            feats = compute_features(encoder, input_ids, text_mask, progress=progress)
            save_tensors({"input_ids": input_ids, "text_mask": text_mask.to(torch.uint8),
                          "features": feats.contiguous()}, path)
    return path


def attach_store(encoder: TextEncoder, path: str | os.PathLike) -> int:
    """Load a store into ``encoder``'s memo (:meth:`TextEncoder.use_memo`); returns its rows."""
    from safetensors.torch import load_file

    data = load_file(str(path))
    encoder.use_memo(data["input_ids"], data["text_mask"].bool(), data["features"])
    return len(data["input_ids"])


def use_feature_store(model: torch.nn.Module, datasets: Iterable[Any], root: str | os.PathLike,
                      *, progress: bool = False) -> Path:
    """Build or read the store of ``model.text_encoder`` and serve its features from memory.

    Raises:
        ValueError: the model has no :class:`TextEncoder` or the encoder is not frozen.
    """
    encoder = getattr(model, "text_encoder", None)
    if not isinstance(encoder, TextEncoder):
        raise ValueError("text_feature_cache: the model has no gres TextEncoder "
                         f"(text_encoder is {type(encoder).__name__})")
    if any(p.requires_grad for p in encoder.parameters()):
        raise ValueError("text_feature_cache needs a frozen text encoder "
                         "(set train.freeze_text_encoder=True)")
    path = feature_store(encoder, datasets, root, progress=progress)
    attach_store(encoder, path)
    return path
