"""Screenshot of the web demo captioning an image, for the README (headless Chromium).

    python bench/screenshot_demo.py --ckpt <.ckpt> --image photo.jpg [--word 2] [--out docs/demo.png]

Serves the checkpoint on a free loopback port, uploads the image in the system's Chromium
(Playwright, no browser download), hovers one word so its attention map shows (attention
decoders), and saves the page. Rerun it with a Flickr8k checkpoint and a real photo to refresh
the README's picture.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="checkpoint to serve")
    ap.add_argument("--image", required=True, help="image to caption (JPEG, PNG or WebP)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "demo.png"))
    ap.add_argument("--word", type=int, default=1, help="index of the word whose attention shows")
    ap.add_argument("--beam-size", type=int, default=3)
    ap.add_argument("--width", type=int, default=1100)
    ap.add_argument("--height", type=int, default=760)
    args = ap.parse_args()

    import uvicorn
    from playwright.sync_api import sync_playwright

    from imcap.serve.app import create_app
    from imcap.serve.engine import Engine, example_images

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("error: no chromium on PATH (apt-get install chromium)")
    engine = Engine(args.ckpt)
    app = create_app(engine, examples=example_images(None, engine.model))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                         args=["--no-sandbox", "--disable-gpu"])  # fmt: skip
            page = browser.new_page(viewport={"width": args.width, "height": args.height})
            page.goto(f"http://127.0.0.1:{port}")
            page.wait_for_selector("#card dt")
            page.check("#beam")
            page.fill("#beam-size", str(args.beam_size))
            page.set_input_files("#file", args.image)
            page.wait_for_function("document.body.dataset.state === 'done'", timeout=60_000)
            words = page.locator("#words button")
            if words.count():
                words.nth(min(args.word, words.count() - 1)).click()  # pinned: stays drawn
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
            print(f"{out}: {page.inner_text('#caption')!r}")
            browser.close()
    finally:
        server.should_exit = True
        thread.join(10)


if __name__ == "__main__":
    main()
