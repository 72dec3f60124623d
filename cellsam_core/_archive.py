"""Archive handling for the weights download: checksums and tar extraction that cannot escape its folder."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path, PurePosixPath

from cellsam_core.errors import DownloadError

__all__ = ["md5_of", "new_md5", "safe_extract"]

_CHUNK_BYTES = 1 << 20


def new_md5() -> hashlib._Hash:
    """A fresh MD5 hasher.

    MD5 because that is what the release table lists; it catches corruption, not tampering.
    """
    return hashlib.md5(usedforsecurity=False)


def md5_of(path: Path) -> str:
    """Lower-case hex MD5 of the file at ``path``, read in chunks."""
    digest = new_md5()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _check_member(member: tarfile.TarInfo) -> None:
    parts = PurePosixPath(member.name).parts
    if member.name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
        raise DownloadError(f"unsafe archive: member {member.name!r} would be written outside the cache")
    if not (member.isfile() or member.isdir()):
        raise DownloadError(f"unsafe archive: member {member.name!r} is a link or special file")


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract the tar ``archive`` (any compression) into the folder ``dest``.

    Only regular files and folders below ``dest`` are allowed; an absolute or ``..`` path, a link or a
    device raises :class:`DownloadError` (members already written stay in ``dest``, so extract into a
    staging folder). A damaged or non-tar file raises :class:`tarfile.TarError` or :class:`OSError`.
    """
    with tarfile.open(archive, "r:*") as tar:
        _extract_members(tar, dest)


def _extract_members(tar: tarfile.TarFile, dest: Path) -> None:
    if hasattr(tarfile, "data_filter"):

        def checked(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
            _check_member(member)
            return tarfile.data_filter(member, path)

        tar.extractall(dest, filter=checked)
    else:  # Python without extraction filters: check every member before writing any
        members = tar.getmembers()
        for member in members:
            _check_member(member)
        tar.extractall(dest, members=members)
