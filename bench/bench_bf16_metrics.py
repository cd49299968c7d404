"""bf16 inference against fp32 on the synthetic benchmark (issue: "within 0.2 gIoU of fp32").

    .venv/bin/python bench/bench_bf16_metrics.py [--preset cpu-small] [--split val] [--root DIR]

Loads the book's trained model of ``--preset`` from the experiment cache (it trains it first when
the cache has none: about 10 CPU-minutes for ``cpu-small``), evaluates the split with the official
evaluator in fp32, then evaluates an inference copy cast with
:func:`gres.model.gres_model.cast_for_bf16_inference` under ``torch.autocast("cpu", bfloat16)``,
and reports both metric sets, their differences, and how many per-sample decisions changed.
Results go to ``bench/results/bf16_metrics.json``; the summary is in bench/RESULTS.md, "Model".
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu-small")
    ap.add_argument("--split", default="val")
    ap.add_argument("--root", default=None, help="experiment cache (default outputs/experiments)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile", action="store_true",
                    help="also torch.compile the bf16 copy (gres.model.compile_for_inference)")
    ap.add_argument("--out", default=None,
                    help="default bench/results/bf16_metrics.json (bf16_compile_metrics.json)")
    args = ap.parse_args()

    import torch

    from gres import engine, experiments
    from gres.model.gres_model import cast_for_bf16_inference, compile_for_inference

    if args.out is None:
        name = "bf16_compile_metrics.json" if args.compile else "bf16_metrics.json"
        args.out = str(ROOT / "bench" / "results" / name)

    torch.set_num_threads(args.threads)
    cfg = experiments.preset(args.preset)
    run = experiments.train_or_load(cfg, root=args.root, progress=False)
    model = run.model().eval()
    dataset = engine.build_dataset(cfg, args.split)

    results = {}
    with torch.no_grad():
        t0 = time.perf_counter()
        results["fp32"] = engine.evaluate(model, dataset, batch_size=32, progress=True,
                                          desc="fp32")
        t_fp32 = time.perf_counter() - t0
        fast = cast_for_bf16_inference(copy.deepcopy(model))
        if args.compile:
            compile_for_inference(fast)  # compile time is included in the bf16 seconds
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results["bf16"] = engine.evaluate(fast, dataset, batch_size=32, progress=True,
                                              desc="bf16")
        t_bf16 = time.perf_counter() - t0

    a, b = results["fp32"], results["bf16"]
    nt_changed = sum(x["pred_nt"] != y["pred_nt"] for x, y in zip(a.records, b.records))
    iou_diff = [abs(x["IoU"] - y["IoU"]) for x, y in zip(a.records, b.records)]
    report = {
        "preset": args.preset,
        "run_dir": str(run.dir),
        "split": args.split,
        "num_samples": a.num_samples,
        "threads": args.threads,
        "compiled": args.compile,
        "fp32": a.metrics,
        "bf16": b.metrics,
        "diff_bf16_minus_fp32": {k: b.metrics[k] - a.metrics[k] for k in a.metrics},
        "nt_decisions_changed": nt_changed,
        "max_abs_sample_iou_diff": max(iou_diff),
        "mean_abs_sample_iou_diff": sum(iou_diff) / len(iou_diff),
        "seconds": {"fp32": t_fp32, "bf16": t_bf16},
        "load_average": os.getloadavg()[0],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
