"""Checkpoints: read as data, upgraded from older layouts, checked, loaded into a Captioner.

A checkpoint is data all the way down: what its hyperparameters may name.

`torch.load(weights_only=True)` stops pickled code, but a checkpoint's hyperparameters are
strings that the loader turns into behaviour: the decoder class, the data loader, the
optimizer and scheduler, timm options, image sizes. A file from elsewhere is untrusted, so each
of these is checked against imcap's own components (the registries below) before anything is
imported or built; anything else is refused in one line. A user's *current config* may still
name their own classes (that is how imcap is extended); only `trust_checkpoint=true` lets a
checkpoint do so.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from imcap.errors import UserError

if TYPE_CHECKING:
    from imcap.model.module import Captioner

log = logging.getLogger(__name__)

# -- registries: every callable a checkpoint may name ---------------------------------------------
DECODERS: set[str] = {
    "imcap.model.decoders.show_tell.ShowTellDecoder",
    "imcap.model.decoders.attention.AttentionDecoder",
    "imcap.model.decoders.topdown.TopDownDecoder",
    "imcap.model.decoders.aoa.AoADecoder",
}
DEFAULT_DECODER = "imcap.model.decoders.show_tell.ShowTellDecoder"  # a decoder without _target_
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
    target = dec.get("_target_", DEFAULT_DECODER)
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


# -- reading, upgrading and loading ---------------------------------------------------------------
_MOVED = {  # class paths of imcap 0.1 checkpoints -> where the classes live now
    "imcap.decoder.": "imcap.model.decoder.",
    "imcap.datasets.": "imcap.data.datasets.",
    "imcap.synthetic.": "imcap.data.synthetic.",
}
_MOVED_CLASSES = {  # imcap.model.decoder (one module) -> imcap.model.decoders (one per family)
    f"imcap.model.decoder.{path.rsplit('.', 1)[1]}": path
    for path in (
        "imcap.model.decoders.show_tell.ShowTellDecoder",
        "imcap.model.decoders.attention.AttentionDecoder",
        "imcap.model.decoders.topdown.TopDownDecoder",
    )
}


# Keys added to the model's sections after checkpoints were first written, with the value that
# reproduces how those checkpoints were trained and decode (not today's defaults: a default that
# changes in conf/ must not change what an old checkpoint does).
LEGACY: dict[str, dict[str, Any]] = {  # imcap 0.1's values, then each key as it was added
    "loss": {
        "label_smoothing": 0.0,
        "attention_reg": 1.0,
        "ss_prob": 0.0,
        "ss_ramp_epochs": 0,
        "attributes": 1.0,
    },
    "decoding": {"beam_size": 1, "max_len": 20, "length_penalty": 0.0, "no_repeat_ngram_size": 0},
    "scst": {
        "enabled": False,
        "num_samples": 5,
        "baseline": "greedy",
        "temperature": 1.0,
        "eos_reward": False,
        "dropout": True,
    },
}
# What imcap's decoder and encoder constructors took for an argument not given, before conf/
# became the only home of these values: checkpoints saved from Python with part of a section
# were built with them. `feature_norm` is read off the weights (checkpoints from before it
# existed have no normalisation; later ones default to batch norm).
_WORDS = {
    "rnn": "lstm",
    "embed_dim": 512,
    "hidden_dim": 512,
    "dropout": 0.5,
    "feature_dropout": 0.0,
}
LEGACY_DECODER: dict[str, dict[str, Any]] = {
    "imcap.model.decoders.show_tell.ShowTellDecoder": {**_WORDS, "num_layers": 1},
    "imcap.model.decoders.attention.AttentionDecoder": {
        **_WORDS,
        "attention_dim": 512,
        "gate": True,
    },
    "imcap.model.decoders.topdown.TopDownDecoder": {
        **_WORDS,
        "attention_dim": 512,
        "attributes": 0,
    },
}
LEGACY_ENCODER = {
    "name": "tf_efficientnet_lite0",
    "pretrained": False,
    "trainable": False,
    "img_size": None,
    "crop_pct": 1.0,
    "tune_stages": 0,
}
LEGACY_OPTIMIZER = {"_target_": "torch.optim.AdamW", "_partial_": True}
LEGACY_SCHEDULER = {"_target_": "imcap.model.schedules.warmup_cosine", "_partial_": True}
LEGACY_ENCODER_LR = 1.0e-5


def upgrade_hparams(hp: dict, weights: Mapping[str, Any] | None = None) -> dict:
    """Hyperparameters of a checkpoint written before the package layout and the optimizer
    config changed, in today's form (so older checkpoints keep loading). `weights` (its state
    dict, when at hand) settles what the hyperparameters leave open."""
    hp = dict(hp)

    def moved(path: Any) -> Any:
        for old, new in _MOVED.items():
            if isinstance(path, str) and path.startswith(old):
                path = new + path[len(old) :]
        return _MOVED_CLASSES.get(path, path)

    for section, keys in LEGACY.items():  # keys added since: the values that behave as before
        if hp.get(section) is None:  # not given to an older constructor: its defaults applied
            hp[section] = {}
        if isinstance(hp.get(section), dict):
            hp[section] = {**keys, **hp[section]}
    if isinstance(hp.get("decoder"), dict):
        dec = {**hp["decoder"], "_target_": moved(hp["decoder"].get("_target_", DEFAULT_DECODER))}
        if dec["_target_"] in LEGACY_DECODER:
            if "feature_norm" not in dec:
                normed = weights is None or any(k.startswith("decoder.feat_norm.") for k in weights)
                dec["feature_norm"] = "batch" if normed else "none"
            dec = {**LEGACY_DECODER[dec["_target_"]], **dec}
        hp["decoder"] = dec
    if isinstance(hp.get("encoder"), dict):
        hp["encoder"] = {**LEGACY_ENCODER, **hp["encoder"]}
    if isinstance(hp.get("encoder"), dict) and hp["encoder"].get("tune_stages") is False:
        hp["encoder"] = {**hp["encoder"], "tune_stages": 0}  # once cast, now refused when given
    if isinstance(hp.get("data"), dict) and "loader" in hp["data"]:
        hp["data"] = {**hp["data"], "loader": moved(hp["data"]["loader"])}
    optim = hp.pop("optim", None)
    if optim is None and "optimizer" not in hp:  # imcap 0.1 built from Python: its defaults
        optim = {}
    if isinstance(optim, dict):  # {lr, weight_decay, encoder_lr, scheduler, warmup_steps}
        hp["optimizer"] = {
            **LEGACY_OPTIMIZER,
            "lr": optim.get("lr", 4.0e-4),
            "weight_decay": optim.get("weight_decay", 0.0),
        }
        hp["encoder_lr"] = optim.get("encoder_lr", LEGACY_ENCODER_LR)
        cosine = optim.get("scheduler", "cosine") == "cosine"
        warmup = optim.get("warmup_steps", 0)
        hp["scheduler"] = {**LEGACY_SCHEDULER, "warmup_steps": warmup} if cosine else None
    if hp.get("optimizer") is None:  # 0.2 built from Python without one: its defaults
        hp["optimizer"] = {**LEGACY_OPTIMIZER, "lr": 4.0e-4, "weight_decay": 0.0}
    hp.setdefault("scheduler", {**LEGACY_SCHEDULER, "warmup_steps": 0})
    if hp.get("encoder_lr") is None:
        hp["encoder_lr"] = LEGACY_ENCODER_LR
    return hp


def read_checkpoint(p: Path, trust: bool = False) -> dict:
    """A checkpoint as data: `weights_only=True` unpickles tensors and plain containers only,
    so a file carrying code (a pickled callable) is refused instead of run.

    `trust=True` (trust_checkpoint=true) unpickles everything: only for a file from a source
    you trust that an older tool wrote with other objects inside."""
    if trust:
        log.warning("trust_checkpoint=true: %s is unpickled in full (it can run code)", p)
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"refusing to load {p}: it holds objects other than tensors and plain values, which "
            f"could run code when unpickled ({first[:160]}). imcap checkpoints never do; "
            "use a checkpoint written by imcap's train.py, or, only for a file from a source you "
            "trust, trust_checkpoint=true"
        ) from None
    except Exception as e:  # noqa: BLE001 - truncated, empty or not a checkpoint at all
        raise UserError(f"cannot read checkpoint {p}: {str(e)[:200]}") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{p} is not an imcap checkpoint (a {type(ckpt).__name__}, not a dict)")
    return ckpt


def load_captioner(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    trust: bool = False,
    **overrides: Any,
) -> Captioner:
    """Load a checkpoint, or a shipped model by name (imcap.model.zoo), with errors a user can
    act on (as data unless `trust`)."""
    from imcap.model import zoo

    p = zoo.resolve(path)
    if not p.is_file():
        names = ", ".join(zoo.index()) or "none"
        raise UserError(
            f"checkpoint not found: {p}. Give ckpt_path=<a .ckpt written by train.py> or a "
            f"shipped model name ({names}; `imcap models` lists them)"
        )
    return captioner_from(read_checkpoint(p, trust), p, map_location, trust=trust, **overrides)


def captioner_from(
    ckpt: dict,
    p: Path,
    map_location: str | torch.device = "cpu",
    trust: bool = False,
    **overrides: Any,
) -> Captioner:
    """The model inside a checkpoint already read (`read_checkpoint`), so a caller that also
    wants its other entries (epoch, callback state: the demo's model card) reads it once.
    A packed checkpoint (a shipped model) gets its frozen weights from their declared source.
    Unless `trust`, every component the hyperparameters name must be imcap's own
    (imcap.model.checkpoint): a checkpoint is data, it never picks the code that runs."""
    from imcap.model import zoo

    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not hp or "vocab" not in hp:
        raise UserError(
            f"{p} is not an imcap checkpoint (no vocabulary inside); train one with src/train.py"
        )
    weights = ckpt.get("state_dict") if isinstance(ckpt.get("state_dict"), Mapping) else None
    hp = upgrade_hparams(hp, weights)
    if not trust:
        check_hparams(hp, p)
    hp = {**hp, **{k: _override(hp.get(k), v) for k, v in overrides.items()}}
    # the weights come from the checkpoint; encoder.pretrained stays as the record of where they
    # came from before training (the Encoder loads nothing unless load_pretrained() is called)
    from imcap.model.module import Captioner

    try:
        model = Captioner(**hp)
    except TypeError as e:  # a section or argument this version does not know or needs
        raise UserError(f"{p}: its hyperparameters do not fit this imcap: {e}") from None
    try:
        if ckpt.get(zoo.PACKED):
            zoo.fill_provided(model, ckpt, p)
        else:
            model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, KeyError) as e:
        raise UserError(
            f"checkpoint {p} does not match its own hyperparameters: {str(e)[:300]}"
        ) from None
    return model.to(map_location).eval()


def _override(section: Any, given: Any) -> Any:
    """A section given in part changes only those keys of the checkpoint's; one naming another
    `_target_` (or replacing a missing section) stands alone."""
    if not (isinstance(given, Mapping) and isinstance(section, Mapping)):
        return given
    if given.get("_target_", section.get("_target_")) != section.get("_target_"):
        return dict(given)
    return {**section, **given}
