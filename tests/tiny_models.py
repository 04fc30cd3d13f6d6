"""Builders of tiny, randomly initialised model parts shared by tests (imported as ``from tiny_models import ...``;
this folder is on ``sys.path`` because ``tests/conftest.py`` lives here). Nothing is downloaded."""
from __future__ import annotations

import json
from pathlib import Path


def tiny_clip_tokenizer(folder: Path):
    """A CLIP tokenizer with a character vocabulary (no BPE merges: one token per character, lower-case letters,
    digits and ``-/, ``), files written into ``folder``. Returns (tokenizer, vocab size); 16 tokens at most, so a
    text encoder built for it needs ``max_position_embeddings=16``, ``bos_token_id=0``, ``eos_token_id=1``."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789-/, ":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")  # no merges: one token per character
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16), len(vocab)
