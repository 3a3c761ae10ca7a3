"""Text: a local tokenizer.json (the `tokenizers` package, read from a file, never downloaded), and the output
text of a sequence as its tokens arrive, cut before the first stop string."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from superopt.errors import SuperoptError


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def from_file(cls, path: Path, vocab: int) -> TextTokenizer:
        """The tokenizer of a tokenizer.json; SuperoptError if it cannot be read or has ids the model lacks."""
        if not path.is_file():
            raise SuperoptError(f"{path}: tokenizer file not found")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 (the tokenizers package raises plain Exceptions for bad files)
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise SuperoptError(f"{path}: not a tokenizer.json: {first}") from None
        if tokenizer.get_vocab_size() > vocab:
            raise SuperoptError(
                f"{path}: the tokenizer has {tokenizer.get_vocab_size()} tokens, the model's vocabulary {vocab}"
            )
        return cls(tokenizer)

    def encode(self, text: str) -> list[int]:
        # no special tokens added: what a prompt's text says is what the model is fed
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


class TextStream:
    """The text of a growing list of tokens, handed out in pieces that never need taking back: text that could
    still become the start of a stop string, or an incomplete UTF-8 character (decoded as U+FFFD), is held back
    until the next token decides it. Without a tokenizer the text is empty (the output is its token ids)."""

    def __init__(self, tokenizer: TextTokenizer | None, stops: tuple[str, ...] = ()) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.sent = 0  # characters of the text handed out
        self.hold = max((len(s) for s in stops), default=1) - 1

    def add(self, token: int) -> tuple[str, bool]:
        """The new text after `token`, and whether a stop string ended the text (the text stops before it)."""
        if self.tokenizer is None:
            return "", False
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            return self._take(text, max(min(hits), self.sent)), True
        safe = len(text) - self.hold
        while safe > self.sent and text[safe - 1] == "\ufffd":
            safe -= 1
        return self._take(text, max(safe, self.sent)), False

    def rest(self) -> str:
        """What is held back, when the sequence ends for another reason than a stop string."""
        if self.tokenizer is None:
            return ""
        return self._take(self.tokenizer.decode(self.ids), None)

    def _take(self, text: str, end: int | None) -> str:
        piece = text[self.sent : end]
        self.sent += len(piece)
        return piece
