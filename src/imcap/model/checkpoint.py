"""A checkpoint is data all the way down: what its hyperparameters may name.

`torch.load(weights_only=True)` stops pickled code, but a checkpoint's hyperparameters are
strings that the loader turns into behaviour: the decoder class, the data loader, the
optimizer and scheduler, timm options, image sizes. A file from elsewhere is untrusted, so each
of these is checked against imcap's own components (the registries below) before anything is
imported or built; anything else is refused in one line. A user's *current config* may still
name their own classes (that is how imcap is extended); only `trust_checkpoint=true` lets a
checkpoint do so.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from imcap.errors import UserError

# -- registries: every callable a checkpoint may name ---------------------------------------------
DECODERS: set[str] = {
    "imcap.model.decoder.ShowTellDecoder",
    "imcap.model.decoder.AttentionDecoder",
    "imcap.model.decoder.TopDownDecoder",
}
DATA_LOADERS: set[str] = {
    "imcap.data.datasets.load_records",
    "imcap.data.synthetic.load_synthetic",
}
OPTIMIZERS: set[str] = {
    f"torch.optim.{n}"
    for n in ("AdamW", "Adam", "SGD", "RMSprop", "Adagrad", "Adamax", "NAdam", "RAdam")
}
SCHEDULERS: set[str] = {
    "imcap.model.schedules.warmup_cosine",
    *(
        f"torch.optim.lr_scheduler.{n}"
        for n in ("StepLR", "MultiStepLR", "ExponentialLR", "CosineAnnealingLR", "OneCycleLR")
    ),
}
# encoder options imcap writes (conf/encoder/*.yaml); anything else would go to timm unchecked
ENCODER_KEYS = {"name", "pretrained", "trainable", "img_size", "crop_pct", "tune_stages"}
HYDRA_KEYS = {"_target_", "_partial_", "_args_", "_recursive_", "_convert_"}
MAX_IMAGE_SIZE = 1024  # px: encoder.img_size and the synthetic set's rendering size
MAX_WIDTH = 16384  # any decoder width, attribute count ...
MAX_BEAM, MAX_LEN = 50, 500


def register_decoder(cls: type) -> type:
    """Let checkpoints name a decoder class of your own (use as a decorator where it is
    defined, and import that module before loading): imcap's allowlist is otherwise closed."""
    DECODERS.add(f"{cls.__module__}.{cls.__qualname__}")
    return cls


def register_data_loader(fn: Any) -> Any:
    """As `register_decoder`, for a data.loader function of your own."""
    DATA_LOADERS.add(f"{fn.__module__}.{fn.__qualname__}")
    return fn


class RefusedCheckpoint(UserError):
    pass


def check_hparams(hp: Mapping[str, Any], p: Path | str) -> None:
    """Refuse a checkpoint whose hyperparameters name anything but imcap's own components or
    hold values imcap would not write (one line; nothing imported, built or read)."""

    def refuse(what: str) -> None:
        raise RefusedCheckpoint(
            f"refusing checkpoint {p}: {what}. A checkpoint may only name imcap's own components; "
            "pass the configuration yourself (a config of yours may name your classes), or, for "
            "a file from a source you trust, trust_checkpoint=true"
        )

    _no_hydra_keys(hp, "", {"decoder", "optimizer", "scheduler"}, refuse)
    dec = hp.get("decoder")
    if not isinstance(dec, Mapping):
        refuse("decoder is not a mapping")
    target = dec.get("_target_", "imcap.model.decoder.ShowTellDecoder")
    if target not in DECODERS:
        refuse(f"decoder._target_ {target!r} is not one of imcap's decoders {sorted(DECODERS)}")
    for k, v in dec.items():
        if k in HYDRA_KEYS - {"_target_"}:
            refuse(f"decoder.{k} is not an imcap option")
        _plain_value(v, f"decoder.{k}", refuse)
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_WIDTH:
            refuse(f"decoder.{k}={v} is out of range (at most {MAX_WIDTH})")
    for key, allowed in (("optimizer", OPTIMIZERS), ("scheduler", SCHEDULERS)):
        spec = hp.get(key)
        if spec is None:
            continue
        if not isinstance(spec, Mapping):
            refuse(f"{key} is not a mapping")
        if spec.get("_target_") not in allowed:
            refuse(f"{key}._target_ {spec.get('_target_')!r} is not one of {sorted(allowed)}")
        for k, v in spec.items():
            if k in HYDRA_KEYS - {"_target_", "_partial_"}:
                refuse(f"{key}.{k} is not an imcap option")
            _plain_value(v, f"{key}.{k}", refuse)
    enc = hp.get("encoder")
    if not isinstance(enc, Mapping):
        refuse("encoder is not a mapping")
    extra = sorted(set(enc) - ENCODER_KEYS)
    if extra:
        refuse(f"encoder option(s) {extra} are not ones imcap writes ({sorted(ENCODER_KEYS)})")
    name = enc.get("name")
    if not isinstance(name, str) or not _timm_name(name):
        refuse(f"encoder.name {name!r} is not a timm architecture of this installation")
    _size(enc.get("img_size"), "encoder.img_size", refuse)
    crop = enc.get("crop_pct")
    if crop is not None and (not isinstance(crop, int | float) or not 0.1 <= crop <= 1.0):
        refuse(f"encoder.crop_pct={crop!r} is out of range (0.1..1)")
    dec_opts = hp.get("decoding") or {}
    if isinstance(dec_opts, Mapping):
        for key, top in (("beam_size", MAX_BEAM), ("max_len", MAX_LEN)):
            v = dec_opts.get(key)
            if isinstance(v, int) and v > top:
                refuse(f"decoding.{key}={v} is out of range (at most {top})")
    data = hp.get("data")
    if data is not None:
        if not isinstance(data, Mapping):
            refuse("data is not a mapping")
        loader = data.get("loader", "imcap.data.datasets.load_records")
        if loader not in DATA_LOADERS:
            refuse(f"data.loader {loader!r} is not one of imcap's readers {sorted(DATA_LOADERS)}")
        source = data.get("source") or {}
        if isinstance(source, Mapping):
            _size(source.get("image_size"), "data.source.image_size", refuse)


def _no_hydra_keys(node: Any, where: str, allowed_at: set[str], refuse: Any) -> None:
    """No `_target_` & co. anywhere but at the top of the sections that are Hydra partials."""
    if isinstance(node, Mapping):
        for k, v in node.items():
            here = f"{where}.{k}" if where else str(k)
            if k in HYDRA_KEYS and where not in allowed_at:
                refuse(f"{here} names a callable where imcap writes plain values")
            _no_hydra_keys(v, here, allowed_at, refuse)
    elif isinstance(node, list | tuple):
        for i, v in enumerate(node):
            _no_hydra_keys(v, f"{where}[{i}]", allowed_at, refuse)


def _plain_value(v: Any, where: str, refuse: Any) -> None:
    if isinstance(v, Mapping):
        refuse(f"{where} is a mapping where imcap writes a plain value")
    if isinstance(v, list | tuple) and not all(
        isinstance(x, str | int | float | bool) or x is None for x in v
    ):
        refuse(f"{where} holds values that are not plain")


def _size(v: Any, where: str, refuse: Any) -> None:
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int) or not 8 <= v <= MAX_IMAGE_SIZE:
        refuse(f"{where}={v!r} is out of range (8..{MAX_IMAGE_SIZE} px)")


def _timm_name(name: str) -> bool:
    """A model timm builds from its own registry: no hub prefix (hf-hub:, timm/...), which
    would fetch a configuration from the network."""
    import timm

    return ":" not in name and "/" not in name and bool(timm.is_model(name))
