"""Caption text: PTB tokenization (as the COCO toolkit scores) and the vocabulary.

Training targets are tokenized the way pycocoevalcap's Stanford PTBTokenizer (CoreNLP 3.4.1, run
with -lowerCase, then the toolkit's punctuation list removed) tokenizes references: lower case,
clitics such as "'s" and "n't" split off, "cannot" -> "can not", brackets kept as "-lrb-" etc. (the
toolkit compares the lower-cased output with "-LRB-", so they survive), other punctuation dropped.
`tokenize` emulates that Java lexer in Python; it gives the Java output on every Flickr8k and
COCO-subset caption in ../shared/data (tests/test_text.py checks it against Java).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from imcap.errors import UserError

# words whose meaning a left-right mirror swaps (data.hflip): a flipped image's captions swap them
MIRROR_WORDS = (("left", "right"),)

# Tokens pycocoevalcap's PTBTokenizer wrapper drops after tokenizing. It compares the *lower-cased*
# Java output with "-LRB-", "-RRB-", ... so bracket tokens survive in the toolkit as "-lrb-" etc.;
# we keep them too, to score exactly what the toolkit scores.
PUNCTUATION = frozenset({"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"})

# The emulation below follows the rules of Stanford CoreNLP 3.4.1's PTBLexer (the jar pycocoevalcap
# ships): at each position the longest match wins, trailing context (the `tc` group) included, and
# on a tie the earlier rule wins. Only rules that plausibly occur in captions are kept.
_NUMERIC = (  # Unicode No/Nl characters: Python's \w matches them, Java's letter/digit classes don't
    "\u00b2\u00b3\u00b9\u00bc-\u00be\u09f4-\u09f9\u0b72-\u0b77\u0bf0-\u0bf2\u0c78-\u0c7e"
    "\u0d58-\u0d5e\u0d70-\u0d78\u0f2a-\u0f33\u1369-\u137c\u16ee-\u16f0\u17f0-\u17f9\u19da\u2070"
    "\u2074-\u2079\u2080-\u2089\u2150-\u2182\u2185-\u2189\u2460-\u249b\u24ea-\u24ff\u2776-\u2793"
    "\u2cfd\u3007\u3021-\u3029\u3038-\u303a\u3192-\u3195\u3220-\u3229\u3248-\u324f\u3251-\u325f"
    "\u3280-\u3289\u32b1-\u32bf\ua6e6-\ua6ef\ua830-\ua835"
)
_L = rf"[^\W\d_{_NUMERIC}]"  # a letter (Java's Character.isLetter)
_LD = rf"[^\W_{_NUMERIC}]"  # a letter or a digit
_AP = "['\u2019\u0092]"  # APOS
_APX = "['`\u2019\u0092\u0091\u2018\u201b]"  # APOSETCETERA
_REDAUX = rf"{_AP}(?i:[smd]|re|ve|ll)"
_SREDAUX = rf"(?i:n{_APX}t)"
_HYPHEN = "[-_\u058a\u2010\u2011]"
_OPREFIX = rf"(?:[dDoOlL]{_APX}{_LD})?"  # o'clock, d'Amico
_THING = rf"{_OPREFIX}{_LD}+(?:{_HYPHEN}{_OPREFIX}{_LD}+)*"
_THINGA = r"[A-Z]+(?:[+&][A-Z]+)+"  # AT&T
_ACRO = r"[A-Za-z](?:\.[A-Za-z])+"
_HTHING = rf"[A-Za-z0-9][A-Za-z0-9.,]*(?:-(?:{_ACRO}\.|[A-Za-z0-9]+))+"


def _alternation(words: str) -> str:
    return "|".join(words.split())


# Abbreviations: "w." stays one token (which the toolkit keeps, dot and all) for these words.
_ABBREV1 = _alternation(
    """jan feb mar apr jun jul aug sept? oct nov dec mon tues? wed thu thurs fri ala ariz calif colo
    conn ct dak fla ga ind kans? ky md mich minn mo mont neb nev okla penn tenn va vt wisc? wyo inc
    cos? corp pp?t[ye]s? ltd plc rt bancorp bhd assn univ intl sys tel est ext sq jr sr bros
    (?:ed|ph)\\.d esq etc al seq bldg blvd rd"""
)
_ABBREV2 = _alternation(
    """mrs? ms drs? profs? sens? reps? attys? lt col gen messrs govs? adm rev maj sgt cpl pvt capt
    ste? ave pres lieut hon brig co?mdr pfc spc supts? det mt ft adj adv asst assoc ens insp mlle mme
    msgr sfc vs alex wm jos cie a\\.k\\.a cf treas ph invt elec natl m[ft]g dept"""
)
_ABBREV_CASED = (
    "A(?i:z|rk)|D(?i:el)|I(?i:ll)|L(?i:a)|M(?i:ass|iss)|O(?i:re)|P(?i:a)|T(?i:ex)|W(?i:ash)"
)
_PHONE = (
    r"(?:\(\d{2,3}\)[ \u00a0]?|(?:\+\+?)?(?:\d{2,4}[- \u00a0])?\d{2,4}[- \u00a0])\d{3,4}[- \u00a0]?\d{3,5}"
    r"|(?:(?:\+\+?)?\d{2,4}\.)?\d{2,4}\.\d{3,4}\.\d{3,5}"
)
_URLCHAR = '[^ \\t\\n\\f\\r"<>|()]'
_URLEND = '[^ \\t\\n\\f\\r"<>|.!?(){},-]'
_LIKELYURL = (  # NB: ",-_" is a range, as in Stanford's rule
    r"(?:www\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4}"
    r"|(?:[^ \t\n\f\r\"`'<>|.!?(){},-_$]+\.)+(?:com|net|org|edu))"
    rf"(?:/{_URLCHAR}+{_URLEND})?"
)
# A single letter "X." loses its dot before one of these words and a space.
_SENT_START = _alternation(
    """A(?i:bout|ccording|dditionally|fter|n|s|t)? B(?i:ut) E(?i:arlier) H(?i:e|er|ere|owever)
    I(?i:f|n|t) L(?i:ast) M(?i:any|ore|r\\.|s\\.) N(?i:ow) O(?i:nce|ne|ther|ur) S(?i:he|ince|o|ome|uch)
    T(?i:hat|he|hen|here|hese|hey|his) W(?i:e|hen|hile|hat) Y(?i:et|ou)"""
)
_QUOTES = "[`\u2018-\u201f\u0082\u0084\u0091-\u0094\u2039\u203a\u00ab\u00bb]{1,2}"
_QUOTE_MAP = {"\u2018": "`", "\u201b": "`", "\u0091": "`", "\u2039": "`", "\u2019": "'", "\u0092": "'",
              "\u203a": "'", "\u201c": "``", "\u0093": "``", "\u00ab": "``", "\u201d": "''",
              "\u0094": "''", "\u00bb": "''"}  # fmt: skip


def _latex(text: str) -> str:  # Stanford's latexQuotes on 's and n't
    return text.translate({0x2019: "'", 0x92: "'", 0x2018: "`", 0x91: "`", 0x201B: "`"})


def _smiley(text: str) -> str:
    return text.replace("(", "-lrb-").replace(")", "-rrb-")


# (pattern, action): action 0 keeps the text, an int k splits off the last k characters, a str
# replaces the text, a function maps it.
_ALNUM_RULES = [  # for a position at a letter or digit
    (r"(?i:c\+\+|[cf]#)", 0),
    (r"(?i:cannot)", 3),  # -> can not
    (r"(?i:gonna|gotta|lemme|gimme|wanna)", 2),  # -> gon na
    (rf"{_L}+(?=(?P<tc>{_REDAUX}))", 0),  # it|'s
    (rf"[A-Za-z]*[A-MO-Za-mo-z](?=(?P<tc>{_SREDAUX}))", 0),  # do|n't
    (rf"{_L}+", 0),
    (rf"[A-HJ-XZn]{_APX}{_L}{{2,}}|[lLdDjJ]{_AP}|(?i:dunkin|somethin|ol){_AP}", 0),
    (rf"{_L}+[aeiouyAEIOUY]{_APX}[aeiouA-Z]{_L}*", 0),  # ma'am
    (r"(?i:cont'd\.?|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)", 0),
    (rf"[yY]{_AP}(?=(?P<tc>{_L}))", 0),  # y'all
    (rf"https?://{_URLCHAR}+{_URLEND}", 0),
    (_LIKELYURL, 0),
    (
        r"[a-zA-Z0-9][^ \t\n\f\r\"<>|()\u00a0]*@(?:[^ \t\n\f\r\"<>|().\u00a0]+\.)*[^ \t\n\f\r\"<>|().\u00a0]+",
        0,
    ),
    (rf"{_L}+(?:[.!?]{_L}+)+", 0),  # file.name, St.Louis, wow!the
    (_SREDAUX, _latex),
    (r"\d{1,2}[-/]\d{1,2}[-/]\d{2,4}", 0),  # date
    (_PHONE, _smiley),
    (r"[-+]?(?:\d*(?:[.:,\u00ad\u066b\u066c]\d+)+|\d+)", 0),  # number
    (r"(?:\d{1,4}[-\u00a0])?\d{1,4}(?:\\?/|\u2044)\d{1,4}", 0),  # fraction, 1 1/2
    (r"(?i:pro|anti)-", 0),
    (r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}", 0),  # and/or
    (r"[A-Z]*\$", 0),
    (rf"(?:(?i:{_ABBREV1})|{_ABBREV_CASED})\.(?:(?=(?P<tc>[A-Za-z][^A-Za-z]))|)", 0),  # etc.
    (rf"(?:{_ACRO}|(?i:{_ABBREV2})|[A-Za-z])\.", 0),  # Mr. a. U.S.
    (r"(?i:ca|figs?|prop|nos?|pp|op)\.(?=(?P<tc> ?\d))", 0),  # no. 5
    (rf"[A-Za-z]\.(?=(?P<tc>\s+(?:{_SENT_START})\s))", 1),  # A.|The -> a .
    (rf"(?:{_L}+|{_HTHING}|{_THING}|{_THINGA}|{_LIKELYURL})\.(?=(?P<tc>[,;:]))", 0),  # word.,
    (_HTHING, 0),
    (_THING, 0),
    (_THINGA, 0),
]
_OTHER_RULES = [  # for a position at anything else
    ("[\u0096\u0097\u2013\u2014\u2015]", "--"),
    (r"(?i:&amp;)", "&"),
    (rf"{_REDAUX}(?=(?P<tc>[^A-Za-z]))", _latex),  # 's
    (rf"{_AP}(?i:n{_AP}?|em|till?|cause|[2-9]0s)", 0),  # 'n' 'em 'til '90s
    (rf"{_AP}(?i:t)(?=(?P<tc>(?i:is|was)))", 0),  # 't|is
    (r"[-+]?(?:\d*(?:[.:,\u00ad\u066b\u066c]\d+)+|\d+)", 0),  # -5 .5
    (r"(?i:-(?:rrb|lrb|rcb|lcb|rsb|lsb)-)", 0),
    (_PHONE, _smiley),
    (_LIKELYURL, 0),
    (rf"{_AP}\d\d(?=(?P<tc>[ \n]))", 0),  # '90
    (r"[<>]?[:;=][-o*']?[()DPdpO\\{@|\[\]](?=(?P<tc>[^A-Za-z0-9]))", _smiley),  # :-)
    (r"[-^x=~<>']_[-^x=~<>']", 0),  # ^_^
    (rf"#{_L}+", 0),  # hashtag
    (r"@[A-Za-z_][A-Za-z0-9_]*", 0),  # handle
    (r"-+", lambda t: "--" if 3 <= len(t) <= 4 else t),
    (r"\.{3,5}|[\u0085\u2026]", "..."),
    (r"@+|#+|_+|\*+|(?:\\\*){1,3}|[?!]+", 0),
    (r"<<|>>", 0),
    (r"''", 0),
    (r"'(?=(?P<tc>[A-Za-z][^ \t\n\r\u00a0]))", "`"),  # opening quote
    (_REDAUX, _latex),
    (_QUOTES, lambda t: "".join(_QUOTE_MAP.get(c, c) for c in t)),
]
_QUOTE_CHARS = frozenset(
    "\"'`\u2018\u2019\u201b\u201c\u201d\u0091\u0092\u0093\u0094\u00ab\u00bb\u2039\u203a"
)
_DROPPED = _QUOTE_CHARS | frozenset(",;:.")  # single characters the toolkit drops
_ONE_CHAR = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-",
             "\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3",
             "\u00a2": "cents", "\u00a3": "#", "\u00a4": "$", "\u0080": "$", "\u20a0": "$",
             "\u20ac": "$"}  # fmt: skip
_ALNUM = [(re.compile(p), "tc" in re.compile(p).groupindex, a) for p, a in _ALNUM_RULES]
_OTHER = [(re.compile(p), "tc" in re.compile(p).groupindex, a) for p, a in _OTHER_RULES]
_SPACES = str.maketrans(
    dict.fromkeys("\t\n\r\x0b\x0c\x85\u00a0\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
                  "\u2009\u200a\u200b\u200e\u200f\u2028\u2029\u3000\ufeff", " ")
    | {"\u00ad": None}  # soft hyphen: Stanford removes it from words
)  # fmt: skip
# Two rules match across a space: "1 1/2" and phone numbers are one token, with a no-break space.
_SPACED = re.compile(
    rf"(?<![\w,:/\\+-])(?<!\d\.)(?:\d{{1,4}} \d{{1,4}}(?:\\?/|\u2044)\d{{1,4}}|{_PHONE})"
)
_DOT_WORDS = re.compile(
    rf"(?i:{_ABBREV1}|{_ABBREV2}|ca|figs?|prop|nos?|pp|op)|{_ABBREV_CASED}|[A-Za-z]"
)
_DIGIT = re.compile(r"\d")
_ASSIMILATIONS = {"cannot": ["can", "not"], "gonna": ["gon", "na"], "gotta": ["got", "ta"],
                  "lemme": ["lem", "me"], "gimme": ["gim", "me"], "wanna": ["wan", "na"]}  # fmt: skip


# What follows a caption in the tokenizer's input: the next caption, which usually starts "A ".
_NEXT_LINE = "\nA "


def _scan(chunk: str, after: str) -> list[str]:
    """Stanford's longest-match scan of one chunk without spaces (original case); `after` is the
    text that follows it (trailing context)."""
    s, n, pos, out = chunk + after, len(chunk), 0, []
    while pos < n:
        c = s[pos]
        best, best_len = None, 0
        for rx, has_tc, action in _ALNUM if c.isalpha() or c.isdecimal() else _OTHER:
            m = rx.match(s, pos)
            if m:
                length = m.end() - pos + (len(m.group("tc") or "") if has_tc else 0)
                if length > best_len:
                    best, best_len = (m, action), length
        if best is None:  # a character on its own
            pos += 1
            if c not in _DROPPED and (c in _ONE_CHAR or (ord(c) <= 0xFFFF and c.isprintable())):
                out.append(_ONE_CHAR.get(c, c))  # Stanford deletes what it can't tokenize (emoji)
            continue
        m, action = best
        text, pos = m.group(), m.end()
        if action == 0:
            out.append(text)
        elif isinstance(action, int):
            out += [text[:-action], text[-action:]]
        elif isinstance(action, str):
            out.append(action)
        else:
            out.append(action(text))
    return out


def tokenize(caption: str) -> list[str]:
    """Lower-case PTB tokens with the toolkit's punctuation removed, e.g. "A dog's ball." -> a dog 's
    ball; the same tokens pycocoevalcap's Java PTBTokenizer gives (checked in tests/test_text.py)."""
    text = caption.translate(_SPACES)
    if " " in text and _DIGIT.search(text):
        text = _SPACED.sub(lambda m: m.group().replace(" ", "\u00a0"), text)
    tokens: list[str] = []
    end = -1  # where `chunk` ends in `text`
    for chunk in text.split(" "):
        end += 1 + len(chunk)
        if chunk.isalpha():  # the common case: a plain word
            low = chunk.lower()
            if low in _ASSIMILATIONS:
                tokens += _ASSIMILATIONS[low]
            else:
                tokens.append(low)
        elif chunk in PUNCTUATION or not chunk:  # e.g. a lone "."
            continue
        elif len(chunk) > 1 and chunk[-1] in ".,;:!?" and chunk[:-1].isalpha():  # "word."
            low = chunk[:-1].lower()
            if low in _ASSIMILATIONS or (chunk[-1] == "." and _DOT_WORDS.fullmatch(chunk[:-1])):
                tokens += (t.lower() for t in _scan(chunk, text[end : end + 40] + _NEXT_LINE))
            else:
                tokens.append(low)
        else:
            tokens += (t.lower() for t in _scan(chunk, text[end : end + 40] + _NEXT_LINE))
    return [t for t in tokens if t not in PUNCTUATION]


def clean(caption: str) -> str:
    """The caption as the scorer sees it: tokens joined by single spaces."""
    return " ".join(tokenize(caption))


@dataclass
class Vocab:
    """Token <-> id map built from training captions. Saved inside every checkpoint."""

    tokens: list[str]
    max_len: int = 20  # longest caption (in words) used for training and decoding
    index: dict[str, int] = field(init=False, repr=False)

    PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
    SPECIALS = (PAD, BOS, EOS, UNK)

    def __post_init__(self) -> None:
        if list(self.tokens[:4]) != list(self.SPECIALS):
            raise UserError(f"vocabulary must start with {self.SPECIALS}, got {self.tokens[:4]}")
        self.index = {t: i for i, t in enumerate(self.tokens)}

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3

    @classmethod
    def build(
        cls, captions: Iterable[Sequence[str]], min_count: int = 1, max_len: int = 20
    ) -> Vocab:
        """Words seen at least `min_count` times in tokenized training captions, most frequent first."""
        counts = Counter(tok for cap in captions for tok in cap)
        if not counts:
            raise UserError("cannot build a vocabulary: the training split has no captions")
        words = sorted(
            (w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w)
        )
        return cls(list(cls.SPECIALS) + words, max_len=max_len)

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, tokens: Sequence[str]) -> list[int]:
        """Word ids (unknown -> <unk>), truncated to max_len, without <bos>/<eos>."""
        return [self.index.get(t, self.unk_id) for t in tokens[: self.max_len]]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> caption text; stops at <eos>, skips <pad>/<bos>."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id):
                continue
            words.append(self.tokens[i])
        return " ".join(words)

    def mirror_ids(self) -> list[int]:
        """id -> the id of its word in a left-right mirrored image (`MIRROR_WORDS`: left <->
        right), every other id to itself: the captions of a horizontally flipped training image
        (data.hflip). A pair is swapped only when both words are in the vocabulary."""
        ids = list(range(len(self.tokens)))
        for a, b in MIRROR_WORDS:
            if a in self.index and b in self.index:
                ids[self.index[a]], ids[self.index[b]] = self.index[b], self.index[a]
        return ids

    def to_dict(self) -> dict:
        return {"tokens": list(self.tokens), "max_len": self.max_len}

    @classmethod
    def from_dict(cls, d: dict) -> Vocab:
        return cls(list(d["tokens"]), max_len=int(d["max_len"]))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"cannot read vocabulary {path}: {e}") from e
