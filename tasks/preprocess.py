"""preprocess: clean and tokenize the corpus, build both vocabularies, store the id sequences."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from prefect import task

from seqlm.io import atomic_open, atomic_path
from seqlm.params import Params
from seqlm.stages import CORPUS, LINES, STAGE_BY_NAME, VOCAB
from seqlm.text import TOKENIZERS, Vocab, read_lines, tokenize


@task(name="preprocess")
def preprocess(params: Params) -> list[Path]:
    p = params.preprocess
    raw = STAGE_BY_NAME["preprocess"].paths(params)["deps"][0]
    lines = read_lines(raw)
    n_chars = sum(map(len, lines))
    if p.train_tokens + p.val_tokens > n_chars:
        raise ValueError(
            f"preprocess.train_tokens + preprocess.val_tokens = {p.train_tokens} + {p.val_tokens}"
            f" exceeds the {n_chars} character tokens of {raw}")

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
