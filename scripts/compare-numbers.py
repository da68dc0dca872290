"""compare-numbers.py BEFORE AFTER: two folders of scripts/record-numbers.sh. Every (organ, query, variant) row of
results.json (TP/FP/FN, Dice, HD95, slices; not seconds) and every summary of ph1 ph2 ch1 ch2, the segment outputs
(voxels and affine) and the checkpoints trained by the two runs must be identical; exit 1 otherwise."""

import json
import sys

import nibabel as nib
import numpy as np
import torch


def _strip(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in x.items() if k != "seconds"} for x in rows]


def _summary(s: dict) -> dict:
    return {k: v for k, v in s.items() if k not in ("seconds_per_volume", "seconds_per_volume_by_organ")}


def main(a: str, b: str) -> int:
    ok = True
    for n in ("ph1", "ph2", "ch1", "ch2"):
        ra = json.load(open(f"{a}/runs/{n}-eval/version_0/results.json"))
        rb = json.load(open(f"{b}/runs/{n}-eval/version_0/results.json"))
        same_rows = _strip(ra["volumes"]) == _strip(rb["volumes"])
        same_sum = list(ra["variants"]) == list(rb["variants"]) and all(
            _summary(ra["variants"][v]) == _summary(rb["variants"][v]) for v in ra["variants"])
        secs = {v: (round(ra["variants"][v]["seconds_per_volume"], 4), round(rb["variants"][v]["seconds_per_volume"], 4))
                for v in ra["variants"]}
        print(f"{n}: {len(ra['volumes'])} rows, rows identical={same_rows}, summaries identical={same_sum}, mean Dice "
              f"{[round(ra['variants'][v]['dice_mean'], 4) for v in ra['variants']]}, s/volume before->after {secs}")
        ok &= same_rows and same_sum
    for f in ("seg_liver", "seg_liver2d", "seg_ph_rk"):
        x, y = nib.load(f"{a}/{f}.nii.gz"), nib.load(f"{b}/{f}.nii.gz")
        same = np.array_equal(np.asarray(x.dataobj), np.asarray(y.dataobj)) and np.array_equal(x.affine, y.affine)
        print(f"{f}: voxel-identical={same}, {int(np.asarray(x.dataobj).sum())} voxels")
        ok &= same
    ca = torch.load(f"{a}/runs/tr/version_0/checkpoints/last.ckpt", weights_only=False)["state_dict"]
    cb = torch.load(f"{b}/runs/tr/version_0/checkpoints/last.ckpt", weights_only=False)["state_dict"]
    same = ca.keys() == cb.keys() and all(torch.equal(ca[k], cb[k]) for k in ca)
    print(f"trained checkpoints identical={same}")
    ok &= same
    print("ALL IDENTICAL" if ok else "DIFFERENCES")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
