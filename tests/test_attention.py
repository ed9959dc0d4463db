"""Show, Attend and Tell: attention over every encoder's map, regulariser, figures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import encoder_args
from PIL import Image

from imcap.config import group_section, model_sections
from imcap.data.text import Vocab
from imcap.model.decoders.attention import AttentionDecoder
from imcap.model.decoding import beam_search, greedy
from imcap.model.encoder import Encoder, Features
from imcap.model.module import Captioner

ATTENTION = {k: v for k, v in group_section("decoder", "lstm_attention").items() if k != "_target_"}

WORDS = ["a", "red", "blue", "circle", "square", "left", "of"]


@pytest.mark.parametrize(
    ("name", "regions", "width"),
    [
        ("vgg16", 49, 512),
        ("resnet50", 49, 2048),
        ("inception_v3", 64, 2048),
        ("tf_efficientnet_lite0", 49, 1280),
        ("vit_tiny_patch16_224", 197, 192),
    ],
)
@pytest.mark.parametrize("rnn", ["lstm", "gru"])
def test_attention_weights_sum_to_one_over_each_encoders_regions(
    name: str, regions: int, width: int, rnn: str
) -> None:
    enc = Encoder(**encoder_args(name))
    px = enc.data_config["input_size"][-1]
    with torch.no_grad():
        feats = enc(torch.randn(2, 3, px, px), grid=True)
    small = {"rnn": rnn, "embed_dim": 8, "hidden_dim": 16, "attention_dim": 8}
    dec = AttentionDecoder(20, enc.grid_dim, **{**ATTENTION, **small}).eval()
    tokens = torch.randint(4, 20, (2, 5))
    out = dec(feats, tokens)
    assert out.logits.shape == (2, 5, 20)
    assert out.alphas.shape == (2, 5, regions) and feats.grid.shape == (2, regions, width)
    torch.testing.assert_close(out.alphas.sum(-1), torch.ones(2, 5))
    assert (out.alphas >= 0).all()


def tiny_captioner(attention_reg: float) -> Captioner:
    vocab = Vocab(list(Vocab.SPECIALS) + WORDS, max_len=6).to_dict()
    dec = group_section(
        "decoder", "lstm_attention", embed_dim=8, hidden_dim=16, attention_dim=8, dropout=0.0
    )
    sections = model_sections(loss={"attention_reg": attention_reg})
    return Captioner(vocab, encoder_args("resnet18"), dec, **sections)


def test_doubly_stochastic_regulariser() -> None:
    torch.manual_seed(0)
    feats = Features(torch.randn(3, 512), torch.randn(3, 49, 512))
    tokens = torch.tensor([[1, 4, 5, 7, 2, 0], [1, 6, 2, 0, 0, 0], [1, 4, 4, 4, 4, 2]])
    m0, m1 = tiny_captioner(0.0), tiny_captioner(1.0)
    m1.load_state_dict(m0.state_dict())
    l0, l1 = m0.caption_loss(feats, tokens), m1.caption_loss(feats, tokens)
    assert "attention_reg" not in l0
    torch.testing.assert_close(l0["ce"], l1["ce"])
    # by hand: lambda * mean over regions and images of (1 - sum_t alpha)^2 over real steps
    alphas = m1.decoder(feats, tokens[:, :-1]).alphas  # (B, T, R)
    mask = (tokens[:, 1:] != 0).float()[..., None]
    expected = ((1 - (alphas * mask).sum(1)) ** 2).mean()
    torch.testing.assert_close(l1["attention_reg"], expected)
    torch.testing.assert_close(l1["loss"], l1["ce"] + expected)
    # minimising it spreads attention: coverage moves towards 1 everywhere
    opt = torch.optim.Adam(m1.decoder.parameters(), lr=0.05)
    for _ in range(30):
        opt.zero_grad()
        m1.caption_loss(feats, tokens)["attention_reg"].backward()
        opt.step()
    assert m1.caption_loss(feats, tokens)["attention_reg"] < l1["attention_reg"]


def test_decoding_returns_attention_per_word() -> None:
    m = tiny_captioner(1.0).eval()
    feats = Features(torch.randn(2, 512), torch.randn(2, 49, 512))
    for out in (
        greedy(m.decoder, feats, 1, 2, 6, return_attn=True),
        beam_search(m.decoder, feats, 1, 2, 6, 3, return_attn=True),
    ):
        assert out.alphas.shape[:2] == out.tokens.shape and out.alphas.shape[2] == 49
        torch.testing.assert_close(out.alphas.sum(-1), torch.ones(out.tokens.shape))


def test_attention_figure_is_written_and_not_blank(tmp_path) -> None:
    from imcap.eval.viz import attention_figure

    img = tmp_path / "img.png"
    arr = np.zeros((64, 64, 3), np.uint8)
    arr[:, :32] = (200, 30, 30)
    Image.fromarray(arr).save(img)
    alphas = torch.softmax(torch.randn(3, 49) * 3, -1)
    out = attention_figure(img, ["a", "red", "<eos>"], alphas, tmp_path / "fig.png")
    pixels = np.asarray(Image.open(out).convert("RGB"), dtype=np.float32)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 300
    assert pixels.std() > 20  # a real picture, not a blank canvas
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100  # heat-map colours present


def test_attention_words_show_eos_only_when_decoding_stopped() -> None:
    from imcap.eval.viz import attention_words

    assert attention_words("a dog runs", max_len=20) == ["a", "dog", "runs", "<eos>"]
    assert attention_words("a b c d", max_len=4) == ["a", "b", "c", "d"]  # cut at max_len


def test_attention_figure_title_is_the_whole_caption_inside_the_figure(tmp_path, monkeypatch):
    """The caption is drawn whole (wrapped), within the figure's bounds, not clipped."""
    import matplotlib.figure

    from imcap.eval.viz import attention_figure

    img = tmp_path / "img.png"
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(img)
    words = [
        "a",
        "man",
        "in",
        "a",
        "red",
        "jacket",
        "is",
        "climbing",
        "a",
        "very",
        "tall",
        "and",
        "steep",
        "rock",
        "wall",
    ]
    seen = {}
    save = matplotlib.figure.Figure.savefig

    def spy(fig, *a, **k):
        fig.canvas.draw()
        title = fig._suptitle
        seen["text"] = title.get_text()
        seen["inside"] = fig.bbox.contains(*title.get_window_extent().p0) and fig.bbox.contains(
            *title.get_window_extent().p1
        )
        return save(fig, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    alphas = torch.softmax(torch.randn(len(words), 49), -1)
    attention_figure(img, words, alphas, tmp_path / "fig.png")
    assert seen["text"].split() == words and seen["inside"]
