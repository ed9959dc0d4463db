"""What caption.py's `images=` accepts: files, folders, globs, URLs (limited), stdin."""

from __future__ import annotations

import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from imcap.data import images as images_mod
from imcap.data.images import list_images
from imcap.errors import UserError


def png_bytes(color: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, "PNG")
    return buf.getvalue()


def photos(tmp_path: Path) -> list[Path]:
    (tmp_path / "a").mkdir()
    paths = [tmp_path / "a" / n for n in ("x.jpg", "y.png", "z.webp")]
    for p in paths:
        Image.new("RGB", (8, 8), "red").save(p)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    return paths


def test_files_folders_and_globs(tmp_path: Path) -> None:
    x, y, z = photos(tmp_path)
    assert list_images(tmp_path / "a") == [x, y, z]
    assert list_images(str(tmp_path / "a" / "*.jpg")) == [x]
    assert list_images(str(tmp_path / "**" / "*.png")) == [y]
    assert list_images([str(x), str(tmp_path / "a" / "[yz]*")]) == [x, y, z]
    with pytest.raises(UserError, match="no images match"):
        list_images(str(tmp_path / "*.gif"))


def test_paths_from_stdin(tmp_path: Path, monkeypatch) -> None:
    x, y, _ = photos(tmp_path)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{x}\n\n{y}\n"))
    assert list_images("-") == [x, y]
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    with pytest.raises(UserError, match="standard input"):
        list_images("-")


@pytest.fixture
def server():
    """A local HTTP server: /photo.png, /big.png (over the limit), /missing."""
    body = png_bytes()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path == "/photo.png":
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif self.path == "/big.png":
                self.send_response(200)
                self.send_header("Content-Length", str(10_000))
                self.end_headers()
                self.wfile.write(b"\0" * 10_000)
            else:
                self.send_error(404)

        def log_message(self, *args) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_urls_are_downloaded_within_limits(server: str, tmp_path: Path, monkeypatch) -> None:
    (got,) = list_images(f"{server}/photo.png", download_dir=tmp_path / "dl")
    assert got.parent == tmp_path / "dl" and got.read_bytes() == png_bytes()
    monkeypatch.setattr(images_mod, "URL_MAX_BYTES", 5_000)
    with pytest.raises(UserError, match=r"big\.png is 10,000 bytes, over the 5,000-byte limit"):
        list_images(f"{server}/big.png", download_dir=tmp_path / "dl")
    with pytest.raises(UserError, match=r"cannot download .*/missing"):
        list_images(f"{server}/missing", download_dir=tmp_path / "dl")
    with pytest.raises(UserError, match=r"Offline\?"):
        list_images("http://127.0.0.1:9/none.jpg", download_dir=tmp_path / "dl")  # nothing there
