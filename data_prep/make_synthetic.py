#!/usr/bin/env python
"""Generate the synthetic GRES dataset in gRefCOCO's file format (idempotent).

    python data_prep/make_synthetic.py --preset default          # -> data/synthetic
    python data_prep/make_synthetic.py --preset tiny             # -> data/synthetic-tiny
    python data_prep/make_synthetic.py --preset default --out DIR --seed 1 [--workers 2] [--force]

Does nothing when ``<out>/manifest.json`` already matches the preset, seed and generator version
(and the JSON checksums). The dataset is written to a temporary folder and renamed into place, so
an interrupted run leaves nothing half-written. See data_prep/README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from gres.data.synthetic import (  # noqa: E402
    DEFAULT_DIRS,
    PRESETS,
    generate,
    get_config,
    is_up_to_date,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="default", choices=sorted(PRESETS))
    ap.add_argument("--out", default=None, help="output folder (default: data/synthetic[-tiny])")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1, help="processes for rendering (same output)")
    ap.add_argument("--force", action="store_true", help="regenerate even if up to date")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    out = Path(args.out) if args.out else ROOT / DEFAULT_DIRS[args.preset]
    cfg = get_config(args.preset)
    if not args.force and is_up_to_date(out, cfg, args.seed):
        print(f"{out}: up to date (preset {args.preset}, seed {args.seed})")
        return 0
    t0 = time.time()
    manifest = generate(out, cfg, seed=args.seed, progress=not args.quiet, force=True,
                        workers=args.workers)
    tot = manifest["totals"]
    print(f"{out}: {tot['images']} images, {tot['expressions']} expressions "
          f"({tot['multi']} multi-target, {tot['no_target']} no-target) "
          f"in {time.time() - t0:.1f} s")
    if not args.quiet:
        print(json.dumps(manifest["splits"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
