"""Hostile inputs to caption.py and training: slow or redirecting image URLs, dataset ids and
image names that would become file paths, a learning rate whose update overflows. Each test
builds its own hostile input and checks the failure is bounded, contained and one line."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import torch
from conftest import cli, demo_checkpoint
from PIL import Image

from imcap.data import images as images_mod
from imcap.data.images import file_in, list_images, safe_stem, unique_stems
from imcap.errors import UserError


def png_bytes(color: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, "PNG")
    return buf.getvalue()


# -- URL inputs: one deadline for the whole download, http(s)-only redirects, a redirect limit ----
class Server(SimpleNamespace):
    url: str
    hits: list[str]


@pytest.fixture
def server() -> Iterator[Server]:
    """A local HTTP server with hostile endpoints:
    /photo.png, /img/<any>  a real image
    /trickle-body           headers at once, then one body byte every 0.5 s
    /trickle-headers        a status line, then one header byte every 0.5 s (headers never end)
    /to?url=U&code=C        a redirect (status C, default 302) to U
    /loop                   redirects to itself
    /chain/N[?stop=S]       redirects to /chain/N+1 (serves the image at N == S; no stop: never)
    """
    body = png_bytes()
    stop = threading.Event()
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            hits.append(self.path)
            parts = urlsplit(self.path)
            query = {k: v[0] for k, v in parse_qs(parts.query).items()}
            try:
                if parts.path == "/photo.png" or parts.path.startswith("/img/"):
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                elif parts.path == "/trickle-body":
                    self.send_response(200)
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    self.trickle(60)
                elif parts.path == "/trickle-headers":
                    self.wfile.write(b"HTTP/1.0 200 OK\r\nX-Slow: ")
                    self.trickle(60)
                elif parts.path == "/to":
                    self.redirect(query["url"], int(query.get("code", 302)))
                elif parts.path == "/loop":
                    self.redirect("/loop")
                elif parts.path.startswith("/chain/"):
                    n = int(parts.path.rsplit("/", 1)[1])
                    if "stop" in query and n >= int(query["stop"]):
                        self.redirect("/photo.png")
                    else:
                        suffix = f"?stop={query['stop']}" if "stop" in query else ""
                        self.redirect(f"/chain/{n + 1}{suffix}")
                else:
                    self.send_error(404)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client hung up: what a deadline does

        def trickle(self, n: int) -> None:
            """One byte every 0.5 s: each read gets data long before any per-read timeout."""
            for _ in range(n):
                if stop.wait(0.5):
                    return
                self.wfile.write(b"x")
                self.wfile.flush()

        def redirect(self, location: str, code: int = 302) -> None:
            self.send_response(code)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield Server(url=f"http://127.0.0.1:{srv.server_address[1]}", hits=hits)
    stop.set()
    srv.shutdown()
    srv.server_close()


def download_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "imcap-download" and t.is_alive()]


@pytest.mark.parametrize("path", ["/trickle-body", "/trickle-headers"])
def test_a_trickling_url_stops_at_one_total_deadline(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """A byte every 0.5 s never trips a per-read timeout (here 2 s); the total deadline does,
    whether the server trickles the body or the headers, and the download thread ends too."""
    deadline = 2.0
    monkeypatch.setattr(images_mod, "URL_DEADLINE", deadline)
    url = f"{server.url}{path}"
    t0 = time.monotonic()
    with pytest.raises(UserError) as err:
        list_images(url, download_dir=tmp_path / "dl")
    elapsed = time.monotonic() - t0
    assert deadline - 0.1 <= elapsed < deadline + 1.5, elapsed
    msg = str(err.value)
    assert url in msg and f"not finished after {deadline:g} s" in msg and "fix:" in msg
    assert "\n" not in msg
    assert not list((tmp_path / "dl").iterdir())  # no partial file left behind
    # the blocked read was woken (socket shut down): no thread keeps the connection open
    until = time.monotonic() + 3.0
    while download_threads() and time.monotonic() < until:
        time.sleep(0.05)
    assert not download_threads()


def test_a_fast_url_is_unaffected_by_the_deadline(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(images_mod, "URL_DEADLINE", 2.0)
    (got,) = list_images(f"{server.url}/photo.png", download_dir=tmp_path / "dl")
    assert got.parent == tmp_path / "dl" and got.read_bytes() == png_bytes()


@pytest.mark.parametrize(
    "target",
    ["file:///etc/passwd", "FILE:///etc/hostname", "ftp://127.0.0.1/photo.png", "data:,x"],
)
def test_a_redirect_to_another_scheme_is_refused(
    server: Server, tmp_path: Path, target: str
) -> None:
    url = f"{server.url}/to?url={target}"
    with pytest.raises(UserError) as err:
        list_images(url, download_dir=tmp_path / "dl")
    msg = str(err.value)
    assert msg.startswith(f"cannot download {url}: it redirects to ")
    assert "not an http(s) URL" in msg and "fix:" in msg and "\n" not in msg
    assert not list((tmp_path / "dl").iterdir())


@pytest.mark.parametrize("start", ["/loop", "/chain/0"])
def test_a_redirect_loop_stops_at_the_limit(server: Server, tmp_path: Path, start: str) -> None:
    limit = images_mod.URL_MAX_REDIRECTS
    with pytest.raises(UserError, match=rf"more than {limit} redirects .*fix:"):
        list_images(f"{server.url}{start}", download_dir=tmp_path / "dl")
    assert len(server.hits) == limit + 1  # the first request and `limit` redirects followed


@pytest.mark.parametrize(
    "how",
    ["relative", "absolute-301", "absolute-307", "absolute-308", "chain-at-limit"],
)
def test_normal_http_redirects_still_work(server: Server, tmp_path: Path, how: str) -> None:
    limit = images_mod.URL_MAX_REDIRECTS
    url = {
        "relative": f"{server.url}/to?url=/photo.png",
        "absolute-301": f"{server.url}/to?code=301&url={server.url}/photo.png",
        "absolute-307": f"{server.url}/to?code=307&url={server.url}/photo.png",
        "absolute-308": f"{server.url}/to?code=308&url={server.url}/photo.png",
        # /chain/1 .. /chain/(limit-1), then /photo.png: exactly `limit` redirects
        "chain-at-limit": f"{server.url}/chain/0?stop={limit - 1}",
    }[how]
    (got,) = list_images(url, download_dir=tmp_path / "dl")
    assert got.read_bytes() == png_bytes()
    assert server.hits[-1] == "/photo.png"
    if how == "chain-at-limit":
        assert len(server.hits) == limit + 1


def test_a_hostile_url_name_makes_a_safe_download_name(server: Server, tmp_path: Path) -> None:
    """The last URL segment names the downloaded file: `..`, encoded separators and control
    characters, or a 300-character name must not escape, hide or overflow the file name."""
    for segment in ("..", "%2E%2E%2F%2E%2E%2Fescape%0A.png", "n" * 300 + ".png"):
        (got,) = list_images(f"{server.url}/img/{segment}", download_dir=tmp_path / "dl")
        assert got.parent == tmp_path / "dl" and got.read_bytes() == png_bytes()
        assert not got.name.startswith(".") and len(got.name.encode()) <= 100
        assert all(c.isprintable() for c in got.name) and ".." not in got.name


# -- file names from dataset ids and image stems --------------------------------------------------
HOSTILE_IDS = [
    "../../escape",
    "..",
    ".",
    "",
    "/etc/passwd",
    "a/b",
    "a_b",
    "x\\y",
    "ctl\x00\x1b[31m\nname",
    "CON",
    "é" * 300,
    ".hidden",
]


def test_safe_stem_never_leaves_its_folder(tmp_path: Path) -> None:
    for text in HOSTILE_IDS:
        stem = safe_stem(text)
        assert stem and stem not in (".", "..") and not stem.startswith(".")
        assert "/" not in stem and "\\" not in stem and ".." not in stem
        assert all(c.isprintable() and c != " " for c in stem), repr(stem)
        assert len(stem.encode()) <= 100
        assert file_in(tmp_path, stem, ".png").parent == tmp_path
    names = unique_stems(HOSTILE_IDS)
    assert len({n.casefold() for n in names.values()}) == len(HOSTILE_IDS)  # all distinct
    with pytest.raises(ValueError, match="unsafe file name"):
        file_in(tmp_path, "../x", ".png")


def test_unique_stems_keep_same_named_images_apart() -> None:
    keys = ["a/cat.jpg", "b/cat.jpg", "c/Cat.png", "d/dog.jpg"]
    names = unique_stems(keys, lambda k: Path(k).stem)
    assert names["d/dog.jpg"] == "dog"  # no clash: the plain stem
    assert len({n.casefold() for n in names.values()}) == 4
    assert all(names[k].startswith(Path(k).stem) for k in keys)
    assert unique_stems(list(reversed(keys)), lambda k: Path(k).stem) == names  # order-free


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def test_caption_attention_maps_of_same_named_images_both_survive(tmp_path: Path) -> None:
    """caption.py attention=true on a/cat.jpg and b/cat.jpg (and a name with control
    characters): one map each, all inside the run's attention folder."""
    from conftest import ROOT
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from imcap.pipeline.run import caption

    inputs = tmp_path / "inputs"
    paths = [inputs / "a" / "cat.jpg", inputs / "b" / "cat.jpg", inputs / "c" / "x\x1b\nname.png"]
    for p, color in zip(paths, ("red", "blue", "green"), strict=True):
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (96, 96), color).save(p, "PNG" if p.suffix == ".png" else "JPEG")
    ckpt = demo_checkpoint(tmp_path / "demo.ckpt", attention=True)
    run = tmp_path / "run"
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="caption",
            overrides=[
                f"ckpt_path={ckpt}",
                "attention=true",
                "device=cpu",
                f"paths.output_dir={run}",
            ],
        )
    cfg.images = [str(p) for p in paths]  # a newline in a name: set here, not on a command line
    before = files_under(tmp_path)
    rows = caption(cfg)
    maps = [Path(r["attention_map"]) for r in rows]
    assert len(maps) == 3 and len(set(maps)) == 3
    assert all(m.is_file() and m.parent == run / "attention" for m in maps)
    assert {m.name for m in maps[:2]} != {"cat.png"}  # the two cats are told apart
    assert all(m.name.startswith("cat_") for m in maps[:2])
    assert "\n" not in maps[2].name and "\x1b" not in maps[2].name
    new = files_under(tmp_path) - before
    assert new and all(run in p.parents for p in new)  # nothing written outside the run


def test_attention_callback_names_hostile_ids_inside_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dataset ids from an annotation file (`../../escape`, `a/b` next to `a_b`) name the
    per-epoch attention figures: each gets its own file, all inside the callback's folder.
    (The figure is a stub that writes its target like the real one: drawing is tested in
    test_attention.py, and five matplotlib figures cost half a minute on 2 cores.)"""
    from conftest import DEMO_WORDS

    import imcap.eval.viz as viz

    def figure(image: Path, words: list[str], alphas: torch.Tensor, target: Path) -> Path:
        assert Path(image).is_file() and alphas.ndim == 2 and words
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(png_bytes())
        return target

    monkeypatch.setattr(viz, "attention_figure", figure)

    from imcap.data.images import load_image, make_transform
    from imcap.model.batch import Batch
    from imcap.model.checkpoint import load_captioner
    from imcap.pipeline.callbacks import AttentionMaps

    model = load_captioner(demo_checkpoint(tmp_path / "demo.ckpt", attention=True))
    ids = ["../../escape", "a/b", "a_b", "..", "cat"]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    image_of = {}
    for n, i in enumerate(ids):
        image_of[i] = inputs / f"{n}.png"
        Image.new("RGB", (96, 96), (40 * n, 80, 120)).save(image_of[i])
    transform = make_transform(model.encoder.data_config)

    def eval_batch(chosen: list[str], device: torch.device) -> Batch:
        images = torch.stack([transform(load_image(image_of[i])) for i in chosen])
        return Batch(rows=torch.arange(len(chosen)), image_ids=list(chosen), images=images)

    model.data_link = SimpleNamespace(
        references=lambda split: {i: [" ".join(DEMO_WORDS[:3])] for i in ids},
        eval_batch=eval_batch,
        image_path=lambda i: image_of[i],
    )
    model.predictions = {"val": {i: "a red circle" for i in ids}}
    trainer = SimpleNamespace(
        sanity_checking=False,
        is_global_zero=True,
        current_epoch=0,
        global_step=0,
        state=SimpleNamespace(fn="fit"),
        loggers=[],
    )
    folder = tmp_path / "run" / "attention"
    before = files_under(tmp_path)
    AttentionMaps(num_images=len(ids), dirpath=str(folder)).on_validation_end(trainer, model)
    new = files_under(tmp_path) - before
    assert len(new) == len(ids)
    assert all(p.parent == folder / "epoch_000" and p.suffix == ".png" for p in new)
    assert not (tmp_path / "escape.png").exists() and not (tmp_path / "run" / "escape.png").exists()


def test_a_non_numeric_coco_id_is_left_out_not_a_crash(tmp_path: Path) -> None:
    """A Karpathy COCO entry with cocoid `../../escape` and no file: reported missing and left
    out like any missing image (it once reached int() and raised ValueError)."""
    import json

    from conftest import data_source

    from imcap.data.datasets import load_records

    root = tmp_path / "coco"
    (root / "val2014").mkdir(parents=True)
    (root / "train2017").mkdir()
    Image.new("RGB", (8, 8)).save(root / "val2014" / "COCO_val2014_000000000001.jpg")
    sent = [{"raw": "a red square", "tokens": ["a", "red", "square"]}]
    images = [
        {"cocoid": 1, "filepath": "val2014", "filename": "COCO_val2014_000000000001.jpg",
         "split": "val", "sentences": sent},
        {"cocoid": "../../escape", "filepath": "val2014", "filename": "nope.jpg",
         "split": "val", "sentences": sent},
    ]  # fmt: skip
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": images}))

    (record,) = load_records("coco", root, **data_source("coco"))  # the other: missing, left out
    assert record.image_id == "1"
    assert record.path == root / "val2014" / "COCO_val2014_000000000001.jpg"


# -- a learning rate whose update overflows --------------------------------------------------------
def test_an_overflowing_learning_rate_is_one_line(tmp_path: Path) -> None:
    """model.optimizer.lr=1e38: Adam's first step size lr / (1 - beta1) = 1e39 does not fit
    float32; the run ends with one line naming the key and the fix, exit 2, no checkpoint."""
    run = tmp_path / "run"
    r = cli(
        "train.py",
        "debug=fast",
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "data.source.n_train=64",
        "data.source.n_val=16",
        "data.source.n_test=16",
        "data.source.image_size=64",
        "data.img_size=64",
        "decoder.embed_dim=16",
        "decoder.hidden_dim=32",
        "logger=csv",
        "metrics.java=false",
        "model.optimizer.lr=1e38",
        f"hydra.run.dir={run}",
    )
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
    assert "model.optimizer.lr=1e+38 is far too large" in line
    assert "without overflow" in line and "fix: lower model.optimizer.lr" in line
    assert not list(run.glob("checkpoints/*.ckpt"))


def guard_setup(lr: float) -> tuple[torch.optim.Optimizer, Any, Any]:
    from imcap.pipeline.callbacks import OverflowGuard

    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([w], lr=lr, foreach=True)
    trainer = SimpleNamespace(optimizers=[opt], global_step=7)
    module = SimpleNamespace(hparams={"optimizer": {"lr": lr}, "encoder_lr": 1e-5})
    OverflowGuard().on_train_start(trainer, module)
    OverflowGuard().on_train_start(trainer, module)  # idempotent: wrapped once
    return opt, trainer, w


def test_overflow_guard_maps_only_the_update_overflow() -> None:
    opt, _, w = guard_setup(1e38)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (w * 2).sum()
        loss.backward()
        return loss

    with pytest.raises(
        UserError, match=r"^training stopped at step 7: .*model\.optimizer\.lr=1e\+38"
    ):
        opt.step(closure=closure)

    def bad_closure() -> torch.Tensor:  # the same words from the forward pass: not the update's
        raise RuntimeError("value cannot be converted to type float without overflow")

    with pytest.raises(RuntimeError, match="without overflow"):
        opt.step(closure=bad_closure)

    opt2, _, w2 = guard_setup(1e-2)
    (w2 * 2).sum().backward()
    opt2.step()  # a sane rate: steps as before
    assert torch.allclose(w2.detach(), torch.full((3,), 0.99))


def test_divergence_message_names_model_optimizer_lr(tmp_path: Path) -> None:
    """The divergence error names the key that exists (it said model.optim.lr)."""
    from imcap.model.checkpoint import load_captioner

    model = load_captioner(demo_checkpoint(tmp_path / "demo.ckpt"))
    with pytest.raises(UserError, match=r"Lower model\.optimizer\.lr, keep"):
        model._check_finite(torch.tensor(float("nan")))
