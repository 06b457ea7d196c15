"""Token ids in, text out, as they stream: decoding only the tokens since the last whitespace, so a
reply of n tokens costs O(n) decoding, not O(n^2). Byte-level BPE text splits exactly at a
whitespace, and a trailing partial UTF-8 character (U+FFFD) is held back until it is whole."""

from __future__ import annotations


class TextStream:
    def __init__(self, decode):
        self._decode = decode  # ids -> text
        self.ids: list[int] = []
        self.text = ""  # the whole text so far, partial characters held back
        self._stable, self._mark = "", 0

    def add(self, ids: list[int]) -> str:
        """Takes new ids; returns the text they add (empty while a character is incomplete)."""
        self.ids += ids
        text = self._stable + self._decode(self.ids[self._mark:])
        if text.endswith("\ufffd"):
            return ""
        if text.endswith((" ", "\n")):
            self._stable, self._mark = text, len(self.ids)
        delta, self.text = text[len(self.text):], text
        return delta

    def finish(self) -> str:
        """The rest, a trailing partial character included, once no more ids come."""
        text = self._stable + self._decode(self.ids[self._mark:])
        delta, self.text = text[len(self.text):], text
        return delta
