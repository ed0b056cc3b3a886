#!/usr/bin/env python
"""Fill ``.whl/`` with the wheels the GPU suite carries to a lent device, and check the budget.

Run here, on the CPU machine, before asking for a device (the device reaches no registry):

    python benchmarks/prepare_wheels.py            # download, slim, check; prints the device call
    python benchmarks/prepare_wheels.py --check    # only check what .whl/ holds against the budget
    python benchmarks/prepare_wheels.py --resolve  # only ask PyPI which file each would be (no download)

What it does:
- reads ``benchmarks/device_wheels.txt`` (what the device image lacks) and takes each version
  from ``constraints/newest.txt`` (the README's CUDA-machine pins);
- downloads each as a CPython 3.12 manylinux x86-64 wheel, no dependencies (the device notes'
  ``pip download`` command); a distribution PyPI ships only as source is built into a wheel
  here (``pip wheel --no-deps``), which must then be pure Python;
- slims bitsandbytes to the CUDA libraries of the device's torch (``--bnb-cuda``, default the
  image's CUDA 13.0 plus 13.2): the wheel ships one ~4-27 MB library per CUDA version;
- removes wheels in ``.whl/`` that the list no longer names (two versions stop an install);
- refuses a folder git does not ignore (``/.whl/`` is in .gitignore);
- ``--resolve`` downloads nothing: one ``pip install --dry-run --report`` for the whole list
  (PyPI's PEP 658 metadata, no wheel bodies) says which file each pin resolves to for the
  device, and which are source-only (built here by the real run);
- checks that what travels -- tracked and untracked-not-ignored files, plus ``.whl/`` -- stays
  under the device's 64 MiB (with ``--margin-mib`` to spare), and prints the sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LIST = Path(__file__).resolve().parent / "device_wheels.txt"
CONSTRAINTS = REPO / "constraints" / "newest.txt"
LIMIT_MIB = 64.0
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64",
             "manylinux_2_35_x86_64"]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wanted() -> list[str]:
    """Distribution names from device_wheels.txt (comments and blank lines dropped)."""
    names = []
    for line in LIST.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line)
    return names


def pins() -> dict[str, str]:
    out = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[canonical(name)] = version.strip()
    return out


def pinned_specs() -> dict[str, str]:
    """name -> "name==version" for every listed distribution; each must be pinned."""
    versions = pins()
    names = wanted()
    missing = [n for n in names if canonical(n) not in versions]
    if missing:
        raise SystemExit(f"prepare_wheels: {', '.join(missing)} not pinned in {CONSTRAINTS.relative_to(REPO)}")
    return {n: f"{n}=={versions[canonical(n)]}" for n in names}


def wheel_dist(path: Path) -> str:
    """The canonical distribution name of a wheel file (its name up to the first '-')."""
    return canonical(path.name.split("-", 1)[0])


def download(spec: str, dest: Path, python: str) -> Path:
    before = set(dest.glob("*.whl"))
    cmd = [python, "-m", "pip", "download", "--no-deps", *pip_platform_args(), "-d", str(dest), "-q", spec]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:  # source only on PyPI: build it here (must be pure Python to run there)
        proc = subprocess.run([python, "-m", "pip", "wheel", "--no-deps", "-w", str(dest), "-q", spec],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"prepare_wheels: cannot fetch or build {spec}:\n{proc.stderr[-2000:]}")
    new = [p for p in dest.glob("*.whl") if p not in before and wheel_dist(p) == canonical(spec.split("==")[0])]
    found = new or [p for p in dest.glob("*.whl") if wheel_dist(p) == canonical(spec.split("==")[0])]
    if not found:
        raise SystemExit(f"prepare_wheels: pip reported success for {spec} but no wheel landed in {dest}")
    wheel = found[0]
    if "-none-any" not in wheel.name and "manylinux" not in wheel.name:
        raise SystemExit(f"prepare_wheels: {wheel.name} was built for this machine only; find a manylinux wheel")
    return wheel


def pip_platform_args() -> list[str]:
    args = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"]
    for platform in PLATFORMS:
        args += ["--platform", platform]
    return args


def resolve(specs: list[str], python: str) -> int:
    """Which file each spec resolves to for CPython 3.12 manylinux x86-64, without downloading
    any wheel: ``pip install --dry-run --no-deps --report``. A spec with no such wheel is tried
    alone as source (what ``download`` would build here)."""
    def dry_run(items: list[str], binary: bool) -> tuple[subprocess.CompletedProcess, dict]:
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "report.json"
            cmd = [python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps", "-q",
                   "--disable-pip-version-check", "--target", str(Path(tmp) / "target"), "--report", str(report)]
            cmd += (pip_platform_args() if binary else []) + items  # a source dist resolves for this machine
            proc = subprocess.run(cmd, capture_output=True, text=True)
            return proc, (json.loads(report.read_text()) if report.exists() else {})

    def files(report: dict) -> dict[str, str]:
        return {canonical(i["metadata"]["name"]): i["download_info"]["url"].rsplit("/", 1)[-1]
                for i in report.get("install", [])}

    pending, found, source = list(specs), {}, {}
    while pending:
        proc, report = dry_run(pending, binary=True)
        if proc.returncode == 0:
            found.update(files(report))
            break
        # pip names the first spec with no matching wheel; try it as source, go on with the rest
        m = re.search(r"No matching distribution found for (\S+)", proc.stderr)
        bad = next((s for s in pending if m and canonical(s.split("==")[0]) == canonical(m.group(1).split("==")[0])), None)
        if bad is None:
            print(proc.stderr[-2000:], file=sys.stderr)
            return 1
        pending.remove(bad)
        proc_src, report_src = dry_run([bad], binary=False)
        if proc_src.returncode != 0:
            print(f"ERROR: {bad}: neither a manylinux wheel nor a source distribution\n{proc_src.stderr[-1000:]}")
            return 1
        source.update(files(report_src))
    width = max(map(len, specs))
    for spec in specs:
        name = canonical(spec.split("==")[0])
        where = found.get(name) or (f"{source[name]}  (source only: built into a wheel here)" if name in source
                                    else "NOT RESOLVED")
        print(f"  {spec:<{width}}  {where}")
    bad = [s for s in specs if canonical(s.split("==")[0]) not in found | source]
    print(f"{len(found)} wheels and {len(source)} source distributions resolve for CPython 3.12 manylinux x86-64"
          + (f"; NOT RESOLVED: {', '.join(bad)}" if bad else "") + " (nothing downloaded)")
    return 1 if bad else 0


def slim_bitsandbytes(wheel: Path, keep_cuda: list[str], python: str) -> Path:
    """Repack the bitsandbytes wheel with only libbitsandbytes_cpu and the CUDA versions kept."""
    keep = {"libbitsandbytes_cpu.so"} | {f"libbitsandbytes_cuda{v}.so" for v in keep_cuda}
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([python, "-m", "wheel", "unpack", "-d", tmp, str(wheel)], check=True, capture_output=True)
        root = next(Path(tmp).iterdir())
        libs = list((root / "bitsandbytes").glob("libbitsandbytes_*.so"))
        if not any(p.name in keep and "cuda" in p.name for p in libs):
            raise SystemExit(f"prepare_wheels: {wheel.name} has none of {sorted(keep)}; "
                             f"it has {sorted(p.name for p in libs)}")
        for lib in libs:
            if lib.name not in keep:
                lib.unlink()
        out_dir = Path(tmp) / "out"
        out_dir.mkdir()
        subprocess.run([python, "-m", "wheel", "pack", "--build-number", "1slim", "-d", str(out_dir), str(root)],
                       check=True, capture_output=True)
        packed = next(out_dir.glob("*.whl"))
        wheel.unlink()
        return Path(shutil.move(str(packed), str(wheel.parent / packed.name)))


def travelling_bytes() -> tuple[int, int]:
    """Bytes of the tracked + untracked-not-ignored files, and of shared/ if the checkout has one."""
    out = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                         check=True).stdout.decode()
    tree = sum((REPO / p).stat().st_size for p in out.split("\0") if p and (REPO / p).is_file())
    shared = REPO / "shared"
    extra = sum(p.stat().st_size for p in shared.rglob("*") if p.is_file()) if shared.is_dir() else 0
    return tree, extra


def ensure_ignored(whl_dir: Path) -> None:
    """The folder must be git-ignored: ignored paths travel only when ``carry`` names them."""
    rel = whl_dir.resolve().relative_to(REPO)
    if subprocess.run(["git", "check-ignore", "-q", str(rel / "probe.whl")], cwd=REPO).returncode != 0:
        raise SystemExit(f"prepare_wheels: {rel}/ is not ignored by git; add /{rel}/ to .gitignore "
                         "(the repository ignores /.whl/)")


def check(whl_dir: Path, margin_mib: float) -> int:
    tree, shared = travelling_bytes()
    wheels = sorted(whl_dir.glob("*.whl"))
    carried = sum(p.stat().st_size for p in wheels)
    total = tree + shared + carried
    mib = 2**20
    print(f"travelling tree: {tree / mib:.1f} MiB (tracked + untracked-not-ignored)"
          + (f", shared/: {shared / mib:.1f} MiB" if shared else ""))
    print(f"{whl_dir.name}/: {len(wheels)} wheels, {carried / mib:.1f} MiB; largest: "
          + ", ".join(f"{p.name.split('-')[0]} {p.stat().st_size / mib:.1f}"
                      for p in sorted(wheels, key=lambda p: -p.stat().st_size)[:5]))
    print(f"total: {total / mib:.1f} MiB of the device's {LIMIT_MIB:.0f} MiB (margin asked: {margin_mib:.0f} MiB)")
    dists = [wheel_dist(p) for p in wheels]
    twice = sorted({d for d in dists if dists.count(d) > 1})
    if twice:
        print(f"ERROR: two wheels of {', '.join(twice)} (pip stops): remove one")
        return 1
    if total / mib > LIMIT_MIB - margin_mib:
        print("ERROR: over budget: carry less (drop a wheel the benchmarks do not import, or slim one)")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=str(REPO / ".whl"), help="wheel folder inside the repository (default .whl)")
    p.add_argument("--bnb-cuda", default="130,132", help="CUDA versions whose bitsandbytes library is kept")
    p.add_argument("--margin-mib", type=float, default=4.0, help="MiB to keep free under the 64 MiB limit")
    p.add_argument("--check", action="store_true", help="only check the budget of what the folder holds")
    p.add_argument("--resolve", action="store_true",
                   help="download nothing: say which file each pin resolves to on PyPI for the device")
    opts = p.parse_args(argv)
    whl_dir = Path(opts.dir)
    if opts.resolve:
        return resolve(list(pinned_specs().values()), sys.executable)
    if not opts.check:
        whl_dir.mkdir(parents=True, exist_ok=True)
        ensure_ignored(whl_dir)
        versions = pins()
        names = list(pinned_specs())
        keep = {canonical(n) for n in names}
        for stale in whl_dir.glob("*.whl"):
            name, version = wheel_dist(stale), stale.name.split("-")[1]
            if name not in keep or versions[name] != version:
                stale.unlink()
        have = {wheel_dist(w) for w in whl_dir.glob("*.whl")}
        python = sys.executable
        for name in names:
            if canonical(name) in have:
                continue
            wheel = download(f"{name}=={versions[canonical(name)]}", whl_dir, python)
            if canonical(name) == "bitsandbytes":
                wheel = slim_bitsandbytes(wheel, [v.strip() for v in opts.bnb_cuda.split(",") if v.strip()], python)
            print(f"  {wheel.name} ({wheel.stat().st_size / 2**20:.1f} MiB)")
    status = check(whl_dir, opts.margin_mib)
    if status == 0 and not opts.check:
        rel = whl_dir.resolve().relative_to(REPO)
        print("\nthe device call (see benchmarks/README.md, 'GPU suite'):")
        print(f"  run(command='python3 benchmarks/gpu_suite.py --install {rel} --out \"$OUT\"', "
              f"carry=['{rel}'], timeout_s=600)")
    return status


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(main())
