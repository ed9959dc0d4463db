"""The model behind the demo: loaded once, decoding one batch at a time, plus what the page shows
about it (the model card) and the example images.

torch on a small CPU is fastest with one batch at a time, so requests take turns on a lock; the
web server's threads wait on it instead of competing for the cores. Several images of one
request are one batch.
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
from imcap.model.module import Captioner, captioner_from, read_checkpoint

log = logging.getLogger(__name__)
WEB_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}  # what the page and the API accept


@dataclass
class Limits:
    """What one request may ask for (safe defaults; conf/serve.yaml sets them)."""

    max_upload_bytes: int = 20 << 20  # per request, all its images together
    max_images: int = 8  # images per request
    max_beam_size: int = 10


def newest_checkpoint(root: Path) -> Path:
    """The checkpoint to serve when none is named: the newest run folder's best checkpoint (its
    newest `.ckpt` that is not `last.ckpt`, which is only where training stopped)."""
    found = [p for p in root.rglob("*.ckpt") if p.is_file() and not p.name.startswith(".")]
    if not found:
        raise UserError(
            f"no ckpt_path given and no checkpoint under {root}: train one with "
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

    def caption(
        self, images: Sequence[Image.Image], beam_size: int, length_penalty: float
    ) -> list[dict[str, Any]]:
        """Caption, n-best beams with log-probs and (attention decoders) per-word maps, for each
        image; the images are decoded as one batch."""
        x = torch.stack([self.transform(im) for im in images])  # (B, 3, H, W)
        with self.lock, torch.no_grad():
            feats = self.model.encode(x)
            dec = self.model.generate(
                feats, beam_size, return_attn=self.attention, length_penalty=length_penalty
            )
            self.served += len(images)
        vocab, max_len = self.model.vocab, int(self.model.decoding["max_len"])
        out = []
        for j, im in enumerate(images):
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
                "size": list(im.size),
                "view": view_box(self.transform, *im.size),
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
    dec = dict(hp.get("decoder") or {})
    dec_type = str(dec.get("_target_", "imcap.model.decoder.ShowTellDecoder")).rsplit(".", 1)[-1]
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
        "decoder": {
            "type": dec_type,
            "rnn": dec.get("rnn", "lstm"),
            "hidden_dim": dec.get("hidden_dim"),
            "num_layers": dec.get("num_layers", 1),
            "attention": bool(model.decoder.uses_grid),
        },
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
def example_images(spec: Any, model: Captioner, n: int = 4) -> list[tuple[str, bytes]]:
    """(name, bytes) of the images the page offers to click: the given files/folder/glob, else a
    few of the checkpoint's own dataset (rendered anew for the synthetic set)."""
    if spec:
        paths = [p for p in list_images(spec) if p.suffix.lower() in WEB_SUFFIXES][:8]
        return [(p.name, p.read_bytes()) for p in paths]
    data = dict(model.hparams.get("data") or {})
    if data.get("name") == "synthetic":
        return _synthetic_examples(data, n)
    root = Path(str(data.get("root") or ""))
    if data.get("root") and root.is_dir():
        return [(p.name, p.read_bytes()) for p in _some_images(root, n)]
    return []


def _synthetic_examples(data: dict, n: int) -> list[tuple[str, bytes]]:
    from imcap.data.synthetic import make_example, render

    source = dict(data.get("source") or {})
    seed, size = int(source.get("seed", 0)), int(source.get("image_size", 128))
    out = []
    for i in range(n):  # test-split scenes: never trained on
        scene, _ = make_example(seed, "test", i, size)
        buf = io.BytesIO()
        render(scene, size).save(buf, format="JPEG", quality=95, subsampling=0)  # as on disk
        out.append((f"syn_test_{i:06d}.jpg", buf.getvalue()))
    return out


def _some_images(root: Path, n: int, max_dirs: int = 200) -> list[Path]:
    """n images spread over the first folder under `root` that holds images (a bounded walk)."""
    for i, d in enumerate(sorted({root, *(p for p in root.glob("*") if p.is_dir())})):
        if i >= max_dirs:
            break
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in WEB_SUFFIXES and p.is_file())
        if files:
            step = max(1, len(files) // n)
            return files[::step][:n]
    return []
