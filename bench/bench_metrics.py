"""Benchmark: scoring samples with `gres.metrics.GRESMetrics` (target: 10k at 480x480 < 2 s).

Usage::

    .venv/bin/python bench/bench_metrics.py                      # 10,000 samples, 480x480
    .venv/bin/python bench/bench_metrics.py --threads 1,2 --repeats 5

The masks come from a pool of distinct pre-generated batches (random rectangles, about 20%
no-target) that is cycled through, so the timed loop reads masks from main memory like a real
evaluation does (the pool, 2 x pool_batches x batch x S² bytes, is larger than the L3 cache) but
does not include mask generation. For each thread count the script times ``update`` over all
samples plus one ``compute`` (median and best of ``--repeats`` runs), with and without per-sample
records, for torch and numpy inputs. It also times the literal per-sample official loop (numpy
``logical_and/or`` per sample, as in ``refer_evaluation.py``) on the pool, checks that both give
the same numbers, and prints a Markdown table for ``bench/RESULTS.md``. The machine is shared:
compare medians, and rerun when another process is busy.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gres.metrics import GRESMetrics  # noqa: E402


def make_pool(n_batches: int, batch: int, size: int, seed: int):
    """Distinct batches of (pred, gt, pred_nt, gt_nt) with rectangle masks, ~20% no-target."""
    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(n_batches):
        gt = torch.zeros(batch, size, size, dtype=torch.bool)
        pred = torch.zeros(batch, size, size, dtype=torch.bool)
        gt_nt = torch.from_numpy(rng.random(batch) < 0.2)
        pred_nt = torch.from_numpy(rng.random(batch) < 0.2)
        for k in range(batch):
            y, x, h, w = rng.integers(0, size // 2, size=4)
            if not gt_nt[k]:
                gt[k, y : y + h + 8, x : x + w + 8] = True
            dy, dx = rng.integers(-20, 21, size=2)
            pred[k, max(y + dy, 0) : y + dy + h + 8, max(x + dx, 0) : x + dx + w + 8] = True
        pool.append((pred, gt, pred_nt, gt_nt))
    return pool


def time_metrics(pool, n_samples: int, batch: int, keep_records: bool, numpy_in: bool) -> float:
    m = GRESMetrics(keep_records=keep_records)
    data = [tuple(x.numpy() for x in b) for b in pool] if numpy_in else pool
    t0 = time.perf_counter()
    done = 0
    i = 0
    while done < n_samples:
        pred, gt, pred_nt, gt_nt = data[i % len(data)]
        take = min(batch, n_samples - done)
        m.update(pred[:take], gt[:take], pred_nt[:take], gt_nt[:take])
        done += take
        i += 1
    m.compute()
    return time.perf_counter() - t0


def official_loop(pool, n_samples: int) -> tuple[float, dict[str, float]]:
    """refer_evaluation.py's per-sample numpy counting, on n_samples samples."""
    t0 = time.perf_counter()
    acc_i = acc_u = 0.0
    done = 0
    for pred, gt, pred_nt, gt_nt in pool:
        pm, gm = pred.numpy().astype(np.int8), gt.numpy().astype(np.int8)
        for k in range(len(pm)):
            if done == n_samples:
                break
            i = np.sum(np.logical_and(pm[k], gm[k]))
            u = np.sum(np.logical_or(pm[k], gm[k]))
            if gt_nt[k]:
                acc_u += 0 if pred_nt[k] else int(u)
            else:
                acc_i += 0 if pred_nt[k] else i
                acc_u += u
            done += 1
    dt = time.perf_counter() - t0
    return dt / done, {"cIoU": acc_i * 100.0 / acc_u}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--size", type=int, default=480)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--pool-batches", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--threads", default="1,0", help="comma-separated torch thread counts; 0 = torch default"
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    default_threads = torch.get_num_threads()
    pool = make_pool(args.pool_batches, args.batch, args.size, args.seed)
    print(
        f"# {args.samples} samples at {args.size}x{args.size}, batch {args.batch}, pool "
        f"{args.pool_batches * args.batch} distinct samples; torch {torch.__version__}, numpy "
        f"{np.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )

    # Correctness check against the literal official counting on the pool.
    n_off = args.pool_batches * args.batch
    per_sample, off = official_loop(pool, n_off)
    ours = GRESMetrics()
    for b in pool:
        ours.update(*b)
    assert abs(ours.compute()["cIoU"] - off["cIoU"]) < 1e-9, (ours.compute(), off)

    rows = []
    for th in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(th if th > 0 else default_threads)
        label = f"{torch.get_num_threads()}" + (" (default)" if th == 0 else "")
        for numpy_in, keep in ((False, False), (False, True), (True, False)):
            times = [
                time_metrics(pool, args.samples, args.batch, keep, numpy_in)
                for _ in range(args.repeats)
            ]
            rows.append(
                (label, "numpy" if numpy_in else "torch", keep, statistics.median(times),
                 min(times))
            )
    torch.set_num_threads(default_threads)

    print()
    print("| threads | input | records | median s | best s | µs / sample |")
    print("|---|---|---|---|---|---|")
    for label, kind, keep, med, best in rows:
        print(
            f"| {label} | {kind} | {'yes' if keep else 'no'} | {med:.3f} | {best:.3f} | "
            f"{1e6 * med / args.samples:.0f} |"
        )
    print(
        f"\nOfficial per-sample numpy loop: {1e3 * per_sample:.2f} ms / sample -> "
        f"{per_sample * args.samples:.1f} s for {args.samples} samples (measured on {n_off}; "
        f"cIoU agrees with GRESMetrics)."
    )


if __name__ == "__main__":
    main()
