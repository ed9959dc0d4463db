"""Data preparation, offline: a local HTTP server (with Range support) serves tiny archives built
here; downloads resume, checksums are enforced, unpacking is atomic, local archives need no server.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import threading
import urllib.request
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from imcap.data.download import fetch, unpack
from imcap.errors import UserError
from imcap.pipeline.prepare import prepare

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


# ----------------------------------------------------------------------------- local server


class Server:
    """Files served on 127.0.0.1 with Range support; records (path, Range header) per request."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.drop_after: dict[str, int] = {}  # path -> bytes sent before the connection is cut
        self.ignore_range = False
        state = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                rng = self.headers.get("Range")
                state.requests.append((self.path, rng))
                data = state.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if rng and not state.ignore_range:
                    start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                cut = state.drop_after.pop(self.path, None)
                self.wfile.write(body if cut is None else body[:cut])
                self.wfile.flush()
                self.close_connection = True  # HTTP/1.0: the connection ends here, cut or not

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    def add(self, path: str, data: bytes) -> str:
        self.files[path] = data
        return self.url + path


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


# ----------------------------------------------------------------------------- tiny archives


def jpeg_bytes(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, "JPEG")
    return buf.getvalue()


IMAGES = {"a.jpg": "train", "b.jpg": "train", "c.jpg": "val", "d.jpg": "test"}


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def flickr8k_archives() -> dict[str, bytes]:
    """The three Flickr8k archives in their real layouts (images zip with macOS litter)."""
    images = {f"Flicker8k_Dataset/{n}": jpeg_bytes((i * 40, 0, 0)) for i, n in enumerate(IMAGES)}
    images["__MACOSX/Flicker8k_Dataset/._a.jpg"] = b"junk"
    token = "".join(f"{n}#{k}\t{n} caption {k} .\n" for n in IMAGES for k in range(5))
    lists = {
        s: "".join(f"{n}\n" for n, sp in IMAGES.items() if sp == s)
        for s in ("train", "val", "test")
    }
    text = {
        "Flickr8k.token.txt": token.encode(),
        "Flickr_8k.trainImages.txt": lists["train"].encode(),
        "Flickr_8k.devImages.txt": lists["val"].encode(),
        "Flickr_8k.testImages.txt": lists["test"].encode(),
        "readme.txt": b"cite the paper",
    }
    karpathy = {
        "images": [
            {
                "filename": n,
                "split": s,
                "sentences": [{"raw": f"{n} caption {k} ."} for k in range(5)],
            }
            for n, s in IMAGES.items()
        ]
    }
    return {
        "Flickr8k_Dataset.zip": zip_bytes(images),
        "Flickr8k_text.zip": zip_bytes(text),
        "caption_datasets.zip": zip_bytes(
            {
                "dataset_flickr8k.json": json.dumps(karpathy).encode(),
                "dataset_coco.json": b"{}",
                "dataset_flickr30k.json": b"{}",
            }
        ),
    }


def make_cfg(tmp_path: Path, name: str = "flickr8k", **over: object) -> DictConfig:
    """prepare's config as Hydra composes it: conf/prepare.yaml keys + conf/data/<name>.yaml."""
    own = OmegaConf.load(CONF / "prepare.yaml")
    data = OmegaConf.load(CONF / "data" / f"{name}.yaml")
    own.pop("defaults")
    data.pop("defaults")
    paths = {"data_dir": str(tmp_path / "data")}
    base = {"data": data, "paths": paths, "progress": False, "retry_wait": 0.0}
    return OmegaConf.merge(own, base, over)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def served_flickr8k(server: Server, tmp_path: Path) -> tuple[DictConfig, dict[str, bytes]]:
    """Config whose archives come from the local server, with the tiny archives' real sha256."""
    archives = flickr8k_archives()
    cfg = make_cfg(tmp_path)
    by_file = {a.file: a for a in cfg.data.download.archives}
    for file, data in archives.items():
        by_file[file].url = server.add(f"/{file}", data)
        by_file[file].md5 = None  # the published md5 is the real archive's
        by_file[file].sha256 = sha256(data)
        by_file[file].size = len(data)
    return cfg, archives


# ----------------------------------------------------------------------------- prepare


def test_download_and_unpack_gives_a_loadable_dataset(server: Server, tmp_path: Path) -> None:
    cfg, _ = served_flickr8k(server, tmp_path)
    recs = prepare(cfg)
    root = tmp_path / "data" / "flickr8k"
    assert {(r.image_id, r.split) for r in recs} == set(IMAGES.items())
    assert (root / "Flickr8k_text" / "Flickr8k.token.txt").is_file()
    assert (root / "Flicker8k_Dataset" / "a.jpg").is_file()
    assert (root / "dataset_flickr8k.json").is_file()
    assert not (root / "dataset_coco.json").exists()  # only the member asked for
    assert not (root / "__MACOSX").exists()
    assert not list(root.glob(".unpack-*")) and not list((tmp_path / "data").rglob("*.part"))
    assert sorted(p.name for p in (tmp_path / "data" / "downloads").iterdir()) == sorted(
        ["Flickr8k_Dataset.zip", "Flickr8k_text.zip", "caption_datasets.zip"]
    )
    assert len(server.requests) == 3
    # a second run finds everything in place and requests nothing
    assert len(prepare(cfg)) == len(recs)
    assert len(server.requests) == 3
    # force: everything again
    cfg.force = True
    cfg.keep_archives = False
    (root / "Flicker8k_Dataset" / "a.jpg").write_bytes(b"stale")
    assert len(prepare(cfg)) == len(recs)
    assert len(server.requests) == 6
    assert (root / "Flicker8k_Dataset" / "a.jpg").read_bytes()[:2] == b"\xff\xd8"  # JPEG again
    assert not list((tmp_path / "data" / "downloads").iterdir())


def test_interrupted_download_resumes_with_range(server: Server, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    url = server.add("/big.zip", data)
    server.drop_after["/big.zip"] = 100_000  # first response: cut after 100 kB
    out = fetch(
        url, tmp_path / "big.zip", size=len(data), sha256=sha256(data), retry_wait=0, progress=False
    )
    assert out.read_bytes() == data
    assert server.requests == [("/big.zip", None), ("/big.zip", "bytes=100000-")]
    assert not (tmp_path / "big.zip.part").exists()


def test_partial_file_from_an_earlier_run_is_resumed(server: Server, tmp_path: Path) -> None:
    data = os.urandom(50_000)
    url = server.add("/a.zip", data)
    (tmp_path / "a.zip.part").write_bytes(data[:12_345])
    fetch(url, tmp_path / "a.zip", sha256=sha256(data), progress=False)
    assert server.requests == [("/a.zip", "bytes=12345-")]
    assert (tmp_path / "a.zip").read_bytes() == data
    # a complete part left by a run killed before the rename: 416 from the server, nothing sent
    (tmp_path / "c.zip.part").write_bytes(data)
    fetch(server.add("/c.zip", data), tmp_path / "c.zip", sha256=sha256(data), progress=False)
    assert server.requests[-1] == ("/c.zip", "bytes=50000-")
    assert (tmp_path / "c.zip").read_bytes() == data
    # a server that ignores Range sends it all again: the part is rewritten, not appended to
    server.ignore_range = True
    (tmp_path / "b.zip.part").write_bytes(b"x" * 999)
    fetch(server.add("/b.zip", data), tmp_path / "b.zip", progress=False)
    assert (tmp_path / "b.zip").read_bytes() == data


def test_bad_checksum_fails_and_leaves_no_file(server: Server, tmp_path: Path) -> None:
    data = b"not the archive you are looking for" * 100
    url = server.add("/x.zip", data)
    dest = tmp_path / "x.zip"
    with pytest.raises(
        UserError, match=r"sha256 mismatch for x\.zip from http://127\.0\.0\.1.*expected 0{64}"
    ):
        fetch(url, dest, sha256="0" * 64, progress=False)
    assert not dest.exists() and not (tmp_path / "x.zip.part").exists()
    with pytest.raises(UserError, match=r"is \d+ bytes but 10 are expected"):
        fetch(url, dest, size=10, progress=False)
    assert not dest.exists()
    with pytest.raises(UserError, match=r"HTTP 404.*archives="):
        fetch(server.url + "/missing.zip", dest, progress=False)


def test_bad_checksum_through_prepare_leaves_no_layout(server: Server, tmp_path: Path) -> None:
    cfg, _ = served_flickr8k(server, tmp_path)
    cfg.data.download.archives[0].sha256 = "f" * 64  # Flickr8k_text.zip
    with pytest.raises(UserError, match="sha256 mismatch for Flickr8k_text.zip"):
        prepare(cfg)
    root = tmp_path / "data" / "flickr8k"
    assert not (root / "Flickr8k_text").exists()
    assert not (tmp_path / "data" / "downloads" / "Flickr8k_text.zip").exists()


def test_local_archives_need_no_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("local-archive mode must not download")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    local = tmp_path / "Downloads"
    local.mkdir()
    for file, data in flickr8k_archives().items():
        (local / file).write_bytes(data)
    cfg = make_cfg(
        tmp_path, archives=[str(local / "Flickr8k_text.zip"), str(local / "Flickr8k_Dataset.zip")]
    )
    cfg.data.download.archives[0].md5 = None  # the published md5 is the real archive's
    cfg.data.download.archives[2].md5 = None
    recs = prepare(cfg)
    assert {(r.image_id, r.split) for r in recs} == set(IMAGES.items())  # official split lists
    assert (local / "Flickr8k_text.zip").is_file()  # the user's files are left alone


def test_local_archive_with_unknown_name_is_unpacked_as_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Kaggle-style zip (Images/ + captions.txt) is unpacked into root and detected."""
    monkeypatch.setattr(urllib.request, "urlopen", None)
    files = {f"Images/{n}": jpeg_bytes((0, 90, 0)) for n in IMAGES}
    files["captions.txt"] = (
        "image,caption\n" + "".join(f'{n},"A, b ."\n' for n in IMAGES)
    ).encode()
    files["Flickr_8k.trainImages.txt"] = b"a.jpg\nb.jpg\n"
    files["Flickr_8k.devImages.txt"] = b"c.jpg\n"
    (tmp_path / "archive.zip").write_bytes(zip_bytes(files))
    recs = prepare(make_cfg(tmp_path, archives=str(tmp_path / "archive.zip")))  # no brackets
    assert {(r.image_id, r.split) for r in recs} == {
        ("a.jpg", "train"),
        ("b.jpg", "train"),
        ("c.jpg", "val"),
    }
    assert recs[0].captions == ["A, b ."]


def test_local_archive_checksum_is_checked_and_file_kept(tmp_path: Path) -> None:
    path = tmp_path / "Flickr8k_text.zip"
    path.write_bytes(flickr8k_archives()["Flickr8k_text.zip"])  # not the real archive: md5 differs
    with pytest.raises(UserError, match="md5 mismatch for Flickr8k_text.zip"):
        prepare(make_cfg(tmp_path, archives=[str(path)]))
    assert path.is_file()
    with pytest.raises(UserError, match="archive\\(s\\) not found: .*nope.zip"):
        prepare(make_cfg(tmp_path, archives=[str(tmp_path / "nope.zip")]))


def test_flickr30k_without_archives_says_where_to_get_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(urllib.request, "urlopen", None)  # fails before any download
    with pytest.raises(UserError, match=r"no official public direct URL.*archives="):
        prepare(make_cfg(tmp_path, "flickr30k"))


def test_coco_prepare_picks_the_year_archives(server: Server, tmp_path: Path) -> None:
    """data.source.year=2017 fetches only 2017 archives; annotations keep only caption files."""
    ann = {
        "images": [{"id": 7, "file_name": "000000000007.jpg"}],
        "annotations": [{"image_id": 7, "id": 1, "caption": "A cat."}],
    }
    files = {
        "annotations_trainval2017.zip": zip_bytes(
            {
                "annotations/captions_train2017.json": json.dumps(ann).encode(),
                "annotations/captions_val2017.json": json.dumps({**ann, "images": []}).encode(),
                "annotations/instances_train2017.json": b"{}",
            }
        ),
        "train2017.zip": zip_bytes({"train2017/000000000007.jpg": jpeg_bytes((1, 2, 3))}),
        "val2017.zip": zip_bytes({"val2017/": b""}),
    }
    cfg = make_cfg(tmp_path, "coco", data={"source": {"year": 2017}})
    for a in cfg.data.download.archives:
        if a.file in files:
            a.url = server.add(f"/{a.file}", files[a.file])
            a.size = len(files[a.file])
        else:  # 2014 archives, and the optional Karpathy zip: 404 here
            a.url = server.url + "/" + a.file
    recs = prepare(cfg)
    assert [(r.image_id, r.split, r.captions) for r in recs] == [("7", "train", ["A cat."])]
    root = tmp_path / "data" / "coco"
    assert sorted(p.name for p in (root / "annotations").iterdir()) == [
        "captions_train2017.json",
        "captions_val2017.json",
    ]
    assert not any("2014" in path for path, _ in server.requests)
    # year auto: the 2017 data already there decides (default_year 2014 would 404 here)
    cfg.data.source.year = "auto"
    n = len(server.requests)
    assert len(prepare(cfg)) == 1
    assert server.requests[n:] == [("/caption_datasets.zip", None)]  # only the optional one


# ----------------------------------------------------------------------------- unpack


def test_unpack_is_atomic_and_safe(tmp_path: Path) -> None:
    good = zip_bytes(
        {"Flicker8k_Dataset/a.jpg": b"A" * 1000, "Flicker8k_Dataset/b.jpg": b"B" * 1000}
    )
    bad = tmp_path / "corrupt.zip"  # the second member's bytes are damaged (CRC error mid-unpack)
    i = good.index(b"B" * 1000)
    bad.write_bytes(good[:i] + b"X" * 10 + good[i + 10 :])
    root = tmp_path / "root"
    with pytest.raises(UserError, match=r"corrupt\.zip is corrupt or truncated"):
        unpack(bad, root, progress=False)
    assert root.is_dir() and not any(root.iterdir())  # no half image folder, no temp dir left
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError, match="truncated.zip is not a zip or tar archive"):
        unpack(truncated, root, progress=False)
    evil = tmp_path / "evil.zip"
    evil.write_bytes(zip_bytes({"ok.txt": b"x", "../escaped.txt": b"y"}))
    with pytest.raises(UserError, match="outside the target folder"):
        unpack(evil, root, progress=False)
    assert not (tmp_path / "escaped.txt").exists() and not any(root.iterdir())


def test_unpack_merges_into_existing_folders_and_keeps_files(tmp_path: Path) -> None:
    import tarfile

    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "captions_train2017.json").write_text("mine")
    tgz = tmp_path / "ann.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        for name, data in (
            ("annotations/captions_train2014.json", b"new"),
            ("annotations/captions_train2017.json", b"theirs"),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    unpack(tgz, root, progress=False)
    assert (root / "annotations" / "captions_train2014.json").read_text() == "new"
    assert (root / "annotations" / "captions_train2017.json").read_text() == "mine"
    unpack(tgz, root, force=True, progress=False)
    assert (root / "annotations" / "captions_train2017.json").read_text() == "theirs"
    # an archive with loose files goes into `into`; one that has the `into` folder is not nested
    unpack(tgz, root, into="annotations", progress=False)
    assert not (root / "annotations" / "annotations").exists()


# ----------------------------------------------------------------------------- entry point

_COMPOSED = all(
    (CONF / p).is_file() for p in ("data/_base.yaml", "paths/default.yaml", "hydra/default.yaml")
)


@pytest.mark.skipif(not _COMPOSED, reason="the shared config tree is not complete yet")
@pytest.mark.parametrize("name", ["flickr8k", "flickr30k", "coco"])
def test_prepare_config_composes(name: str) -> None:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="prepare", overrides=[f"data={name}", "paths.data_dir=/d"])
    assert cfg.data.root == f"/d/{name}" and cfg.download_dir == "/d/downloads"
    assert cfg.data.loader == "imcap.data.datasets.load_records"
    assert cfg.archives is None and cfg.force is False


@pytest.mark.skipif(not _COMPOSED, reason="the shared config tree is not complete yet")
def test_cli_prints_one_line_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "src" / "prepare.py"),
            "data=flickr8k",
            f"paths.data_dir={tmp_path}",
            f"archives=[{tmp_path / 'nope.zip'}]",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: archive(s) not found:") and "nope.zip" in last
