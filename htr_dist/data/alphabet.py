"""Character alphabet for CTC: class 0 is the blank, class i + 1 is ``chars[i]``."""

from __future__ import annotations

from collections import Counter
from typing import Iterable, List, Tuple


class Alphabet:
    """Maps text to CTC class ids and back. Characters outside the alphabet are counted, never silently lost:
    :meth:`encode_counted` drops them from the CTC target (CTC cannot emit them) and records them in
    ``unknown``; the raw transcription is kept for CER/WER, so an unknown character costs its edit."""

    def __init__(self, chars: str):
        if len(set(chars)) != len(chars):
            raise ValueError(f"alphabet has repeated characters: {chars!r}")
        self.chars = chars
        self.index = {c: i + 1 for i, c in enumerate(chars)}
        self.unknown: Counter = Counter()

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> "Alphabet":
        return cls("".join(sorted(set("".join(texts)))))

    @property
    def num_classes(self) -> int:
        return len(self.chars) + 1

    def encode(self, text: str) -> List[int]:
        """Strict: raise KeyError naming the first character outside the alphabet."""
        try:
            return [self.index[c] for c in text]
        except KeyError as err:
            raise KeyError(f"character {err.args[0]!r} of {text!r} is not in the alphabet") from None

    def encode_counted(self, text: str) -> Tuple[List[int], int]:
        """Lenient: ids of the known characters and how many were unknown (also added to ``self.unknown``)."""
        ids, missing = [], 0
        for c in text:
            i = self.index.get(c)
            if i is None:
                self.unknown[c] += 1
                missing += 1
            else:
                ids.append(i)
        return ids, missing

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i - 1] for i in ids if 0 < i <= len(self.chars))
