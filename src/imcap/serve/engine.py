"""The model behind the demo: loaded once, decoding one batch at a time, plus what the page shows
about it (the model card) and the example images.

torch on a small CPU is fastest with one batch at a time, so requests take turns on a lock; the
web server's threads wait on it instead of competing for the cores (for at most the caller's
timeout: a request never waits forever). Several images of one request are one batch. An image
is made into the model's small input tensor (`prepare`) before the wait, so a waiting request
holds kilobytes, not the decoded photo.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from imcap.data.images import list_images, make_transform
from imcap.errors import UserError
from imcap.eval.viz import attention_words, region_grid
from imcap.model.checkpoint import captioner_from, read_checkpoint
from imcap.model.module import Captioner

log = logging.getLogger(__name__)
WEB_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}  # what the page and the API accept


@dataclass
class Limits:
    """What the demo allows one request and all of them together: safe defaults here;
    conf/serve.yaml sets them (each field is the config key of the same name, but
    max_upload_mb there)."""

    max_upload_bytes: int = 20 << 20  # per request, all its images together
    max_images: int = 8  # images per request
    max_beam_size: int = 10
    max_request_pixels: int = 100_000_000  # header-declared pixels per request, before decoding
    max_pending: int = 8  # caption requests admitted at once (reading, decoding, waiting, running)
    max_decoding: int = 1  # images decoded at once, over all requests (each up to 8 B a pixel)
    queue_timeout_s: float = 30.0  # longest wait for a decoding thread and the model, then 503
    body_timeout_s: float = 60.0  # a request body must arrive within this, else 408
    header_timeout_s: float = 10.0  # a request's headers must arrive within this (uvicorn)
    keep_alive_s: int = 5  # an idle keep-alive connection is closed after this (uvicorn)
    max_connections: int = 64  # open connections + requests in progress; beyond it uvicorn 503s
    host: str = "127.0.0.1"  # the address the server is bound to (the Host check starts there)
    allowed_hosts: tuple[str, ...] = ()  # more names the Host header may carry ("*.example.org")
    allowed_origins: tuple[str, ...] = ()  # other web origins that may POST ("https://x.org")


class Busy(Exception):
    """The model stayed busy for longer than a request may wait (a 503 with Retry-After)."""


@dataclass
class Prepared:
    """One image as the model takes it, and what the answer reports about the original."""

    x: torch.Tensor  # (3, H, W)
    size: tuple[int, int]  # the original's width, height
    view: list[float]  # the part of the original the encoder sees


def newest_checkpoint(root: Path) -> Path:
    """The checkpoint to serve when none is named: the newest run folder's best checkpoint (its
    newest `.ckpt` that is not `last.ckpt`, which is only where training stopped)."""
    found = [p for p in root.rglob("*.ckpt") if p.is_file() and not p.name.startswith(".")]
    if not found:
        raise UserError(
            f"ckpt_path=latest: no checkpoint under {root}: train one with "
            "`python src/train.py` (a few minutes on a laptop CPU) or pass ckpt_path=<.ckpt>"
        )
    newest = max(found, key=lambda p: p.stat().st_mtime)
    best = [p for p in newest.parent.glob("*.ckpt") if p in found and not p.stem.startswith("last")]
    return max(best, key=lambda p: p.stat().st_mtime) if best else newest


def view_box(transform: Any, width: int, height: int) -> list[float]:
    """[left, top, width, height] of the part of an image the encoder sees, in its pixels: the
    eval transform resizes the short side and centre-crops, so a wide photo loses its sides and
    the attention grid covers only this square."""
    from torchvision import transforms as T

    left, top, w, h = 0.0, 0.0, float(width), float(height)
    scale = 1.0  # transformed pixels per original pixel
    for t in getattr(transform, "transforms", []):
        if isinstance(t, T.Resize):
            size = t.size
            if isinstance(size, int) or (isinstance(size, Sequence) and len(size) == 1):
                s = size if isinstance(size, int) else size[0]
                scale = s / min(w, h)
            else:  # (h, w): squashed to a fixed shape, the whole image stays in view
                return [left, top, w, h]
        elif isinstance(t, T.CenterCrop):
            ch, cw = (t.size, t.size) if isinstance(t.size, int) else t.size
            cw_o, ch_o = min(w, cw / scale), min(h, ch / scale)
            left, top = left + (w - cw_o) / 2, top + (h - ch_o) / 2
            w, h = cw_o, ch_o
    return [round(left, 1), round(top, 1), round(w, 1), round(h, 1)]


class Engine:
    """One loaded model and the lock its decoding takes turns on."""

    def __init__(self, ckpt_path: str | Path, device: str = "cpu", trust: bool = False) -> None:
        from imcap.model import zoo

        p = zoo.resolve(ckpt_path)
        if not p.is_file():
            raise UserError(
                f"checkpoint not found: {p}. Give ckpt_path=<a .ckpt written by train.py> or a "
                f"shipped model name ({', '.join(zoo.index()) or 'none'})"
            )
        self.name = str(ckpt_path) if zoo.is_name(str(ckpt_path)) else None
        ckpt = read_checkpoint(p, trust)  # weights_only unless trust: no pickled code runs
        self.model: Captioner = captioner_from(ckpt, p, map_location=device, trust=trust)
        self.path, self.device = p, device
        self.transform = make_transform(self.model.encoder.data_config)
        self.attention = bool(self.model.decoder.uses_grid)
        self.card = model_card(p, ckpt, self.model)
        if self.name:  # a shipped model: its card says what it was measured to do
            shipped = zoo.card(self.name)
            self.card.update(
                checkpoint=self.name,
                val_scores=shipped.get("val_scores"),
                val_scores_source="imcap/zoo/index.json (beam 3, Flickr8k val)",
                model_card=shipped,
            )
        self.card["device"] = device
        self.lock = threading.Lock()
        self.served = 0

    def prepare(self, image: Image.Image) -> Prepared:
        """The model's input for one image: made as soon as it is decoded, so the decoded
        image can be freed before the request waits for its turn."""
        return Prepared(self.transform(image), image.size, view_box(self.transform, *image.size))

    def caption(
        self,
        images: Sequence[Image.Image | Prepared],
        beam_size: int,
        length_penalty: float,
        timeout: float | None = None,
    ) -> list[dict[str, Any]]:
        """Caption, n-best beams with log-probs and (attention decoders) per-word maps, for each
        image; the images are captioned as one batch. Waits at most `timeout` seconds for the
        model (None: as long as it takes), then raises Busy."""
        items = [im if isinstance(im, Prepared) else self.prepare(im) for im in images]
        x = torch.stack([p.x for p in items])  # (B, 3, H, W)
        if not self.lock.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            raise Busy(f"the model stayed busy for over {timeout or 0:.0f} s")
        try:
            with torch.no_grad():
                feats = self.model.encode(x)
                dec = self.model.generate(
                    feats, beam_size, return_attn=self.attention, length_penalty=length_penalty
                )
            self.served += len(items)
        finally:
            self.lock.release()
        vocab, max_len = self.model.vocab, int(self.model.decoding["max_len"])
        out = []
        for j, item in enumerate(items):
            beams = [
                {"caption": vocab.decode(t), "logprob": round(lp, 4), "score": round(s, 4)}
                for t, lp, s in zip(
                    dec.beams[j].tolist(),
                    dec.beam_logprobs[j].tolist(),
                    dec.beam_scores[j].tolist(),
                    strict=True,
                )
                if math.isfinite(lp)  # a tiny vocabulary can leave a beam with no way forward
            ]
            caption = vocab.decode(dec.tokens[j].tolist())
            row: dict[str, Any] = {
                "caption": caption,
                "beams": beams,
                "size": list(item.size),
                "view": item.view,
            }
            if dec.alphas is not None:
                row["attention"] = attention_json(caption, max_len, dec.alphas[j])
            out.append(row)
        return out


def attention_json(caption: str, max_len: int, alphas: torch.Tensor) -> dict[str, Any] | None:
    """Per word, its attention over the encoder's grid of regions, as plain numbers (row-major
    h x w maps, each summing to one) for the page to draw over the image."""
    words = attention_words(caption, max_len)
    n = min(len(words), alphas.shape[0])
    try:
        maps = region_grid(alphas[:n].float().cpu())  # (n, h, w)
    except ValueError:  # regions that are no square grid: nothing to draw
        return None
    h, w = maps.shape[1:]
    return {
        "words": words[:n],
        "grid": [h, w],
        "maps": [[round(v, 5) for v in m.flatten().tolist()] for m in maps],
    }


# -- the model card ------------------------------------------------------------------------------
def _number(v: Any) -> float | None:
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    return float(v) if isinstance(v, int | float) and math.isfinite(v) else None


def val_scores(path: Path, ckpt: dict) -> tuple[dict[str, float] | None, str | None]:
    """The validation scores of *these* weights: the run's metrics.json when it names this file
    as its best checkpoint (every metric), else the val/CIDEr the checkpoint callback recorded
    when it saved this file."""
    metrics = path.parent.parent / "metrics.json"
    try:
        m = json.loads(metrics.read_text())
        best = m.get("best_checkpoint")
        if best and Path(best).name == path.name and Path(best).parent.name == path.parent.name:
            scores = {
                k: float(v) for k, v in (m.get("val") or {}).items() if _number(v) is not None
            }
            if scores:
                return scores, str(metrics)
    except (OSError, ValueError, AttributeError):
        pass
    for name, state in (ckpt.get("callbacks") or {}).items():
        if not isinstance(state, dict) or state.get("monitor") is None:
            continue
        if "Checkpoint" not in str(name):
            continue
        is_best = Path(str(state.get("best_model_path") or "")).name == path.name
        score = _number(state.get("best_model_score" if is_best else "current_score"))
        if score is not None:
            return {str(state["monitor"]).split("/", 1)[-1]: score}, "checkpoint"
    return None, None


def model_card(path: Path, ckpt: dict, model: Captioner) -> dict[str, Any]:
    """What a person wants to know about the model before trusting its captions; None where the
    checkpoint does not say."""
    hp = dict(model.hparams)
    enc = dict((ckpt.get("hyper_parameters") or {}).get("encoder") or {})  # as trained
    scores, source = val_scores(path, ckpt)
    stat = path.stat()
    data = dict(hp.get("data") or {})
    return {
        "checkpoint": str(path),
        "file_mb": round(stat.st_size / 2**20, 1),
        "encoder": {
            "name": model.encoder.name,
            "input_size": int(model.encoder.data_config["input_size"][-1]),
            "weights": enc.get("pretrained"),  # where its weights came from before training
            "trainable": bool(enc.get("trainable")),
        },
        "decoder": model.decoder.describe(),
        "vocab_size": len(model.vocab),
        "parameters": sum(p.numel() for p in model.parameters()),
        "dataset": data.get("name"),
        "decoding": dict(model.decoding),
        "scst": bool((hp.get("scst") or {}).get("enabled")),
        "val_scores": scores,
        "val_scores_source": source,
        "trained": {
            "epoch": ckpt.get("epoch"),
            "global_step": ckpt.get("global_step"),
            "saved": dt.datetime.fromtimestamp(stat.st_mtime).isoformat(timespec="seconds"),
            "lightning": ckpt.get("pytorch-lightning_version"),
        },
    }


# -- example images ------------------------------------------------------------------------------
MAX_EXAMPLE_BYTES = 20 << 20  # an example larger than this is skipped (the page fetches it whole)


def example_images(spec: Any, model: Captioner, n: int = 4) -> list[tuple[str, bytes]]:
    """(name, bytes) of the images the page offers to click: the files/folder/glob the user's
    config names (`examples=`), else, for the synthetic set, a few scenes rendered anew. Never
    files from a folder the checkpoint names: a checkpoint is data from elsewhere, and its
    data.root must not choose what this server reads and publishes."""
    if spec:
        paths = [p for p in list_images(spec) if p.suffix.lower() in WEB_SUFFIXES][:8]
        out = []
        for p in paths:
            if p.stat().st_size > MAX_EXAMPLE_BYTES:
                log.warning("example %s is over %d MB: not offered", p, MAX_EXAMPLE_BYTES >> 20)
                continue
            out.append((p.name, p.read_bytes()))
        return out
    data = dict(model.hparams.get("data") or {})
    if data.get("name") == "synthetic":
        return _synthetic_examples(data, n)
    return []


def _synthetic_examples(data: dict, n: int) -> list[tuple[str, bytes]]:
    from imcap.data.synthetic import make_example, render

    source = dict(data.get("source") or {})
    try:
        seed, size = int(source.get("seed", 0)), int(source.get("image_size", 128))
    except (TypeError, ValueError):  # the checkpoint's own numbers: nonsense means no examples
        return []
    size = min(max(size, 16), 1024)  # bounded before rendering
    out = []
    for i in range(n):  # test-split scenes: never trained on
        scene, _ = make_example(seed, "test", i, size)
        buf = io.BytesIO()
        render(scene, size).save(buf, format="JPEG", quality=95, subsampling=0)  # as on disk
        out.append((f"syn_test_{i:06d}.jpg", buf.getvalue()))
    return out
