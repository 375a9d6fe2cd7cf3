"""A benchmark tokenizer that survives transformers' Qwen2 loading: every id is one letter word.

transformers 5.x loads any `model_type: qwen2` directory with `Qwen2Tokenizer` (byte-level BPE,
Qwen's pre-tokenizer, which splits digits one by one), whatever tokenizer_config.json says. So
the bench's words are letters only (id -> a base-26 word) and the vocabulary is byte-level BPE
whose merges build each word from its prefixes: " xyz" is one token, and the chat worker sees
exactly the prompt lengths the bench sent.
"""

from __future__ import annotations

import itertools
import json
import string
from pathlib import Path
from typing import Any

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet of byte-level BPE)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, (chr(c) for c in chars), strict=True))


def _words(count: int) -> list[str]:
    """`count` letter words, shortest first, closed under prefixes (what BPE merges need)."""
    out: list[str] = []
    for length in itertools.count(1):
        for letters in itertools.product(string.ascii_lowercase, repeat=length):
            out.append("".join(letters))
            if len(out) == count:
                return out


class WordVocab:
    """Ids <-> words for a vocabulary of `vocab_size` ids (the last three are the ChatML specials)."""

    def __init__(self, vocab_size: int) -> None:
        self.alphabet = list(_bytes_to_unicode().values())
        self.first_word = len(self.alphabet)
        self.words = _words(vocab_size - len(SPECIALS) - self.first_word)
        self.vocab_size = vocab_size
        self.specials = {name: vocab_size - len(SPECIALS) + i for i, name in enumerate(SPECIALS)}
        self._index = {word: self.first_word + i for i, word in enumerate(self.words)}

    def text(self, ids: list[int]) -> str:
        """Ids of words (first_word <= id < specials) as text, each word with its leading space."""
        return "".join(" " + self.words[i - self.first_word] for i in ids)

    def ids(self, text: str) -> list[int]:
        return [self._index[w] for w in text.split() if w in self._index]

    def word_ids(self, rng: Any, n: int) -> list[int]:
        return [rng.randrange(self.first_word, self.first_word + len(self.words)) for _ in range(n)]


def save_tokenizer(directory: Path, vocab: WordVocab, chat_template: str) -> None:
    """Write tokenizer.json + tokenizer_config.json that Qwen2Tokenizer loads as this vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    table: dict[str, int] = {ch: i for i, ch in enumerate(vocab.alphabet)}
    merges: list[tuple[str, str]] = []
    space = _bytes_to_unicode()[ord(" ")]
    for i, word in enumerate(vocab.words):
        token = space + word
        table[token] = vocab.first_word + i
        merges.append((token[:-1], token[-1]))
    for name, index in vocab.specials.items():
        table[name] = index
    model = models.BPE(vocab=table, merges=merges)
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = chat_template
    fast.save_pretrained(directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "Qwen2Tokenizer"
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
