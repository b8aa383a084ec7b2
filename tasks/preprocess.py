"""preprocess: clean and tokenize the corpus, build both vocabularies, store the id sequences."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from prefect import task

from seqlm.io import atomic_open, atomic_path
from seqlm.params import Params
from seqlm.protocol import SplitError, split_of
from seqlm.stages import CORPUS, LINES, STAGE_BY_NAME, VOCAB
from seqlm.text import TOKENIZERS, Vocab, read_lines, tokenize


@task(name="preprocess")
def preprocess(params: Params) -> list[Path]:
    p = params.preprocess
    raw = STAGE_BY_NAME["preprocess"].paths(params)["deps"][0]
    lines = read_lines(raw)
    try:
        split_of(sum(map(len, lines)), p.train_tokens, p.val_tokens)
    except SplitError as exc:
        raise SplitError(f"{raw}: {exc}") from None

    with atomic_open(LINES, "w", encoding="utf-8", newline="\n") as handle:
        handle.write("\n".join(lines) + "\n")
    written = [Path(LINES)]
    for level in TOKENIZERS:
        tokens = tokenize(lines, level)
        vocab = Vocab(tokens, min_freq=p.min_freq, reserved_tokens=p.reserved_tokens)
        # All lines concatenated with no separator (seed load_corpus_time_machine): n-grams and
        # the language models run across line boundaries.
        ids = np.asarray([vocab[tok] for line in tokens for tok in line], dtype=np.int32)
        written.append(vocab.save(VOCAB[level]))
        with atomic_path(CORPUS[level]) as tmp, open(tmp, "wb") as handle:
            np.save(handle, ids)
        written.append(Path(CORPUS[level]))
    return written
