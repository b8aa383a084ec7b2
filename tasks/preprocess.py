"""preprocess: clean and tokenize the corpus, build both vocabularies, store the id sequences.

Streamed in two passes over the raw file, so memory is bounded by a chunk plus the vocabularies,
not by the corpus: the first counts the tokens (and refuses a bad file), the second writes the
cleaned lines and the ids with the vocabularies the counts give.
"""
from __future__ import annotations

from pathlib import Path

from seqlm.io import file_digest, publish
from seqlm.params import Params
from seqlm.runtime.records import Record, stage_task
from seqlm.stages import CORPUS, LINES, PROCESSED, STAGE_BY_NAME, VOCAB

STAGE = STAGE_BY_NAME["preprocess"]


@stage_task("preprocess")
def preprocess(params: Params) -> Record:
    from seqlm.protocol import SplitError, split_of      # torch and pandas: only when it runs
    from seqlm.text import TOKENIZERS, Vocab, char_dtype, count_tokens, write_corpus
    p = params.preprocess
    raw = STAGE.at(params).deps.corpus
    freqs = count_tokens(raw, clean=p.clean)
    try:
        split_of(sum(freqs["char"].values()), p.train_tokens, p.val_tokens, p.test_tokens)
    except SplitError as exc:
        raise SplitError(f"{raw}: {exc}") from None

    vocabs = {level: Vocab(freqs[level], min_freq=p.min_freq, reserved_tokens=p.reserved_tokens)
              for level in TOKENIZERS}
    char_dtype(p.clean, len(vocabs["char"]), str(raw))    # an alphabet the ids hold, or stop here
    with publish() as outputs:           # all of data/processed, or none of it
        folder = outputs.folder(PROCESSED)

        def staged(path: str) -> Path:
            return folder / Path(path).relative_to(PROCESSED)
        write_corpus(raw, vocabs, staged(LINES), {level: staged(CORPUS[level]) for level in vocabs},
                     clean=p.clean)
        for level, vocab in vocabs.items():
            vocab.save(staged(VOCAB[level]))
    sha256 = file_digest(raw)
    return {"datasets": [{"name": params.corpus_name, "source": raw, "digest": sha256,
                          "context": "corpus", "tags": {"sha256": sha256}}],
            "artifacts": {"vocab": list(VOCAB.values())}}
