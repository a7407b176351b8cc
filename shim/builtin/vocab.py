"""A tiny word-level tokenizer shared by the API server and both model backends.

Word-level keeps detokenized text readable, so a test can see which model answered.
Words outside the vocabulary map to a stable in-vocabulary id (crc32), so every prompt
tokenizes deterministically without an <unk> token swallowing the difference.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

EOS_TOKEN = "<|endoftext|>"  # noqa: S105 (a token, not a secret)

_WORDS = """
the a an and or but if then so because when while where who what which how why is are
was were be been being have has had do does did will would can could should may might
must shall i you he she it we they me him her us them my your his its our their this
that these those here there now today tomorrow yesterday always never often sometimes
again very more most less least many much few some any all each every no not one two
three four five six seven eight nine ten hundred thousand first last next time day night
morning evening week month year hour minute second moment sun moon star sky cloud rain
snow wind storm river lake sea ocean mountain hill valley forest tree flower grass leaf
stone sand fire water earth air light shadow red blue green yellow black white gray
silver golden bright dark quiet loud soft hard warm cold hot cool fast slow old new
young ancient small large tall short long wide city town village road bridge house door
window garden wall tower castle market king queen child friend stranger teacher farmer
sailor poet doctor engine machine cat dog horse bird fish wolf fox bear owl bee go come
walk run fly swim sing dance write read speak listen look see find keep give take make
build open close begin end rise fall grow fade remember forget dream think know learn
teach help carry hold follow lead wait stay leave return love hope fear joy sorrow peace
war truth story song word letter book map key question answer reason idea memory silence
music color number name voice heart mind over under above below across through between
beside behind beyond toward within
""".split()  # noqa: SIM905

VOCAB: tuple[str, ...] = (EOS_TOKEN, *dict.fromkeys(_WORDS))
VOCAB_SIZE = len(VOCAB)
EOS_ID = 0
_IDS = {word: index for index, word in enumerate(VOCAB)}
_TOKEN_RE = re.compile(r"[a-z']+|\d+|[^\sa-z\d]")


def encode(text: str) -> list[int]:
    """Lower-cased words and punctuation to ids; unknown pieces hash to a fixed word."""
    ids: list[int] = []
    for piece in _TOKEN_RE.findall(text.lower()):
        token_id = _IDS.get(piece)
        if token_id is None:
            token_id = 1 + zlib.crc32(piece.encode()) % (VOCAB_SIZE - 1)
        ids.append(token_id)
    return ids


def decode(ids: Sequence[int], *, leading_space: bool = False) -> str:
    """Words joined by spaces; ``leading_space`` for a streamed delta after the first."""
    text = " ".join(VOCAB[i] for i in ids if 0 < i < VOCAB_SIZE)
    return f" {text}" if leading_space and text else text
