"""Find CellSAM weights on disk, and fetch the official archive on request.

Resolution order (:func:`resolve_weights`): an explicit path, then the ``CELLSAM_WEIGHTS`` environment
variable, then the cache the reference ``cellSAM`` package uses,
``~/.deepcell/models/cellsam_v{version}/{model}.pt``, so weights it already downloaded are reused.
Resolution never touches the network: only :func:`fetch_weights` (the ``cellsam-stream weights fetch``
command) downloads, and only when called.

The download follows the users.deepcell.org flow: ``POST`` the archive's key (form field ``s3_key``)
with the access token in the ``X-Api-Key`` header to the API endpoint, which answers JSON
``{"url": <download URL>, "size": "<number> <B|KB|MB|GB>"}``; ``GET`` that URL; check the archive's MD5
against the version table; extract the ``.tar.gz`` into the cache, which yields ``cellsam_v{version}/``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import IO

from tqdm import tqdm

from cellsam_core._archive import md5_of, new_md5, safe_extract
from cellsam_core.errors import DownloadError, UnknownModelError, WeightsNotFoundError

__all__ = [
    "API_URL_ENV",
    "DEFAULT_API_URL",
    "DEFAULT_VERSION",
    "KNOWN_VERSIONS",
    "MODEL_NAMES",
    "TOKEN_ENV",
    "WEIGHTS_ENV",
    "WeightsRecord",
    "cache_dir",
    "cached_weights_path",
    "fetch_weights",
    "find_weights",
    "resolve_weights",
]

logger = logging.getLogger(__name__)

MODEL_NAMES: tuple[str, ...] = ("cellsam_general", "cellsam_extra")
"""Models shipped in the official archive; each is one ``{model}.pt`` state dict."""

DEFAULT_VERSION = "1.2"
"""Version used when none is given: the latest official release, as in the reference."""

WEIGHTS_ENV = "CELLSAM_WEIGHTS"
TOKEN_ENV = "DEEPCELL_ACCESS_TOKEN"
API_URL_ENV = "DEEPCELL_API_URL"
DEFAULT_API_URL = "https://users.deepcell.org/api/getData/"
TOKEN_HELP_URL = "https://users.deepcell.org"

# Some download hosts refuse Python's default user agent; the reference identifies as wget.
_DOWNLOAD_USER_AGENT = "Wget/1.20 (linux-gnu)"
_CHUNK_BYTES = 1 << 20
_VERSION_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}


@dataclass(frozen=True)
class WeightsRecord:
    """One official weights release.

    Attributes
    ----------
    version : str
        Release version, e.g. ``"1.2"``; the archive extracts to ``cellsam_v{version}/``.
    asset_key : str
        Key of the archive on users.deepcell.org (sent as ``s3_key``).
    md5 : str
        Lower-case hex MD5 of the whole archive file.
    """

    version: str
    asset_key: str
    md5: str

    @property
    def archive_name(self) -> str:
        """File name of the archive in the cache (last component of the key)."""
        return self.asset_key.rsplit("/", 1)[-1]


# Same records as the reference's model table (1.1 was withdrawn upstream and never listed).
KNOWN_VERSIONS: Mapping[str, WeightsRecord] = MappingProxyType(
    {
        "1.2": WeightsRecord(
            version="1.2",
            asset_key="models/cellsam-models_v1.2.tar.gz",
            md5="f41e6899c49fc8ce12f77a8d25594604",
        ),
    }
)
"""Official releases by version."""


def cache_dir() -> Path:
    """Directory holding downloaded weights: ``~/.deepcell/models`` (the reference's layout).

    ``~`` is the current user's home (``$HOME`` on POSIX).
    """
    return Path.home() / ".deepcell" / "models"


def cached_weights_path(
    *, model: str = "cellsam_general", version: str | None = None, cache: Path | None = None
) -> Path:
    """Where ``model`` of ``version`` lives in the cache: ``{cache}/cellsam_v{version}/{model}.pt``.

    The file may not exist. Raises :class:`UnknownModelError` for a model not in :data:`MODEL_NAMES`
    and :class:`WeightsNotFoundError` for a version that is not of the form ``1.2``.
    """
    if model not in MODEL_NAMES:
        raise UnknownModelError(model, list(MODEL_NAMES))
    version = DEFAULT_VERSION if version is None else version
    if not _VERSION_RE.fullmatch(version):
        raise WeightsNotFoundError(
            f"{version!r} is not a weights version; use digits and dots, e.g. {DEFAULT_VERSION!r} "
            f"(known releases: {', '.join(KNOWN_VERSIONS)})"
        )
    root = cache_dir() if cache is None else Path(cache)
    return root / f"cellsam_v{version}" / f"{model}.pt"


def resolve_weights(
    path: str | os.PathLike[str] | None = None,
    *,
    model: str = "cellsam_general",
    version: str | None = None,
    env: Mapping[str, str] = os.environ,
    cache: Path | None = None,
) -> Path:
    """Return the weights file to load, without downloading anything.

    Looks, in order, at ``path``, at ``env["CELLSAM_WEIGHTS"]`` and at :func:`cached_weights_path`.
    The first one given wins: a given path or variable that names no file is an error rather than
    a reason to fall through, so a typo never silently loads other weights.

    Raises
    ------
    WeightsNotFoundError
        Nothing found; the message says how to get weights.
    UnknownModelError
        ``model`` is not in :data:`MODEL_NAMES`.
    """
    target = cached_weights_path(model=model, version=version, cache=cache)
    if path is not None:
        return _existing_file(Path(path).expanduser(), "the weights path given")
    from_env = env.get(WEIGHTS_ENV, "")
    if from_env:
        return _existing_file(Path(from_env).expanduser(), f"${WEIGHTS_ENV}")
    if target.is_file():
        return target
    raise WeightsNotFoundError(_how_to_get_weights(model, target))


def find_weights(
    path: str | os.PathLike[str] | None = None,
    *,
    model: str = "cellsam_general",
    version: str | None = None,
    env: Mapping[str, str] = os.environ,
    cache: Path | None = None,
) -> Path | None:
    """Like :func:`resolve_weights`, but return ``None`` when no weights file is found."""
    try:
        return resolve_weights(path, model=model, version=version, env=env, cache=cache)
    except WeightsNotFoundError:
        return None


def _existing_file(path: Path, source: str) -> Path:
    if path.is_file():
        return path
    what = "is a directory, not a weights file" if path.is_dir() else "does not exist"
    raise WeightsNotFoundError(f"{source} ({path}) {what}; point it at a CellSAM .pt file")


def _how_to_get_weights(model: str, target: Path) -> str:
    version = target.parent.name.removeprefix("cellsam_v")
    version_flag = "" if version == DEFAULT_VERSION else f" --version {version}"
    return (
        f"no CellSAM weights found for model {model!r} (version {version}): no path given, "
        f"${WEIGHTS_ENV} is not set, and {target} does not exist. To get the official weights run\n"
        f"    {TOKEN_ENV}=<your token> cellsam-stream weights fetch{version_flag}\n"
        f"(create a token at {TOKEN_HELP_URL}), or pass --weights PATH, or set {WEIGHTS_ENV}=PATH."
    )


def fetch_weights(
    *,
    version: str | None = None,
    token: str | None = None,
    base_url: str | None = None,
    cache: Path | None = None,
    progress: bool | None = True,
    force: bool = False,
    records: Mapping[str, WeightsRecord] | None = None,
    env: Mapping[str, str] = os.environ,
    timeout: float = 60.0,
) -> Path:
    """Download, verify and extract the official weights archive; return ``{cache}/cellsam_v{version}``.

    Does nothing when that folder already holds weights (unless ``force``). An archive already in the
    cache whose MD5 matches (e.g. left by the reference package) is extracted without downloading.

    Parameters
    ----------
    version : str, optional
        Release to fetch, a key of ``records``; default :data:`DEFAULT_VERSION`.
    token : str, optional
        users.deepcell.org access token; default ``env["DEEPCELL_ACCESS_TOKEN"]``.
    base_url : str, optional
        API endpoint; default ``env["DEEPCELL_API_URL"]``, else :data:`DEFAULT_API_URL`.
    cache : Path, optional
        Models cache; default :func:`cache_dir`.
    progress : bool or None
        Show a progress bar on stderr; ``None`` shows it only when stderr is a terminal.
    force : bool
        Download and extract again even if the weights or the archive are present.
    records : mapping of str to WeightsRecord, optional
        Version table; default :data:`KNOWN_VERSIONS`.
    env : mapping
        Environment to read ``DEEPCELL_ACCESS_TOKEN`` and ``DEEPCELL_API_URL`` from.
    timeout : float
        Seconds to wait on each network operation.

    Raises
    ------
    DownloadError
        Unknown version, missing or rejected token, HTTP or network failure, checksum mismatch (the
        bad file is deleted), or an archive that is not a tar or holds unsafe members.
    """
    table = KNOWN_VERSIONS if records is None else records
    version = DEFAULT_VERSION if version is None else version
    if version not in table:
        raise DownloadError(f"unknown weights version {version!r}; known versions: {', '.join(table)}")
    record = table[version]
    root = cache_dir() if cache is None else Path(cache)
    target = root / f"cellsam_v{version}"
    if not force and _has_weights(target):
        logger.info("weights %s already in %s", version, target)
        return target

    archive = root / record.archive_name
    if force or not (archive.is_file() and md5_of(archive) == record.md5):
        token = token or env.get(TOKEN_ENV) or None
        if token is None:
            raise DownloadError(
                f"{TOKEN_ENV} is not set; create an access token at {TOKEN_HELP_URL} and run\n"
                f"    {TOKEN_ENV}=<your token> cellsam-stream weights fetch"
            )
        url = base_url or env.get(API_URL_ENV) or DEFAULT_API_URL
        download_url, size = _request_download(url, record.asset_key, token, timeout)
        show = sys.stderr.isatty() if progress is None else progress
        root.mkdir(parents=True, exist_ok=True)
        _download(download_url, archive, record, size=size, show_progress=show, timeout=timeout)
    _extract(archive, target, version)
    logger.info("weights %s extracted to %s", version, target)
    return target


def _has_weights(folder: Path) -> bool:
    return any((folder / f"{name}.pt").is_file() for name in MODEL_NAMES)


def _request_download(api_url: str, asset_key: str, token: str, timeout: float) -> tuple[str, int | None]:
    """Ask the API for a download URL; return it with the announced size in bytes (if parseable)."""
    _require_http(api_url, "API URL")
    request = urllib.request.Request(
        api_url,
        data=urllib.parse.urlencode({"s3_key": asset_key}).encode("ascii"),
        headers={"X-Api-Key": token, "Accept": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as err:
        with err:
            detail = _error_detail(err.read())
        if err.code in (401, 403):
            raise DownloadError(
                f"{api_url} rejected the access token (HTTP {err.code}{detail}); check {TOKEN_ENV} or "
                f"create a new token at {TOKEN_HELP_URL} (tokens expire)"
            ) from None
        if err.code == 404:
            raise DownloadError(f"{api_url} has no asset {asset_key!r} (HTTP 404{detail})") from None
        raise DownloadError(f"{api_url} answered HTTP {err.code}{detail}; try again later") from None
    except (urllib.error.URLError, OSError) as err:
        raise DownloadError(f"could not reach {api_url}: {err}; check the network or {API_URL_ENV}") from err
    try:
        payload = json.loads(body)
        download_url = str(payload["url"])
    except (ValueError, KeyError, TypeError) as err:
        raise DownloadError(f"{api_url} sent an unexpected answer (no JSON 'url'): {body[:200]!r}") from err
    _require_http(download_url, "download URL")
    return download_url, _parse_size(payload.get("size"))


def _error_detail(body: bytes) -> str:
    try:
        payload = json.loads(body)
    except ValueError:
        return ""
    if isinstance(payload, dict):
        message = payload.get("detail") or payload.get("error")
        if message:
            return f": {message}"
    return ""


def _require_http(url: str, what: str) -> None:
    # urllib also opens file:// and ftp:// URLs; a server must not be able to point us there.
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise DownloadError(f"{what} {url!r} is not an http(s) URL")


def _parse_size(size: object) -> int | None:
    """Parse the API's ``"<number> <unit>"`` size; ``None`` when absent or malformed."""
    if not isinstance(size, str):
        return None
    value, _, unit = size.strip().partition(" ")
    try:
        return int(float(value) * _SIZE_UNITS[unit.strip().upper()])
    except (ValueError, KeyError):
        return None


def _download(
    url: str, archive: Path, record: WeightsRecord, *, size: int | None, show_progress: bool, timeout: float
) -> None:
    """Stream ``url`` to a temporary file next to ``archive``, check its MD5, then move it into place."""
    fd, tmp_name = tempfile.mkstemp(dir=archive.parent, prefix=f".{archive.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            md5 = _stream(
                url, out, size=size, show_progress=show_progress, timeout=timeout, desc=archive.name
            )
        if md5 != record.md5:
            raise DownloadError(
                f"checksum mismatch for {archive.name}: MD5 {md5}, expected {record.md5}; the download was "
                "corrupted or the server sent another file. It was deleted; run the fetch again."
            )
        os.replace(tmp, archive)
    finally:
        tmp.unlink(missing_ok=True)


def _stream(
    url: str, out: IO[bytes], *, size: int | None, show_progress: bool, timeout: float, desc: str
) -> str:
    request = urllib.request.Request(url, headers={"User-Agent": _DOWNLOAD_USER_AGENT})
    digest = new_md5()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else size
            with tqdm(
                total=total,
                desc=desc,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=sys.stderr,
                disable=not show_progress,
            ) as bar:
                while chunk := response.read(_CHUNK_BYTES):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as err:
        err.close()
        raise DownloadError(f"downloading the archive failed: HTTP {err.code} from {url}") from None
    except (urllib.error.URLError, OSError) as err:
        raise DownloadError(f"downloading the archive from {url} failed: {err}; run the fetch again") from err
    return digest.hexdigest()


def _extract(archive: Path, target: Path, version: str) -> None:
    """Extract ``archive`` safely and move its ``cellsam_v{version}/`` folder to ``target`` atomically."""
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".extract-"))
    try:
        try:
            safe_extract(archive, staging)
        except DownloadError:
            archive.unlink(missing_ok=True)  # a verified but unsafe archive will never become safe
            raise
        except (tarfile.TarError, OSError, EOFError) as err:
            raise DownloadError(
                f"cannot extract {archive}: {err}; run `cellsam-stream weights fetch --force`"
            ) from err
        extracted = staging / target.name
        if not _has_weights(extracted):
            raise DownloadError(
                f"{archive.name} holds no {target.name}/<model>.pt (models: {', '.join(MODEL_NAMES)}); "
                f"it is not a CellSAM weights archive for version {version}"
            )
        if target.exists():  # force: swap the old folder out first, since rename cannot replace a folder
            target.rename(staging / f"{target.name}.old")
        extracted.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
