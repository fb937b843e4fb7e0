"""Text as every stage reads it: decoding that counts what it replaced, and the punctuation-free form in which
texts are compared and the domain classifier reads them."""

import codecs
import string


class _ReplacementCounter:
    count = 0

    @classmethod
    def handler(cls, error):
        cls.count += error.end - error.start
        return "\ufffd", error.end


codecs.register_error("count_replace", _ReplacementCounter.handler)


def decode(raw: bytes) -> tuple[str, int]:
    """UTF-8 text with undecodable bytes replaced by U+FFFD, and how many bytes were replaced."""
    before = _ReplacementCounter.count
    text = raw.decode("utf-8", errors="count_replace")
    return text, _ReplacementCounter.count - before


# Apostrophes join ("don't" -> "dont"); other punctuation separates ("well-known" -> "well known").
_PUNCTUATION = str.maketrans({p: "" if p == "'" else " " for p in string.punctuation})


def remove_punctuation(text):
    """Lowercase words without punctuation, single-spaced: how texts are compared and how the domain
    classifier reads them."""
    return " ".join(text.replace("\u2019", "'").translate(_PUNCTUATION).lower().split())
