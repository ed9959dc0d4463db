"""What the entry points do, as plain functions of a composed config (testable without a CLI)."""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, ListConfig, OmegaConf

from imcap.data.images import (
    ImageFiles,
    collate_images,
    file_in,
    list_images,
    make_transform,
    safe_stem,
    unique_stems,
)
from imcap.errors import UserError
from imcap.model.checkpoint import check_hparams, load_captioner, read_checkpoint, upgrade_hparams
from imcap.model.module import Captioner, check_decoding
from imcap.pipeline.datamodule import CaptionDataModule, recorded_data

log = logging.getLogger(__name__)


# Known and harmless, printed by every run (so people stop reading warnings): silenced here.
_HARMLESS = (
    r".*isinstance\(treespec, LeafSpec\).*",  # Lightning's own use of a torch API it will update
    r"Found \d+ module\(s\) in eval mode.*",  # the frozen encoder stays in eval mode on purpose
    r"Precision .* is not supported by the model summary.*",  # the size column is approximate
    r"Detected pickle protocol \d+ in the checkpoint.*",  # Lightning writes protocol 4; loads fine
    # DDP: caption scores are computed once from every rank's gathered captions and broadcast
    # (Captioner._score), so each rank logs the same global value; nothing to all-reduce
    r"It is recommended to use `self.log\('(val|val_best|test)/[^']+', \.\.\., sync_dist=True\)`.*",
    # DDP validate/test: the sampler pads with repeated images; _score keeps each image once
    r"Using `DistributedSampler` with the dataloaders\. During `trainer\.(validate|test)\(\)`.*",
)


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.lstrip().startswith("💡") or "litlogger" in msg or "litmodels" in msg)


def quiet_known_noise() -> None:
    """Silence warnings a user cannot act on; everything else still prints."""
    for pattern in _HARMLESS:
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropAdverts())


def plain(cfg: Any) -> Any:
    """OmegaConf -> plain Python containers (what checkpoints and constructors get)."""
    return (
        OmegaConf.to_container(cfg, resolve=True)
        if isinstance(cfg, DictConfig | ListConfig)
        else cfg
    )


def output_dir(cfg: DictConfig) -> Path:
    out = Path(cfg.paths.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(
            f"cannot write the run directory {out}: {e.strerror}; choose another with "
            "hydra.run.dir=<dir> (or paths.log_dir=<dir>), or free space there"
        ) from None
    return out


def check_metrics_env(cfg: DictConfig) -> None:
    """Fail before any training if scoring cannot run at the end: building the final scorer of
    `metrics` checks Java and SPICE's jars, one line each, and spawns nothing."""
    from imcap.eval.metrics import CaptionScorer

    CaptionScorer.from_config(plain(cfg.metrics)).close()


def make_loggers(cfg: DictConfig) -> list:
    loggers = []
    for name, lcfg in (cfg.get("logger") or {}).items():
        if lcfg is None or "_target_" not in lcfg:
            continue
        if lcfg._target_.endswith("WandbLogger"):
            from imcap.pipeline.wandb_utils import wandb_logger

            loggers.append(wandb_logger(lcfg, cfg))
        else:
            loggers.append(instantiate(lcfg))
        log.info("logger %s: %s", name, lcfg._target_)
    return loggers


def make_callbacks(cfg: DictConfig) -> list[L.Callback]:
    return [
        instantiate(c)
        for c in (cfg.get("callbacks") or {}).values()
        if c is not None and "_target_" in c
    ]


def build_model(cfg: DictConfig, data: CaptionDataModule | None = None) -> Captioner:
    """The model of this config: vocabulary from the training captions of `data` (the run's
    data module, so its records are read once; a new one when not given), weights loaded.

    With `init_from=<ckpt>` (a second stage, e.g. SCST) the checkpoint's vocabulary, encoder and
    decoder are kept (so they always fit its weights); optimisation, loss, decoding and SCST
    settings come from this config.
    """
    m = cfg.model
    run_args = {
        "optimizer": plain(m.optimizer),
        "scheduler": plain(m.scheduler),
        "encoder_lr": m.encoder_lr,
        "loss": plain(m.loss),
        "decoding": plain(m.decoding),
        "scst": plain(m.get("scst")),
        "data": recorded_data(plain(cfg.data)),  # eval.py rebuilds the data from it
    }
    if cfg.get("init_from"):
        init = load_captioner(cfg.init_from, trust=bool(cfg.get("trust_checkpoint")))
        hp = dict(init.hparams)
        model = Captioner(**{**hp, **run_args})  # encoder.pretrained kept as a record only
        model.load_state_dict(init.state_dict())
        if plain(cfg.decoder) != hp["decoder"]:
            log.warning(
                "init_from: using the checkpoint's decoder %s (the config's differs)", hp["decoder"]
            )
        log.info(
            "initialised from %s (its vocabulary of %d words)", cfg.init_from, len(model.vocab)
        )
    else:
        vocab = (data or CaptionDataModule.from_config(plain(cfg.data))).build_vocab()
        model = Captioner(
            vocab=vocab.to_dict(),
            encoder=plain(cfg.encoder),
            decoder=plain(cfg.decoder),
            **run_args,
        )
        source = model.encoder.load_pretrained()
        log.info("encoder %s, weights: %s", model.encoder.name, source)
    model.metrics_cfg = plain(cfg.metrics)
    return model


def stopped_message(trainer: L.Trainer, why: str) -> str:
    last = getattr(trainer.checkpoint_callback, "last_model_path", "") or ""
    if last and Path(last).is_file():
        return (
            f"training stopped ({why}) in epoch {trainer.current_epoch}; resumable checkpoint "
            f"{last}: continue in the same run directory with `python src/train.py "
            f"resume={Path(last).parents[1]}` (its overrides are reapplied; add e.g. "
            "trainer.max_epochs=N to change them)"
        )
    return f"training stopped ({why}) in epoch {trainer.current_epoch}; no checkpoint was saved"


def train(cfg: DictConfig) -> float | None:
    """Fit, select the best checkpoint on val/CIDEr, test it; returns the optimized metric."""
    started = time.perf_counter()
    quiet_known_noise()
    out = output_dir(cfg)
    check_metrics_env(cfg)
    L.seed_everything(cfg.seed, workers=True)
    epochs = cfg.trainer.get("max_epochs")
    if epochs is not None and (not isinstance(epochs, int) or epochs == 0 or epochs < -1):
        raise UserError(f"trainer.max_epochs must be a whole number >= 1 (or -1), got {epochs!r}")
    finetune = (cfg.get("callbacks") or {}).get("finetune") or {}
    if cfg.mode == "two_step" and (
        cfg.encoder.trainable or finetune.get("start_epoch") is not None
    ):
        raise UserError(
            "a trainable / fine-tuned encoder needs mode=joint (two_step trains on frozen features)"
        )
    trust = bool(cfg.get("trust_checkpoint"))  # unpickle checkpoints in full (opt-in)
    if cfg.get("resume") and not cfg.get("ckpt_path"):
        raise UserError(
            "resume= is turned into overrides by the entry point (src/train.py); in code, compose "
            "the config with imcap.config.resume_overrides(overrides)"
        )
    # resume=<run dir> (or ckpt_path=<out>/checkpoints/last.ckpt): continue in this directory
    in_place = (
        bool(cfg.get("ckpt_path"))
        and Path(str(cfg.ckpt_path)).resolve().parents[1] == out.resolve()
    )
    dm = CaptionDataModule.from_config(plain(cfg.data))  # one data module: records read once
    model = build_model(cfg, dm)
    if cfg.get("ckpt_path"):
        check_resume_vocab(cfg.ckpt_path, model.vocab, trust, model)
    if rank_zero_only.rank == 0:
        model.vocab.save(out / "vocab.json")
    dm.attach(model, cfg.mode)
    if cfg.get("compile"):
        model.decoder.compile()  # in place: state-dict keys unchanged
    from imcap.pipeline.callbacks import OverflowGuard

    callbacks = [*make_callbacks(cfg), OverflowGuard()]  # always on, whatever callbacks= says
    extra: dict[str, Any] = {}
    if not sys.stderr.isatty():  # a log file, not a terminal: progress lines, not bar redraws
        from imcap.pipeline.callbacks import ProgressLog

        if "enable_progress_bar" not in cfg.trainer:
            extra["enable_progress_bar"] = False
        callbacks.append(ProgressLog())
    if cfg.trainer.get("enable_model_summary", True):  # ours: no column of zero FLOPs
        from imcap.pipeline.callbacks import ModelSummary

        callbacks.append(ModelSummary(max_depth=1))
    extra["enable_model_summary"] = False  # Lightning's own: replaced by the one above
    if "plugins" not in cfg.trainer:  # checkpoints written to a temp file, then renamed
        from imcap.pipeline.callbacks import AtomicCheckpointIO

        extra["plugins"] = [AtomicCheckpointIO()]
    loggers = make_loggers(cfg)
    if in_place:
        from imcap.pipeline.callbacks import ContinueMetrics

        rows = ContinueMetrics.take(loggers) if rank_zero_only.rank == 0 else []
        callbacks.append(ContinueMetrics(rows))
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* is not empty")
        log.info("resuming in place: %s (from %s)", out, cfg.ckpt_path)
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, **extra
    )
    for lg in trainer.loggers:
        lg.log_hyperparams(plain(cfg))
    try:
        trainer.fit(model, datamodule=dm, ckpt_path=cfg.get("ckpt_path"), weights_only=not trust)
    except SIGTERMException:  # preemption / scancel: last.ckpt saved, exit 143 for a requeue
        print(f"error: {stopped_message(trainer, 'SIGTERM')}", file=sys.stderr)
        sys.exit(143)
    except OSError as e:  # a full disk or a vanished folder while writing a checkpoint or log
        where = f" ({e.filename})" if e.filename else ""
        raise UserError(
            f"training stopped: {e.strerror or e}{where}. Checkpoints already written are "
            "complete (each is written to a temporary file, then renamed); free space or point "
            f"the run elsewhere, then resume. {stopped_message(trainer, 'I/O error')}"
        ) from None
    except SystemExit:  # Lightning turns Ctrl-C into exit(1) after saving last.ckpt
        if not trainer.interrupted:
            raise
        print(f"error: {stopped_message(trainer, 'Ctrl-C')}", file=sys.stderr)
        sys.exit(130)
    if trainer.interrupted:
        raise UserError(stopped_message(trainer, "interrupted"))

    ckpt_cb = trainer.checkpoint_callback
    best = ckpt_cb.best_model_path if ckpt_cb is not None and ckpt_cb.best_model_path else None
    results: dict[str, Any] = {
        "best_checkpoint": best,
        "fit_seconds": round(time.perf_counter() - started, 1),
    }
    curves = next((c for c in callbacks if hasattr(c, "epoch_seconds")), None)
    if curves is not None:
        results["epoch_seconds"] = curves.epoch_seconds
    if dm.cache is not None:
        keys = (
            "encoder",
            "weights",
            "num_images",
            "seconds",
            "images_per_second",
            "device",
            "bad_files",
        )
        results["features"] = {
            "directory": str(dm.cache.directory),
            **{k: dm.cache.manifest.get(k) for k in keys},
        }
    trainer.validate(model, datamodule=dm, ckpt_path=best, verbose=False, weights_only=True)
    results["val"] = model.scores.get("val", {})
    if trainer.is_global_zero:
        write_captions(out / "captions_val.json", model.predictions.get("val", {}), dm, "val")
    if cfg.get("test"):
        if dm.has_split("test"):
            dm.split = "test"
            trainer.test(model, datamodule=dm, ckpt_path=best, verbose=False, weights_only=True)
            results["test"] = model.scores.get("test", {})
            if trainer.is_global_zero:
                write_captions(
                    out / "captions_test.json", model.predictions.get("test", {}), dm, "test"
                )
        else:
            log.warning(
                "dataset %s has no test split: skipped the final test; report val scores", dm.name
            )
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    if trainer.is_global_zero:
        (out / "metrics.json").write_text(json.dumps(results, indent=1))
        samples = next((c.latest for c in callbacks if getattr(c, "latest", None)), None)
        summary(out, best, results, samples)
    metric = cfg.get("optimized_metric")
    if metric:
        split, name = metric.split("/", 1)
        return results.get(split, {}).get(name)
    return results["val"].get("CIDEr")


def check_resume_vocab(ckpt_path: str, vocab, trust: bool = False, model=None) -> None:
    """Resuming needs the vocabulary and the model shape the checkpoint was trained with."""
    p = Path(str(ckpt_path)).expanduser()
    if not p.is_file():
        raise UserError(
            f"checkpoint not found: {p}. Give ckpt_path=<a .ckpt written by train.py> to resume"
        )
    ckpt = read_checkpoint(p, trust)
    hp = upgrade_hparams(ckpt.get("hyper_parameters") or {})
    if not trust:
        check_hparams(hp, p)
        check_callback_paths(ckpt, p)
    tokens = (hp.get("vocab") or {}).get("tokens")
    if tokens != vocab.tokens:
        n = len(tokens) if tokens else 0
        raise UserError(
            f"{p} was trained with another vocabulary ({n} words; this data builds {len(vocab)}). "
            "Resume with the same data and data.vocab settings, or start a new run from its weights "
            f"and vocabulary with init_from={p}"
        )
    if model is None:
        return
    for part in ("encoder", "decoder"):
        theirs, ours = dict(hp.get(part) or {}), dict(model.hparams.get(part) or {})
        theirs.pop("pretrained", None), ours.pop("pretrained", None)  # where weights came from
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        if diff:
            shown = ", ".join(f"{part}.{k}={theirs.get(k)!r} (here {ours.get(k)!r})" for k in diff)
            raise UserError(
                f"{p} was trained with another {part}: {shown}. Resume with the overrides it "
                "was trained with (its .hydra/config.yaml), or start anew from it with init_from="
            )


def check_callback_paths(ckpt: dict, p: Path) -> None:
    """Lightning restores the checkpoint callback's record of the best files (when its folder
    is this run's) and later deletes those that fall out of the top k: a resumed checkpoint may
    only name files inside the folder it records."""
    for name, state in (ckpt.get("callbacks") or {}).items():
        if not isinstance(state, dict) or "dirpath" not in state:
            continue
        home = Path(str(state["dirpath"]))
        named = [*(state.get("best_k_models") or {})]
        named += [
            state.get(k) for k in ("best_model_path", "kth_best_model_path", "last_model_path")
        ]
        for f in named:
            if f and (Path(str(f)).parent != home or ".." in Path(str(f)).parts):
                raise UserError(
                    f"refusing checkpoint {p}: its {name} state names {f}, a file outside its "
                    f"folder {home}; resume only checkpoints train.py wrote, or trust_checkpoint=true"
                )


def write_captions(path: Path, preds: dict[str, str], dm: CaptionDataModule, split: str) -> None:
    if not preds:
        return
    refs = dm.references(split)
    rows = [
        {"image_id": i, "caption": c, "references": refs.get(i, [])}
        for i, c in sorted(preds.items())
    ]
    path.write_text(json.dumps(rows, indent=1))


def summary(out: Path, ckpt: str | None, results: dict, samples: Path | None) -> None:
    """The end-of-run lines: where things are, and the headline scores of `metrics.SPECS`."""
    from imcap.eval.metrics import metric_names

    def fmt(scores: dict) -> str:
        keys = metric_names(headline=True)
        return "  ".join(f"{k} {100 * scores[k]:.1f}" for k in keys if k in scores)

    lines = [
        f"run directory : {out}",
        f"checkpoint    : {ckpt}",
        f"metrics       : {out / 'metrics.json'}",
    ]
    if samples:
        lines.append(f"sample captions: {samples}")
    for split in ("val", "test"):
        if results.get(split):
            lines.append(f"{split:5s} (x100)  : {fmt(results[split])}")
    lines.append(f"wall time     : {results['total_seconds']:.0f} s")
    print("\n" + "\n".join(lines))


# -- eval.py ----------------------------------------------------------------------------------
def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Score a checkpoint on a split: metrics JSON + per-image captions JSON."""
    quiet_known_noise()
    out = output_dir(cfg)
    check_metrics_env(cfg)
    ckpts = plain(cfg.ckpt_path)
    model = load_models(ckpts, trust=bool(cfg.get("trust_checkpoint")))
    if model.members() and cfg.get("mode", "joint") != "joint":
        raise UserError("an ensemble (ckpt_path=[...]) reads raw images: use mode=joint")
    apply_decoding_overrides(model, cfg)
    model.metrics_cfg = plain(cfg.metrics)
    data = plain(cfg.data) if cfg.get("data") else dict(model.hparams.get("data") or {})
    if not data:
        raise UserError(
            f"{cfg.ckpt_path} records no dataset: pass data=<name> (e.g. data=flickr8k)"
        )
    if not data.get("root"):  # a shipped model records its dataset by name only
        name = data.get("name", "<name>")
        raise UserError(
            f"{cfg.ckpt_path} does not record where its {name} data lives: pass "
            f"data={name} data.root=<the dataset folder>"
        )
    split = cfg.get("split") or data.get("split") or "test"
    dm = CaptionDataModule.for_model(data, model, cfg.get("mode", "joint"), split=split)
    dm.require_split(split)
    trainer = L.Trainer(
        accelerator=cfg.get("accelerator", "auto"),
        devices=1,
        logger=False,
        enable_checkpointing=False,
    )
    trainer.test(model, datamodule=dm, verbose=False)
    scores = model.scores[split]
    result = {
        "checkpoint": [str(p) for p in ckpts] if isinstance(ckpts, list) else str(ckpts),
        "split": split,
        "dataset": dm.name,
        "decoding": model.decoding,
        "scores": scores,
    }
    metrics_path, captions_path = out / f"metrics_{split}.json", out / f"captions_{split}.json"
    metrics_path.write_text(json.dumps(result, indent=1))
    write_captions(captions_path, model.predictions[split], dm, split)
    from imcap.eval.metrics import metric_names

    print(
        f"\n{dm.name} {split}, beam {model.decoding['beam_size']} ({int(scores['num_images'])} images, x100):"
    )
    print("  ".join(f"{k} {100 * scores[k]:.2f}" for k in metric_names() if k in scores))
    print(f"metrics : {metrics_path}\ncaptions: {captions_path}")
    return scores


def load_models(ckpt_path: Any, map_location: str = "cpu", trust: bool = False) -> Captioner:
    """`ckpt_path`: one checkpoint, or a list of them decoded as an ensemble (the mean of their
    word distributions at every step; the first one's decoding settings)."""
    ckpt_path = plain(ckpt_path)
    if not isinstance(ckpt_path, list | tuple):
        return load_captioner(str(ckpt_path), map_location=map_location, trust=trust)
    paths = [str(p) for p in ckpt_path]
    if not paths:
        raise UserError("ckpt_path=[] names no checkpoint: give one path, or a list of them")
    models = [load_captioner(p, map_location=map_location, trust=trust) for p in paths]
    models[0].join(models[1:], paths)
    log.info("ensemble of %d checkpoints: %s", len(paths), ", ".join(paths))
    return models[0]


def apply_decoding_overrides(model: Captioner, cfg: DictConfig) -> None:
    for key, value in (plain(cfg.get("model")) or {}).items():
        if value is None:
            continue
        if key not in model.decoding:
            raise UserError(f"unknown decoding option model.{key}; known: {sorted(model.decoding)}")
        try:
            model.decoding[key] = type(model.decoding[key])(value)
        except (TypeError, ValueError):
            raise UserError(f"model.{key}={value!r} is not a number") from None
    check_decoding(model.decoding)


# -- caption.py -------------------------------------------------------------------------------
def caption(cfg: DictConfig) -> list[dict[str, str]]:
    """Caption new images (a file, a folder, or a list) and write them as JSON."""
    if cfg.get("images") is None:
        raise UserError("give images=<image file, folder, or [list]>")
    quiet_known_noise()
    out = output_dir(cfg)
    device = "cuda" if torch.cuda.is_available() and cfg.get("device", "auto") != "cpu" else "cpu"
    from imcap.model import zoo

    ckpt = cfg.ckpt_path if cfg.get("ckpt_path") else zoo.default_checkpoint("caption")
    model = load_models(ckpt, map_location=device, trust=bool(cfg.get("trust_checkpoint")))
    apply_decoding_overrides(model, cfg)
    paths = list_images(plain(cfg.images), download_dir=out / "downloads")
    files = ImageFiles(
        paths,
        make_transform(model.encoder.data_config),
        cfg.get("bad_images", "skip"),
        key="bad_images",
    )
    loader = torch.utils.data.DataLoader(
        files, batch_size=cfg.batch_size, collate_fn=collate_images, num_workers=0
    )
    rows: list[dict[str, str]] = []
    bad: list[str] = []
    attention = bool(cfg.get("attention"))
    att_dir = out / "attention"
    # one map per image, named by its stem: two `cat.jpg` in different folders both keep theirs
    att_names = unique_stems([str(p) for p in paths], lambda k: Path(k).stem)
    for batch in loader:
        bad += [str(paths[i]) for i in batch["bad"].tolist()]
        if batch["index"].numel() == 0:
            continue
        with torch.no_grad():
            dec = model.generate(model.encode(batch["images"]), return_attn=attention)
        for j, i in enumerate(batch["index"].tolist()):
            text = model.vocab.decode(dec.tokens[j].tolist())
            row = {"image": str(paths[i]), "caption": text}
            if attention:
                name = att_names[str(paths[i])]
                row["attention_map"] = str(save_attention(model, paths[i], dec, j, att_dir, name))
            rows.append(row)
            print(f"{paths[i]}: {text}")
    if not rows:
        raise UserError(
            f"none of the {len(paths)} file(s) is a readable image: {', '.join(bad[:3])}"
        )
    if bad:
        log.warning("skipped %d unreadable file(s): %s", len(bad), ", ".join(bad[:5]))
    target = Path(cfg.output) if cfg.get("output") else out / "captions.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(rows, indent=1))
    print(f"captions: {target}")
    return rows


def save_attention(
    model: Captioner, path: Path, dec: Any, j: int, out: Path, name: str | None = None
) -> Path:
    """Per-word attention figure (attention decoders only) as `out/<name>.png`; `name` is made
    safe (no separators, no `..`), the image's stem when not given."""
    from imcap.eval.viz import attention_figure, attention_words

    if dec.alphas is None:
        raise UserError(
            "attention=true needs an attention decoder "
            "(decoder=lstm_attention, gru_attention or topdown); an ensemble draws its first "
            "checkpoint's maps, so list an attention checkpoint first"
        )
    out.mkdir(parents=True, exist_ok=True)
    target = file_in(out, safe_stem(name or Path(path).stem), ".png")
    tokens = dec.tokens[j].tolist()
    words = attention_words(model.vocab.decode(tokens), int(model.decoding["max_len"]))
    attention_figure(path, words, dec.alphas[j].float().cpu(), target)
    return target
