"""The evaluator a Captioner scores with: the COCO caption toolkit, its Java processes, and the
distributed bookkeeping (every rank's captions gathered, each image scored once).

Kept apart from the LightningModule so the scorer's lifecycle (a METEOR JVM that takes ~15 s to
start, reused across validations, stopped at teardown) has one owner.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)


class Evaluator:
    """Corpus-level scores of free-running captions against references (the `metrics` config)."""

    def __init__(self, cfg: Mapping[str, Any] | None = None) -> None:
        self.cfg: dict[str, Any] = {
            "java": True,
            "meteor": True,
            "meteor_every_epoch": False,
            "spice": False,
        }
        self._scorer = None
        # split -> image id -> group (eval.py, from data.source.group_by): scored per group too
        self.groups: dict[str, dict[str, str]] = {}
        if cfg is not None:
            self.configure(cfg)

    def configure(self, cfg: Mapping[str, Any]) -> None:
        """The run's `metrics` section (a scorer already running is rebuilt on next use)."""
        self.cfg = {**self.cfg, **dict(cfg)}
        self.close()

    def scorer(self, final: bool = True):
        """The COCO toolkit scorer of the `metrics` config: the Java metrics (METEOR's JVM takes
        ~15 s to start, SPICE longer) only for a final evaluation unless asked every epoch;
        one scorer reused until it lacks a metric now wanted."""
        from imcap.eval.metrics import CaptionScorer

        wanted = CaptionScorer.from_config(self.cfg, final=final)  # spawns nothing
        if self._scorer is None or set(wanted.metrics) - set(self._scorer.metrics):
            self.close()
            if "METEOR" in wanted.metrics:  # say what the pause is: a 60 MB paraphrase table
                log.info("scoring with METEOR: starting its Java VM (~15-20 s the first time)")
            self._scorer = wanted
        return self._scorer

    def group_by(self, split: str, groups: Mapping[str, str]) -> None:
        """Score `split` per group too (image id -> group, e.g. nocaps' domain): each group as a
        corpus of its own, under `<group>/<metric>` beside the overall scores."""
        self.groups[split] = dict(groups)

    def score(
        self, preds: Mapping[str, str], refs: Mapping[str, list], split: str, final: bool
    ) -> dict[str, float]:
        """Scores of `preds` (image id -> caption) on the images that have a caption and
        references; `num_images` is how many were scored. A split with no references at all
        (nocaps test, a folder of images) has no scores: only `num_images`, of those captioned."""
        missing = set(refs) - set(preds)
        if missing:
            log.warning(
                "%d %s images have no caption (bad images?); scoring the rest", len(missing), split
            )
        refs = {k: v for k, v in refs.items() if k in preds and v}
        if not preds:  # every image unreadable: nothing to score (the caller says so)
            return {"num_images": 0.0}
        if not refs:
            log.info("%s: no reference captions, so no scores (%d captioned)", split, len(preds))
            return {"num_images": float(len(preds))}
        unreferenced = len(preds) - len(refs)
        if unreferenced:
            log.warning(
                "%d %s images have no reference captions; scoring the %d that do",
                unreferenced,
                split,
                len(refs),
            )
        preds = {k: preds[k] for k in refs}
        groups = self.groups.get(split) or {}
        scores = self.scorer(final=final)(preds, refs, groups=groups)
        scores["num_images"] = float(len(preds))
        for group, n in sorted(Counter(groups[k] for k in preds if k in groups).items()):
            scores[f"{group}/num_images"] = float(n)
        return scores

    def close(self) -> None:
        """Stop the scorer's Java processes (a later `scorer()` starts new ones)."""
        if self._scorer is not None:
            self._scorer.close()
            self._scorer = None


def gather_predictions(strategy: Any, local: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """All ranks' (image_id, caption) pairs, duplicates included (the caller keys by image id:
    a DistributedSampler pads by repeating images)."""
    world = getattr(strategy, "world_size", 1)
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        parts: list[Any] = [None] * world
        torch.distributed.all_gather_object(parts, list(local))
        return [p for part in parts for p in part]
    return list(local)
