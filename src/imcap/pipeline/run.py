"""What the entry points do, as plain functions of a composed config (testable without a CLI)."""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

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
from imcap.model.checkpoint import load_captioner
from imcap.model.module import Captioner
from imcap.pipeline.checks import (
    check_callback_paths,  # noqa: F401 (the old path)
    check_metrics_env,
    check_resume_vocab,
    check_train_config,
)
from imcap.pipeline.datamodule import MACHINE, CaptionDataModule, recorded_data
from imcap.pipeline.runtime import (
    apply_decoding_overrides,
    load_models,
    output_dir,
    plain,
    quiet_known_noise,
)
from imcap.pipeline.training import (  # noqa: F401
    fit,
    make_callbacks,
    make_loggers,
    make_trainer,
    run_facts,
    stopped_message,
)

log = logging.getLogger(__name__)


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


def train(cfg: DictConfig) -> float | None:
    """Fit, select the best checkpoint on val/CIDEr, test it; returns the optimized metric."""
    started = time.perf_counter()
    quiet_known_noise()
    out = output_dir(cfg)
    check_train_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    dm = CaptionDataModule.from_config(plain(cfg.data))  # one data module: records read once
    model = build_model(cfg, dm)
    resume = None  # ckpt_path=<a .ckpt>: read once here, checked, and handed to the fit
    if cfg.get("ckpt_path"):
        trust = bool(cfg.get("trust_checkpoint"))
        resume = check_resume_vocab(cfg.ckpt_path, model.vocab, trust, model)
    if rank_zero_only.rank == 0:
        model.vocab.save(out / "vocab.json")
    dm.attach(model, cfg.mode)
    if cfg.get("compile"):
        model.decoder.compile()  # in place: state-dict keys unchanged
    trainer = make_trainer(cfg, out, resume)
    del resume  # the trainer's checkpoint plugin holds it until the fit takes it
    fit(trainer, model, dm, cfg)
    results = {**run_facts(trainer, dm), "fit_seconds": round(time.perf_counter() - started, 1)}
    results |= score_best(trainer, model, dm, out, test=bool(cfg.get("test")))
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    if trainer.is_global_zero:
        (out / "metrics.json").write_text(json.dumps(results, indent=1))
        samples = next((c.latest for c in trainer.callbacks if getattr(c, "latest", None)), None)
        summary(out, results["best_checkpoint"], results, samples)
    from imcap.eval.metrics import OBJECTIVE  # (the toolkit import is slow: only when needed)

    split, name = str(cfg.get("optimized_metric") or OBJECTIVE).split("/", 1)
    return results.get(split, {}).get(name)


def score_best(
    trainer: L.Trainer, model: Captioner, dm: CaptionDataModule, out: Path, test: bool
) -> dict[str, Any]:
    """The best checkpoint re-scored on val (every metric, METEOR included) and, with `test`,
    on the test split; each split's captions saved beside the scores."""
    best = run_facts(trainer, dm)["best_checkpoint"]
    results: dict[str, Any] = {}
    trainer.validate(model, datamodule=dm, ckpt_path=best, verbose=False, weights_only=True)
    results["val"] = model.scores.get("val", {})
    if trainer.is_global_zero:
        write_captions(out / "captions_val.json", model.predictions.get("val", {}), dm, "val")
    if not test:
        return results
    if not dm.has_split("test"):
        log.warning(
            "dataset %s has no test split: skipped the final test; report val scores", dm.name
        )
        return results
    dm.split = "test"
    trainer.test(model, datamodule=dm, ckpt_path=best, verbose=False, weights_only=True)
    results["test"] = model.scores.get("test", {})
    if trainer.is_global_zero:
        write_captions(out / "captions_test.json", model.predictions.get("test", {}), dm, "test")
    return results


def write_captions(path: Path, preds: dict[str, str], dm: CaptionDataModule, split: str) -> None:
    """Every image's caption with its references (and what the annotations say of it, e.g.
    nocaps' domain and id), keyed by the dataset's own image ids."""
    if not preds:
        return
    records = {r.image_id: r for r in dm.require_split(split)}
    rows = []
    for i, c in sorted(preds.items()):
        r = records.get(i)
        attrs = {k: v for k, v in (r.attributes if r else {}).items() if k not in ROW_KEYS}
        rows.append({"image_id": i, **attrs, "caption": c, "references": r.captions if r else []})
    path.write_text(json.dumps(rows, indent=1))


ROW_KEYS = ("image_id", "caption", "references")


def results_rows(preds: dict[str, str], ids: dict[str, str]) -> list[dict[str, Any]] | None:
    """Captions in the results format of the COCO caption server, pycocoevalcap's `loadRes` and
    nocaps' EvalAI: `[{"image_id": int, "caption": str}]`, one per image, by id. `ids` maps an
    image id to the id the server knows (nocaps: `attributes["id"]`; COCO: the image id
    itself). None when an id is not an integer (Flickr's are file names): no server reads those."""
    rows, names = [], {}
    for image_id, caption in preds.items():
        server_id = str(ids.get(image_id, image_id))
        if not (server_id.isascii() and server_id.isdigit()):
            return None
        rows.append({"image_id": int(server_id), "caption": caption})
        names.setdefault(int(server_id), []).append(image_id)
    rows.sort(key=lambda r: r["image_id"])
    shared = {i: n for i, n in names.items() if len(n) > 1}
    if shared:
        i, n = next(iter(shared.items()))
        log.warning(
            "%d integer id(s) shared by several images (e.g. %d: %s): no results file written, "
            "as a server would score only one of them; give each image its own id in the "
            "annotation file",
            len(shared),
            i,
            ", ".join(n[:3]),
        )
        return None
    return rows


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
    """Score a checkpoint on a split: metrics JSON, per-image captions JSON and, where the
    dataset's image ids are integers (COCO, nocaps), the caption servers' results file. A
    grouped dataset (data.source.group_by, nocaps' domain) is also scored per group. A split
    without references (nocaps test, `images=<folder>`) gets captions and the results file
    only, with a note saying why there are no scores."""
    quiet_known_noise()
    out = output_dir(cfg)
    check_metrics_env(cfg)
    ckpts = plain(cfg.ckpt_path)
    model = load_models(ckpts, trust=bool(cfg.get("trust_checkpoint")))
    if model.members() and cfg.get("mode", "joint") != "joint":
        raise UserError("an ensemble (ckpt_path=[...]) reads raw images: use mode=joint")
    apply_decoding_overrides(model, cfg)
    model.metrics_cfg = plain(cfg.metrics)
    if cfg.get("images"):
        if cfg.get("data"):
            raise UserError(
                "give data=<name> (a dataset's split, scored) or images=<folder> (images without "
                "captions: captioned, not scored), not both"
            )
        data = folder_data(cfg)
        split, label = "test", safe_stem(str(cfg.get("split") or data["name"]))
    else:
        data = eval_data(cfg, model)
        split = cfg.get("split") or data.get("split") or "test"
        label = safe_stem(str(split))
    dm = CaptionDataModule.for_model(data, model, cfg.get("mode", "joint"), split=split)
    dm.needs_train = False  # nocaps or a folder have no training split: scoring needs none
    records = dm.require_split(split)
    group_by = (data.get("source") or {}).get("group_by")
    if group_by:
        groups = {r.image_id: r.attributes[group_by] for r in records if group_by in r.attributes}
        if not groups:
            log.warning("no %s image has a %s: no per-%s scores", split, group_by, group_by)
        model.evaluator.group_by(split, groups)
    trainer = L.Trainer(
        accelerator=cfg.get("accelerator", "auto"),
        devices=1,
        logger=False,
        enable_checkpointing=False,
    )
    trainer.test(model, datamodule=dm, verbose=False)
    scores, preds = model.scores[split], model.predictions[split]
    if not preds:
        raise UserError(
            f"none of the {len(records)} {split} images of {dm.name} could be read (see the "
            "warnings above): nothing to caption; fix or restore the image files"
        )
    metrics_path, captions_path = out / f"metrics_{label}.json", out / f"captions_{label}.json"
    write_captions(captions_path, preds, dm, split)
    rows = results_rows(preds, {r.image_id: r.attributes.get("id", r.image_id) for r in records})
    results_path = (
        out / f"captions_{label}_{safe_stem(cfg.get('results_name') or 'imcap')}_results.json"
    )
    if rows is not None:
        results_path.write_text(json.dumps(rows))
    from imcap.eval.metrics import metric_names

    scored = any(k in scores for k in metric_names())
    note = None
    if not scored:
        where = f"the images in {data['root']}" if cfg.get("images") else f"{dm.name} {split}"
        server = f" (a caption server scores {results_path.name})" if rows is not None else ""
        note = f"no scores: no reference captions for {where}{server}"
    result = {
        "checkpoint": [str(p) for p in ckpts] if isinstance(ckpts, list) else str(ckpts),
        "split": label,
        "dataset": dm.name,
        "decoding": model.decoding,
        "scores": {k: v for k, v in scores.items() if "/" not in k},
        "metrics": {f"{label}/{k}": v for k, v in scores.items()},  # as logged, groups included
        "group_by": group_by or None,
        "results_file": str(results_path) if rows is not None else None,
        **({"note": note} if note else {}),
    }
    metrics_path.write_text(json.dumps(result, indent=1))
    beam = model.decoding["beam_size"]
    n = int(scores["num_images"])
    if note:
        print(f"\n{dm.name} {label}, beam {beam}: {n} images captioned\n{note}")
    else:
        print(f"\n{dm.name} {label}, beam {beam} ({n} images, x100):")
        print(score_table(scores, group_by) if group_by else "  ".join(
            f"{k} {100 * scores[k]:.2f}" for k in metric_names() if k in scores
        ))  # fmt: skip
    print(f"metrics : {metrics_path}\ncaptions: {captions_path}")
    if rows is not None:
        print(f"results : {results_path} (the caption servers' format)")
    else:
        why = f"{dm.name}'s image ids are not integers; {captions_path.name} has every caption"
        print(f"results : none ({why})")
    return scores


def score_table(scores: dict[str, float], group_by: str) -> str:
    """Overall and per-group scores, one row each, the headline metrics (x100): the nocaps
    leaderboard's table (the metrics JSON has every metric of every group)."""
    from imcap.eval.metrics import metric_names

    names = [k for k in metric_names(headline=True) if k in scores]  # the leaderboard's
    groups = sorted({k.rsplit("/", 1)[0] for k in scores if "/" in k})
    width = max(len(g) for g in [group_by, "overall", *groups])
    lines = [f"{group_by:<{width}}  {'images':>6}" + "".join(f"  {k:>7}" for k in names)]
    for group, prefix in [*((g, f"{g}/") for g in groups), ("overall", "")]:
        cells = "".join(
            f"  {100 * scores[prefix + k]:7.2f}" if prefix + k in scores else f"  {'-':>7}"
            for k in names
        )
        lines.append(f"{group:<{width}}  {int(scores[prefix + 'num_images']):>6}{cells}")
    return "\n".join(lines)


def eval_data(cfg: DictConfig, model: Captioner) -> dict[str, Any]:
    """The data eval.py scores: data=<name> as composed, else the checkpoint's own record."""
    if cfg.get("data"):
        data = plain(cfg.data)
    else:  # the checkpoint's dataset, loaded the way this machine loads
        cache = f"{cfg.paths.cache_dir}/features" if cfg.get("paths") else None
        data = recorded(dict(model.hparams.get("data") or {}), cache)
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
    return data


def folder_data(cfg: DictConfig) -> dict[str, Any]:
    """eval.py images=<folder>: a data section whose loader lists the images, all in `test`,
    without captions (`imcap.data.datasets.folder_records`)."""
    from imcap.config import data_section

    images = plain(cfg.images)
    folder = Path(str(images)).expanduser() if isinstance(images, str) else None
    is_dir = folder is not None and folder.is_dir()
    return {
        **data_section("_base"),
        "name": folder.name if is_dir else "images",
        "root": str(folder if is_dir else Path.cwd()),
        "loader": "imcap.data.datasets.folder_records",
        "source": {"images": images},
        "split": "test",
        "cache_dir": f"{cfg.paths.cache_dir}/features",
    }


def recorded(data: dict[str, Any], cache_dir: str | None = None) -> dict[str, Any]:
    """The data section a checkpoint recorded, completed for this machine: its dataset's config
    (conf/data/<name>.yaml; data/_base.yaml for a dataset this installation has no config for)
    gives what the record lacks (options added since it was written) and how this machine loads
    (workers, batch sizes: never the checkpoint's); the record wins for what describes the data."""
    name = data.get("name")
    if not name:
        return data
    from imcap.config import data_section

    # the name picks a config file: only a plain name of this installation's conf/data (a
    # checkpoint's string never reaches Hydra's override grammar or a path outside conf/)
    plain_name = re.fullmatch(r"[A-Za-z0-9_-]+", str(name)) and not str(name).startswith("_")
    try:
        base = data_section(str(name)) if plain_name else data_section("_base")
    except Exception:  # noqa: BLE001 - a dataset of the user's own (its own loader)
        base = data_section("_base")
    known, theirs = base.get("source") or {}, data.get("source") or {}
    source = {**known, **({k: v for k, v in theirs.items() if k in known} if known else theirs)}
    kept = {k: v for k, v in data.items() if k in base and k not in MACHINE and k != "source"}
    out = {**base, **kept, "source": source}
    if cache_dir:
        out["cache_dir"] = cache_dir
    return out


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
            "(decoder=lstm_attention, gru_attention, topdown or aoa); an ensemble draws its first "
            "checkpoint's maps, so list an attention checkpoint first"
        )
    out.mkdir(parents=True, exist_ok=True)
    target = file_in(out, safe_stem(name or Path(path).stem), ".png")
    tokens = dec.tokens[j].tolist()
    words = attention_words(model.vocab.decode(tokens), int(model.decoding["max_len"]))
    attention_figure(path, words, dec.alphas[j].float().cpu(), target)
    return target
