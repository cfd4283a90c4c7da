"""Generated ids -> text, in O(1) work per token: incremental detokenization and linear stop-string matching.

:class:`Detokenizer` decodes only a short window of the last ids per token; :class:`StopMatcher` runs one
Knuth-Morris-Pratt automaton per stop string over the new characters; :class:`TextTracker` joins them and holds
back text that could still begin a stop string.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from ..tokenizer import Tokenizer

MAX_STOPS = 4  # OpenAI's limit
MAX_STOP_CHARS = 1024  # the longest stop string accepted, in characters
MAX_PENDING_TOKENS = 16  # ids waited for at most while their text ends in an incomplete UTF-8 sequence


class Detokenizer:
    """Ids -> text pieces. The text of the generated ids is their decoding after ``context`` (the prompt's last
    tokens, so that a leading space survives). Each push decodes the window of ids since the last piece
    boundary twice (with and without the new ids) and returns the difference; a piece is held back while its
    text ends in U+FFFD (an incomplete UTF-8 sequence), for at most ``MAX_PENDING_TOKENS`` ids."""

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int]):
        self.tokenizer = tokenizer
        self.window: List[int] = list(context)  # ids from the last piece boundary but one
        self.read = len(self.window)  # window[:read] is already in the text
        self.prefix = tokenizer.decode(self.window)

    def push(self, token: int) -> str:
        """Add an id; returns the new text (may be empty)."""
        self.window.append(token)
        text = self.tokenizer.decode(self.window)
        if text.endswith("\ufffd") and len(self.window) - self.read < MAX_PENDING_TOKENS:
            return ""
        return self._advance(text)

    def flush(self) -> str:
        """The text of the ids still held back."""
        return self._advance(self.tokenizer.decode(self.window)) if len(self.window) > self.read else ""

    def _advance(self, text: str) -> str:
        piece = text[len(self.prefix):]
        self.window = self.window[self.read:]
        self.read = len(self.window)
        self.prefix = self.tokenizer.decode(self.window)
        return piece


def _failure(s: str) -> List[int]:
    """KMP failure table of ``s``: entry ``i`` is the length of the longest proper border of ``s[:i + 1]``."""
    fail, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail


class StopMatcher:
    """Finds the first stop string to appear in a text given piece by piece; O(1) amortized per character."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.fails = [_failure(s) for s in self.stops]
        self.state = [0] * len(self.stops)  # per stop: the longest prefix of it that ends the text so far

    def feed(self, text: str) -> Optional[Tuple[int, int]]:
        """Feed ``text``; returns ``(end, length)`` of the first stop string completed in it (``end``: the index
        in ``text`` just past it; a tie goes to the longest), or None."""
        for j, c in enumerate(text):
            found = 0
            for k, (s, fail) in enumerate(zip(self.stops, self.fails)):
                st = self.state[k]
                if st == len(s):
                    st = fail[st - 1]
                while st and s[st] != c:
                    st = fail[st - 1]
                if s[st] == c:
                    st += 1
                self.state[k] = st
                if st == len(s):
                    found = max(found, st)
            if found:
                return j + 1, found
        return None

    def held(self) -> int:
        """How many characters at the end of the text could begin a stop string."""
        return max((st for st, s in zip(self.state, self.stops) if st < len(s)), default=0)


class TextTracker:
    """Generated ids -> text pieces with stop strings cut exactly: a piece is held back while it could be the
    start of a stop string; the text ends before the first stop string to appear (``stopped``)."""

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int], stops: Sequence[str]):
        self.detokenizer = Detokenizer(tokenizer, context)
        self.matcher = StopMatcher(stops)
        self.ids: List[int] = []
        self.parts: List[str] = []  # the text handed out
        self.length = 0  # its length
        self.pending = ""  # text held back (it could begin a stop string)
        self.stopped = False

    @property
    def text(self) -> str:
        """The text so far (cut at a stop string once found)."""
        return "".join(self.parts)

    def push(self, token: int) -> str:
        """Add a token; returns the text now safe to send. Sets ``stopped`` when a stop string appeared."""
        self.ids.append(token)
        return self._text(self.detokenizer.push(token))

    def flush(self) -> str:
        """Everything not yet sent (the request ended)."""
        piece = self._text(self.detokenizer.flush()) if not self.stopped else ""
        rest, self.pending = self.pending, ""
        return piece + self._take(rest)

    def _text(self, new: str) -> str:
        if not new or self.stopped:
            return ""
        if not self.matcher.stops:
            return self._take(new)
        held, buffer = len(self.pending), self.pending + new
        hit = self.matcher.feed(new)
        if hit is not None:
            end, length = hit
            self.stopped, self.pending = True, ""
            return self._take(buffer[:held + end - length])
        hold = self.matcher.held()
        self.pending = buffer[len(buffer) - hold:] if hold else ""
        return self._take(buffer[:len(buffer) - hold])

    def _take(self, piece: str) -> str:
        if piece:
            self.parts.append(piece)
            self.length += len(piece)
        return piece
