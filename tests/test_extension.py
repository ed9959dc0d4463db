"""The extension contract: a decoder and a caption reader written outside imcap (here, in this
test module), chosen by config only (`decoder._target_`, `data.source.readers`), train,
validate, decode with beam search, export and show a correct model card in the demo, with no
edit to imcap."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import compose_train, tiny_overrides
from torch import nn

from imcap.data.captions import Captions, Context, Parsed, Reader, register_reader
from imcap.data.images import make_transform
from imcap.data.synthetic import make_example, render
from imcap.model.checkpoint import load_captioner, register_decoder
from imcap.model.decoders.base import CELLS, CaptionDecoder, State
from imcap.model.decoding import beam_search
from imcap.model.encoder import Features
from imcap.pipeline.datamodule import CaptionDataModule
from imcap.pipeline.run import build_model, plain, train

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from imcap.serve.app import create_app  # noqa: E402
from imcap.serve.engine import Engine, Limits  # noqa: E402


@register_decoder  # a checkpoint may name it: imcap's loader refuses unregistered classes
class MeanGridGRU(CaptionDecoder):
    """A family imcap does not have: a GRU cell reading [word; the mean region] at every step."""

    uses_grid = True

    def __init__(
        self,
        vocab_size: int,
        feature_dim: int,
        rnn: str = "gru",
        embed_dim: int = 32,
        hidden_dim: int = 64,
        num_layers: int = 1,
        dropout: float = 0.0,
        feature_dropout: float = 0.0,
        feature_norm: str = "batch",
    ) -> None:
        super().__init__()
        self._recurrence(rnn, {"gru": CELLS["gru"]}, hidden_dim)
        self._image_input(feature_dim, feature_norm, feature_dropout)
        self.init_proj = nn.Linear(feature_dim, hidden_dim)
        self.image_proj = nn.Linear(feature_dim, embed_dim)
        self._word_input(vocab_size, embed_dim)
        self.cell = nn.GRUCell(2 * embed_dim, hidden_dim)
        self._word_output(hidden_dim, vocab_size, dropout)

    def init_state(self, feats: Features) -> State:
        mean = self._grid(feats).mean(1)  # (B, C)
        return torch.tanh(self.init_proj(mean)), self.image_proj(mean)  # (B, H), (B, E)

    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State, None]:
        h, image = state
        x = torch.cat([self.drop(self.embed(tokens)), image.to(h.dtype)], -1)  # (B, 2E)
        h = self.cell(x, h)  # (B, H)
        return self.head(self.drop(h)), (h, image), None  # (B, V)


@register_reader("ext_tsv")
class TsvCaptions(Reader):
    """A caption format imcap does not have: `<image><TAB><caption>` lines."""

    describe = "`<image><TAB><caption>` lines"
    files = ("captions.tsv",)

    def read(self, paths: list[Path], ctx: Context) -> Captions:
        parsed = Parsed()
        for line in paths[0].read_text().splitlines():
            image, _, caption = line.partition("\t")
            parsed.add(image, caption)
        return Captions(paths[0], self.name, parsed.check(paths[0], ctx, self.describe))


def tsv_dataset(root: Path, n: int = 300, size: int = 96) -> Path:
    """Synthetic scenes as PNG files + captions.tsv (5 captions each)."""
    (root / "Images").mkdir(parents=True)
    lines = []
    for i in range(n):
        scene, captions = make_example(3, "train", i, size)
        render(scene, size).save(root / "Images" / f"s{i:04d}.png")
        lines += [f"s{i:04d}.png\t{c}" for c in captions]
    (root / "captions.tsv").write_text("\n".join(lines) + "\n")
    return root


OUTSIDE = (
    "decoder=gru",
    f"decoder._target_={__name__}.MeanGridGRU",
    "data=flickr8k",  # a dataset config whose layout we change by config alone:
    "+data.source.readers.tsv={reader:ext_tsv}",
    "data.source.format=tsv",
    "data.source.split_source=hash",
    "data.source.hash_split.val=60",
    "data.source.hash_split.test=0",
    "data.img_size=96",
    "data.vocab.min_count=1",
)


def untrained_val_cider(cfg) -> float:
    model = build_model(cfg)
    dm = CaptionDataModule.for_model(plain(cfg.data), model, cfg.mode)
    L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False).validate(
        model, datamodule=dm, verbose=False
    )
    return model.scores["val"]["CIDEr"]


def test_a_decoder_from_outside_imcap_trains_decodes_exports_and_has_a_card(
    tmp_path: Path,
) -> None:
    root = tsv_dataset(tmp_path / "tsv")
    base = [o for o in tiny_overrides(tmp_path, "trainer.max_epochs=4") if "data.source." not in o]
    cfg = compose_train([*base, *OUTSIDE, f"data.root={root}"])
    val_cider = train(cfg)
    untrained = untrained_val_cider(cfg)
    print(f"val CIDEr: trained {val_cider:.3f}, untrained {untrained:.3f}")
    assert val_cider > untrained + 0.3  # it learned, on held-out images

    best = json.loads((tmp_path / "run" / "metrics.json").read_text())["best_checkpoint"]
    model = load_captioner(best)  # as data: no trust_checkpoint, the class is registered
    assert type(model.decoder) is MeanGridGRU

    pics = [render(make_example(7, "val", i, 96)[0], 96) for i in range(6)]
    transform = make_transform(model.encoder.data_config)
    images = torch.stack([transform(p) for p in pics])  # (6, 3, 96, 96)
    with torch.no_grad():
        feats = model.encode(images)
        greedy = model.generate(feats, beam_size=1)
        v = model.vocab
        b1 = beam_search(
            model.decoder, feats, v.bos_id, v.eos_id, int(model.decoding["max_len"]), beam_size=1
        )
        beam = model.generate(feats, beam_size=3)
    assert torch.equal(greedy.tokens, b1.tokens[:, : greedy.tokens.size(1)])  # beam 1 = greedy
    beams = [v.decode(t) for t in beam.tokens.tolist()]
    assert all(beams) and torch.isfinite(beam.scores).all()
    captions = model.caption(images, beam_size=1)
    assert len(set(captions)) > 1, captions  # captions depend on the image

    pytest.importorskip("onnxruntime")
    from imcap.model.export import export_model
    from imcap.pipeline.export import run_export

    meta = export_model(model, tmp_path / "export", "onnx")
    assert run_export(meta, images) == captions

    engine = Engine(best)
    client = TestClient(create_app(engine, Limits(), []), base_url="http://127.0.0.1:8000")
    card = client.get("/api/model").json()
    assert card["decoder"] == {
        "type": "MeanGridGRU",
        "rnn": "gru",
        "hidden_dim": 256,  # tiny_overrides' decoder.hidden_dim
        "num_layers": 1,
        "attention": True,
    }
