"""The train/validation split and the evaluation protocol every model is scored by.

Split: the first `preprocess.train_tokens` character ids train, the next `val_tokens` validate;
`train_tokens: null` trains on everything before the last `val_tokens` (a split of the whole
corpus). An optional test split, the last `test_tokens` ids, is held out from both: scored by the
same protocol, reported, and never used to train or choose a model.

Protocol: every validation token is scored exactly once, each predicted from the text before it
in the corpus (for the first ones, the end of the training text). An n-gram model of order n
reads the last n - 1 characters; a recurrent model starts from a zero state CONTEXT characters
before each stretch of positions it scores and reads on to the position, so it has at least
CONTEXT characters of context. Every model is scored on the same targets with the same text
before them; the recurrent models in ROWS parallel rows (fast, and independent of the training
batch size).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:          # the split is plain arithmetic: the download's check loads no torch
    import torch

CONTEXT = 64        # characters of context before each scored stretch (warm-up of the state)
ROWS = 32           # validation rows scored side by side
VERSION = f"context={CONTEXT};rows={ROWS}"   # part of the digest: another protocol, other numbers


class SplitError(ValueError):
    """The split does not fit the corpus; the message names the params keys."""


@dataclass(frozen=True)
class Split:
    """Where the held-out texts lie in the corpus: ids[val_start:val_end] are the validation
    text, ids[test_start:test_end] the test text (none when test_start is None)."""
    train_end: int
    val_end: int
    test_start: int | None = None
    test_end: int | None = None

    @property
    def val_start(self) -> int:
        return self.train_end

    @property
    def scored(self) -> int:
        return self.val_end - self.val_start

    @property
    def context_start(self) -> int:
        return max(self.val_start - CONTEXT, 0)


def split_of(n_tokens: int, train_tokens: int | None, val_tokens: int,
             test_tokens: int | None = None) -> Split:
    """The split of a corpus of n_tokens ids; SplitError naming the keys when it does not fit.
    The test text is the last test_tokens ids; with train_tokens None the training text is
    everything before the validation text."""
    test = test_tokens or 0
    tested = " + preprocess.test_tokens" if test_tokens else ""
    if train_tokens is None:
        if val_tokens + test >= n_tokens:
            raise SplitError(f"preprocess.val_tokens{tested} = "
                             f"{val_tokens}{f' + {test}' if test else ''} leaves no training "
                             f"text in the corpus of {n_tokens} tokens "
                             "(preprocess.train_tokens: null)")
        train_tokens = n_tokens - test - val_tokens
    elif train_tokens + val_tokens + test > n_tokens:
        raise SplitError(f"preprocess.train_tokens + preprocess.val_tokens{tested} = "
                         f"{train_tokens} + {val_tokens}{f' + {test}' if test else ''} exceeds "
                         f"the corpus of {n_tokens} tokens")
    if test_tokens:
        return Split(train_tokens, train_tokens + val_tokens, n_tokens - test, n_tokens)
    return Split(train_tokens, train_tokens + val_tokens)


def scored_text(corpus: np.ndarray, start: int, end: int) -> tuple[np.ndarray, int]:
    """What the protocol reads to score ids[start:end]: up to CONTEXT ids before them, then
    them; and where the scored ones begin in it."""
    context_start = max(start - CONTEXT, 0)
    return np.asarray(corpus[context_start:end]), start - context_start


def heldout_text(corpus: np.ndarray, split: Split) -> tuple[np.ndarray, int] | None:
    """scored_text of the test split, None without one."""
    if split.test_start is None:
        return None
    return scored_text(corpus, split.test_start, split.test_end)


def train_val(corpus: np.ndarray, split: Split) -> tuple[np.ndarray, np.ndarray]:
    return corpus[:split.train_end], corpus[split.val_start:split.val_end]


def validation_text(corpus: np.ndarray, split: Split) -> np.ndarray:
    """The ids the protocol reads: the context before the validation tokens, then those tokens."""
    return np.asarray(corpus[split.context_start:split.val_end])


def validation_digest(corpus: np.ndarray, split: Split, vocab_tokens: list[str]) -> str:
    """Identifies what a validation perplexity was measured on: the protocol, the text read
    (as characters, through the vocabulary) and its scored positions. Equal digests, comparable
    perplexities."""
    digest = hashlib.sha256(VERSION.encode())
    digest.update(f"|scored={split.scored}|".encode())
    digest.update("\x00".join(vocab_tokens).encode())
    digest.update(np.asarray(validation_text(corpus, split), dtype=np.int64).tobytes())
    return digest.hexdigest()


def windows(text: torch.Tensor, first: int,
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs, targets, the targets' positions in `text` and a mask, each (rows, steps), that
    score text[first:] once each, every row warmed up on up to CONTEXT tokens before its stretch
    (first <= CONTEXT, as validation_text gives it). Padding beyond the text is masked out."""
    import torch
    n = len(text) - first
    if first < 1 or n < 1:
        raise ValueError(f"nothing to score: {len(text)} tokens with the first {first} as context")
    rows = min(ROWS, n)
    length = -(-n // rows)                                  # scored positions per row
    starts = first + length * torch.arange(rows, device=text.device)
    warm = min(first, CONTEXT)
    # Row r reads text[s - warm : s + length]: inputs are all but the last, targets all but the
    # first; target j of the row is text[s - warm + 1 + j].
    index = (starts - warm)[:, None] + torch.arange(warm + length, device=text.device)
    target_at = index[:, 1:]
    mask = (target_at >= starts[:, None]) & (target_at < len(text))
    index = index.clamp(max=len(text) - 1)
    return text[index[:, :-1]], text[index[:, 1:]], target_at, mask
