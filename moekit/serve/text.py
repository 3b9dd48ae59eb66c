"""From tokens to the text a client sees: incremental decoding with stop strings (chat prompts:
``moekit.train.chat``).

A piece of text is sent only once it can no longer change: a byte-level tokenizer may end a
step in the middle of a UTF-8 character (decoded as U+FFFD until its last byte comes), and the
end of the text may be the start of a stop string, which must not reach the client.
"""
from __future__ import annotations

REPLACEMENT = "\ufffd"


class TextStream:
    """One generated sequence: ``add(token)`` returns the text that became final; ``finish``
    says why it ended (None while it runs) and ``close()`` returns what was held back."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.token_ids: list[int] = []
        self.sent = 0  # characters already returned
        self.finish: str | None = None
        self.text = ""

    def add(self, token: int) -> str:
        self.token_ids.append(token)
        if token == self.tokenizer.eos_id:
            self.finish = "stop"
            return self.close()
        self.text = self.tokenizer.decode(self.token_ids)
        # Held-back text covers any stop string's start, so none begins in what was sent.
        found = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if found:
            self.text, self.finish = self.text[:min(found)], "stop"
            return self.close()
        final = len(self.text.rstrip(REPLACEMENT))
        if self.stop:  # the end may be the start of a stop string: hold it back
            final = min(final, len(self.text) - max(len(s) for s in self.stop) + 1)
        return self._send(final)

    def close(self, reason: str = "length") -> str:
        self.finish = self.finish or reason
        return self._send(len(self.text))

    def _send(self, end: int) -> str:
        piece = self.text[self.sent:max(end, self.sent)]
        self.sent += len(piece)
        return piece
