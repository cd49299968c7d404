"""Reproducibility plumbing shared by the CLI, the engine and the book.

* :func:`seed_everything` seeds ``random``, NumPy and torch (CPU and CUDA) and sets the cuDNN
  flags; :func:`make_generator` / :func:`seed_worker` make DataLoaders reproducible (STYLE §3.6.4).
* :func:`start_run` creates ``<output_root>/<chapter>/<run_name>/`` and writes ``params.json``
  (the parameters and the config) and ``env.json`` (git SHA, dirty flag, library versions,
  device) beside every result (STYLE §3.6.2, §3.6.6).
* :func:`cached` is the train-or-load helper (STYLE §3.6.5): load ``path`` if it exists,
  otherwise compute, save and say so.
* :func:`glue` wraps ``myst_nb.glue`` so that numbers render in prose as plain formatted text.
* :func:`file_lock` serialises processes that build the same cached file (pretrained backbones,
  text-feature stores).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import os
import pickle
import platform
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Exclusive ``flock`` on the file ``path`` (created, with its folder, if missing) for the
    ``with`` block: parallel processes that need the same cached result compute it once."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------------
# Seeds and devices
# --------------------------------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in ``chunk``-byte pieces (dataset manifests, checks)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def seed_everything(seed: int, deterministic: bool = True) -> int:
    """Seed Python, NumPy and torch (all devices); optionally make cuDNN deterministic.

    ``PYTHONHASHSEED`` is set for child processes (DataLoader workers); the current interpreter's
    string hashing cannot be changed after start-up.

    Args:
        seed: any non-negative integer.
        deterministic: set ``cudnn.deterministic = True`` and ``cudnn.benchmark = False``.

    Returns:
        The seed, for logging.
    """
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    return seed


def make_generator(seed: int) -> "torch.Generator":  # noqa: F821
    """A CPU ``torch.Generator`` seeded with ``seed`` (for DataLoader shuffling and splits)."""
    import torch

    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: derive NumPy/random seeds from torch's per-worker seed."""
    import torch

    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def resolve_device(device: str = "auto") -> str:
    """``"auto"`` -> ``"cuda"`` when available else ``"cpu"``; other names are checked.

    Raises:
        ValueError: CUDA requested but not available, or an unknown device string.
    """
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    dev = str(device)
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {dev!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    try:
        torch.device(dev)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {dev!r}: {exc}") from exc
    return dev


# --------------------------------------------------------------------------------------------------
# Environment record
# --------------------------------------------------------------------------------------------------
def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=20, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_info() -> dict[str, Any]:
    """Commit SHA, branch and whether tracked files differ from that commit (``dirty``)."""
    sha = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "sha": sha,
        "short_sha": sha[:10] if sha else None,
        "branch": _git("rev-parse", "--abbrev-ref", "HEAD"),
        "dirty": bool(status) if status is not None else None,
    }


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # not installed
        return None


def environment(device: str = "auto") -> dict[str, Any]:
    """Everything needed to say where a number came from (written to ``env.json``)."""
    import torch

    dev = resolve_device(device)
    cuda = torch.cuda.is_available()
    return {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git": git_info(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "env_threads": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")},
        "device": dev,
        "cuda_available": cuda,
        "cuda_version": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "versions": {
            name: _version(name)
            for name in (
                "gres", "torch", "torchvision", "timm", "transformers", "tokenizers", "numpy",
                "pandas", "matplotlib", "pycocotools", "jupyter-book", "myst-nb", "papermill",
            )
        },
    }


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (dataclasses, paths and NumPy scalars converted)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")
    return path


# --------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One executed chapter or CLI run.

    Attributes:
        dir: ``<output_root>/<chapter>/<run_name>/``; everything the run writes goes below it.
        chapter: chapter (or command) name.
        params: the parameters as recorded in ``params.json``.
        env: the environment as recorded in ``env.json``.
        device: the resolved device (``"cpu"``, ``"cuda"``, ...).
    """

    dir: Path
    chapter: str
    params: dict[str, Any]
    env: dict[str, Any]
    device: str

    def path(self, *parts: str, mkdir: bool = True) -> Path:
        """``self.dir / parts``, creating the parent folder."""
        p = self.dir.joinpath(*parts)
        if mkdir:
            p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def save_json(self, name: str, obj: Any) -> Path:
        """Write ``obj`` to ``self.dir / name`` (e.g. ``"metrics.json"``)."""
        return write_json(self.path(name), obj)

    def summary(self) -> "pd.DataFrame":  # noqa: F821
        """A two-column table (item, value) for a hidden cell of the chapter."""
        import pandas as pd

        git = self.env.get("git", {})
        rows = [
            ("chapter", self.chapter),
            ("output folder", str(self.dir)),
            ("git commit", f"{git.get('short_sha')}{' (dirty)' if git.get('dirty') else ''}"),
            ("device", self.device),
            ("python", self.env.get("python")),
        ]
        rows += [(k, v) for k, v in self.env.get("versions", {}).items()
                 if k in ("torch", "transformers", "timm") and v]
        rows += [(f"param {k}", repr(v)) for k, v in self.params.items() if k != "config"]
        return pd.DataFrame(rows, columns=["item", "value"]).set_index("item")


def start_run(
    output_root: str | Path,
    chapter: str,
    params: Mapping[str, Any] | None = None,
    cfg: Any = None,
    run_name: str = "default",
    device: str = "auto",
    style: bool = True,
) -> Run:
    """Create the run folder and record ``params.json`` and ``env.json``.

    Args:
        output_root: root of all outputs (``outputs/`` at the repository top by default).
        chapter: e.g. ``"05_training"``.
        params: the chapter's parameters (the papermill ``parameters`` cell values).
        cfg: optional config dataclass (stored under ``"config"`` in ``params.json``).
        run_name: sub-folder name, so that several parameter sets can coexist.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ... (resolved and recorded).
        style: also call :func:`gres.viz.use_book_style` (figures in the book).

    Returns:
        The :class:`Run` (``run.dir`` exists).
    """
    if not chapter or "/" in chapter or "\\" in chapter:
        raise ValueError(f"chapter must be a plain name, got {chapter!r}")
    run_dir = Path(output_root) / chapter / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = dict(_jsonable(dict(params or {})))
    if cfg is not None:
        record["config"] = _jsonable(cfg)
    env = environment(device)
    write_json(run_dir / "params.json", record)
    write_json(run_dir / "env.json", env)
    if style:
        from gres import viz

        viz.use_book_style()
    return Run(dir=run_dir, chapter=chapter, params=record, env=env, device=env["device"])


# --------------------------------------------------------------------------------------------------
# Train-or-load
# --------------------------------------------------------------------------------------------------
def _save(path: Path, obj: Any) -> None:
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth", ".ckpt"):
        import torch

        torch.save(obj, path)
    elif suffix == ".json":
        write_json(path, obj)
    elif suffix == ".csv":
        obj.to_csv(path, index=False)
    elif suffix == ".parquet":
        obj.to_parquet(path)
    elif suffix == ".npz":
        np.savez_compressed(path, **obj)
    elif suffix == ".npy":
        np.save(path, obj)
    elif suffix in (".pkl", ".pickle"):
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    else:
        raise ValueError(f"cached: no default format for {path.name!r}; pass save= and load=")


def _load(path: Path) -> Any:
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth", ".ckpt"):
        import torch

        return torch.load(path, map_location="cpu", weights_only=False)
    if suffix == ".json":
        return json.loads(path.read_text())
    if suffix == ".csv":
        import pandas as pd

        return pd.read_csv(path)
    if suffix == ".parquet":
        import pandas as pd

        return pd.read_parquet(path)
    if suffix == ".npz":
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    if suffix == ".npy":
        return np.load(path)
    if suffix in (".pkl", ".pickle"):
        with open(path, "rb") as f:
            return pickle.load(f)
    raise ValueError(f"cached: no default format for {path.name!r}; pass save= and load=")


def cached(
    path: str | Path,
    fn: Callable[[], Any],
    *,
    save: Callable[[Path, Any], None] | None = None,
    load: Callable[[Path], Any] | None = None,
    force: bool = False,
    verbose: bool = True,
) -> Any:
    """Train-or-load: return ``load(path)`` if ``path`` exists, else ``fn()`` saved to ``path``.

    The default format follows the suffix (``.pt``/``.pth``/``.ckpt`` torch, ``.json``, ``.csv``
    and ``.parquet`` pandas, ``.npz``/``.npy`` NumPy, ``.pkl``). The file is written to a temporary
    name first and renamed, so an interrupted run never leaves a truncated cache behind. Put a
    config hash in ``path`` (:func:`gres.config.config_hash`) so that a changed config never
    reuses a stale result.

    Args:
        path: cache file.
        fn: computes the value (e.g. trains a model and returns its state_dict).
        save: ``save(path, obj)``; default by suffix.
        load: ``load(path) -> obj``; default by suffix.
        force: recompute even if the file exists.
        verbose: print a "loaded from ..." or "computed ... in N s" line.
    """
    path = Path(path)
    if path.exists() and not force:
        obj = (load or _load)(path)
        if verbose:
            print(f"[cached] loaded from {path}")
        return obj
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    obj = fn()
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        (save or _save)(tmp, obj)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    if verbose:
        print(f"[cached] computed in {time.perf_counter() - t0:.1f} s, saved to {path}")
    return obj


# --------------------------------------------------------------------------------------------------
# Glue
# --------------------------------------------------------------------------------------------------
class GluedText:
    """A value whose plain-text representation is exactly ``text`` (no quotes).

    ``myst_nb.glue`` stores an object's ``text/plain`` repr; gluing a ``str`` directly would show
    the quotes in the book (``'62.42'``). The notebook output and ``{glue:}`` both show ``text``.
    """

    def __init__(self, text: str) -> None:
        self.text = str(text)

    def __repr__(self) -> str:
        return self.text

    def __str__(self) -> str:
        return self.text

    def _repr_markdown_(self) -> str:  # lets ``{glue:md}`` work as well
        return self.text


def format_value(value: Any, fmt: str | None = None) -> str:
    """Format a number for prose: ``fmt`` if given, else 2 decimals for floats, commas for ints."""
    if fmt is not None:
        return format(value, fmt) if not fmt.startswith("{") else fmt.format(value)
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.2f}"
    return str(value)


def glue(name: str, value: Any, fmt: str | None = None, display: bool = False) -> None:
    """Glue ``value`` under ``name`` for ``{glue:}`name``` in the prose.

    Returns nothing, so that a ``glue(...)`` call ending a cell prints nothing.

    Numbers and strings are glued as plain text formatted with :func:`format_value`; figures and
    DataFrames are glued as themselves (``{glue:figure}`` / ``{glue:}``).

    Args:
        name: glue key (unique in the chapter).
        value: number, string, ``matplotlib`` figure or ``pandas`` object.
        fmt: format spec (``".1f"``) or template (``"{:.1f} %"``) for numbers.
        display: also show the value in the cell output.
    """
    from myst_nb import glue as _glue

    if isinstance(value, (str, int, float, np.generic)):
        _glue(name, GluedText(format_value(value, fmt)), display=display)
    else:
        _glue(name, value, display=display)
