"""Export a trained Captioner as graphs that run without imcap: TorchScript or ONNX.

Both formats cut the model at the same two places, so every decoder (Show-Tell, SAT attention,
Top-Down, with attributes) exports through the `init_state` / `step` contract it already has:

    encode(images) -> state                      CNN, attribute detector, decoder.init_state
    step(tokens, *state) -> log_probs, *state    one word; <pad>, <bos>, <unk> already banned

TorchScript: one file whose `forward(images)` runs encode and a scripted greedy loop and returns
word ids (B, T); `captions(images)` returns strings. ONNX: `encode.onnx` and `step.onnx`, driven
by the numpy loop in `imcap.deploy` (onnxruntime, no torch). A JSON sidecar next to the files
holds the vocabulary, the preprocessing and the decoding settings: the export describes itself.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imcap import __version__
from imcap.errors import UserError
from imcap.model.decoding import greedy, word_log_probs
from imcap.model.encoder import Encoder

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
SIDECAR = "captioner.json"
FILES = {
    "torchscript": {"model": "captioner.pt"},
    "onnx": {"encode": "encode.onnx", "step": "step.onnx"},
}
OPSET = 17  # onnxruntime >= 1.14 runs it; the LSTM/GRU ops and dynamic batch need nothing newer


class EncodeGraph(nn.Module):
    """images (B, 3, H, W) -> the decoder's initial state (a tuple of batch-first tensors)."""

    def __init__(self, encoder: Encoder, attributes: nn.Module | None, decoder: nn.Module) -> None:
        super().__init__()
        self.encoder, self.attributes, self.decoder = encoder, attributes, decoder

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = self.encoder(images, grid=self.decoder.uses_grid)
        if self.attributes is not None:  # as Captioner.with_attributes
            feats.attrs = torch.sigmoid(self.attributes(feats.pooled).float())  # (B, K)
        return tuple(self.decoder.init_state(feats))


class StepGraph(nn.Module):
    """One word: tokens (B,), state -> log-probabilities (B, V) and the next state."""

    def __init__(self, decoder: nn.Module, bos: int) -> None:
        super().__init__()
        self.decoder, self.bos = decoder, bos

    def forward(self, tokens: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, new_state, _ = self.decoder.step(tokens, tuple(state))  # (B, V)
        return (word_log_probs(logits, self.bos), *new_state)  # the same ban as decoding.greedy


class _TupleStep(nn.Module):
    """StepGraph with the state as one tuple argument (a fixed type for the scripted loop)."""

    def __init__(self, step: StepGraph) -> None:
        super().__init__()
        self.step = step

    def forward(
        self, tokens: torch.Tensor, state: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        out = self.step(tokens, *state)
        return out[0], tuple(out[1:])


class GreedyCaptioner(nn.Module):
    """The TorchScript export: traced encode and step under a scripted greedy loop, with the
    vocabulary inside, so `torch.jit.load(path).captions(images)` needs neither imcap nor timm.

    Decodes exactly as imcap.model.decoding.greedy: arg-max until <eos> or max_len words (then
    <eos> is forced); <pad> after a caption's end."""

    def __init__(
        self, encode: Any, step: Any, itos: list[str], bos: int, eos: int, pad: int, max_len: int
    ) -> None:
        super().__init__()
        self.encode, self.step = encode, step
        self.itos, self.bos, self.eos, self.pad, self.max_len = itos, bos, eos, pad, max_len

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        state = self.encode(images)
        B = images.size(0)
        prev = torch.full([B], self.bos, dtype=torch.long, device=images.device)  # (B,)
        done = torch.zeros([B], dtype=torch.bool, device=images.device)  # (B,)
        out: list[torch.Tensor] = []
        for t in range(self.max_len + 1):
            logp, state = self.step(prev, state)  # (B, V)
            last = t == self.max_len  # out of room: <eos> is forced
            word = torch.full_like(prev, self.eos) if last else logp.argmax(-1)  # (B,)
            word = torch.where(done, torch.full_like(word, self.pad), word)
            out.append(word)
            done = done | (word == self.eos)
            prev = word
            if bool(done.all()):
                break
        return torch.stack(out, 1)  # (B, T)

    @torch.jit.export
    def captions(self, images: torch.Tensor) -> list[str]:
        rows: list[list[int]] = self.forward(images).tolist()
        texts: list[str] = []
        for row in rows:
            words: list[str] = []
            for i in row:
                if i == self.eos:
                    break
                if i != self.pad and i != self.bos:
                    words.append(self.itos[i])
            texts.append(" ".join(words))
        return texts


def check_exportable(model: Any) -> None:
    """The decoder says whether its init_state/step trace (CaptionDecoder.exportable): any
    decoder keeping the contract (a tuple of batch-first tensors as state) exports unchanged."""
    dec = model.decoder
    if not getattr(dec, "exportable", False) or not callable(getattr(dec, "step", None)):
        raise UserError(
            f"cannot export decoder {type(dec).__name__}: it declares exportable = False (its "
            "step does not trace to a graph); caption with the checkpoint itself instead"
        )


def preprocessing(data_config: dict[str, Any]) -> dict[str, Any]:
    """The encoder's image transform in words a non-Python runtime can follow (timm's eval
    transform, crop_mode center): resize the shorter side, centre-crop, scale to [0, 1],
    normalise per channel, NCHW float32 RGB."""
    _, h, w = data_config["input_size"]
    crop_pct = float(data_config.get("crop_pct") or 0.875)
    mode = data_config.get("crop_mode") or "center"
    resize = [math.floor(h / crop_pct), math.floor(w / crop_pct)]
    return {
        "input_size": [3, int(h), int(w)],
        "resize_shorter_side": resize[0] if resize[0] == resize[1] else resize,
        "center_crop": [int(h), int(w)],
        "crop_mode": mode,
        "interpolation": data_config.get("interpolation", "bilinear"),
        "scale": 1 / 255,
        "mean": [float(x) for x in data_config["mean"]],
        "std": [float(x) for x in data_config["std"]],
        "layout": "NCHW float32 RGB",
    }


def sidecar(model: Any, fmt: str, n_state: int, source: str) -> dict[str, Any]:
    v = model.vocab
    d = model.decoding
    return {
        "format": fmt,
        "files": FILES[fmt],
        "source_checkpoint": source,
        "imcap_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        "onnx_opset": OPSET if fmt == "onnx" else None,
        "encoder": model.encoder.name,
        "decoder": type(model.decoder).__name__,
        "vocab": {
            "itos": list(v.tokens),
            "pad_id": v.pad_id,
            "bos_id": v.bos_id,
            "eos_id": v.eos_id,
            "unk_id": v.unk_id,
        },
        "decoding": {
            "strategy": "greedy",
            "max_len": int(d["max_len"]),
            "banned_ids": [v.pad_id, v.bos_id, v.unk_id],  # already -inf in step's log_probs
            "checkpoint_beam_size": int(d["beam_size"]),  # imcap's own decoding, not exported
            "checkpoint_no_repeat_ngram_size": int(d["no_repeat_ngram_size"]),
        },
        "state": {
            "inputs": [f"state_{i}" for i in range(n_state)],
            "outputs": [f"next_state_{i}" for i in range(n_state)],
        },
        "preprocess": preprocessing(model.encoder.data_config),
    }


def export_model(model: Any, out: Path, fmt: str, source: str = "") -> Path:
    """Write `model` (a Captioner in eval mode) to `out` in `fmt`; returns the sidecar's path."""
    if fmt not in FORMATS:
        raise UserError(f"format={fmt!r} is not an export format; use one of: {', '.join(FORMATS)}")
    check_exportable(model)
    if fmt == "onnx" and importlib.util.find_spec("onnx") is None:
        raise UserError(
            "format=onnx needs the onnx package (and onnxruntime to run the export): "
            "pip install -e '.[export]' (make install does), or use format=torchscript"
        )
    d = model.decoding
    if int(d["beam_size"]) > 1 or int(d["no_repeat_ngram_size"]) > 0:
        log.warning(
            "the export decodes greedily without n-gram blocking; the checkpoint's decoding "
            "(beam_size=%s, no_repeat_ngram_size=%s) is recorded in the sidecar only",
            d["beam_size"],
            d["no_repeat_ngram_size"],
        )
    model = model.cpu().eval()
    out.mkdir(parents=True, exist_ok=True)
    v = model.vocab
    encode = EncodeGraph(model.encoder, model.attributes, model.decoder).eval()
    step = StepGraph(model.decoder, v.bos_id).eval()
    _, h, w = model.encoder.data_config["input_size"]
    images = torch.zeros(2, 3, h, w)  # (2, 3, H, W): a batch of 2, so the batch axis stays free
    with torch.no_grad(), warnings.catch_warnings():
        # TorchScript and the TorchScript-based ONNX exporter are deprecated upstream but are the
        # exporters that need no extra packages; their tracer warnings concern Python branches on
        # sizes that hold for every batch here (the Top-Down teacher-forcing path is not traced)
        warnings.simplefilter("ignore")
        state = encode(images)
        tokens = torch.full((2,), v.bos_id, dtype=torch.long)  # (2,)
        meta = json.dumps(sidecar(model, fmt, len(state), source), indent=1)
        if fmt == "torchscript":
            _torchscript(model, encode, step, images, tokens, state, out, meta)
        else:
            _onnx(encode, step, images, tokens, state, out)
    path = out / SIDECAR
    path.write_text(meta)
    return path


@torch.no_grad()
def reference_ids(model: Any, images: torch.Tensor) -> torch.Tensor:
    """What an export computes, by the checkpoint's own code: plain greedy (no n-gram
    blocking), ids (B, T) with <eos> and <pad>."""
    v = model.vocab
    feats = model.with_attributes(model.encoder(images, grid=model.decoder.uses_grid))
    return greedy(model.decoder, feats, v.bos_id, v.eos_id, int(model.decoding["max_len"])).tokens


def _torchscript(model, encode, step, images, tokens, state, out: Path, meta: str) -> None:
    v = model.vocab
    enc = torch.jit.trace(encode, (images,), check_trace=False)
    stp = torch.jit.trace(_TupleStep(step), (tokens, tuple(state)), check_trace=False)
    loop = GreedyCaptioner(
        enc, stp, list(v.tokens), v.bos_id, v.eos_id, v.pad_id, int(model.decoding["max_len"])
    )
    scripted = torch.jit.script(loop)
    torch.jit.save(scripted, str(out / FILES["torchscript"]["model"]), _extra_files={SIDECAR: meta})


def _onnx(encode, step, images, tokens, state, out: Path) -> None:
    n = len(state)
    ins = [f"state_{i}" for i in range(n)]
    outs = [f"next_state_{i}" for i in range(n)]
    batch = {0: "batch"}
    torch.onnx.export(
        encode,
        (images,),
        str(out / FILES["onnx"]["encode"]),
        dynamo=False,
        input_names=["images"],
        output_names=ins,
        dynamic_axes={"images": batch, **dict.fromkeys(ins, batch)},
        opset_version=OPSET,
    )
    torch.onnx.export(
        step,
        (tokens, *state),
        str(out / FILES["onnx"]["step"]),
        dynamo=False,
        input_names=["tokens", *ins],
        output_names=["log_probs", *outs],
        dynamic_axes={k: batch for k in ["tokens", *ins, "log_probs", *outs]},
        opset_version=OPSET,
    )
