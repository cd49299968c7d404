"""Acceptance test: our model computes the official ReLA function (official test vectors).

The vector set (``official_config.json``, ``state_dict.safetensors``, ``inputs.npz``,
``outputs.npz``, ``outputs_lang_weight_dropped.npz``, ``compare_outputs.py``) is read from
``$GRES_OFFICIAL_VECTORS`` or, by default, ``<repo>/../shared/reference/rela_official_tiny/public``.
Everything is derived from the set's own files, so other sets made the same way (other seeds,
images, sentences) pass unchanged. The test is skipped only when the folder is absent.

Rules (the set's README §6-7, implemented here and cross-checked with the shipped comparator):

* every float array: ``max|ours − ref| <= 1e-4 · max|ref|`` (``ref_seg``: ``<= 1e-3``);
* decoder attention masks identical; a mismatch is tolerated only at the listed near-threshold
  positions, and then the decoder is rerun with the stored masks forced (teacher forcing) and
  must pass;
* ``final_mask`` identical except at fragile pixels; ``nt_pred`` identical except at ties.

``outputs_lang_weight_dropped.npz`` (the official evaluation: ``lang_weight`` never loaded)
stores no attention masks. There, a mismatch is accepted only if flipping attention-mask bits at
positions whose logit is within ``NEAR = 1e-4`` of the threshold (the README's "near 0") makes
every array pass: the same teacher-forcing rule, with the masks found instead of stored.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gres.convert import config_from_official, load_official_checkpoint
from gres.model import build_model, postprocess

from official_vectors import VECTORS  # noqa: E402

REQUIRED = ("official_config.json", "state_dict.safetensors", "inputs.npz", "outputs.npz")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not VECTORS.is_dir(),
        reason=f"official test vectors not found at {VECTORS} (set GRES_OFFICIAL_VECTORS)",
    ),
]

RTOL_ABSMAX = 1e-4  # README §7: per-array tolerance relative to max|ref|
REF_SEG_ATOL = 1e-3  # README §7: absolute tolerance on the sigmoid outputs
NT_TIE = 2e-5  # README §7: nt_pred may differ only where the two probabilities tie
SAT_HI, SAT_LO = 15.0, -80.0  # README §6: saturated channels tie at 1.0 / 0.0
NEAR = 1e-4  # README §5: |resized region logit| below which float noise may flip a mask bit
MAX_FLIPS = 4  # near-threshold flips the lang_weight-dropped search may use


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vectors() -> dict:
    missing = [f for f in REQUIRED if not (VECTORS / f).is_file()]
    if missing:
        pytest.fail(f"vector set {VECTORS} lacks {missing}")
    return {
        "cfg": json.loads((VECTORS / "official_config.json").read_text()),
        "inputs": dict(np.load(VECTORS / "inputs.npz")),
        "ref": dict(np.load(VECTORS / "outputs.npz")),
        "dropped": dict(np.load(VECTORS / "outputs_lang_weight_dropped.npz"))
        if (VECTORS / "outputs_lang_weight_dropped.npz").is_file()
        else None,
    }


@pytest.fixture(scope="module")
def model(vectors):
    torch.manual_seed(0)
    cfg = config_from_official(vectors["cfg"], VECTORS)
    return build_model(cfg).eval()


def _inputs(vectors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    inp = vectors["inputs"]
    if "image_u8" in inp:  # (B, H, W, 3) uint8
        image = torch.from_numpy(inp["image_u8"]).permute(0, 3, 1, 2)
    else:  # (B, 3, H, W) float32 0..255
        image = torch.from_numpy(inp["image"])
    return image, torch.from_numpy(inp["lang_tokens"]), torch.from_numpy(inp["lang_mask"]).bool()


# --------------------------------------------------------------------------------------------------
# Candidate arrays in the vector layout, and the README's comparison rule
# --------------------------------------------------------------------------------------------------
def _final_arrays(out, size: tuple[int, int]) -> dict[str, np.ndarray]:
    ref_seg = F.interpolate(out.mask_logits, size=size, mode="bilinear", align_corners=False)
    ref_seg = ref_seg.sigmoid()
    pred_mask, pred_nt, _ = postprocess(out, size)
    return {
        "pred_masks": out.mask_logits.numpy(),
        "pred_logits": out.region_logits.numpy(),
        "all_masks": out.region_masks.numpy(),
        "nt_label": out.nt_logits.numpy(),
        "ref_seg": ref_seg.numpy(),
        "nt_prob": out.nt_logits.sigmoid().numpy(),
        "final_mask": pred_mask.numpy().astype(np.uint8),
        "nt_pred": pred_nt.long().numpy(),
    }


def _candidate(out, size: tuple[int, int]) -> dict[str, np.ndarray]:
    cand = {k: v.numpy() for k, v in out.extras.items()}
    cand.update(_final_arrays(out, size))
    return cand


def _fragile_pixels(ref: dict[str, np.ndarray], size: tuple[int, int]) -> np.ndarray:
    logits = F.interpolate(torch.from_numpy(ref["pred_masks"]).double(), size=size, mode="bilinear",
                           align_corners=False).numpy()
    eps = RTOL_ABSMAX * float(np.abs(ref["pred_masks"]).max())
    lo, hi = np.minimum(logits[:, 0], logits[:, 1]), np.maximum(logits[:, 0], logits[:, 1])
    tie = np.abs(logits[:, 1] - logits[:, 0]) <= 2 * eps
    return tie | (lo >= SAT_HI - eps) | (hi <= SAT_LO + eps)


def _compare(ref: dict, cand: dict, *, skip_masks: bool = False) -> list[str]:
    """Failures of ``cand`` against ``ref`` (the README rule without the mask-flip logic)."""
    fails = []
    size = tuple(ref["final_mask"].shape[-2:]) if "final_mask" in ref else None
    for k, a in ref.items():
        if k.startswith(("dec_attn_logit_", "dec_attn_near0_")):
            continue  # diagnostics
        if skip_masks and k.startswith("dec_attn_mask"):
            continue
        if k not in cand:
            fails.append(f"{k}: missing")
            continue
        b = np.asarray(cand[k])
        if b.shape != a.shape:
            fails.append(f"{k}: shape {b.shape} != {a.shape}")
        elif k == "final_mask":
            diff = a != b
            bad = int((diff & ~_fragile_pixels(ref, size)).sum())
            own = np.argmax(cand["ref_seg"], axis=1).astype(b.dtype)
            if bad or not np.array_equal(own, b):
                fails.append(f"final_mask: {int(diff.sum())} pixels differ, {bad} not fragile")
        elif k == "nt_pred":
            tie = np.abs(ref["nt_prob"][:, 1] - ref["nt_prob"][:, 0]) <= NT_TIE
            if ((a != b) & ~tie).any():
                fails.append(f"nt_pred: {b.tolist()} vs {a.tolist()}")
        elif a.dtype.kind in "biu":
            if not np.array_equal(a, b):
                fails.append(f"{k}: not identical ({int((a != b).sum())} of {a.size} differ)")
        else:
            d = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())
            tol = REF_SEG_ATOL if k == "ref_seg" else RTOL_ABSMAX * float(np.abs(a).max())
            if not np.isfinite(d) or d > tol:
                fails.append(f"{k}: max|diff| {d:.3e} > tol {tol:.3e}")
    return fails


def _mask_flips(ref: dict, cand: dict) -> tuple[list[int], list[str]]:
    """Layers whose attention masks differ only at listed near-threshold positions, and fails."""
    flipped, fails = [], []
    i = 0
    while f"dec_attn_mask{i}" in ref:
        a, b = ref[f"dec_attn_mask{i}"], cand[f"dec_attn_mask{i}"]
        bad = np.flatnonzero((a != b).reshape(-1))
        if bad.size:
            allowed = np.isin(bad, ref.get(f"dec_attn_near0_idx{i}", np.zeros(0, np.int64)))
            if allowed.all():
                flipped.append(i)
            else:
                n_bad = int((~allowed).sum())
                fails.append(f"dec_attn_mask{i}: {n_bad} bits differ away from the threshold")
        i += 1
    return flipped, fails


def _run_comparator(cand: dict, tmp_path: Path, forced: bool) -> subprocess.CompletedProcess:
    path = tmp_path / ("cand_forced.npz" if forced else "cand.npz")
    np.savez(path, **cand)
    args = [sys.executable, str(VECTORS / "compare_outputs.py"), str(VECTORS), str(path)]
    return subprocess.run(args + (["--forced"] if forced else []), capture_output=True, text=True,
                          timeout=300)


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------
def test_tokenizer_reproduces_the_stored_tokens(vectors):
    from gres.model.text import build_tokenizer, tokenize

    inp = vectors["inputs"]
    vocab = vectors["cfg"]["text"].get("vocab_file")
    if "sentences" not in inp or not vocab:
        pytest.skip("this set stores no sentences / vocabulary")
    tok = build_tokenizer(str(VECTORS / vocab))
    sentences = [str(s) for s in inp["sentences"]]
    ids, mask = tokenize(tok, sentences, vectors["cfg"]["text"]["max_tokens"])
    assert np.array_equal(ids.numpy(), inp["lang_tokens"])
    assert np.array_equal(mask.numpy(), inp["lang_mask"].astype(bool))


def test_conversion_is_strict_and_complete(model):
    report = load_official_checkpoint(
        model, VECTORS / "state_dict.safetensors", use_stored_lang_weight=True
    )
    assert report.ok and not report.missing and not report.unexpected
    assert all(k.endswith("relative_position_index") for k in report.dropped)


def test_matches_official_outputs_with_stored_lang_weight(vectors, model, tmp_path):
    ref = vectors["ref"]
    load_official_checkpoint(model, VECTORS / "state_dict.safetensors", use_stored_lang_weight=True)
    lw = float(vectors["cfg"]["decoder"].get("lang_weight", model.decoder.lang_weight.item()))
    assert model.decoder.lang_weight.item() == pytest.approx(lw)
    size = tuple(ref["final_mask"].shape[-2:])
    with torch.no_grad():
        out = model(*_inputs(vectors), return_extras=True)
    cand = _candidate(out, size)
    flipped, mask_fails = _mask_flips(ref, cand)
    assert not mask_fails, mask_fails
    if flipped:  # README §6: rerun with the stored masks forced into the decoder
        n_layers = len(out.extras["dec_attn_full_rows"])
        forced = [torch.from_numpy(ref[f"dec_attn_mask{i}"]) for i in range(n_layers)]
        with torch.no_grad():
            out = model(*_inputs(vectors), return_extras=True, forced_attn_masks=forced)
        cand = _candidate(out, size)
    fails = _compare(ref, cand, skip_masks=bool(flipped))
    assert not fails, "\n".join(fails)
    result = _run_comparator(cand, tmp_path, forced=bool(flipped))
    assert result.returncode == 0, result.stdout + result.stderr


def _near_threshold_search(model, vectors, ref: dict, size) -> tuple[list[str], list[tuple]]:
    """Greedy teacher forcing at near-threshold mask positions (for sets without stored masks).

    Runs the decoder on our own pixel-decoder / text outputs; each step tries flipping one bit
    whose logit is within NEAR of the threshold (earliest layers first) and keeps the flip that
    lowers the worst normalised error most. Returns (remaining failures, flips used).
    """
    with torch.no_grad():
        base = model(*_inputs(vectors), return_extras=True)
    ex = base.extras
    ms = [ex[f"pixdec_ms{i}"] for i in range(3)]
    mf, lang = ex["pixdec_mask_features"], ex["text_last_hidden_state"]
    n_layers = len(ex["dec_attn_full_rows"])

    def run(forced):
        with torch.no_grad():
            return model.decoder(ms, mf, lang, return_extras=True, forced_attn_masks=forced)

    def error(dec) -> float:
        arrays = _final_arrays(dec, size)
        worst = 0.0
        for k in ("pred_masks", "pred_logits", "all_masks", "nt_label"):
            if k in ref:
                d = np.abs(ref[k].astype(np.float64) - arrays[k]).max()
                worst = max(worst, d / (RTOL_ABSMAX * np.abs(ref[k]).max()))
        return worst

    forced: list = [None] * n_layers
    flips: list[tuple] = []
    current = run(forced)
    for _ in range(MAX_FLIPS):
        if not _compare(ref, _final_arrays(current, size)):
            break
        best = (error(current), None)
        for layer in range(n_layers):
            logits = current.extras[f"dec_attn_logits{layer}"]
            # masks used so far: the forced ones, else the computed ones
            used = [
                forced[j] if forced[j] is not None else current.extras[f"dec_attn_mask{j}"]
                for j in range(layer + 1)
            ]
            for b, q, p in (logits.abs() < NEAR).nonzero().tolist():
                trial = list(used)
                trial[layer] = trial[layer].clone()
                trial[layer][b, q, p] = ~trial[layer][b, q, p]
                trial += [None] * (n_layers - layer - 1)
                err = error(run(trial))
                if err < best[0]:
                    best = (err, (trial, (layer, b, q, p, float(logits[b, q, p]))))
        if best[1] is None:
            break
        forced, flip = best[1]
        flips.append(flip)
        current = run(forced)
    return _compare(ref, _final_arrays(current, size)), flips


def test_matches_official_evaluation_with_lang_weight_dropped(vectors, model):
    ref = vectors["dropped"]
    if ref is None:
        pytest.skip("this set has no outputs_lang_weight_dropped.npz")
    report = load_official_checkpoint(model, VECTORS / "state_dict.safetensors")
    assert model.decoder.lang_weight.item() == 0.0
    assert any("lang_weight" in n for n in report.notes)
    size = tuple(ref["final_mask"].shape[-2:])
    with torch.no_grad():
        out = model(*_inputs(vectors))
    arrays = _final_arrays(out, size)
    # discrete decisions must agree without any forcing
    discrete = {k: ref[k] for k in ("final_mask", "nt_pred", "nt_prob", "pred_masks") if k in ref}
    fails = [f for f in _compare(discrete, arrays) if f.startswith(("final_mask", "nt_pred"))]
    assert not fails, fails
    fails = _compare(ref, arrays)
    if fails:  # a near-threshold mask bit may flip: find it (README §6 rule without stored masks)
        fails, flips = _near_threshold_search(model, vectors, ref, size)
        assert flips, f"no near-threshold flip explains the difference: {fails}"
        assert all(abs(f[-1]) < NEAR for f in flips)
    assert not fails, "\n".join(fails)
