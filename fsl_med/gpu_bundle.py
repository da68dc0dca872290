"""``fsl-med gpu-bundle`` (``make gpu-bundle``): what a borrowed GPU machine needs for ``make gpu-check``.

The GPU machines lent to this project have no network and a Python (3.12) of their own with torch,
lightning, timm, peft, scikit-image, scipy, numpy and PyYAML, but not monai, nibabel, omegaconf or pydicom;
only the repository travels there, at most 64 MiB with the git-ignored folders named for the trip. The bundle
is such a folder (``gpu_bundle/``, git-ignored):

* ``wheels/``: the missing packages at the versions installed here, for CPython 3.12 on manylinux x86-64
  (all four are pure Python). wandb is not among them: fsl_med imports it only for ``logging.logger=wandb``.
* ``chaos/``: a subset of the prepared real CHAOS-T2 scans (default: fold 0's query scans 1, 2, 3, 5, its
  support scan 8 and training scans 10-20; fold 0 *of the subset* is what the check evaluates);
* ``cache/``: the superpixel pseudolabels of the subset's training scans, so the GPU machine does not spend
  its minutes computing them;
* ``MANIFEST.json``: versions, SHA-256 and sizes of everything, the subset's fold-0 split, the total size.

``scripts/gpu-check.sh`` (what ``make gpu-check`` runs) installs the wheels into a temporary folder and runs
the check with the machine's own Python when there is no ``.venv`` and the bundle is present.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fsl_med import __version__, atomic
from fsl_med.errors import ConfigError, DataError, FslMedError

REPO = Path(__file__).resolve().parents[1]
MISSING_PACKAGES = ("monai", "nibabel", "omegaconf", "pydicom")
"""fsl_med's dependencies that the GPU machines' Python lacks (their own dependencies are all there)."""
DEFAULT_SCANS = ("1", "2", "3", "5", "8", "10", "13", "15", "19", "20")
LIMIT_BYTES = 64 * 2**20
"""What the device tool carries: the working tree and the carried folders together."""
TARGET_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")


@dataclass(frozen=True)
class Bundle:
    """What :func:`build_bundle` wrote."""

    path: Path
    wheels: list[str]
    scans: list[str]
    bytes_total: int
    repo_bytes: int

    def summary(self) -> str:
        mib = 2**20
        return (f"{self.path}: {len(self.wheels)} wheels ({', '.join(self.wheels)}), {len(self.scans)} CHAOS-T2 "
                f"scans ({', '.join(self.scans)}) with their superpixel cache; {self.bytes_total / mib:.1f} MiB, "
                f"{(self.bytes_total + self.repo_bytes) / mib:.1f} MiB with the repository (limit "
                f"{LIMIT_BYTES / mib:.0f} MiB)")


def tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def repository_bytes() -> int:
    """Bytes of the repository's tracked and untracked-not-ignored files (what travels besides the bundle);
    0 outside a git checkout."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return 0
    return sum((REPO / f).stat().st_size for f in out.decode().split("\0") if f and (REPO / f).is_file())


def download_wheels(dest: Path, packages: tuple[str, ...] = MISSING_PACKAGES, wheels_from: Path | None = None) -> list[Path]:
    """Wheels of ``packages`` at the versions installed here, for CPython 3.12 on manylinux x86-64.

    With ``wheels_from`` they are taken from that folder (offline) instead of downloaded by pip.

    Raises:
        FslMedError: a package is not installed here, or pip cannot get a wheel (no network, no
            3.12-compatible wheel); the message names the package.
    """
    dest.mkdir(parents=True, exist_ok=True)
    pins = []
    for name in packages:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            raise FslMedError(f"gpu-bundle: {name} is not installed here (make install first)") from None
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--only-binary=:all:", "--python-version", TARGET_PYTHON, "--implementation", "cp", "--abi",
           f"cp{TARGET_PYTHON.replace('.', '')}", *(a for p in PLATFORMS for a in ("--platform", p)), "-d", str(dest)]
    if wheels_from is not None:
        cmd += ["--no-index", "--find-links", str(wheels_from)]
    for pin in pins:  # one call per package: an error names it
        p = subprocess.run([*cmd, pin], capture_output=True, text=True)
        if p.returncode != 0:
            lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip() and "WARNING" not in ln]
            raise FslMedError(f"gpu-bundle: pip could not get a Python {TARGET_PYTHON} wheel of {pin}: "
                              f"{lines[-1] if lines else 'no output'}")
    return sorted(dest.glob("*.whl"))


def _copy_scans(src: Path, dest: Path, scans: list[str]) -> None:
    dest.mkdir(parents=True)
    for sid in scans:
        for kind in ("image", "label"):
            f = src / f"{kind}_{sid}.nii.gz"
            if not f.is_file():
                raise DataError(f"--data {src}: {f.name} not found (scan {sid} of --scans)")
            shutil.copyfile(f, dest / f.name)
    for extra in ("classmap_1.json", "PROVENANCE.md"):
        if (src / extra).is_file():
            shutil.copyfile(src / extra, dest / extra)


def build_bundle(out: str | Path = "gpu_bundle", data: str | Path | None = None, scans: list[str] | None = None,
                 wheels_from: str | Path | None = None) -> Bundle:
    """Write the bundle (see the module docstring) into ``out``, replacing an older one only when complete.

    Args:
        out: the bundle folder (keep it git-ignored; ``gpu_bundle`` is).
        data: prepared CHAOS-T2 folder (default: :func:`~fsl_med.prepare.datasets.default_mri_root`).
        scans: scan ids to include (default :data:`DEFAULT_SCANS`); at least 3.
        wheels_from: a folder of wheels to take instead of downloading.
    Returns:
        A :class:`Bundle`.
    Raises:
        DataError: the data folder or a scan is missing.
        ConfigError: fewer than 3 scans, ``out`` is a non-empty folder that is not a bundle, or a bundle over the
            64 MiB the device tool carries.
        FslMedError: a wheel cannot be obtained.
    """
    from fsl_med.data.datamodule import FewShotDataModule
    from fsl_med.prepare.datasets import fold_split, get_dataset_info, mri_data_folder
    from fsl_med.run_config import load_run_config

    src = mri_data_folder(data)
    ids = list(dict.fromkeys(scans or DEFAULT_SCANS))
    if len(ids) < 3:
        raise ConfigError(f"--scans {','.join(ids)}: need at least 3 scans (query, support, training)")
    out = Path(out)
    if out.exists() and not (out.is_dir() and (out / "MANIFEST.json").is_file()):
        if not out.is_dir() or any(out.iterdir()):
            raise ConfigError(f"--out {out}: exists and is not a bundle (no MANIFEST.json): choose another folder, "
                              "a bundle is replaced as a whole")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the bundle is an ordinary folder
    try:
        wheels = download_wheels(tmp / "wheels", wheels_from=Path(wheels_from) if wheels_from else None)
        _copy_scans(src, tmp / "chaos", ids)
        # the training scans' pseudolabels, computed as training computes them (the cache is keyed by content)
        cfg = load_run_config(REPO / "experiments" / "mri.yaml", [f"data.root={tmp / 'chaos'}",
                                                              f"data.cache_dir={tmp / 'cache'}"])
        t0 = time.perf_counter()
        FewShotDataModule(cfg).prepare_data()
        sp_seconds = time.perf_counter() - t0
        split = fold_split(get_dataset_info("chaos_t2"), ids, 0)
        total = tree_bytes(tmp)
        repo = repository_bytes()
        if total + repo > LIMIT_BYTES:
            raise ConfigError(f"--scans: the bundle is {total / 2**20:.1f} MiB, {(total + repo) / 2**20:.1f} MiB with "
                              f"the repository, over the {LIMIT_BYTES / 2**20:.0f} MiB the device tool carries: "
                              "choose fewer scans")
        atomic.write_json(tmp / "MANIFEST.json", {
            "created": time.strftime("%Y-%m-%d %H:%M:%S"), "fsl_med": __version__, "python": TARGET_PYTHON,
            "platforms": list(PLATFORMS), "source": str(src),
            "wheels": [{"file": w.name, "bytes": w.stat().st_size, "sha256": atomic.sha256_file(w)} for w in wheels],
            "scans": ids, "fold0_of_subset": {"query": split.query, "support": split.support, "train": split.train},
            "superpixel_seconds": sp_seconds, "bytes": total, "repository_bytes": repo, "limit_bytes": LIMIT_BYTES,
        })
        atomic.replace_folder(out, tmp)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        raise
    return Bundle(out, [w.name for w in wheels], ids, tree_bytes(out), repo)
