"""The text parts every tiny model shares: word-level tokenizers over the project's prompts and a tiny LLM config.

A low module (it imports only the prompts): the tiny builders of every architecture folder use it.
"""

from __future__ import annotations

import re
from functools import lru_cache

from .prompts import load_prompts

_EXTRA_WORDS = (
    "a an the of on in at and with image picture photo left right top bottom middle centre center "
    "red green blue yellow purple orange white black grey gray cyan magenta circle square triangle "
    "small large big background shape shapes one two three four beige"
).split()


@lru_cache(maxsize=1)
def tiny_vocabulary() -> tuple[str, ...]:
    words = set(_EXTRA_WORDS)
    for prompt in load_prompts():
        words.update(re.findall(r"\w+|[^\w\s]", prompt.lower()))
    return tuple(sorted(words))


def word_level_tokenizer(
    specials: list[str],
    words: list[str],
    *,
    bos: str,
    eos: str,
    pad: str,
    unk: str,
    extra_special_tokens: dict[str, str],
    add_bos: bool = True,
    split_digits: bool = False,
):
    """A lowercasing word-level fast tokenizer: ``specials`` first (never split), then ``words``.

    ``add_bos=False`` leaves the begin-of-sequence token to the processor (Emu3's processor writes it);
    ``split_digits`` makes every digit its own word, so size text such as ``"16*16"`` needs only ten.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
        if split_digits
        else pre_tokenizers.Whitespace()
    )
    backend.add_special_tokens(specials)
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        padding_side="left",
        extra_special_tokens=extra_special_tokens,
    )


def tiny_llm_config(tokenizer, hidden_size: int = 64) -> dict:
    """The tiny language model of the tiny architectures (2 layers, 4 heads), sized to ``tokenizer``."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


# The special tokens of :func:`tiny_tokenizer`, Janus' names (the tiny Janus and the tiny flow model read them).
TINY_SPECIALS = {
    "pad": "<pad>",
    "bos": "<bos>",
    "eos": "<eos>",
    "unk": "<unk>",
    "image": "<image_placeholder>",
    "boi": "<begin_of_image>",
    "eoi": "<end_of_image>",
}
TINY_CHAT_WORDS = ["<|User|>", "<|Assistant|>"]


def tiny_tokenizer():
    """A word-level tokenizer over the project's prompts, with Janus-style special tokens."""
    return word_level_tokenizer(
        list(TINY_SPECIALS.values()) + TINY_CHAT_WORDS,
        list(tiny_vocabulary()),
        bos=TINY_SPECIALS["bos"],
        eos=TINY_SPECIALS["eos"],
        pad=TINY_SPECIALS["pad"],
        unk=TINY_SPECIALS["unk"],
        extra_special_tokens={
            "image_token": TINY_SPECIALS["image"],
            "boi_token": TINY_SPECIALS["boi"],
            "eoi_token": TINY_SPECIALS["eoi"],
        },
    )
