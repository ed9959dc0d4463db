"""The web demo in a real browser: headless Chromium (the system's, driven by Playwright) uploads,
drops, pastes and clicks images, and the page shows the caption the API gives for the same
image, its beams, per-word attention over the image, and a clear message for a bad file."""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import pytest
from conftest import demo_checkpoint, live_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no chromium on PATH (apt-get install chromium)", allow_module_level=True)
pytest.importorskip(
    "playwright.sync_api", reason="playwright not installed (pip install -e '.[dev]')"
)
pytest.importorskip(
    "fastapi", reason="the web demo's extra is not installed (pip install -e '.[demo]')"
)
import httpx  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

from imcap.data.synthetic import make_example, render  # noqa: E402
from imcap.serve.app import create_app  # noqa: E402
from imcap.serve.engine import Engine, example_images  # noqa: E402


def scene_png(path: Path, index: int) -> Path:
    scene, _ = make_example(0, "test", index, 96)
    render(scene, 96).save(path, format="PNG")
    return path


def api_caption(url: str, path: Path, **fields: str) -> str:
    files = {"file": (path.name, path.read_bytes(), "image/png")}
    r = httpx.post(f"{url}/api/caption", files=files, data=fields, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["caption"]


@pytest.fixture(scope="module")
def page_at(tmp_path_factory):
    """(page, base URL): the demo of a tiny attention checkpoint in headless Chromium."""
    base = tmp_path_factory.mktemp("browser")
    engine = Engine(demo_checkpoint(base / "run" / "checkpoints" / "epoch_002.ckpt"))
    app = create_app(engine, examples=example_images(None, engine.model))
    with live_server(app) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        page.wait_for_selector("#card dt")  # the model card has arrived
        yield page, url, base
        browser.close()
        assert not errors, f"JavaScript errors in the page: {errors}"


def wait_done(page) -> str:
    page.wait_for_function("document.body.dataset.state === 'done'", timeout=30_000)
    return page.inner_text("#caption")


def test_upload_shows_the_apis_caption_beams_and_attention(page_at) -> None:
    page, url, base = page_at
    img = scene_png(base / "scene0.png", 0)
    page.set_input_files("#file", str(img))
    shown = wait_done(page)
    assert shown and shown == api_caption(url, img, decoding="greedy")
    assert "Encoder" in page.inner_text("#card") and "resnet18" in page.inner_text("#card")
    assert "91.0" not in page.inner_text("#card")  # no metrics.json: scores unknown, not invented
    assert page.locator("#beams li").count() == 1
    # beam search from the controls re-captions the same image
    page.check("#beam")
    page.fill("#beam-size", "3")
    page.dispatch_event("#beam-size", "change")
    page.wait_for_function("document.querySelectorAll('#beams li').length === 3")
    assert wait_done(page) == api_caption(url, img, decoding="beam", beam_size="3")
    # hovering a word draws its attention map over the image
    first = page.locator("#words button").first
    word = first.inner_text()
    assert word == page.inner_text("#caption").split()[0]
    first.hover()
    assert page.get_attribute("#overlay", "data-word") == word
    painted = page.evaluate(
        """() => { const c = document.querySelector('#overlay');
                   const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                   let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n; }"""
    )
    assert painted > 0
    assert page.inner_text("#ms").endswith("ms in all")
    page.check("#greedy")
    page.dispatch_event("#greedy", "change")
    wait_done(page)


def test_drop_paste_and_example_images_caption_too(page_at) -> None:
    page, url, base = page_at
    for how, index in (("drop", 1), ("paste", 2)):
        img = scene_png(base / f"scene{index}.png", index)
        b64 = base64.b64encode(img.read_bytes()).decode()
        page.evaluate(
            """([how, b64, name]) => {
                const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
                const dt = new DataTransfer();
                dt.items.add(new File([bytes], name, { type: "image/png" }));
                if (how === "drop") {
                    document.querySelector("#drop").dispatchEvent(
                        new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true }));
                } else {
                    document.dispatchEvent(
                        new ClipboardEvent("paste", { clipboardData: dt, bubbles: true }));
                }
            }""",
            [how, b64, img.name],
        )
        page.wait_for_function(
            "document.body.dataset.state === 'busy' || document.body.dataset.state === 'done'"
        )
        assert wait_done(page) == api_caption(url, img, decoding="greedy"), how
    # the example's bytes are fetched before captioning starts, so the previous image's "done"
    # would still stand right after the click: clear it first, then wait for this one's
    page.evaluate("document.body.dataset.state = 'clicked'")
    page.locator("#examples button.example").nth(3).click()
    shown = wait_done(page)
    data = httpx.get(f"{url}/api/examples/3").content
    r = httpx.post(f"{url}/api/caption", files={"file": ("ex.jpg", io.BytesIO(data), "image/jpeg")})
    assert shown == r.json()["caption"]


def test_a_bad_file_shows_a_message_and_the_page_keeps_working(page_at) -> None:
    page, url, base = page_at
    bad = base / "notes.txt"
    bad.write_text("not an image\n")
    page.set_input_files("#file", str(bad))
    page.wait_for_function("document.body.dataset.state === 'error'")
    msg = page.inner_text("#error")
    assert page.is_visible("#error") and "not a JPEG, PNG or WebP image" in msg
    renamed = base / "photo.jpg"
    renamed.write_bytes(scene_png(base / "s.png", 0).read_bytes())
    page.set_input_files("#file", str(renamed))
    page.wait_for_function(
        "document.body.dataset.state === 'error' && "
        "document.querySelector('#error').textContent.includes('photo.jpg')"
    )
    assert "PNG" in page.inner_text("#error")
    img = scene_png(base / "again.png", 1)
    page.set_input_files("#file", str(img))
    assert wait_done(page) == api_caption(url, img, decoding="greedy")
    assert not page.is_visible("#error")
