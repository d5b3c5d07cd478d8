"""Grouping subword tokens into the caption's words (`text.split()`).

Byte-level BPE splits "skateboard" into "Ġsk", "ate", "board"; a person clicks the word, so each word needs the
list of tokens that spell it. For generated tokens we decode growing prefixes and credit each new character to
the token that produced it (robust to byte tokens that only become a character together); for text a person
typed we use the fast tokenizer's offsets into that text.
"""
from __future__ import annotations

import re


def _words_with_owners(text: str, owners: list[set[int]]) -> tuple[list[str], list[list[int]]]:
    words, groups = [], []
    for m in re.finditer(r"\S+", text):
        words.append(m.group())
        groups.append(sorted(set().union(*owners[m.start():m.end()])))
    return words, groups


def group_generated(tokenizer, ids: list[int]) -> tuple[str, list[str], list[list[int]]]:
    """(text, words, token indices of each word) for generated caption tokens `ids` (no start/EOS tokens)."""
    full = tokenizer.decode(ids, skip_special_tokens=True)
    owners: list[set[int]] = [set() for _ in full]
    done = 0  # characters of `full` already credited to a token
    pending: list[int] = []  # tokens that completed no character yet (the first bytes of a multi-byte one)
    for k in range(len(ids)):
        prefix = tokenizer.decode(ids[: k + 1], skip_special_tokens=True)
        common = 0
        limit = min(len(prefix), len(full))
        while common < limit and prefix[common] == full[common]:
            common += 1
        pending.append(k)
        if common > done:
            for c in range(done, common):
                owners[c].update(pending)
            done, pending = common, []
    stripped = full.strip()
    start = len(full) - len(full.lstrip())
    words, groups = _words_with_owners(stripped, owners[start:start + len(stripped)])
    return stripped, words, groups


def group_typed(tokenizer, text: str) -> tuple[list[int], list[str], list[list[int]]]:
    """(token ids, words, token indices of each word) for a caption a person typed."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    owners: list[set[int]] = [set() for _ in text]
    for k, (a, b) in enumerate(enc["offset_mapping"]):
        for c in range(a, b):
            owners[c].add(k)
    words, groups = _words_with_owners(text, owners)
    return list(enc["input_ids"]), words, groups
