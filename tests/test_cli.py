"""The ``gres`` command line: help, --set overrides, train/eval/predict/convert, error exits."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from gres import engine
from gres.cli import apply_overrides, main
from gres.config import PRESETS

SMALL = ["--set", "train.batch_size=2", "--set", "train.eval_every=0", "--set",
         "train.checkpoint_every=2", "--no-progress"]


@pytest.fixture(scope="module")
def data_root(tiny_synthetic):
    return tiny_synthetic


@pytest.fixture(scope="module")
def run(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "cli-run"
    code = main(["train", "--preset", "tiny-test", "--data-root", str(data_root), "--out", str(out),
                 "--set", "train.max_iters=2", *SMALL])
    assert code == 0
    return out


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for cmd in ("train", "eval", "predict", "convert"):
        assert cmd in text
        with pytest.raises(SystemExit) as exit_:
            main([cmd, "--help"])
        assert exit_.value.code == 0
        assert f"usage: gres {cmd}" in capsys.readouterr().out
    proc = subprocess.run([sys.executable, "-m", "gres.cli", "predict", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "--expression" in proc.stdout and "--nt-threshold" in proc.stdout


def test_overrides_are_typed():
    cfg = apply_overrides(PRESETS["tiny-test"](), [
        "train.lr=1e-4", "train.max_iters=1e3", "model.swin.depths=[1,2,1,1]",
        "train.max_samples=none", "train.amp=true", "data.root=elsewhere",
        "train.betas=0.8,0.95", "model.decoder.rla_weight=0.5",
    ])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_iters == 1000 and isinstance(cfg.train.max_iters, int)
    assert cfg.model.swin.depths == (1, 2, 1, 1)
    assert cfg.train.max_samples is None and cfg.train.amp is True
    assert cfg.data.root == "elsewhere" and cfg.train.betas == (0.8, 0.95)
    assert cfg.model.decoder.rla_weight == 0.5
    base = PRESETS["tiny-test"]()
    with pytest.raises(ValueError, match=r"unknown config key 'lrr'.*valid keys"):
        apply_overrides(base, ["train.lrr=1"])
    with pytest.raises(ValueError, match="is a section"):
        apply_overrides(base, ["train=1"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        apply_overrides(base, ["train.lr"])
    with pytest.raises(ValueError, match="cannot parse 'fast'"):
        apply_overrides(base, ["train.lr=fast"])
    assert base.train.lr == PRESETS["tiny-test"]().train.lr  # the input config is unchanged


def test_train_resume_eval_predict(run, data_root, tmp_path, capsys):
    assert (run / "config.json").is_file() and (run / "model_final.safetensors").is_file()
    assert engine.latest_checkpoint(run).name == "iter_0000002"
    capsys.readouterr()
    # A longer budget on the same run folder: --resume continues from iteration 2.
    code = main(["train", "--preset", "tiny-test", "--data-root", str(data_root), "--out", str(run),
                 "--resume", "--set", "train.max_iters=3", *SMALL])
    assert code == 0 and "trained 3 iterations" in capsys.readouterr().out

    code = main(["eval", "--checkpoint", str(run), "--split", "val", "--max-samples", "10",
                 "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "gIoU" in out and "val (10 samples" in out
    assert len((run / "eval" / "val_records.csv").read_text().splitlines()) == 11

    image = sorted((data_root / "images" / "train2014").iterdir())[0]
    overlay = tmp_path / "overlay.png"
    code = main(["predict", "--image", str(image), "--expression", "the red circle",
                 "--expression", "two squares",
                 "--checkpoint", str(run / "model_final.safetensors"), "--out", str(overlay)])
    out = capsys.readouterr().out
    assert code == 0 and out.count("no-target probability") == 2 and overlay.is_file()


def test_error_exits(run, data_root, tmp_path, capsys):
    code = main(["train", "--preset", "tiny-test", "--data-root", str(tmp_path / "missing"),
                 "--out", str(tmp_path / "r"), *SMALL])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    code = main(["train", "--preset", "no-such-preset", "--out", str(tmp_path / "r")])
    assert code == 2 and "unknown preset" in capsys.readouterr().err
    code = main(["eval", "--checkpoint", str(run / "model_final.safetensors"), "--preset",
                 "tiny-test", "--set", "model.decoder.hidden_dim=16",
                 "--data-root", str(data_root)])
    assert code == 2 and "does not match the model config" in capsys.readouterr().err
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image at all")
    code = main(["predict", "--image", str(broken), "--expression", "x", "--checkpoint", str(run)])
    assert code == 2 and "broken.jpg" in capsys.readouterr().err
    code = main(["eval", "--checkpoint", str(tmp_path / "nothing.safetensors")])
    assert code == 2 and "not found" in capsys.readouterr().err


def test_convert_official_layout(run, tmp_path, capsys):
    """Our weights exported under the official names and converted back are unchanged."""
    from gres.convert import ours_to_official

    ours = load_file(str(run / "model_final.safetensors"))
    official = tmp_path / "official.pth"
    torch.save({"model": ours_to_official(ours), "iteration": 3}, official)
    out = tmp_path / "converted.safetensors"
    code = main(["convert", "--official", str(official), "--preset", "tiny-test", "--out", str(out),
                 "--use-stored-lang-weight"])
    assert code == 0 and "converted" in capsys.readouterr().out
    back = load_file(str(out))
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)
    model = engine.prepare_model(PRESETS["tiny-test"](), load_pretrained=False)
    engine.load_weights(model, out)  # loads strictly into the preset's architecture
    code = main(["convert", "--official", str(tmp_path / "absent.pth"), "--preset", "tiny-test",
                 "--out", str(out)])
    assert code == 2 and "not found" in capsys.readouterr().err
