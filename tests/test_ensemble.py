"""Ensembles of checkpoints (imcap.model.ensemble): the mean word distribution, decoded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import DEMO_WORDS, ROOT, cli, demo_checkpoint, encoder_args

from imcap.config import group_section, model_sections
from imcap.data.text import Vocab
from imcap.errors import UserError
from imcap.model.checkpoint import load_captioner
from imcap.model.ensemble import EnsembleDecoder
from imcap.model.module import Captioner
from imcap.pipeline.runtime import load_models

BANNED = (Vocab.pad_id, Vocab.bos_id, Vocab.unk_id)  # never in a caption


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
    dec = EnsembleDecoder([a.decoder, b.decoder], Vocab.bos_id)
    state, sa, sb = dec.init_state(feats), a.decoder.init_state(fa), b.decoder.init_state(fb)
    words = torch.tensor([Vocab.bos_id] * 3)
    with torch.no_grad():
        for t in range(4):  # the same words into all three; compare the distributions
            mean, state, alpha = dec.step(words, state)
            la, sa, alpha_a = a.decoder.step(words, sa)
            lb, sb, _ = b.decoder.step(words, sb)
            la[:, BANNED], lb[:, BANNED] = float("-inf"), float("-inf")
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
            la[:, BANNED], lb[:, BANNED] = float("-inf"), float("-inf")
            p = F.softmax(la, -1) + F.softmax(lb, -1)
            live = out.tokens[:, t] != Vocab.pad_id
            assert torch.equal(out.tokens[live, t], p.argmax(-1)[live])
            prev = out.tokens[:, t].clamp(min=Vocab.eos_id)


def test_beam_search_ranks_by_the_ensembles_log_probabilities(tmp_path: Path) -> None:
    """Beam 3 over two different members (attention + Show and Tell): the best beam's reported
    log-probability is the sum of the mean distribution's log-probabilities of its words."""
    a, b = _pair(tmp_path)
    a.join([b])
    torch.manual_seed(2)
    feats = a.encode(torch.randn(4, 3, 96, 96))
    out = a.generate(feats, beam_size=3)
    dec = EnsembleDecoder([a.decoder, b.decoder], Vocab.bos_id)
    state, total = dec.init_state(feats), torch.zeros(4)
    prev = torch.full((4,), Vocab.bos_id)
    with torch.no_grad():
        for t in range(out.tokens.size(1)):
            logp, state, _ = dec.step(prev, state)  # (4, V)
            word = out.tokens[:, t]
            live = word != Vocab.pad_id
            total += torch.where(live, logp.gather(1, word[:, None]).squeeze(1), 0.0)
            prev = torch.where(live, word, Vocab.eos_id)
    torch.testing.assert_close(total, out.beam_logprobs[:, 0], atol=1e-4, rtol=1e-4)
    assert torch.equal(out.beams[:, 0], out.tokens)


def test_an_ensemble_of_a_model_with_itself_is_that_model(tmp_path: Path) -> None:
    a, _ = _pair(tmp_path)
    torch.manual_seed(1)
    images = torch.randn(6, 3, 96, 96)
    alone = {k: a.caption(images, beam_size=k) for k in (1, 3)}
    twin = load_captioner(tmp_path / "a.ckpt")
    a.join([twin])
    for k in (1, 3):
        assert a.caption(images, beam_size=k) == alone[k]


def test_a_joined_model_decodes_only(tmp_path: Path) -> None:
    """An ensemble is not a checkpoint (saving it would write members' weights its own
    hyperparameters cannot load) and decodes only from all members' features."""
    a, b = _pair(tmp_path)
    a.join([b])
    with pytest.raises(UserError, match="decodes only: save its members apart"):
        a.on_save_checkpoint({})
    one_member = a.encoder(torch.randn(1, 3, 96, 96), grid=True)
    with pytest.raises(ValueError, match="Captioner.encode's features"):
        a.generate(one_member)


def test_members_must_share_vocabulary_and_image_transform(tmp_path: Path) -> None:
    a, _ = _pair(tmp_path)
    words = Vocab(list(Vocab.SPECIALS) + DEMO_WORDS[::-1], max_len=8).to_dict()
    other_vocab = Captioner(
        words,
        encoder_args("resnet18", img_size=96),
        group_section("decoder", "lstm", embed_dim=8),
        **model_sections(),
    )
    with pytest.raises(UserError, match=r"b\.ckpt: its vocabulary \(14 words\) differs"):
        a.join([other_vocab], ["a.ckpt", "b.ckpt"])
    same = Vocab(list(Vocab.SPECIALS) + DEMO_WORDS, max_len=8).to_dict()
    other_size = Captioner(
        same,
        encoder_args("resnet18", img_size=64),
        group_section("decoder", "lstm", embed_dim=8),
        **model_sections(),
    )
    with pytest.raises(
        UserError,
        match=r"c.ckpt reads images with input_size \(3, 64, 64\) where a.ckpt has \(3, 96, 96\)",
    ):
        a.join([other_size], ["a.ckpt", "c.ckpt"])
    with pytest.raises(UserError, match="names no checkpoint"):
        load_models([])
    assert not a.members()  # a refused join leaves the model alone


def shaken_copy(ckpt: str, path: Path, seed: int) -> Path:
    """A second member: the same checkpoint with its decoder weights scaled by noise."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    gen = torch.Generator().manual_seed(seed)
    for k, w in state["state_dict"].items():
        if k.startswith("decoder.") and w.is_floating_point():
            w.mul_(1 + 0.5 * torch.randn(w.shape, generator=gen))
    torch.save(state, path)
    return path


def test_eval_cli_scores_an_ensemble(trained: dict, shared: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    ckpt = trained["ckpt"]
    other = shaken_copy(ckpt, tmp_path / "other.ckpt", seed=0)
    r = cli(
        "eval.py",
        f"ckpt_path=[{ckpt},{other}]",
        "split=val",
        "model.beam_size=1",
        "metrics.meteor=false",
        f"hydra.run.dir={out}",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((out / "metrics_val.json").read_text())
    assert result["checkpoint"] == [str(ckpt), str(other)]
    captions = [c["caption"] for c in json.loads((out / "captions_val.json").read_text())]
    assert len(captions) == 80
    ids = [c["image_id"] for c in json.loads((out / "captions_val.json").read_text())]
    images = [shared / "data" / "synthetic" / "images" / f"{i}.jpg" for i in ids]
    assert captions == load_models([ckpt, str(other)]).caption_files(images, beam_size=1)
    assert captions != load_captioner(ckpt).caption_files(images, beam_size=1)  # both members count
    r = cli("eval.py", f"ckpt_path=[{ckpt},{ckpt}]", "mode=two_step", f"hydra.run.dir={out}")
    assert r.returncode != 0 and "use mode=joint" in r.stderr


def test_ensemble_bench_scores_members_and_ensemble_alike(trained: dict, tmp_path: Path) -> None:
    """bench/ensemble.py: each member alone and the ensemble, scored by the same eval, in one JSON;
    a missing member is refused by name before anything runs."""
    ckpt = trained["ckpt"]
    other = shaken_copy(ckpt, tmp_path / "other.ckpt", seed=1)
    out = tmp_path / "ensemble.json"
    bench = [sys.executable, str(ROOT / "bench" / "ensemble.py")]
    args = ["--data", "", "--beam", "1", "--out", str(out), "metrics.meteor=false"]
    r = subprocess.run(
        [*bench, "--ckpt", str(ckpt), "--ckpt", str(other), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    runs = result["runs"]
    assert [r["checkpoint"] for r in runs] == [str(ckpt), str(other), [str(ckpt), str(other)]]
    assert all(r["scores"]["num_images"] == 80 for r in runs)
    alone = [r["scores"]["CIDEr"] for r in runs[:2]]
    assert alone[0] != alone[1]  # the shaken member is a different model
    gain = (runs[2]["scores"]["CIDEr"] - max(alone)) * 100
    assert result["cider_gain_over_best_member_x100"] == pytest.approx(gain, abs=0.01)

    missing = tmp_path / "nowhere.ckpt"
    r = subprocess.run(
        [*bench, "--ckpt", str(ckpt), "--ckpt", str(missing), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and str(missing) in r.stderr
