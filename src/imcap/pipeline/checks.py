"""Checks that fail fast, before any work: the training config's combinations, whether scoring
can run at the end, and whether a checkpoint to resume fits this run and stays inside its folder."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from imcap.errors import UserError
from imcap.model.checkpoint import check_hparams, read_checkpoint, upgrade_hparams
from imcap.pipeline.runtime import plain


def check_train_config(cfg: DictConfig) -> None:
    """Combinations Hydra accepts and a run would only trip on later, as one line each."""
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
    source = (cfg.get("data") or {}).get("source") or {}
    if source.get("evaluation_only"):  # nocaps: say what to train on before reading anything
        from imcap.data.datasets import training_refusal

        raise UserError(training_refusal(cfg.data.name, cfg.data.root, plain(source)))
    if cfg.get("resume") and not cfg.get("ckpt_path"):
        raise UserError(
            "resume= is turned into overrides by the entry point (src/train.py); in code, compose "
            "the config with imcap.config.resume_overrides(overrides)"
        )
    check_metrics_env(cfg)


def check_metrics_env(cfg: DictConfig) -> None:
    """Fail before any training if scoring cannot run at the end: building the final scorer of
    `metrics` checks Java and SPICE's jars, one line each, and spawns nothing."""
    from imcap.eval.metrics import CaptionScorer

    CaptionScorer.from_config(plain(cfg.metrics)).close()


def check_resume_vocab(ckpt_path: str, vocab, trust: bool = False, model=None) -> dict:
    """Resuming needs the vocabulary and the model shape the checkpoint was trained with.
    Returns the checkpoint as read (as data unless `trust`), so the fit need not read it again."""
    p = Path(str(ckpt_path)).expanduser()
    if not p.is_file():
        raise UserError(
            f"checkpoint not found: {p}. Give ckpt_path=<a .ckpt written by train.py> to resume"
        )
    ckpt = read_checkpoint(p, trust)
    weights = ckpt.get("state_dict") if isinstance(ckpt.get("state_dict"), dict) else None
    hp = upgrade_hparams(ckpt.get("hyper_parameters") or {}, weights)
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
        return ckpt
    mine = upgrade_hparams({k: dict(model.hparams.get(k) or {}) for k in ("encoder", "decoder")})
    for part in ("encoder", "decoder"):  # both in today's form (class paths, added keys)
        theirs, ours = dict(hp.get(part) or {}), dict(mine.get(part) or {})
        theirs.pop("pretrained", None), ours.pop("pretrained", None)  # where weights came from
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        if diff:
            shown = ", ".join(f"{part}.{k}={theirs.get(k)!r} (here {ours.get(k)!r})" for k in diff)
            raise UserError(
                f"{p} was trained with another {part}: {shown}. Resume with the overrides it "
                "was trained with (its .hydra/config.yaml), or start anew from it with init_from="
            )
    return ckpt


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
