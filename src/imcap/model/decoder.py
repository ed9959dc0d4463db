"""Where the decoders lived before `imcap.model.decoders` (one module per family): kept so code
written against this path keeps importing them. Checkpoints naming `imcap.model.decoder.X` are
redirected to the new paths when read (imcap.model.checkpoint.upgrade_hparams)."""

from imcap.model.decoders.aoa import AoADecoder
from imcap.model.decoders.attention import AttentionDecoder
from imcap.model.decoders.base import (
    CELLS,
    FEATURE_NORMS,
    RNNS,
    CaptionDecoder,
    DecoderOutput,
    State,
)
from imcap.model.decoders.show_tell import ShowTellDecoder
from imcap.model.decoders.topdown import TopDownDecoder

__all__ = [
    "CELLS",
    "FEATURE_NORMS",
    "RNNS",
    "AoADecoder",
    "AttentionDecoder",
    "CaptionDecoder",
    "DecoderOutput",
    "ShowTellDecoder",
    "State",
    "TopDownDecoder",
]
