"""gres.utils: seeding, run records, train-or-load cache and glue text."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch

from gres import utils


def test_seed_everything_reproduces_all_generators():
    def draw():
        return (random.random(), np.random.rand(), torch.rand(3).tolist())

    utils.seed_everything(123)
    a = draw()
    utils.seed_everything(123)
    b = draw()
    utils.seed_everything(124)
    c = draw()
    assert a == b and a != c
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    with pytest.raises(ValueError, match="non-negative"):
        utils.seed_everything(-1)


def test_make_generator_and_worker_seed():
    g1, g2 = utils.make_generator(7), utils.make_generator(7)
    assert torch.equal(torch.randperm(20, generator=g1), torch.randperm(20, generator=g2))
    torch.manual_seed(5)
    utils.seed_worker(0)
    x = np.random.rand()
    torch.manual_seed(5)
    utils.seed_worker(0)
    assert np.random.rand() == x


def test_resolve_device():
    assert utils.resolve_device("auto") in ("cpu", "cuda")
    assert utils.resolve_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            utils.resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        utils.resolve_device("tpu9")


@dataclass(frozen=True)
class _Cfg:
    width: int = 8
    sizes: tuple[int, ...] = (1, 2)


def test_start_run_writes_params_and_env(tmp_path):
    run = utils.start_run(tmp_path, "05_training", {"seed": 0, "preset": "tiny", "ids": (1, 2)},
                          cfg=_Cfg(), run_name="smoke", device="cpu", style=False)
    assert run.dir == tmp_path / "05_training" / "smoke" and run.dir.is_dir()
    params = json.loads((run.dir / "params.json").read_text())
    assert params == {"seed": 0, "preset": "tiny", "ids": [1, 2],
                      "config": {"width": 8, "sizes": [1, 2]}}
    env = json.loads((run.dir / "env.json").read_text())
    assert env["device"] == "cpu" and run.device == "cpu"
    assert env["versions"]["torch"] == torch.__version__.split("+")[0] or \
        env["versions"]["torch"].startswith(torch.__version__.split("+")[0])
    git = env["git"]
    assert set(git) == {"sha", "short_sha", "branch", "dirty"}
    if git["sha"] is not None:  # inside the repository
        assert len(git["sha"]) == 40 and isinstance(git["dirty"], bool)
    summary = run.summary()
    assert summary.loc["device", "value"] == "cpu"
    assert summary.loc["param seed", "value"] == "0"
    p = run.save_json("metrics.json", {"gIoU": np.float32(0.5)})
    assert json.loads(p.read_text()) == {"gIoU": 0.5}
    with pytest.raises(ValueError, match="plain name"):
        utils.start_run(tmp_path, "a/b")


@pytest.mark.parametrize("suffix", [".pt", ".json", ".csv", ".npz", ".pkl"])
def test_cached_computes_once_then_loads(tmp_path, suffix, capsys):
    calls = []

    def make():
        calls.append(1)
        if suffix == ".csv":
            return pd.DataFrame({"a": [1, 2]})
        if suffix == ".npz":
            return {"x": np.arange(3)}
        return {"w": [1.0, 2.0]}

    path = tmp_path / "sub" / f"thing{suffix}"
    first = utils.cached(path, make)
    assert "computed" in capsys.readouterr().out
    second = utils.cached(path, make)
    assert "loaded from" in capsys.readouterr().out
    assert len(calls) == 1 and path.exists()
    if suffix == ".csv":
        pd.testing.assert_frame_equal(first, second)
    elif suffix == ".npz":
        np.testing.assert_array_equal(first["x"], second["x"])
    else:
        assert first == second
    utils.cached(path, make, force=True, verbose=False)
    assert len(calls) == 2
    assert not list(path.parent.glob(".*tmp*"))  # no temporary file left behind


def test_cached_failure_leaves_no_file(tmp_path):
    def boom():
        raise RuntimeError("training diverged")

    path = tmp_path / "ckpt.pt"
    with pytest.raises(RuntimeError, match="diverged"):
        utils.cached(path, boom)
    assert not path.exists()
    with pytest.raises(ValueError, match="no default format"):
        utils.cached(tmp_path / "x.weird", lambda: 1)


def test_format_value_and_glued_text():
    assert utils.format_value(62.4167) == "62.42"
    assert utils.format_value(278232) == "278,232"
    assert utils.format_value(0.5634, ".1%") == "56.3%"
    assert utils.format_value(3.14159, "{:.1f} %") == "3.1 %"
    t = utils.GluedText("62.42")
    assert repr(t) == "62.42" and str(t) == "62.42"  # no quotes in {glue:} output


def test_glue_publishes_plain_text(monkeypatch):
    published = {}

    def fake_glue(name, obj, display=True):
        published[name] = (obj, display)

    import myst_nb

    monkeypatch.setattr(myst_nb, "glue", fake_glue)
    assert utils.glue("x", 12.3456, fmt=".1f") is None  # nothing echoed at the end of a cell
    obj, display = published["x"]
    assert isinstance(obj, utils.GluedText) and repr(obj) == "12.3" and display is False
    utils.glue("n", np.int64(278232))
    assert repr(published["n"][0]) == "278,232"
    frame = pd.DataFrame({"a": [1]})
    utils.glue("table", frame)
    assert published["table"][0] is frame  # rich objects are glued as themselves
