"""Incremental detokenization and stop-string handling for one sequence.

Rules (tests/engine/test_detok_tokenizers.py holds them for byte-level BPE and byte-fallback
SentencePiece-style tokenizers):
- The deltas handed out concatenate to the final text; with no stop string hit the final text is
  exactly `decode(token_ids, skip_special_tokens=True)`.
- A character whose bytes are split over several tokens is handed out once its last token arrives.
  If the sequence ends before that (max_tokens), the final delta carries what `decode` gives for the
  incomplete bytes (U+FFFD), never dropping them: the text is every complete character, then U+FFFD.
  That is `decode(token_ids)` exactly for byte-level tokenizers; a byte-fallback (SentencePiece)
  decoder turns the whole run of byte tokens into U+FFFD once one is incomplete, complete characters
  before the cut included, and there the text keeps those characters.
- A stop string matches when a token completes it (it may span any number of tokens); the text ends
  just before it. Before `min_tokens` tokens exist stop strings are not honoured (as vLLM): a stop
  string completed by an earlier token never stops the sequence, even once min_tokens is reached.
"""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, holding back partial UTF-8 and
    anything that could still become a stop string."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = (), min_tokens: int = 0) -> None:
        self.tok = tokenizer
        self.stop = stop
        self.min_tokens = min_tokens
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.emitted = 0
        self.stopped = False
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def add(self, ids: list[int]) -> bool:
        """Consume the full output id list after a new token. Returns True when a stop string hit."""
        self._ids = ids
        prefix_text = self._decode(ids[self._prefix:self._read])
        new_text = self._decode(ids[self._prefix:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return False
        delta = new_text[len(prefix_text):]
        self._prefix, self._read = self._read, len(ids)
        old_len = len(self.text)
        self.text += delta
        if self.stop and len(ids) >= self.min_tokens:
            # Only matches that end in the new text: one completed earlier (before min_tokens) never counts.
            hits = [i for i in (self.text.find(s, max(0, old_len - len(s) + 1)) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                return True
        return False

    def _flush(self) -> None:
        """At the end: bytes of an incomplete character still held back become what decode gives them."""
        if self.stopped or self._read == len(self._ids):
            return
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        if new_text.startswith(prefix_text):
            self.text += new_text[len(prefix_text):]
        else:  # a byte-fallback decoder renders a whole run of byte tokens as U+FFFD once any is incomplete
            self.text += self._decode(self._ids[self._read:])
        self._prefix = self._read = len(self._ids)

    def take(self, final: bool) -> str:
        """Text not yet handed out; while not final, keep back what may begin a stop string."""
        if final:
            self._flush()
        end = len(self.text) if final or not self.stop else max(self.emitted, len(self.text) - self.hold)
        out = self.text[self.emitted:end]
        self.emitted = end
        return out
