"""Weights resolution and the official-weights download, against a real HTTP server on loopback."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import socket
import tarfile
import threading
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cellsam_core import weights
from cellsam_core._cli_weights import add_weights_commands
from cellsam_core.errors import DownloadError, UnknownModelError, WeightsNotFoundError

TOKEN = "good-token"
VERSION = weights.DEFAULT_VERSION
ASSET_KEY = weights.KNOWN_VERSIONS[VERSION].asset_key
ARCHIVE_NAME = weights.KNOWN_VERSIONS[VERSION].archive_name
GENERAL_BYTES = b"general-state-dict\x00\x01" * 50
EXTRA_BYTES = b"extra-state-dict\x02" * 40


# --- archives and the loopback server -------------------------------------------------------------


def make_tar(entries: list[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    """A .tar.gz in memory; ``(name, data)`` makes a regular file, a ``TarInfo`` is added as is."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                tar.addfile(entry)
            else:
                name, data = entry
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def good_archive(version: str = VERSION) -> bytes:
    return make_tar(
        [
            (f"cellsam_v{version}/cellsam_general.pt", GENERAL_BYTES),
            (f"cellsam_v{version}/cellsam_extra.pt", EXTRA_BYTES),
        ]
    )


def records_for(archive: bytes, version: str = VERSION) -> dict[str, weights.WeightsRecord]:
    """A version table whose checksum is that of ``archive`` (the test stands in for the release)."""
    md5 = hashlib.md5(archive, usedforsecurity=False).hexdigest()
    return {version: weights.WeightsRecord(version=version, asset_key=ASSET_KEY, md5=md5)}


@dataclass
class FakeDeepcell:
    """State of the loopback server: what it serves and what it was asked."""

    archive: bytes = b""
    corrupt: bool = False
    api_calls: list[dict[str, str]] = field(default_factory=list)
    downloads: int = 0
    url: str = ""


def _handler(state: FakeDeepcell) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # keep test output clean
            pass

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            form = urllib.parse.parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
            call = {"path": self.path, "token": self.headers.get("X-Api-Key", "")}
            call["s3_key"] = form.get("s3_key", [""])[0]
            state.api_calls.append(call)
            if self.path != "/api/getData/":
                self._send(404, b"{}", "application/json")
            elif call["token"] != TOKEN:
                detail = {"detail": "Authentication credentials were not provided."}
                self._send(403, json.dumps(detail).encode(), "application/json")
            elif call["s3_key"] != ASSET_KEY:
                self._send(404, json.dumps({"error": "Key not found"}).encode(), "application/json")
            else:
                download_url = state.url.replace("/api/getData/", f"/files/{ARCHIVE_NAME}")
                answer = {"url": download_url, "size": "1.5 KB"}
                self._send(200, json.dumps(answer).encode(), "application/json")

        def do_GET(self) -> None:
            if self.path != f"/files/{ARCHIVE_NAME}":
                self._send(404, b"", "text/plain")
                return
            state.downloads += 1
            body = state.archive
            if state.corrupt:  # flip one byte in the middle, as a broken transfer would
                middle = len(body) // 2
                body = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1 :]
            self._send(200, body, "application/gzip")

    return Handler


@pytest.fixture
def server() -> Iterator[FakeDeepcell]:
    state = FakeDeepcell(archive=good_archive())
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/api/getData/"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture(autouse=True)
def fake_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Never read or write the real home, and never see the developer's variables."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in (weights.WEIGHTS_ENV, weights.TOKEN_ENV, weights.API_URL_ENV):
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights resolution must not open a URL")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/api/getData/"


def write(path: Path, data: bytes = b"w") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# --- resolution -----------------------------------------------------------------------------------


def test_reference_facts() -> None:
    record = weights.KNOWN_VERSIONS["1.2"]
    assert (record.asset_key, record.md5) == (
        "models/cellsam-models_v1.2.tar.gz",
        "f41e6899c49fc8ce12f77a8d25594604",
    )
    assert record.archive_name == "cellsam-models_v1.2.tar.gz"
    assert weights.DEFAULT_VERSION == "1.2"
    assert weights.MODEL_NAMES == ("cellsam_general", "cellsam_extra")


def test_cache_dir_is_the_reference_layout(fake_home: Path) -> None:
    assert weights.cache_dir() == fake_home / ".deepcell" / "models"
    assert weights.cached_weights_path(model="cellsam_extra", version="1.2") == (
        fake_home / ".deepcell" / "models" / "cellsam_v1.2" / "cellsam_extra.pt"
    )


@pytest.mark.parametrize(
    ("explicit", "env", "cached", "expected"),
    [
        pytest.param(True, True, True, "explicit", id="explicit-beats-all"),
        pytest.param(True, False, False, "explicit", id="explicit-only"),
        pytest.param(False, True, True, "env", id="env-beats-cache"),
        pytest.param(False, True, False, "env", id="env-only"),
        pytest.param(False, False, True, "cache", id="cache-only"),
    ],
)
def test_resolution_order(
    tmp_path: Path, fake_home: Path, no_network: None, explicit: bool, env: bool, cached: bool, expected: str
) -> None:
    files = {
        "explicit": write(tmp_path / "mine.pt"),
        "env": write(tmp_path / "from_env.pt"),
    }
    files["cache"] = weights.cached_weights_path()
    if cached:
        write(files["cache"])
    environ = {weights.WEIGHTS_ENV: str(files["env"])} if env else {}
    path = files["explicit"] if explicit else None
    assert weights.resolve_weights(path, env=environ) == files[expected]
    assert weights.find_weights(path, env=environ) == files[expected]


@pytest.mark.parametrize(
    ("model", "version"),
    [("cellsam_general", "1.2"), ("cellsam_extra", "1.2"), ("cellsam_general", "1.3")],
)
def test_cache_lookup_by_model_and_version(tmp_path: Path, model: str, version: str) -> None:
    expected = write(tmp_path / "models" / f"cellsam_v{version}" / f"{model}.pt")
    found = weights.resolve_weights(model=model, version=version, env={}, cache=tmp_path / "models")
    assert found == expected


def test_missing_explicit_path_is_an_error_even_if_cached(tmp_path: Path) -> None:
    write(weights.cached_weights_path())
    with pytest.raises(WeightsNotFoundError, match="does not exist") as info:
        weights.resolve_weights(tmp_path / "typo.pt", env={})
    assert "typo.pt" in str(info.value)
    assert weights.find_weights(tmp_path / "typo.pt", env={}) is None


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_bad_env_path_is_an_error_even_if_cached(tmp_path: Path, kind: str) -> None:
    write(weights.cached_weights_path())
    bad = tmp_path / "bad"
    if kind == "directory":
        bad.mkdir()
    with pytest.raises(WeightsNotFoundError, match=weights.WEIGHTS_ENV):
        weights.resolve_weights(env={weights.WEIGHTS_ENV: str(bad)})


def test_not_found_message_says_how_to_get_weights(fake_home: Path, no_network: None) -> None:
    with pytest.raises(WeightsNotFoundError) as info:
        weights.resolve_weights(env={})
    message = str(info.value)
    for needle in (
        "DEEPCELL_ACCESS_TOKEN=",
        "cellsam-stream weights fetch",
        "--weights",
        "CELLSAM_WEIGHTS",
        str(fake_home / ".deepcell" / "models" / "cellsam_v1.2" / "cellsam_general.pt"),
    ):
        assert needle in message
    assert isinstance(info.value, FileNotFoundError)


def test_resolution_never_downloads(tmp_path: Path, server: FakeDeepcell) -> None:
    environ = {weights.TOKEN_ENV: TOKEN, weights.API_URL_ENV: server.url}
    with pytest.raises(WeightsNotFoundError):
        weights.resolve_weights(env=environ)
    assert weights.find_weights(env=environ) is None
    assert server.api_calls == [] and server.downloads == 0
    assert not weights.cache_dir().exists()
    # And with the API unreachable, cached weights still resolve.
    cached = write(weights.cached_weights_path())
    assert (
        weights.resolve_weights(env={weights.TOKEN_ENV: TOKEN, weights.API_URL_ENV: closed_port_url()})
        == cached
    )


@pytest.mark.parametrize(
    ("model", "version", "error"),
    [
        ("vit_h", None, UnknownModelError),
        ("cellsam_general", "../../etc", WeightsNotFoundError),
    ],
)
def test_bad_model_or_version(model: str, version: str | None, error: type[Exception]) -> None:
    with pytest.raises(error):
        weights.resolve_weights(model=model, version=version, env={})


# --- fetch ----------------------------------------------------------------------------------------


def fetch(server: FakeDeepcell, **kwargs: object) -> Path:
    options: dict[str, object] = {
        "token": TOKEN,
        "base_url": server.url,
        "records": records_for(server.archive),
        "progress": False,
    }
    options.update(kwargs)
    return weights.fetch_weights(**options)  # type: ignore[arg-type]


def test_fetch_end_to_end_then_resolve(server: FakeDeepcell, fake_home: Path) -> None:
    folder = fetch(server)
    cache = fake_home / ".deepcell" / "models"
    assert folder == cache / "cellsam_v1.2"
    assert server.api_calls == [{"path": "/api/getData/", "token": TOKEN, "s3_key": ASSET_KEY}]
    assert server.downloads == 1
    assert weights.resolve_weights(env={}) == folder / "cellsam_general.pt"
    assert weights.resolve_weights(model="cellsam_extra", env={}).read_bytes() == EXTRA_BYTES
    assert (folder / "cellsam_general.pt").read_bytes() == GENERAL_BYTES
    # Like the reference, the verified archive stays in the cache; no temporary files are left.
    assert sorted(p.name for p in cache.iterdir()) == [ARCHIVE_NAME, "cellsam_v1.2"]
    # A second fetch finds the weights and does not download again.
    assert fetch(server) == folder and server.downloads == 1


def test_fetch_reads_token_and_url_from_env(server: FakeDeepcell, tmp_path: Path) -> None:
    environ = {weights.TOKEN_ENV: TOKEN, weights.API_URL_ENV: server.url}
    folder = fetch(server, token=None, base_url=None, env=environ, cache=tmp_path / "c")
    assert (folder / "cellsam_general.pt").is_file()
    assert server.api_calls[0]["token"] == TOKEN


def test_fetch_reuses_a_cached_archive_and_force_downloads(server: FakeDeepcell, fake_home: Path) -> None:
    cache = weights.cache_dir()
    write(cache / ARCHIVE_NAME, server.archive)  # as the reference leaves it
    folder = fetch(server, token=None, base_url=closed_port_url())
    assert (folder / "cellsam_general.pt").read_bytes() == GENERAL_BYTES
    assert server.downloads == 0
    (folder / "cellsam_general.pt").write_bytes(b"stale")
    fetch(server, force=True)
    assert server.downloads == 1
    assert (folder / "cellsam_general.pt").read_bytes() == GENERAL_BYTES
    assert sorted(p.name for p in cache.iterdir()) == [ARCHIVE_NAME, "cellsam_v1.2"]


@pytest.mark.parametrize("token", ["wrong-token", ""])
def test_bad_or_missing_token(server: FakeDeepcell, tmp_path: Path, token: str) -> None:
    with pytest.raises(DownloadError, match=weights.TOKEN_ENV) as info:
        fetch(server, token=token or None, env={}, cache=tmp_path / "cache")
    if token:
        assert "403" in str(info.value) and server.api_calls[0]["token"] == token
    else:
        assert server.api_calls == []
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("base_url", "match"),
    [
        pytest.param("/nope/", "404", id="http-404"),
        pytest.param("closed", "could not reach", id="connection-refused"),
        pytest.param("file:///etc/passwd", "not an http", id="file-scheme"),
    ],
)
def test_api_failures(server: FakeDeepcell, tmp_path: Path, base_url: str, match: str) -> None:
    if base_url == "closed":
        base_url = closed_port_url()
    elif base_url.startswith("/"):
        base_url = server.url.replace("/api/getData/", base_url)
    with pytest.raises(DownloadError, match=match):
        fetch(server, base_url=base_url, cache=tmp_path)
    assert server.downloads == 0


def test_unknown_version(server: FakeDeepcell, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match=re.escape("unknown weights version '9.9'")):
        fetch(server, version="9.9", cache=tmp_path)


def test_corrupted_download_is_deleted(server: FakeDeepcell, tmp_path: Path) -> None:
    server.corrupt = True
    with pytest.raises(DownloadError, match="checksum mismatch"):
        fetch(server, cache=tmp_path / "cache")
    assert server.downloads == 1
    assert list((tmp_path / "cache").iterdir()) == []
    assert weights.find_weights(env={}, cache=tmp_path / "cache") is None


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


@pytest.mark.parametrize(
    "bad_entry",
    [
        pytest.param(("cellsam_v1.2/../../escaped.pt", b"x"), id="dotdot"),
        pytest.param(("/tmp/cellsam-absolute-escape.pt", b"x"), id="absolute"),
        pytest.param(_link("cellsam_v1.2/link.pt", "/etc/passwd", tarfile.SYMTYPE), id="symlink"),
        pytest.param(
            _link("cellsam_v1.2/hard.pt", "cellsam_v1.2/cellsam_general.pt", tarfile.LNKTYPE), id="hardlink"
        ),
    ],
)
@pytest.mark.parametrize("extraction", ["filter", "no-filter"])
def test_unsafe_archive_is_refused(
    server: FakeDeepcell,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    bad_entry: tarfile.TarInfo | tuple[str, bytes],
    extraction: str,
) -> None:
    if extraction == "no-filter":  # Pythons before extraction filters take the check-all-first path
        monkeypatch.delattr(tarfile, "data_filter")
    server.archive = make_tar([("cellsam_v1.2/cellsam_general.pt", GENERAL_BYTES), bad_entry])
    top = tmp_path / "top"
    with pytest.raises(DownloadError, match="unsafe archive"), warnings.catch_warnings():
        # Where filters exist, extracting without one warns; here that is the point of the test.
        warnings.simplefilter("ignore", DeprecationWarning)
        fetch(server, cache=top / "deep" / "cache")
    assert sorted(p.name for p in top.rglob("*")) == ["cache", "deep"]
    assert not Path("/tmp/cellsam-absolute-escape.pt").exists()


@pytest.mark.parametrize(
    ("archive", "match"),
    [
        pytest.param(
            make_tar([("cellsam_v9.9/cellsam_general.pt", b"x")]), "holds no cellsam_v1.2", id="wrong-folder"
        ),
        pytest.param(b"not a tar at all" * 10, "cannot extract", id="not-tar"),
    ],
)
def test_archive_without_weights(server: FakeDeepcell, tmp_path: Path, archive: bytes, match: str) -> None:
    server.archive = archive
    with pytest.raises(DownloadError, match=match):
        fetch(server, cache=tmp_path)
    assert not (tmp_path / "cellsam_v1.2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("progress", [True, False])
def test_progress_on_stderr(
    server: FakeDeepcell, tmp_path: Path, capsys: pytest.CaptureFixture[str], progress: bool
) -> None:
    fetch(server, cache=tmp_path, progress=progress)
    captured = capsys.readouterr()
    assert (ARCHIVE_NAME in captured.err) is progress
    assert ("100%" in captured.err) is progress
    assert captured.out == ""


def test_parse_size() -> None:
    assert weights._parse_size("1.5 KB") == 1500
    assert weights._parse_size("2 GB") == 2 * 10**9
    assert weights._parse_size("12 B") == 12
    assert weights._parse_size("lots") is None
    assert weights._parse_size(None) is None


# --- command line ---------------------------------------------------------------------------------


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cellsam-stream")
    add_weights_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_cli_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run_cli(["weights", "path", "--cache-dir", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "cellsam-stream weights fetch" in captured.err and captured.out == ""

    extra = write(tmp_path / "cellsam_v1.2" / "cellsam_extra.pt")
    assert run_cli(["weights", "path", "--model", "cellsam_extra", "--cache-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(extra)

    monkeypatch.setenv(weights.WEIGHTS_ENV, str(extra))
    assert run_cli(["weights", "path"]) == 0
    assert capsys.readouterr().out.strip() == str(extra)
    assert run_cli(["weights", "path", "--weights", str(tmp_path / "nope.pt")]) == 1


@pytest.mark.parametrize(
    "argv",
    [["weights"], ["weights", "path", "--model", "vit_h"], ["weights", "fetch", "--bogus"]],
)
def test_cli_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        run_cli(argv)
    assert info.value.code == 2
    assert "usage" in capsys.readouterr().err


def test_cli_fetch(
    server: FakeDeepcell, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(weights, "KNOWN_VERSIONS", records_for(server.archive))
    monkeypatch.setenv(weights.API_URL_ENV, server.url)
    cache = tmp_path / "cache"
    argv = ["weights", "fetch", "--no-progress", "--cache-dir", str(cache)]

    assert run_cli(argv) == 1  # no token
    assert weights.TOKEN_ENV in capsys.readouterr().err

    monkeypatch.setenv(weights.TOKEN_ENV, TOKEN)
    assert run_cli(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(cache / "cellsam_v1.2")
    assert ARCHIVE_NAME not in captured.err  # --no-progress
    assert run_cli(["weights", "path", "--cache-dir", str(cache)]) == 0
    assert capsys.readouterr().out.strip() == str(cache / "cellsam_v1.2" / "cellsam_general.pt")

    server.corrupt = True
    assert run_cli([*argv, "--force"]) == 1
    assert "checksum mismatch" in capsys.readouterr().err
