"""Incremental detokenization and stop-string handling for one sequence."""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, holding back partial UTF-8 and
    anything that could still become a stop string."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self.tok = tokenizer
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.emitted = 0
        self._prefix = 0
        self._read = 0

    def add(self, ids: list[int]) -> bool:
        """Consume the full output id list after a new token. Returns True when a stop string hit."""
        prefix_text = self.tok.decode(ids[self._prefix:self._read], skip_special_tokens=True)
        new_text = self.tok.decode(ids[self._prefix:], skip_special_tokens=True)
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return False
        delta = new_text[len(prefix_text):]
        self._prefix, self._read = self._read, len(ids)
        search_from = max(0, len(self.text) - self.hold)
        self.text += delta
        if self.stop:
            hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                return True
        return False

    def take(self, final: bool) -> str:
        """Text not yet handed out; while not final, keep back what may begin a stop string."""
        end = len(self.text) if final or not self.stop else max(self.emitted, len(self.text) - self.hold)
        out = self.text[self.emitted:end]
        self.emitted = end
        return out
