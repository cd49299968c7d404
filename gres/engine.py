"""Training and evaluation engine: the official recipe (spec §3) without detectron2.

Public API:

* :func:`train` ``(cfg, run_dir, resume=False, hook=None, ...) -> TrainResult``: iteration-budgeted
  training (``TrainConfig.max_iters`` or ``max_samples``, never wall time) with tqdm progress, a
  JSONL log (losses, learning rate, gradient norm, periodic metrics), ``config.json`` beside the
  run, atomic checkpoints and bitwise-exact resumption on CPU. Runs under ``torchrun`` with DDP.
* :func:`evaluate` ``(model, dataset, ...) -> EvalResult``: the official evaluator
  (:class:`gres.metrics.GRESMetrics`) over a split, overall and per expression type, plus one
  record per sample (I, U, IoU, no-target decision and probability) saved as CSV and JSONL.
* :func:`save_checkpoint` / :func:`load_checkpoint` / :func:`latest_checkpoint`.

Data order. Every epoch is a permutation drawn from a generator seeded with ``(seed, epoch)``;
with ``W`` processes the permutation is padded by wrap-around to a multiple of ``W`` and process
``r`` takes every ``W``-th index from ``r``. The per-process stream concatenates the epochs, and
each iteration consumes the next ``batch_size / W`` indices (detectron2's infinite
``TrainingSampler``, made resumable). The position in the stream is therefore
``iteration * batch_size / W``, and resuming mid-epoch only needs the iteration.

Checkpoints. ``<run_dir>/checkpoints/iter_XXXXXXX/`` holds ``model.safetensors`` (weights and the
config as metadata), ``state.pt`` (optimiser, scheduler, grad scaler, iteration, sampler position,
torch / numpy / python RNG states of every process) and ``meta.json`` (written last). The folder
is written under a temporary name, every file is fsync'ed, then it is renamed into place and
``latest.json`` is replaced atomically; a kill at any point leaves the previous checkpoint as the
latest valid one.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from gres.config import ExperimentConfig, ModelConfig, to_dict
from gres.optim import build_optimizer, build_scheduler, clip_gradients, freeze_text_encoder
from gres.utils import seed_everything, seed_worker

EXPR_TYPES: dict[int, str] = {0: "single", 1: "multi", 2: "no-target"}
"""``expr_type`` codes of the sample contract."""

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest.json"


# --------------------------------------------------------------------------------------------------
# Distributed helpers (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a (possibly single-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group described by torchrun's environment (no-op for one process).

    Uses NCCL on CUDA and gloo on CPU. A group that is already initialised (tests spawning
    processes themselves) is reused.
    """
    if dist.is_available() and dist.is_initialized():
        return current_dist()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return current_dist()


def current_dist() -> DistInfo:
    """The :class:`DistInfo` of an initialised process group, else a single process."""
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", 0))
        return DistInfo(dist.get_rank(), dist.get_world_size(), local)
    return DistInfo()


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"`` -> ``cuda:<local_rank>`` when CUDA is available, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def _barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def _all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------------------------------
# Seeding and RNG state
# --------------------------------------------------------------------------------------------------
def get_rng_state() -> dict[str, Any]:
    """torch / CUDA / numpy / python RNG states in types ``torch.load(weights_only=True)`` reads."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`get_rng_state`."""
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["kind"],
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["gauss"],
        )
    )
    random.setstate(_to_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# --------------------------------------------------------------------------------------------------
# Samplers: data order = f(seed, epoch), resumable mid-epoch, DDP-sharded
# --------------------------------------------------------------------------------------------------
def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch, a pure function of ``(seed, epoch)``. Shape ``(N,)``."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + epoch) % (2**63))
    return torch.randperm(num_samples, generator=g)


class TrainBatchSampler:
    """Infinite, resumable, sharded batch sampler (a resumable detectron2 ``TrainingSampler``).

    Process ``rank`` of ``world_size`` sees, per epoch, ``ceil(N / world_size)`` indices:
    ``perm[rank::world_size]`` of the epoch permutation padded by wrap-around to a multiple of
    ``world_size``. Consecutive epochs are concatenated into one stream and cut into batches of
    ``batch_size``; batches may straddle an epoch boundary.

    Args:
        num_samples: dataset length N.
        batch_size: samples per batch for this process.
        seed: data-order seed.
        rank / world_size: this process's shard.
        start: position in this process's stream to start from (``iteration * batch_size``).
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
    ) -> None:
        if num_samples <= 0:
            raise ValueError("TrainBatchSampler: the training dataset is empty")
        if batch_size <= 0:
            raise ValueError(f"TrainBatchSampler: batch_size must be positive, got {batch_size}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start = start
        self.per_epoch = math.ceil(num_samples / world_size)

    def shard(self, epoch: int) -> list[int]:
        """This process's indices for ``epoch`` (length ``ceil(N / world_size)``)."""
        perm = epoch_permutation(self.num_samples, self.seed, epoch).tolist()
        total = self.per_epoch * self.world_size
        while len(perm) < total:
            perm += perm[: total - len(perm)]
        return perm[self.rank : total : self.world_size]

    def position(self, pos: int) -> tuple[int, int]:
        """``(epoch, offset)`` of stream position ``pos``."""
        return divmod(pos, self.per_epoch)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, offset = self.position(self.start)
        order = self.shard(epoch)
        batch: list[int] = []
        while True:
            if offset == len(order):
                epoch, offset = epoch + 1, 0
                order = self.shard(epoch)
            batch.append(order[offset])
            offset += 1
            if len(batch) == self.batch_size:
                yield batch
                batch = []


class ShardedEvalSampler(torch.utils.data.Sampler[int]):
    """Evaluation shard without duplicates: process ``rank`` gets ``range(rank, N, world_size)``.

    Unlike ``DistributedSampler`` no index is repeated to even out the shards, so the merged
    per-sample records equal a single-process evaluation exactly.
    """

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, num_samples, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


# --------------------------------------------------------------------------------------------------
# Building blocks: dataset, model, mixed precision
# --------------------------------------------------------------------------------------------------
def build_dataset(
    cfg: ExperimentConfig,
    split: str,
    root: str | os.PathLike | None = None,
    tokenizer: Any = None,
    max_samples: int | None = None,
):
    """The :class:`gres.data.dataset.GRESDataset` of ``split`` under ``root`` (default: data.root).

    The tokenizer is the model's (``cfg.model.text.tokenizer`` or ``name_or_path``; ``None`` = the
    packaged offline one); pass ``tokenizer`` to share one between splits. Unlike the book's
    helpers, a missing synthetic dataset is not generated here: training on a wrong path must fail.

    Raises:
        FileNotFoundError: the data root, its annotation files or an image do not exist.
        ValueError: ``cfg.data.image_size`` differs from ``cfg.model.image_size``, or the split is
            unknown.
    """
    from gres.data.dataset import build_dataset as data_build_dataset
    from gres.data.dataset import build_tokenizer

    data = cfg.data if root is None else dataclasses.replace(cfg.data, root=str(root))
    if data.image_size != cfg.model.image_size:
        raise ValueError(
            f"data.image_size={data.image_size} differs from model.image_size="
            f"{cfg.model.image_size}; set both to the same value"
        )
    if not Path(data.root).is_dir():
        hint = (
            f" (generate it with: python data_prep/make_synthetic.py --out {data.root})"
            if data.dataset == "synthetic"
            else " (see README: real gRefCOCO layout)"
        )
        raise FileNotFoundError(f"data root {data.root!r} does not exist{hint}")
    if tokenizer is None:
        tokenizer = build_tokenizer(cfg.model.text.tokenizer or cfg.model.text.name_or_path)
    return data_build_dataset(
        data,
        split,
        tokenizer=tokenizer,
        image_size=data.image_size,
        max_tokens=cfg.model.text.max_tokens,
        ensure=False,
        max_samples=max_samples,
    )


def build_collate():
    from gres.data.dataset import collate

    return collate


def keep_fp32(module: nn.Module) -> nn.Module:
    """Run ``module`` in fp32 under autocast (GRES: the pixel decoder is forced to fp32).

    Floating-point tensor inputs (also inside lists, tuples and dicts) are cast to float32 and
    autocast is disabled for the call. Idempotent.
    """
    if getattr(module, "_gres_keep_fp32", False):
        return module
    inner = module.forward

    def _cast(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return x.float()
        if isinstance(x, (list, tuple)):
            return type(x)(_cast(v) for v in x)
        if isinstance(x, dict):
            return {k: _cast(v) for k, v in x.items()}
        return x

    def forward(*args: Any, **kwargs: Any) -> Any:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            return inner(*_cast(args), **_cast(kwargs))

    module.forward = forward  # type: ignore[method-assign]
    module._gres_keep_fp32 = True  # type: ignore[attr-defined]
    return module


def apply_fp32_modules(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Wrap every sub-module whose attribute name is in ``names`` with :func:`keep_fp32`.

    Returns:
        Qualified names of the wrapped modules (outermost matches only).
    """
    wrapped: list[str] = []
    for qual, module in model.named_modules():
        if qual.split(".")[-1] in names and not any(qual.startswith(w + ".") for w in wrapped):
            keep_fp32(module)
            wrapped.append(qual)
    return wrapped


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DDP wrapper."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def prepare_model(cfg: ExperimentConfig, load_pretrained: bool = True) -> nn.Module:
    """``build_model(cfg.model)`` with the recipe's text-encoder freezing applied, and without
    gradients for the frozen Swin weights when ``train.frozen_backbone_grads`` is False.

    Args:
        cfg: the experiment config (model + ``train.freeze_text_encoder``).
        load_pretrained: load the Swin / BERT weights the config names; False when every weight
            comes from a checkpoint anyway (evaluation, prediction, resuming: no download).
    """
    from gres.model import build_model

    model = build_model(cfg.model, load_pretrained=load_pretrained)
    freeze_text_encoder(
        model,
        frozen_layers_from=cfg.model.text.frozen_layers_from,
        freeze_embeddings=cfg.model.text.freeze_embeddings,
        freeze_all=cfg.train.freeze_text_encoder,
    )
    if not cfg.train.frozen_backbone_grads:
        if cfg.train.backbone_lr_factor != 0:
            raise ValueError(
                "train.frozen_backbone_grads=False needs train.backbone_lr_factor=0 (it drops the "
                f"gradients of frozen Swin weights), got {cfg.train.backbone_lr_factor}"
            )
        from gres.model.swin import pretrained_parameters

        for param in pretrained_parameters(model, cfg.train.backbone_lr_from_stage):
            param.requires_grad_(False)
    return model


def max_iterations(cfg: ExperimentConfig) -> int:
    """Iteration budget: ``ceil(max_samples / batch_size)`` if max_samples is set, else max_iters."""
    t = cfg.train
    if t.max_samples is not None:
        return math.ceil(t.max_samples / t.batch_size)
    return t.max_iters


# --------------------------------------------------------------------------------------------------
# Model weights (safetensors) and atomic checkpoints
# --------------------------------------------------------------------------------------------------
def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file, fsync and ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_weights(
    model: nn.Module, path: str | os.PathLike, cfg: ModelConfig | ExperimentConfig | None = None
) -> Path:
    """Write the weights as safetensors with the config (metadata + ``<path>.json``), atomically.

    Thin wrapper of :func:`gres.checkpoint.save_model` that also fsyncs the folder.
    """
    from gres.checkpoint import save_model

    path = Path(path)
    save_model(unwrap(model), cfg, path)
    _fsync_dir(path.parent)
    return path


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load safetensors weights into ``model`` strictly (no partial load).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is unreadable or does not match the model (the message names the
            file and the missing, unexpected and mis-shaped keys).
    """
    from safetensors.torch import load_file

    from gres.checkpoint import load_state_dict_checked

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from exc
    try:
        load_state_dict_checked(unwrap(model), state, strict=True, source=str(path))
    except ValueError as exc:
        raise ValueError(f"checkpoint {path} does not match the model config: {exc}") from None
    return model


def read_weights_config(path: str | os.PathLike) -> ModelConfig | None:
    """The :class:`ModelConfig` stored with a weights file, or ``None`` when it has none."""
    from gres.checkpoint import model_config, read_config

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return model_config(read_config(path))
    except ValueError:
        return None


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def save_checkpoint(
    run_dir: str | os.PathLike,
    iteration: int,
    model: nn.Module,
    cfg: ExperimentConfig,
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write ``checkpoints/iter_XXXXXXX`` atomically and point ``latest.json`` at it.

    Args:
        run_dir: the run folder.
        iteration: completed iterations.
        model: the (possibly DDP-wrapped) model.
        cfg: the experiment config (stored in the weights' metadata and in ``meta.json``).
        state: optimiser / scheduler / RNG / sampler state for ``state.pt``.
        keep: how many ``iter_*`` folders to keep (older ones are deleted after the switch).

    Returns:
        The checkpoint folder.
    """
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"iter_{iteration:07d}"
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_weights(model, tmp / "model.safetensors", cfg)
    torch.save(state, tmp / "state.pt")
    _fsync_file(tmp / "state.pt")
    meta = {"iteration": iteration, "config": to_dict(cfg), "time": time.time()}
    atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=1))
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same iteration (e.g. after a resume): swap safely
        trash = root / f".old-{name}-{os.getpid()}"
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    atomic_write_text(root / LATEST, json.dumps({"iteration": iteration, "path": name}))
    if keep > 0:
        for old in sorted(root.glob("iter_*"))[:-keep]:
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    return final


def _complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in ("model.safetensors", "state.pt", "meta.json"))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder of a run (``latest.json`` first), or ``None``."""
    root = checkpoint_dir(run_dir)
    pointer = root / LATEST
    if pointer.is_file():
        try:
            folder = root / json.loads(pointer.read_text())["path"]
            if _complete(folder):
                return folder
        except (ValueError, KeyError):
            pass
    candidates = [p for p in sorted(root.glob("iter_*")) if _complete(p)]
    return candidates[-1] if candidates else None


def load_checkpoint(folder: str | os.PathLike, model: nn.Module) -> dict[str, Any]:
    """Load the weights of checkpoint ``folder`` into ``model``; return its ``state.pt`` dict."""
    folder = Path(folder)
    if not _complete(folder):
        raise FileNotFoundError(f"incomplete or missing checkpoint folder: {folder}")
    load_weights(model, folder / "model.safetensors")
    return torch.load(folder / "state.pt", map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------
@dataclass
class EvalResult:
    """Metrics of one split (percent, official evaluator) and the per-sample records."""

    metrics: dict[str, float]  # overall: gIoU, cIoU, Pr@0.7/0.8/0.9, N-acc, T-acc
    per_type: dict[str, dict[str, float]]  # "single" / "multi" / "no-target" -> metrics
    records: list[dict[str, Any]]  # one per sample, sorted by dataset index
    num_samples: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "per_type": self.per_type, "num_samples": self.num_samples}

    def save(self, out_dir: str | os.PathLike, prefix: str = "") -> dict[str, Path]:
        """Write ``{prefix}metrics.json``, ``{prefix}records.csv`` and ``{prefix}records.jsonl``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {
            "metrics": out / f"{prefix}metrics.json",
            "csv": out / f"{prefix}records.csv",
            "jsonl": out / f"{prefix}records.jsonl",
        }
        atomic_write_text(paths["metrics"], json.dumps(self.to_dict(), indent=1))
        with open(paths["jsonl"], "w") as f:
            for r in self.records:
                f.write(json.dumps(r) + "\n")
        with open(paths["csv"], "w", newline="") as f:
            fields = list(self.records[0]) if self.records else ["index"]
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.records)
        return paths


@torch.no_grad()
def predict_batch(model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward + official post-processing (:func:`gres.model.postprocess`) at the GT resolution.

    Returns:
        ``pred_mask (B,S,S) bool``, ``pred_no_target (B,) bool`` (official argmax rules) and
        ``nt_prob (B,) float``: the two-class softmax probability of "no target" (the NT head is
        trained with a softmax cross-entropy, so this is the probability to threshold).
    """
    from gres.model import postprocess

    size = tuple(batch.gt_mask.shape[-2:])
    out = model(batch.image, batch.input_ids, batch.text_mask)
    pred_mask, pred_nt, _ = postprocess(out, size)
    return pred_mask, pred_nt, out.nt_logits.float().softmax(-1)[:, 1]


def _raw_records(
    indices: Sequence[int],
    batch: Any,
    pred: torch.Tensor,
    pred_nt: torch.Tensor,
    nt_prob: torch.Tensor,
) -> list[dict[str, Any]]:
    """Per-sample pixel counts and decisions of one batch (everything the metrics need)."""
    from gres.metrics import mask_counts

    inter, p_area, g_area = (c.cpu().tolist() for c in mask_counts(pred, batch.gt_mask.bool()))
    out = []
    for k, idx in enumerate(indices):
        meta = batch.meta[k]
        out.append(
            {
                "index": int(idx),
                "image_id": meta.get("image_id"),
                "ref_id": meta.get("ref_id"),
                "sent_id": meta.get("sent_id"),
                "sentence": meta.get("sentence"),
                "expr_type": int(batch.expr_type[k]),
                "gt_nt": bool(batch.no_target[k]),
                "pred_nt": bool(pred_nt[k]),
                "nt_prob": float(nt_prob[k]),
                "mask_I": int(inter[k]),
                "pred_area": int(p_area[k]),
                "gt_area": int(g_area[k]),
            }
        )
    return out


def metrics_from_counts(raw: Sequence[dict[str, Any]], chunk: int = 256):
    """A :class:`gres.metrics.GRESMetrics` (with records) fed from per-sample pixel counts.

    The evaluator only looks at ``|pred ∧ gt|``, ``|pred|``, ``|gt|`` and the flags, so each
    sample is replayed as two 1-D masks with exactly those counts: ``pred`` = the first
    ``pred_area`` cells, ``gt`` = ``gt_area`` cells starting at ``pred_area - mask_I``. Samples are
    replayed in the given order, so the floating-point gIoU sum is the one of a single-process
    loop over that order (bit for bit), whatever process computed each prediction.
    """
    from gres.metrics import GRESMetrics

    m = GRESMetrics(keep_records=True)
    for s in range(0, len(raw), chunk):
        part = raw[s : s + chunk]
        length = max(1, max(r["pred_area"] + r["gt_area"] - r["mask_I"] for r in part))
        pred = torch.zeros(len(part), 1, length, dtype=torch.bool)  # (B, 1, L)
        gt = torch.zeros(len(part), 1, length, dtype=torch.bool)  # (B, 1, L)
        for k, r in enumerate(part):
            pred[k, 0, : r["pred_area"]] = True
            g0 = r["pred_area"] - r["mask_I"]
            gt[k, 0, g0 : g0 + r["gt_area"]] = True
        m.update(
            pred,
            gt,
            torch.tensor([r["pred_nt"] for r in part], dtype=torch.bool),
            torch.tensor([r["gt_nt"] for r in part], dtype=torch.bool),
            expr_type=torch.tensor([r["expr_type"] for r in part], dtype=torch.int64),
            ids=[r["index"] for r in part],
        )
    return m


def evaluate(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    max_samples: int | None = None,
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "eval",
) -> EvalResult:
    """Evaluate ``model`` on ``dataset`` with the official evaluator, overall and per type.

    Under an initialised process group every process evaluates a disjoint shard
    (:class:`ShardedEvalSampler`, no duplicated sample); the per-sample pixel counts are gathered,
    sorted by dataset index and scored once (:func:`metrics_from_counts`), so every process
    returns the same result, identical to a single-process evaluation.

    Args:
        model: a GRES model (DDP wrappers are unwrapped: evaluation never synchronises).
        dataset: a :class:`gres.data.dataset.GRESDataset`.
        device: where to run.
        batch_size: samples per forward pass on each process.
        max_samples: evaluate only the first ``max_samples`` samples (learning curves).
        num_workers: DataLoader workers.
        progress: show a tqdm bar on the main process.
        desc: progress-bar label.

    Returns:
        :class:`EvalResult` with records holding the ids and sentence of every sample, the
        no-target decision and probability, the raw mask overlap (``mask_I``, areas) and the
        official per-sample ``I``, ``U``, ``IoU`` and ``outcome`` (TP/FN/FP/TN, positive =
        no-target).
    """
    info = current_dist()
    device = torch.device(device)
    net = unwrap(model)
    was_training = net.training
    net.eval()
    n = len(dataset) if max_samples is None else min(len(dataset), max_samples)
    sampler = ShardedEvalSampler(n, info.rank, info.world_size)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=build_collate(),
        num_workers=num_workers,
        generator=torch.Generator(),  # never draw from the global RNG (bitwise resume)
    )
    local: list[dict[str, Any]] = []
    order = iter(sampler.indices)
    bar = tqdm(loader, desc=desc, disable=not (progress and info.is_main), leave=False)
    try:
        for batch in bar:
            idx = [next(order) for _ in range(batch.input_ids.shape[0])]
            batch = batch.to(device)
            pred, pred_nt, nt_prob = predict_batch(net, batch)
            local.extend(_raw_records(idx, batch, pred, pred_nt.cpu(), nt_prob.cpu()))
    finally:
        net.train(was_training)
    raw = sorted((r for part in _all_gather_objects(local, info) for r in part),
                 key=lambda r: r["index"])
    m = metrics_from_counts(raw)
    per_type = {k: v for k, v in m.compute_by_type().items()
                if any(EXPR_TYPES[r["expr_type"]] == k for r in raw)}
    records = []
    for r, official in zip(raw, m.records()):
        rec = dict(r)
        rec["expr_type"] = EXPR_TYPES[r["expr_type"]]
        rec.update(outcome=official["outcome"], I=official["I"], U=official["U"],
                   IoU=official["IoU"], mask_U=official["mask_U"])
        records.append(rec)
    return EvalResult(metrics=m.compute(), per_type=per_type, records=records,
                      num_samples=len(records))


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------
class NonFiniteLossError(FloatingPointError):
    """Training stopped because the loss became NaN or infinite."""


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    run_dir: Path
    iterations: int  # completed iterations
    samples_seen: int  # iterations x batch_size (all processes)
    final_weights: Path | None  # model_final.safetensors, or None when stopped early
    last_checkpoint: Path | None  # newest checkpoint folder
    history: list[dict[str, Any]] = field(default_factory=list)  # training log records
    eval_history: list[dict[str, Any]] = field(default_factory=list)  # periodic evaluations
    final_eval: EvalResult | None = None  # evaluation at the end (when eval_every > 0)
    resumed_from: int = 0  # iteration the run resumed from (0 = fresh)
    train_samples: int = 0  # size of the training set (after data.train_expr_types)
    model: nn.Module | None = None  # the trained model (unwrapped, on its device, train mode)
    seconds: float = 0.0  # wall time of this call (reporting only, never a budget)


Hook = Callable[[dict[str, Any]], None]
"""Called on the main process with every log record (``kind`` = ``"train"`` or ``"eval"``)."""


def _amp_setup(cfg: ExperimentConfig, device: torch.device) -> tuple[bool, torch.dtype]:
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(cfg.train.amp_dtype)
    if dtype is None:
        raise ValueError(
            f"TrainConfig.amp_dtype={cfg.train.amp_dtype!r}: expected float16 or bfloat16"
        )
    return bool(cfg.train.amp and device.type == "cuda"), dtype


RESUME_FREE_KEYS: dict[str, set[str]] = {"data": {"root", "num_workers"}}
"""Config keys that may change between an interrupted run and its resumption (where the data
lives, how it is loaded); everything else of ``model`` / ``data`` / ``loss`` must match."""


def _check_resume_config(saved: dict[str, Any], cfg: ExperimentConfig, path: Path) -> None:
    """Resuming with another model, data or loss config would silently train something else."""
    now = to_dict(cfg)
    for section in ("model", "data", "loss"):
        old, new = saved.get(section, {}), now[section]
        diff = sorted(
            k for k in set(old) | set(new)
            if old.get(k) != new.get(k) and k not in RESUME_FREE_KEYS.get(section, set())
        )
        if diff:
            raise ValueError(
                f"cannot resume from {path}: its {section} config differs from the current one "
                f"(keys {diff}); use a new run folder"
            )


def train(
    cfg: ExperimentConfig,
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    hook: Hook | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    train_dataset: torch.utils.data.Dataset | None = None,
    val_dataset: torch.utils.data.Dataset | None = None,
    pretrain_root: str | os.PathLike | None = None,
) -> TrainResult:
    """Train a GRES model with the config's recipe; returns a :class:`TrainResult`.

    The budget is ``TrainConfig.max_iters`` (or ``max_samples``) iterations of ``batch_size``
    samples summed over processes. Every ``log_every`` iterations a record (losses, learning rate,
    gradient norm, throughput) goes to ``<run_dir>/log.jsonl`` and to ``hook``; every
    ``eval_every`` iterations (0 = never) the model is evaluated on the validation split (at most
    ``eval_max_samples`` samples) and, at the end, on the full split with per-sample records in
    ``<run_dir>/eval/``. Checkpoints every ``checkpoint_every`` iterations and at the end.

    Args:
        cfg: the experiment config (saved as ``<run_dir>/config.json``).
        run_dir: output folder.
        resume: continue from the latest checkpoint in ``run_dir`` (bitwise on CPU; a fresh
            start when there is none). Without it, a run folder that already holds checkpoints
            is refused.
        hook: optional callback for every log / eval record (main process).
        device: overrides ``cfg.train.device``.
        progress: tqdm bars on the main process.
        stop_after: stop (after writing a checkpoint) once this many iterations are complete, as
            if interrupted; the schedule still targets the full budget.
        train_dataset / val_dataset: override the datasets built from ``cfg.data``.
        pretrain_root: cache of backbones pretrained by :mod:`gres.pretrain` (for
            ``swin.pretrained="dataset-categories"``) and of the text-feature stores of
            :mod:`gres.text_cache` (``train.text_feature_cache``); default
            ``<run_dir>/../_pretrained``.

    Raises:
        NonFiniteLossError: the loss became NaN or infinite; the last good checkpoint is kept.
        FileNotFoundError: missing data root or image.
        ValueError: a checkpoint that does not match the config, or a bad config value.
    """
    t0 = time.time()
    tcfg = cfg.train
    run_dir = Path(run_dir)
    dev = resolve_device(str(device) if device is not None else tcfg.device,
                         int(os.environ.get("LOCAL_RANK", 0)))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # before NCCL initialisation
    info = init_distributed(dev)
    if tcfg.batch_size % info.world_size:
        raise ValueError(
            f"TrainConfig.batch_size={tcfg.batch_size} is the total over processes and must be "
            f"divisible by the world size {info.world_size}"
        )
    per_rank_bs = tcfg.batch_size // info.world_size
    total_iters = max_iterations(cfg)
    use_amp, amp_dtype = _amp_setup(cfg, dev)

    # ---- run folder, resume point -----------------------------------------------------------
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None and not resume:
        raise ValueError(
            f"run folder {run_dir} already holds checkpoints ({ckpt.name}); pass resume=True "
            "(CLI: --resume) to continue it or choose another folder"
        )
    if resume and ckpt is not None:
        saved = json.loads((ckpt / "meta.json").read_text())["config"]
        _check_resume_config(saved, cfg, ckpt)

    # ---- data ----------------------------------------------------------------------------------
    tokenizer = None
    if train_dataset is None:
        train_dataset = build_dataset(cfg, cfg.data.train_split)
        tokenizer = train_dataset.tokenizer
        types = getattr(cfg.data, "train_expr_types", None)
        if types is not None:  # e.g. (0,): classic RES training on single-target expressions
            keep = np.flatnonzero(np.isin(train_dataset.expr_types, list(types))).tolist()
            if not keep:
                raise ValueError(f"data.train_expr_types={types} keeps no training sample")
            train_dataset = torch.utils.data.Subset(train_dataset, keep)
    if val_dataset is None and tcfg.eval_every > 0:
        val_dataset = build_dataset(cfg, cfg.data.val_split, tokenizer=tokenizer)

    # ---- model, optimiser ------------------------------------------------------------------------
    fresh = not (resume and ckpt is not None)
    model_cfg = cfg
    # shared by the runs of a cache: pretrained backbones, stores of text features
    shared_root = Path(pretrain_root) if pretrain_root is not None else run_dir.parent / "_pretrained"
    if fresh:  # a backbone pretrained on the dataset's categories: cached, or trained now
        from gres.pretrain import resolve_pretrained

        model_cfg = resolve_pretrained(cfg, shared_root, progress=progress and info.is_main)
    seed_everything(tcfg.seed)
    model = prepare_model(model_cfg, load_pretrained=fresh).to(dev)
    if use_amp:
        apply_fp32_modules(model, tcfg.fp32_modules)
    if tcfg.text_feature_cache:  # frozen encoder: its features of every sentence, computed once
        from gres.text_cache import use_feature_store

        if not tcfg.freeze_text_encoder:
            raise ValueError("train.text_feature_cache=True needs train.freeze_text_encoder=True")
        use_feature_store(model, [d for d in (train_dataset, val_dataset) if d is not None],
                          shared_root, progress=progress and info.is_main)
    from gres.losses import GRESCriterion

    criterion = GRESCriterion(cfg.loss).to(dev)
    optimizer = build_optimizer(model, tcfg)
    scheduler = build_scheduler(optimizer, tcfg, total_iters)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    start_iter = 0
    if resume and ckpt is not None:
        state = load_checkpoint(ckpt, model)
        was = state["sampler"]
        if was["batch_size"] != per_rank_bs or was["world_size"] != info.world_size:
            raise ValueError(
                f"cannot resume {ckpt}: it was written with {state['sampler']['world_size']} "
                f"process(es) x batch {state['sampler']['batch_size']}, now {info.world_size} x "
                f"{per_rank_bs}"
            )
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_iter = int(state["iteration"])
        rng = state["rng"]
        set_rng_state(rng[info.rank] if info.rank < len(rng) else rng[0])
    elif info.enabled:
        # Different dropout / drop-path streams per process; the data order is seeded separately.
        torch.manual_seed(tcfg.seed + info.rank)

    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in checkpoint_dir(run_dir).glob(".tmp-*"):  # left by a killed checkpoint write
            shutil.rmtree(stale, ignore_errors=True)
        atomic_write_text(run_dir / "config.json", json.dumps(to_dict(cfg), indent=1))
        _truncate_log(run_dir / "log.jsonl", start_iter)
    _barrier(info)

    net: nn.Module = model
    if info.enabled:
        net = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[dev.index] if dev.type == "cuda" else None,
            find_unused_parameters=tcfg.ddp_find_unused_parameters,
            forward_sync_buffers=False,  # buffers are constants (index tables); synced at init
        )

    sampler = TrainBatchSampler(
        len(train_dataset), per_rank_bs, tcfg.seed, info.rank, info.world_size,
        start=start_iter * per_rank_bs,
    )
    loader = torch.utils.data.DataLoader(
        train_dataset,
        batch_sampler=sampler,
        collate_fn=build_collate(),
        num_workers=cfg.data.num_workers,
        pin_memory=dev.type == "cuda",
        generator=torch.Generator().manual_seed(tcfg.seed),  # keeps the global RNG untouched
        persistent_workers=cfg.data.num_workers > 0,
        worker_init_fn=seed_worker,
    )

    history: list[dict[str, Any]] = []
    eval_history: list[dict[str, Any]] = []
    result = TrainResult(run_dir=run_dir, iterations=start_iter,
                         samples_seen=start_iter * tcfg.batch_size,
                         final_weights=None, last_checkpoint=ckpt if resume else None,
                         history=history, eval_history=eval_history, resumed_from=start_iter,
                         train_samples=len(train_dataset))

    def make_state(it: int) -> dict[str, Any]:
        return {
            "iteration": it,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            "rng": _all_gather_objects(get_rng_state(), info),
            "sampler": {
                "seed": tcfg.seed,
                "batch_size": per_rank_bs,
                "world_size": info.world_size,
                "position": it * per_rank_bs,
                "epoch": sampler.position(it * per_rank_bs)[0],
            },
        }

    def checkpoint(it: int) -> None:
        state = make_state(it)  # collective: every process takes part
        if info.is_main:
            result.last_checkpoint = save_checkpoint(
                run_dir, it, model, cfg, state, tcfg.keep_checkpoints)
        _barrier(info)

    def emit(record: dict[str, Any]) -> None:
        if not info.is_main:
            return
        with open(run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if hook is not None:
            hook(record)

    it = start_iter
    window: dict[str, float] = {}
    window_n = 0
    t_window = time.perf_counter()
    bar = tqdm(total=total_iters, initial=start_iter, desc="train",
               disable=not (progress and info.is_main), dynamic_ncols=True)
    data_iter = iter(loader)
    net.train()
    # ReLA decoders whose region attention is forced to the minimap grid early in training
    grid_decoders = [m for m in model.modules() if hasattr(m, "grid_attention")]
    try:
        while it < total_iters:
            for decoder in grid_decoders:
                decoder.grid_attention = it < tcfg.grid_attention_iters
            batch = next(data_iter).to(dev, non_blocking=True)
            with torch.autocast(device_type=dev.type, dtype=amp_dtype, enabled=use_amp):
                out = net(batch.image, batch.input_ids, batch.text_mask)
                losses = criterion(out, batch.gt_mask, batch.no_target)
            loss = losses["loss"]
            finite = torch.isfinite(loss.detach()).float()
            if info.enabled:
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if finite.item() < 1:
                terms = {k: float(v.detach()) for k, v in losses.items()}
                last = latest_checkpoint(run_dir)
                raise NonFiniteLossError(
                    f"non-finite loss at iteration {it + 1} (losses {terms}); training stopped. "
                    f"Last good checkpoint: {last if last is not None else 'none'} "
                    "(resume from it with a lower lr or check the data)"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = clip_gradients(optimizer, tcfg.clip_grad_norm)
            lr = optimizer.param_groups[0]["lr"]
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            it += 1
            bar.update(1)
            for k, v in losses.items():
                window[k] = window.get(k, 0.0) + float(v.detach())
            window["grad_norm"] = window.get("grad_norm", 0.0) + float(grad_norm)
            window_n += 1

            if it % tcfg.log_every == 0 or it == total_iters:
                means = {k: v / window_n for k, v in window.items()}
                if info.enabled:
                    vec = torch.tensor(list(means.values()), dtype=torch.float64, device=dev)
                    dist.all_reduce(vec)
                    means = dict(zip(means, (vec / info.world_size).tolist()))
                dt = time.perf_counter() - t_window
                record = {"kind": "train", "iter": it, "samples": it * tcfg.batch_size, "lr": lr,
                          **means, "samples_per_s": window_n * tcfg.batch_size / max(dt, 1e-9)}
                history.append(record)
                emit(record)
                bar.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{lr:.2e}")
                window, window_n, t_window = {}, 0, time.perf_counter()

            if val_dataset is not None and tcfg.eval_every > 0 and it % tcfg.eval_every == 0 \
                    and it < total_iters:
                ev = evaluate(net, val_dataset, device=dev, batch_size=tcfg.eval_batch_size,
                              max_samples=tcfg.eval_max_samples, num_workers=cfg.data.num_workers,
                              progress=progress, desc=f"eval@{it}")
                record = {"kind": "eval", "iter": it, "samples": it * tcfg.batch_size,
                          "split": cfg.data.val_split, "num_samples": ev.num_samples, **ev.metrics}
                eval_history.append(record)
                emit(record)
                t_window = time.perf_counter()

            if stop_after is not None and it >= stop_after and it < total_iters:
                checkpoint(it)
                break
            if it % tcfg.checkpoint_every == 0 and it < total_iters:
                checkpoint(it)
    finally:
        bar.close()
        del data_iter

    result.iterations = it
    result.samples_seen = it * tcfg.batch_size
    result.model = model
    if it >= total_iters:
        checkpoint(it)
        if info.is_main:
            result.final_weights = save_weights(model, run_dir / "model_final.safetensors", cfg)
        if val_dataset is not None and tcfg.eval_every > 0:
            ev = evaluate(net, val_dataset, device=dev, batch_size=tcfg.eval_batch_size,
                          num_workers=cfg.data.num_workers, progress=progress, desc="final eval")
            result.final_eval = ev
            record = {"kind": "eval", "iter": it, "samples": it * tcfg.batch_size, "final": True,
                      "split": cfg.data.val_split, "num_samples": ev.num_samples, **ev.metrics}
            eval_history.append(record)
            emit(record)
            if info.is_main:
                ev.save(run_dir / "eval", prefix=f"{cfg.data.val_split}_")
        _barrier(info)
    result.seconds = time.time() - t0
    return result


def _truncate_log(path: Path, iteration: int) -> None:
    """Drop log records past ``iteration`` (left by an interrupted run) before appending."""
    if not path.exists():
        return
    if iteration == 0:
        path.unlink()
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("iter", 0) <= iteration:
                keep.append(line)
        except ValueError:
            continue  # a line cut by the interruption
    atomic_write_text(path, "".join(k + "\n" for k in keep))


def read_log(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``<run_dir>/log.jsonl`` (learning curves)."""
    path = Path(run_dir) / "log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
