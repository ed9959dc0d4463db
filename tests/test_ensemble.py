"""Ensembles of checkpoints (imcap.model.ensemble): the mean word distribution, decoded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import DEMO_WORDS, cli, demo_checkpoint

from imcap.data.text import Vocab
from imcap.errors import UserError
from imcap.model.ensemble import EnsembleDecoder
from imcap.model.module import Captioner, load_captioner
from imcap.pipeline.run import load_models


def _pair(tmp_path: Path) -> tuple[Captioner, Captioner]:
    """Two different untrained members: an attention decoder and a Show-and-Tell one."""
    a = load_captioner(demo_checkpoint(tmp_path / "a.ckpt", attention=True, seed=0))
    b = load_captioner(demo_checkpoint(tmp_path / "b.ckpt", attention=False, seed=1))
    return a, b


def test_each_step_is_the_mean_of_the_members_distributions(tmp_path: Path) -> None:
    a, b = _pair(tmp_path)
    torch.manual_seed(0)
    images = torch.randn(3, 3, 96, 96)
    a.join([b])
    feats = a.encode(images)
    fa, fb = feats.parts
    dec = EnsembleDecoder([a.decoder, b.decoder])
    state, sa, sb = dec.init_state(feats), a.decoder.init_state(fa), b.decoder.init_state(fb)
    words = torch.tensor([Vocab.bos_id] * 3)
    with torch.no_grad():
        for t in range(4):  # the same words into all three; compare the distributions
            mean, state, alpha = dec.step(words, state)
            la, sa, alpha_a = a.decoder.step(words, sa)
            lb, sb, _ = b.decoder.step(words, sb)
            expected = ((F.softmax(la, -1) + F.softmax(lb, -1)) / 2).log()  # (3, V)
            torch.testing.assert_close(mean, expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(alpha, alpha_a)  # the first member's attention
            words = torch.tensor([4 + t, 5, 6 + t])
    # and greedy decoding follows the mean: at every step its word is the mean's arg-max
    out = a.generate(feats, beam_size=1)
    steps = min(out.tokens.size(1), int(a.decoding["max_len"]))  # the last step forces <eos>
    sa, sb = a.decoder.init_state(fa), b.decoder.init_state(fb)
    prev = torch.full((3,), Vocab.bos_id)
    with torch.no_grad():
        for t in range(steps):
            la, sa, _ = a.decoder.step(prev, sa)
            lb, sb, _ = b.decoder.step(prev, sb)
            p = F.softmax(la, -1) + F.softmax(lb, -1)
            p[:, [Vocab.pad_id, Vocab.bos_id, Vocab.unk_id]] = 0
            live = out.tokens[:, t] != Vocab.pad_id
            assert torch.equal(out.tokens[live, t], p.argmax(-1)[live])
            prev = out.tokens[:, t].clamp(min=Vocab.eos_id)


def test_an_ensemble_of_a_model_with_itself_is_that_model(tmp_path: Path) -> None:
    a, _ = _pair(tmp_path)
    torch.manual_seed(1)
    images = torch.randn(6, 3, 96, 96)
    alone = {k: a.caption(images, beam_size=k) for k in (1, 3)}
    twin = load_captioner(tmp_path / "a.ckpt")
    a.join([twin])
    for k in (1, 3):
        assert a.caption(images, beam_size=k) == alone[k]


def test_members_must_share_vocabulary_and_image_transform(tmp_path: Path) -> None:
    a, _ = _pair(tmp_path)
    words = Vocab(list(Vocab.SPECIALS) + DEMO_WORDS[::-1], max_len=8).to_dict()
    other_vocab = Captioner(words, {"name": "resnet18", "img_size": 96}, {"embed_dim": 8})
    with pytest.raises(UserError, match=r"b\.ckpt: its vocabulary \(14 words\) differs"):
        a.join([other_vocab], ["a.ckpt", "b.ckpt"])
    same = Vocab(list(Vocab.SPECIALS) + DEMO_WORDS, max_len=8).to_dict()
    other_size = Captioner(same, {"name": "resnet18", "img_size": 64}, {"embed_dim": 8})
    with pytest.raises(UserError, match="c.ckpt reads images as .*share one image transform"):
        a.join([other_size], ["a.ckpt", "c.ckpt"])
    with pytest.raises(UserError, match="names no checkpoint"):
        load_models([])
    assert not len(a.partners)  # a refused join leaves the model alone


def test_eval_cli_scores_an_ensemble(trained: dict, shared: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    ckpt = trained["ckpt"]
    r = cli(
        "eval.py",
        f"ckpt_path=[{ckpt},{ckpt}]",
        "split=val",
        "metrics.meteor=false",
        f"hydra.run.dir={out}",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((out / "metrics_val.json").read_text())
    assert result["checkpoint"] == [str(ckpt), str(ckpt)]
    captions = json.loads((out / "captions_val.json").read_text())
    assert len(captions) == 80
    images = [shared / "data" / "synthetic" / "images" / f"{c['image_id']}.jpg" for c in captions]
    alone = load_captioner(ckpt).caption_files(images, beam_size=1)
    assert [c["caption"] for c in captions] == alone  # an ensemble of one model twice is that model
    r = cli("eval.py", f"ckpt_path=[{ckpt},{ckpt}]", "mode=two_step", f"hydra.run.dir={out}")
    assert r.returncode != 0 and "use mode=joint" in r.stderr
