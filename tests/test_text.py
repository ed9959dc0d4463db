"""imcap.data.text.tokenize against the tokenizer the COCO toolkit really runs (Stanford PTBTokenizer
through pycocoevalcap), so training targets are exactly the tokens that get scored."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from imcap.data.text import clean, tokenize

JAVA = shutil.which("java")
needs_java = pytest.mark.skipif(
    JAVA is None, reason="java not installed: the reference tokenizer is Java"
)
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Hard-coded expectations (each checked against the Java tokenizer when this was written).
EXPECTED = [
    ("A dog's ball.", ["a", "dog", "'s", "ball"]),
    ("Don't stop, they're gonna win", ["do", "n't", "stop", "they", "'re", "gon", "na", "win"]),
    ("I cannot go", ["i", "can", "not", "go"]),
    ("it’s a dog’s life", ["it", "'s", "a", "dog", "'s", "life"]),  # curly apostrophes
    ("dogs' toys", ["dogs", "toys"]),
    ("A t-shirt on a 3-year-old", ["a", "t-shirt", "on", "a", "3-year-old"]),
    (
        "A man (left) [x] {y}",
        ["a", "man", "-lrb-", "left", "-rrb-", "-lsb-", "x", "-rsb-", "-lcb-", "y", "-rcb-"],
    ),
    ("1,000 people at 3.5 m", ["1,000", "people", "at", "3.5", "m"]),
    ('“Quoted” ‘single’ "double"', ["quoted", "single", "double"]),
    ("Mt. Fuji and the U.S. flag", ["mt.", "fuji", "and", "the", "u.s.", "flag"]),
    ("wow!! what?!", ["wow", "!!", "what", "?!"]),
    ("½ cup, 1 1/2 cups", ["1/2", "cup", "1\u00a01/2", "cups"]),
    ("café naïve 😀 dog", ["café", "naïve", "dog"]),  # emoji: Stanford drops it
    ("a -- b — c – d", ["a", "b", "c", "d"]),
    ("o'clock y'all ma'am", ["o'clock", "y'", "all", "ma'am"]),
    ("AT&T b&w", ["at&t", "b", "&", "w"]),
    ("#1 @home 50% $5", ["#", "1", "@home", "50", "%", "$", "5"]),
    ("Line\nbreak\ttab", ["line", "break", "tab"]),
    ("...", []),
    ("", []),
]

# Tricky sentences compared with the Java tokenizer itself. The Java lexer sees the next line of
# its input file, so none of these ends in a single-letter abbreviation ("... plan B.").
TRICKY = [
    "A dog's ball.",
    "Don't stop (now) & then {x} [y]",
    "She said \"hi\" and 'bye'",
    "It's 3.5 o'clock, 1,000 t-shirts... cannot gonna wanna",
    "café naïve – — “quoted” ‘single’ dogs' toys",
    "a/b 50% $5 #1 @home *star* 1/2 ½ \\back",
    "the letter a. on a. mt. rainier St. Mt. Dr. no. 5 vs. Jan. the U.S. a.m. on the mt. here",
    "a dog.a cat dog.Cat x.y 5.5.5 a.b.c. dog,cat dog;cat dog:cat dog's. dogs'. dogs' and",
    "< > <3 @ # ## _ __ * ** *** / // \\ \\\\",
    "emoji 😀 dog ♥ ★ ™ ® © ° ² ½ ¾ × ÷ • · ¡ ¿",
    "—dash– word—word a–b 5–10 a-b-c -a a- x--y x---y",
    "\"quoted\" \"a\" ' a ' 'a' \"s\" 's dogs's a's i's x' and",
    "it's. it's, it's; 'cause 'em 'til 'till '90s '80 rock'n'roll n' ma'am hawai'i",
    "SHE'D SHE'S I'M YOU'RE CAN'T DON'T O'NEILL B&W AT&T A+B R&B rock&roll",
    '½ ¼ 1½ 3/4 4/5/6 10-20 1990-2000 5\'10" 6\' tall 5" x 3"',
    "a...b a..b a . . . b a. . . dog... dog.. dog.... dog!? dog?!?",
    "'nice' 'n 'nice 'em 'cause it'sa they'rex dog'sbone",
    "5pm 5.5mm 5.5-inch 1,000-piece -5 a-5 10-20 -10-20 3- 3d 1st. 5:30pm 5'x",
    "1 1/2 inch 1 1/2-inch 5 7/8 12 3/4",
    "U.S.-made e-mail 2-year-old's dog-like. x-ray's",
    "A man(left) (yes) dog(s) dog) x[y] ()",
    "#hash_tag #a1 @a_b1 @1 #é x@y.com a@b www.coco.org",
    "a,b 1,a a:b 12:30: ;) :) :-) :( =) ^_^",
    "Tues. Wed. Sat. ft. sq. ft Inc. Co. Ltd. Jr. Sr. etc",
    'A sign that says "No Parking 7am-7pm Mon.-Fri."',
    "People at a McDonald's restaurant on I-95 in Washington D.C.",
    "Call 555-123-4567 or (555) 123-4567 now.",
    "A  man   with  extra\tspaces\u00a0and\u2009thin ones",
    "A BIPLANE AND A SMALL BOAT OUT ON THE WATER",
    "A. The end",
]


@pytest.mark.parametrize(("caption", "tokens"), EXPECTED)
def test_expected_tokens(caption: str, tokens: list[str]) -> None:
    assert tokenize(caption) == tokens


def test_clean_joins_tokens() -> None:
    assert clean("A Dog's  ball!") == "a dog 's ball"


@needs_java
def test_matches_java_tokenizer_on_tricky_sentences() -> None:
    from imcap.eval.metrics import ptb_tokenize

    (java,) = ptb_tokenize(TRICKY)
    mismatches = [
        (s, j, " ".join(tokenize(s)))
        for s, j in zip(TRICKY, java, strict=True)
        if j != " ".join(tokenize(s))
    ]
    assert mismatches == []


@needs_java
def test_expected_table_is_what_java_says() -> None:
    """Keeps the hard-coded table honest: it must be the Java tokenizer's output too."""
    from imcap.eval.metrics import ptb_tokenize

    captions = [c for c, _ in EXPECTED]
    (java,) = ptb_tokenize(captions)
    assert java == [" ".join(t) for _, t in EXPECTED]


def _real_captions() -> list[str]:
    caps = []
    with open(SHARED_DATA / "flickr8k" / "captions.txt", newline="") as f:
        rows = csv.reader(f)
        next(rows)
        caps += [row[1] for row in rows]
    for path in sorted((SHARED_DATA / "coco_mini" / "annotations").glob("*.json")):
        caps += [a["caption"] for a in json.loads(path.read_text())["annotations"]]
    return caps


@pytest.mark.slow
@needs_java
@pytest.mark.skipif(
    not (SHARED_DATA / "flickr8k" / "captions.txt").exists(), reason="no shared Flickr8k data"
)
def test_agreement_on_real_captions() -> None:
    from imcap.eval.metrics import ptb_tokenize

    caps = _real_captions()
    (java,) = ptb_tokenize(caps)
    same = sum(j == " ".join(tokenize(c)) for c, j in zip(caps, java, strict=True))
    assert len(caps) > 30_000
    assert same / len(caps) >= 0.995
