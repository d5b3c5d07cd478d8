"""Tokenizers built with the `tokenizers` library: a word-level one for the scene grammar, byte-level BPE ones
for tests and benchmarks. All come back as `PreTrainedTokenizerFast` with pad/bos/eos set."""
from __future__ import annotations

import random
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   unk_token=UNK, clean_up_tokenization_spaces=False)


def word_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """One token per word: the scene grammar is closed, so every caption word is a single decoding step."""
    vocab = {w: i for i, w in enumerate([PAD, BOS, EOS, UNK, *sorted(set(words))])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins word-level tokens with single spaces
    return _wrap(tok)


def bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """GPT-2-style byte-level BPE trained on `texts`; with a small vocab_size words split into several tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS, UNK],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return _wrap(tok)


def random_bpe_tokenizer(vocab_size: int, seed: int = 0) -> PreTrainedTokenizerFast:
    """Byte-level BPE of exactly `vocab_size` tokens (4 specials, 256 bytes, the rest merges of random existing
    pairs): GPT-2's tokenizer shape (vocab_size=50257) for benchmarks, with nothing to download or train.

    A merge joins a short token (under 8 characters) with a byte or another short token, so tokens stay a few
    characters long, as in a real vocabulary, and a third of the merges start a word (space + byte), so random
    captions have words; what they spell means nothing.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 characters standing for bytes
    vocab = {t: i for i, t in enumerate([PAD, BOS, EOS, UNK, *alphabet])}
    if vocab_size < len(vocab):
        raise ValueError(f"vocab_size must be at least {len(vocab)} (4 specials + 256 bytes), got {vocab_size}.")
    rng = random.Random(seed)
    short, merges = list(alphabet), []
    while len(vocab) < vocab_size:
        a = "\u0120" if rng.random() < 0.3 else rng.choice(short)  # Ġ: the byte-level space
        b = rng.choice(alphabet) if rng.random() < 0.7 else rng.choice(short)
        if a + b in vocab:
            continue
        vocab[a + b] = len(vocab)
        merges.append((a, b))
        if len(a + b) < 8:
            short.append(a + b)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([PAD, BOS, EOS, UNK])
    return _wrap(tok)
