"""Does the opt-in compiled model (``gres.model.compile_for_inference``) still match the official
code? Runs the official test vectors (the set of ``tests/test_official_equivalence.py``) through
the eager and the compiled model, as the official evaluation runs (``lang_weight`` dropped), and
applies that test's comparison rule to the final outputs (mask logits, region logits, region
masks, no-target logits and probabilities, final masks and decisions).

Not a test: compiling takes minutes. ``OMP_NUM_THREADS=1 .venv/bin/python
bench/check_compiled_official.py [--json bench/results/compiled_official.json]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    import test_official_equivalence as t
    from gres.convert import config_from_official, load_official_checkpoint
    from gres.model import build_model, compile_for_inference

    torch.set_num_threads(1)
    vectors = {
        "cfg": json.loads((t.VECTORS / "official_config.json").read_text()),
        "inputs": dict(t.np.load(t.VECTORS / "inputs.npz")),
        "ref": dict(t.np.load(t.VECTORS / "outputs_lang_weight_dropped.npz")),
    }
    torch.manual_seed(0)
    model = build_model(config_from_official(vectors["cfg"], t.VECTORS)).eval()
    load_official_checkpoint(model, t.VECTORS / "state_dict.safetensors")
    ref = vectors["ref"]
    size = tuple(ref["final_mask"].shape[-2:])
    inputs = t._inputs(vectors)
    report = {"vectors": str(t.VECTORS)}
    with torch.inference_mode():
        eager = t._final_arrays(model(*inputs), size)
        report["eager_failures"] = t._compare(ref, eager)
        compile_for_inference(model)
        t0 = time.perf_counter()
        compiled = t._final_arrays(model(*inputs), size)
        report["compile_seconds"] = time.perf_counter() - t0
    report["compiled_failures"] = t._compare(ref, compiled)
    report["compiled_vs_eager_max_abs"] = {
        k: float(abs(compiled[k].astype("float64") - eager[k].astype("float64")).max())
        for k in compiled
    }
    report["final_mask_equal"] = bool((compiled["final_mask"] == ref["final_mask"]).all())
    report["nt_pred_equal"] = bool((compiled["nt_pred"] == ref["nt_pred"]).all())
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0 if not report["compiled_failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
