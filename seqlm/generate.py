"""Text from a trained character model (d2l predict_ch8, plus seeded temperature / top-k sampling),
and loading a trained model folder models/<name>/ as train_lm writes it."""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from seqlm.models import build_model
from seqlm.text import Clean, Vocab, normalize_prefix

MODEL_FILE, VOCAB_FILE = "model.pt", "vocab.parquet"
META_FILE, HISTORY_FILE = "meta.json", "history.csv"


class ModelLoadError(ValueError):
    """A trained model folder is incomplete, unreadable or inconsistent."""




# Characters one call may generate: about a second of the CPU per 10,000 here; a bound keeps a
# typo (--num-chars 10000000) from holding a terminal or a model server for a quarter of an hour.
MAX_CHARS = 100_000


def predict(prefix: str, num_chars: int, model: nn.Module, vocab: Vocab,
            device: torch.device | str, *, temperature: float | None = None, top_k: int | None = None,
            seed: int | None = None, clean: Clean = "letters") -> str:
    """prefix + num_chars generated characters (see `generate`)."""
    return "".join(generate(prefix, num_chars, model, vocab, device, temperature=temperature,
                            top_k=top_k, seed=seed, clean=clean))


def generate(prefix: str, num_chars: int, model: nn.Module, vocab: Vocab,
             device: torch.device | str, *, temperature: float | None = None,
             top_k: int | None = None, seed: int | None = None, clean: Clean = "letters",
             ) -> Iterator[str]:
    """The normalised prefix, then each of num_chars generated characters as it comes. Greedy
    (argmax) when neither temperature nor top_k is given; otherwise sampled from
    softmax(logits / temperature) (temperature 1 by default) restricted to the top_k most
    likely tokens, with a torch.Generator seeded by `seed`. The prefix is normalised as the
    corpus was (normalize_prefix with the model's `clean`: under `none` it stays as it is, case
    included); one that is empty then, or has characters the vocabulary lacks, is a ValueError
    naming them, as are settings out of range. Checked before the first character is
    yielded."""
    text = normalize_prefix(prefix, clean)
    if not text:
        raise ValueError(f"prefix {prefix!r} is empty: give at least one character to start from")
    missing = sorted({c for c in text if c not in vocab.token_to_idx})
    if missing:
        raise ValueError(f"prefix {prefix!r} has characters the model's vocabulary lacks: "
                         f"{''.join(missing)!r}" + (" (its text was lower-cased letters and "
                                                    "spaces)" if clean == "letters" else ""))
    if not 0 <= num_chars <= MAX_CHARS:
        raise ValueError(f"num_chars = {num_chars} must be between 0 and {MAX_CHARS:,}")
    if temperature is not None and not temperature > 0:
        raise ValueError(f"temperature = {temperature} must be > 0")
    if top_k is not None:
        if top_k < 1 or top_k != int(top_k):
            raise ValueError(f"top_k = {top_k} must be an integer >= 1")
        top_k = int(top_k)               # e.g. a float64 from a DataFrame column (MLflow pyfunc)
    return _generate(text, num_chars, model, vocab, device, temperature, top_k, seed)


def _generate(prefix: str, num_chars: int, model: nn.Module, vocab: Vocab,
              device: torch.device | str, temperature: float | None, top_k: int | None,
              seed: int | None) -> Iterator[str]:
    sample = temperature is not None or top_k is not None
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()                 # an unseeded Generator would repeat one fixed default seed
    was_training = model.training
    model.eval()
    yield prefix
    try:
        with torch.no_grad():
            # Warm-up: the whole prefix in one call is the same recurrence as d2l's char-by-char
            # loop; the logits of its last character predict the first new one.
            ids = torch.tensor([vocab[list(prefix)]], device=device)        # (1, len(prefix))
            logits, state = model(ids, model.begin_state(1, device))
            last_id = None
            for i in range(num_chars):
                if i:
                    logits, state = model(torch.tensor([[last_id]], device=device), state)
                last = logits[-1]                                        # time-major: last step
                last_id = _sample(last, temperature or 1.0, top_k, generator) if sample else \
                    int(last.argmax())
                yield vocab.to_tokens(last_id)
    finally:
        model.train(was_training)


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None,
            generator: torch.Generator) -> int:
    logits = logits / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _current_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Models saved before the torch layers were kept one per module held one multi-layer
    `rnn` module: rnn.weight_ih_l1 is now layers.1.weight_ih_l0 (registered models stay
    loadable)."""
    def rename(key: str) -> str:
        match = re.fullmatch(r"rnn\.(\w+)_l(\d+)", key)
        return f"layers.{match[2]}.{match[1]}_l0" if match else key
    return {rename(k): v for k, v in state_dict.items()}


def clean_of(meta: dict) -> Clean:
    """The cleaning of the text a model was trained on (meta.json; models trained before the
    setting existed had the chapter's)."""
    return meta.get("params", {}).get("preprocess", {}).get("clean", "letters")


def load_trained(model_dir: Path | str, device: torch.device | str = "cpu",
                 ) -> tuple[nn.Module, Vocab, dict]:
    """(model in eval mode on `device`, its vocabulary, meta.json) from a folder train_lm wrote."""
    model_dir = Path(model_dir)
    paths = {name: model_dir / name for name in (MODEL_FILE, VOCAB_FILE, META_FILE)}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise ModelLoadError(f"{model_dir}: not a trained model folder, missing "
                             f"{', '.join(missing)} (run the train_lm stage)")
    path = paths[MODEL_FILE]
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
        config = saved["config"]
        model = build_model(config["name"], config["vocab_size"], config["hidden"],
                            config["num_layers"], embedding=config.get("embedding"))
        model.load_state_dict(_current_keys(saved["state_dict"]))
    except Exception as exc:  # corrupt zip/pickle, missing keys, shape mismatch: all "unreadable"
        reason = " ".join(str(exc).split())[:200]
        raise ModelLoadError(
            f"{path}: unreadable model file ({type(exc).__name__}: {reason})") from None
    vocab = Vocab.load(paths[VOCAB_FILE])
    if vocab.fingerprint() != saved["vocab_fingerprint"] or len(vocab) != config["vocab_size"]:
        raise ModelLoadError(f"{path}: trained on another vocabulary than {paths[VOCAB_FILE]}")
    meta = json.loads(paths[META_FILE].read_text(encoding="utf-8"))
    return model.to(device).eval(), vocab, meta
