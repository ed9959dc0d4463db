"""The web demo's JSON API (python src/serve.py): captions, n-best beams, attention, the model
card, one batch per request, 20 concurrent requests, and hostile uploads refused with a 4xx and a
message while the server keeps serving."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import ROOT, cli_popen, demo_checkpoint, free_port, live_server, png_header

pytest.importorskip(
    "fastapi", reason="the web demo's extra is not installed: pip install -e '.[demo]'"
)
pytest.importorskip(
    "multipart", reason="python-multipart is not installed: pip install -e '.[demo]'"
)
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from imcap.data.synthetic import make_example, render  # noqa: E402
from imcap.errors import UserError  # noqa: E402
from imcap.serve.app import create_app  # noqa: E402
from imcap.serve.engine import Engine, Limits, example_images, newest_checkpoint  # noqa: E402

LOCAL = "http://127.0.0.1"


def image_bytes(index: int = 0, fmt: str = "PNG", size: int = 96) -> bytes:
    """A synthetic test-split scene (deterministic) encoded as `fmt`."""
    scene, _ = make_example(0, "test", index, size)
    buf = io.BytesIO()
    render(scene, size).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """Two tiny checkpoints laid out as train.py writes them: an attention model whose run has a
    metrics.json naming it best, and a Show-and-Tell model with only its callback's score."""
    base = tmp_path_factory.mktemp("serve")
    att = demo_checkpoint(base / "att" / "checkpoints" / "epoch_002.ckpt")
    (base / "att" / "metrics.json").write_text(
        json.dumps({"best_checkpoint": str(att), "val": {"CIDEr": 0.91, "BLEU-4": 0.25}})
    )
    state = {"monitor": "val/CIDEr", "best_model_path": "elsewhere/epoch_001.ckpt",
             "best_model_score": torch.tensor(0.7), "current_score": torch.tensor(0.42)}  # fmt: skip
    plain = demo_checkpoint(
        base / "plain" / "checkpoints" / "last.ckpt",
        attention=False,
        callbacks={"Checkpoint{'monitor': 'val/CIDEr', 'mode': 'max'}": state},
    )
    return {"att": att, "plain": plain, "base": base}


@pytest.fixture(scope="module")
def engine(run: dict) -> Engine:
    return Engine(run["att"])


@pytest.fixture(scope="module")
def client(engine: Engine) -> TestClient:
    app = create_app(engine, Limits(), example_images(None, engine.model))
    return TestClient(app, base_url=LOCAL)  # the demo answers to its own address, not testserver


def post(client, data: bytes, name: str = "scene.png", ctype: str = "image/png", **fields):
    return client.post("/api/caption", files={"file": (name, data, ctype)}, data=fields)


def test_caption_beams_attention_model_and_time(client: TestClient, engine: Engine, tmp_path):
    r = post(client, image_bytes(), beam_size="3")
    assert r.status_code == 200, r.text
    body = r.json()
    # the same caption the library gives for the same file and beam size
    path = tmp_path / "scene.png"
    path.write_bytes(image_bytes())
    assert body["caption"] == engine.model.caption_files([path], beam_size=3)[0]
    beams = body["beams"]
    assert len(beams) == 3 and beams[0]["caption"] == body["caption"]
    assert len({b["caption"] for b in beams}) == 3
    lps = [b["logprob"] for b in beams]  # length penalty 0: ranked by log-prob
    assert lps == sorted(lps, reverse=True) and all(lp < 0 for lp in lps)
    att = body["attention"]
    words = body["caption"].split()
    assert att["words"][: len(words)] == words and att["grid"] == [3, 3]
    assert len(att["maps"]) == len(att["words"])
    for m in att["maps"]:
        assert len(m) == 9 and abs(sum(m) - 1.0) < 1e-3
    assert body["model"] == {"checkpoint": "epoch_002.ckpt", "encoder": "resnet18",
                             "decoder": "AttentionDecoder"}  # fmt: skip
    assert body["decoding"] == {"beam_size": 3, "length_penalty": 0.0} and body["ms"] > 0
    assert body["size"] == [96, 96] and body["view"] == [0, 0, 96, 96]


def test_greedy_multipart_base64_and_data_url_agree(client: TestClient) -> None:
    data = image_bytes(1, "JPEG")
    a = post(client, data, "x.jpg", "image/jpeg", decoding="greedy").json()
    b64 = base64.b64encode(data).decode()
    b = client.post("/api/caption", json={"image": b64, "decoding": "greedy"}).json()
    c = client.post("/api/caption", json={"image": f"data:image/jpeg;base64,{b64}"}).json()
    assert a["caption"] == b["caption"] == c["caption"] and len(a["beams"]) == 1
    assert a["beams"][0]["logprob"] == pytest.approx(b["beams"][0]["logprob"])
    longer = post(client, data, "x.jpg", "image/jpeg", beam_size="4", length_penalty="2.0").json()
    assert longer["decoding"] == {"beam_size": 4, "length_penalty": 2.0}


def test_a_wide_photo_reports_the_centre_square_the_model_sees(client: TestClient) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (300, 100), "white").save(buf, format="PNG")
    body = post(client, buf.getvalue()).json()
    assert body["size"] == [300, 100] and body["view"] == [100, 0, 100, 100]


def test_several_images_in_one_request_are_one_batch(client: TestClient, engine, monkeypatch):
    singles = [post(client, image_bytes(i)).json()["caption"] for i in range(3)]
    batches = []
    generate = engine.model.generate

    def counting(feats, *a, **k):
        batches.append(feats.pooled.shape[0])
        return generate(feats, *a, **k)

    monkeypatch.setattr(engine.model, "generate", counting)
    files = [("file", (f"s{i}.png", image_bytes(i), "image/png")) for i in range(3)]
    r = client.post("/api/caption", files=files)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert batches == [3]
    assert [x["caption"] for x in results] == singles
    assert [x["name"] for x in results] == ["s0.png", "s1.png", "s2.png"]


def test_health_model_card_examples_and_the_offline_page(client: TestClient, run) -> None:
    health = client.get("/api/health").json()
    assert health["status"] == "ok" and health["model"] == "epoch_002.ckpt"
    card = client.get("/api/model").json()
    assert card["encoder"]["name"] == "resnet18" and card["encoder"]["input_size"] == 96
    assert card["decoder"]["type"] == "AttentionDecoder" and card["decoder"]["attention"]
    assert card["vocab_size"] == 4 + 10 and card["dataset"] == "synthetic"
    assert card["val_scores"] == {"CIDEr": 0.91, "BLEU-4": 0.25}
    assert card["val_scores_source"].endswith("metrics.json")
    assert card["trained"]["epoch"] == 2 and card["trained"]["global_step"] == 30
    assert card["trained"]["saved"][:4].isdigit() and card["limits"]["max_images"] == 8
    examples = client.get("/api/examples").json()
    assert len(examples) == 4
    ex = client.get(examples[0]["url"])
    assert ex.status_code == 200 and ex.headers["content-type"] == "image/jpeg"
    assert client.get("/api/examples/99").status_code == 404
    page = client.get("/")
    assert page.status_code == 200 and 'id="caption"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from the network


def test_model_card_without_metrics_uses_the_checkpoints_own_score(run) -> None:
    card = Engine(run["plain"]).card
    assert card["decoder"]["type"] == "ShowTellDecoder" and not card["decoder"]["attention"]
    # last.ckpt is not the callback's best: its score is the one recorded when it was saved
    assert card["val_scores"] == {"CIDEr": pytest.approx(0.42)}
    assert card["val_scores_source"] == "checkpoint"
    bare = demo_checkpoint(run["base"] / "bare" / "x.ckpt", attention=False)
    assert Engine(bare).card["val_scores"] is None


def test_no_attention_key_for_a_decoder_without_attention(run) -> None:
    c = TestClient(create_app(Engine(run["plain"])), base_url=LOCAL)
    body = post(c, image_bytes()).json()
    assert body["caption"] and "attention" not in body


def test_model_card_of_a_real_training_run(trained: dict) -> None:
    """What train.py writes (metrics.json beside checkpoints/, Lightning's checkpoint) is what
    the card reads."""
    card = Engine(trained["ckpt"]).card
    val = trained["metrics"]["val"]
    assert card["val_scores"]["CIDEr"] == pytest.approx(val["CIDEr"])
    assert card["dataset"] == "synthetic" and card["encoder"]["weights"] is not None
    assert isinstance(card["trained"]["epoch"], int) and card["trained"]["lightning"]


# -- hostile uploads -------------------------------------------------------------------------------
def hostile(tmp: Path) -> dict[str, tuple]:
    """name -> (filename, bytes, content type, expected status, words the message must hold)."""
    png = image_bytes()
    jpeg = image_bytes(0, "JPEG")
    bomb = png_header(tmp / "bomb.png", 20000, 20000).read_bytes()
    ours = png_header(tmp / "big.png", 9000, 9000).read_bytes()  # under Pillow's limit, over ours
    return {
        "png named .jpg": ("photo.jpg", png, "image/jpeg", 415, ["PNG", ".jpg", "photo.png"]),
        "zero bytes": ("empty.jpg", b"", "image/jpeg", 400, ["empty"]),
        "text file": ("notes.txt", b"just some words\n", "text/plain", 415, ["not a JPEG", "text"]),
        "20000x20000 png": ("bomb.png", bomb, "image/png", 413, ["400,000,000", "limit"]),
        "9000x9000 png": ("big.png", ours, "image/png", 413, ["9000x9000", "limit"]),
        "truncated jpeg": ("cut.jpg", jpeg[: len(jpeg) // 2], "image/jpeg", 400, ["truncated"]),
        "gif": ("anim.gif", b"GIF89a" + b"\0" * 20, "image/gif", 415, ["GIF"]),
        "png sent as jpeg": ("blob", png, "image/jpeg", 415, ["PNG", "image/jpeg"]),
    }


BAD = ["png named .jpg", "zero bytes", "text file", "20000x20000 png", "9000x9000 png",
       "truncated jpeg", "gif", "png sent as jpeg"]  # fmt: skip


@pytest.mark.parametrize("case", BAD)
def test_a_bad_upload_is_a_4xx_with_a_message(client: TestClient, tmp_path, case: str) -> None:
    name, data, ctype, status, words = hostile(tmp_path)[case]
    r = post(client, data, name, ctype)
    assert r.status_code == status, r.text
    msg = r.json()["error"]
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize(
    ("kwargs", "status", "words"),
    [
        ({"json": {"image": "not base64!!"}}, 400, ["base64"]),
        ({"json": {"nothing": 1}}, 400, ["no image"]),
        ({"content": b"raw", "headers": {"content-type": "image/png"}}, 415, ["multipart"]),
        ({"data": {"beam_size": "99"}, "files": {"file": ("a.png", b"x", "image/png")}}, 400,
         ["beam_size must be 1..10"]),
        ({"data": {"beam_size": "two"}, "files": {"file": ("a.png", b"x", "image/png")}}, 400,
         ["whole number"]),
        ({"files": [("file", (f"{i}.png", b"x", "image/png")) for i in range(9)]}, 400,
         ["Too many files"]),
    ],
)  # fmt: skip
def test_a_bad_request_is_a_4xx_with_a_message(client, kwargs, status, words) -> None:
    r = client.post("/api/caption", **kwargs)
    assert r.status_code == status, r.text
    for w in words:
        assert w in r.json()["error"]


def test_a_body_over_the_upload_limit_is_refused_before_it_is_read(engine: Engine) -> None:
    small = TestClient(create_app(engine, Limits(max_upload_bytes=100_000)), base_url=LOCAL)
    big = b"\x89PNG\r\n\x1a\n" + os.urandom(400_000)
    r = post(small, big)  # Content-Length declared: refused at once
    assert r.status_code == 413 and "upload limit" in r.json()["error"]

    def chunks():  # no Content-Length: refused once the limit is crossed
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
        for _ in range(50):
            yield b"\0" * 10_000

    r = small.post(
        "/api/caption",
        content=chunks(),
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    assert r.status_code == 413 and "upload limit" in r.json()["error"]
    assert small.get("/api/health").status_code == 200


def test_a_real_server_answers_20_concurrent_requests_and_survives_the_hostile_ones(
    client: TestClient, engine: Engine, tmp_path: Path
) -> None:
    images = [image_bytes(i % 4) for i in range(20)]
    expected = [post(client, image_bytes(i)).json()["caption"] for i in range(4)]
    # room for all 20 (by default 8 are admitted, the rest get 503: test_serve_security.py)
    with live_server(create_app(engine, Limits(max_pending=20))) as url:

        def one(data: bytes) -> httpx.Response:
            files = {"file": ("scene.png", data, "image/png")}
            return httpx.post(f"{url}/api/caption", files=files, timeout=120)

        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(one, images))
        assert [r.status_code for r in answers] == [200] * 20
        assert [r.json()["caption"] for r in answers] == [expected[i % 4] for i in range(20)]
        for case in ("png named .jpg", "zero bytes", "text file", "20000x20000 png"):
            name, data, ctype, status, _ = hostile(tmp_path)[case]
            r = httpx.post(f"{url}/api/caption", files={"file": (name, data, ctype)}, timeout=60)
            assert 400 <= r.status_code < 500 and r.json()["error"], (case, r.text)
        assert httpx.get(f"{url}/api/health", timeout=10).json()["status"] == "ok"
        assert (
            httpx.post(f"{url}/api/caption", files={"file": ("a.png", images[0])}).json()["caption"]
            == expected[0]
        )


# -- which checkpoint, and the command line --------------------------------------------------------
def test_newest_checkpoint_is_the_newest_runs_best(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"python src/train.py"):
        newest_checkpoint(tmp_path)
    old = tmp_path / "train/runs/a/checkpoints"
    new = tmp_path / "train/runs/b/checkpoints"
    for i, p in enumerate([old / "epoch_009.ckpt", new / "epoch_001.ckpt", new / "last.ckpt"]):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
        os.utime(p, (1000 + i, 1000 + i))
    (new / ".last.ckpt.123.tmp").write_bytes(b"x")  # a checkpoint being written
    assert newest_checkpoint(tmp_path) == new / "epoch_001.ckpt"


def test_a_checkpoint_carrying_code_is_refused_and_nothing_runs(run, tmp_path: Path) -> None:
    from test_faults import _Payload

    marker = tmp_path / "payload_ran"
    ckpt = torch.load(run["plain"], map_location="cpu", weights_only=True)
    ckpt["extra"] = _Payload(marker)
    evil = tmp_path / "evil.ckpt"
    torch.save(ckpt, evil)
    with pytest.raises(UserError, match="refusing to load"):
        Engine(evil)
    assert not marker.exists()


def serve_cli(*args: str) -> subprocess.Popen:
    return cli_popen("serve.py", *args, stderr=subprocess.STDOUT, cwd=ROOT)


def test_serve_cli_without_a_checkpoint_says_how_to_train_one(tmp_path: Path) -> None:
    proc = serve_cli(
        "ckpt_path=latest", f"paths.log_dir={tmp_path / 'empty'}", f"hydra.run.dir={tmp_path / 'o'}"
    )
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    err = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "python src/train.py" in err[0] and "Traceback" not in out


def test_serve_cli_serves_the_newest_checkpoint_on_loopback(tmp_path: Path) -> None:
    """`python src/serve.py ckpt_path=latest`: the newest run's best checkpoint (not its
    last.ckpt), named in the log, on 127.0.0.1; Ctrl-C stops it."""
    ckpts = tmp_path / "outputs" / "train" / "runs" / "r" / "checkpoints"
    demo_checkpoint(ckpts / "epoch_001.ckpt", attention=False)
    demo_checkpoint(ckpts / "last.ckpt", attention=False)
    port = free_port()
    proc = serve_cli(
        "ckpt_path=latest",
        f"paths.log_dir={tmp_path / 'outputs'}",
        f"port={port}",
        f"hydra.run.dir={tmp_path / 'o'}",
    )
    try:
        deadline, up = time.monotonic() + 120, False
        while time.monotonic() < deadline and proc.poll() is None and not up:
            try:
                up = httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                time.sleep(0.3)
        assert up, proc.communicate(timeout=5)[0] if proc.poll() is not None else "no answer"
        model = httpx.get(f"http://127.0.0.1:{port}/api/model").json()
        assert Path(model["checkpoint"]).name == "epoch_001.ckpt"
        assert httpx.get(f"http://127.0.0.1:{port}/").status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert "ckpt_path=latest: serving the newest checkpoint" in out
    assert f"http://127.0.0.1:{port}" in out
