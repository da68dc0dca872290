"""setting2_exclusion.py [DATA] [--dataset NAME] [--num-val-scans N]: how many slices Setting 2 removes under each
``data.exclude_rule`` (method-zoo.md §1 row 6), with fsl_med's own rule (:func:`fsl_med.data.exclusion.excluded_slices`).

Prints two markdown tables: over every label volume of DATA (the README's ANY/ALL table), and per fold over the
training scans a run of that fold trains on (the fold's non-group scans less the last ``N`` held out for validation,
as ``data.num_val_scans``), i.e. the numbers a run's "setting 2 (...): dropped X of Y" log line gives.
DATA defaults to $FSL_MED_DATA_MRI or ../shared/data/CHAOST2/chaos_MR_T2_normalized; labels are read as stored.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from fsl_med.data.exclusion import EXCLUDE_RULES, excluded_slices
from fsl_med.prepare.datasets import fold_split, get_dataset_info, scan_files, validation_split
from fsl_med.prepare.nifti import read_nifti

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "CHAOST2" / "chaos_MR_T2_normalized"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", nargs="?", default=os.environ.get("FSL_MED_DATA_MRI", str(DEFAULT)))
    ap.add_argument("--dataset", default="chaos_t2")
    ap.add_argument("--num-val-scans", type=int, default=1)
    args = ap.parse_args(argv)
    info = get_dataset_info(args.dataset)
    listing = scan_files(args.data)
    ids = listing.scan_ids()
    labels = {s: np.asarray(read_nifti(listing.paths(s)[1])[0]).transpose(2, 1, 0) for s in ids}  # [Z, y, x]
    names = {v: k for k, v in info.labels.items()}
    groups = [tuple(sorted(info.labels[o] for o in g)) for g in info.label_groups[::-1]]
    groups.append(tuple(sorted(info.labels.values())))

    def dropped(scans: list[str], group: tuple[int, ...], rule: str) -> int:
        return sum(int(excluded_slices(labels[s], group, rule).sum()) for s in scans)

    total = sum(lab.shape[0] for lab in labels.values())
    print(f"{args.data}: {len(ids)} label volumes, {total} slices\n")
    print("| excluded labels | " + " | ".join(f"{r.upper()} rule" for r in EXCLUDE_RULES) + " |")
    print("|---|" + "---:|" * len(EXCLUDE_RULES))
    for g in groups:
        cells = [f"{n} ({100 * n / total:.1f} %)" for n in (dropped(ids, g, r) for r in EXCLUDE_RULES)]
        print(f"| {' + '.join(names[i] for i in g)} {list(g)} | " + " | ".join(cells) + " |")
    print(f"\nper fold, training scans (data.num_val_scans={args.num_val_scans}): dropped / training slices")
    print("| fold | training slices | " + " | ".join(f"{list(g)} {r}" for g in groups for r in EXCLUDE_RULES) + " |")
    print("|---|---:|" + "---:|" * (len(groups) * len(EXCLUDE_RULES)))
    for fold in range(info.n_folds):
        train, _ = validation_split(fold_split(info, ids, fold).train, args.num_val_scans)
        n = sum(labels[s].shape[0] for s in train)
        cells = [str(dropped(train, g, r)) for g in groups for r in EXCLUDE_RULES]
        print(f"| {fold} | {n} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
