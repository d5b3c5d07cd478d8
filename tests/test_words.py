"""Grouping subword tokens into the words a person clicks."""
from __future__ import annotations

import pytest

from captioner_train.vocabulary import bpe_tokenizer, word_tokenizer
from captioner.words import group_generated, group_typed


def _each_token_once(tok, ids, groups):
    """Every token spells part of exactly one word, except tokens that decode to whitespace alone."""
    grouped = [i for g in groups for i in g]
    assert len(grouped) == len(set(grouped))
    assert all(not tok.decode([ids[i]]).strip() for i in set(range(len(ids))) - set(grouped))


@pytest.fixture(scope="module")
def bpe():
    return bpe_tokenizer(["a dog riding a skateboard on the street", "a cat under a table"] * 5, 280)


def test_generated_tokens_group_into_words(bpe):
    ids = bpe("a skateboard under a table", add_special_tokens=False).input_ids
    text, words, groups = group_generated(bpe, ids)
    assert text == "a skateboard under a table" and words == text.split()
    assert [len(g) for g in groups][1] >= 2
    _each_token_once(bpe, ids, groups)


def test_multibyte_characters_credit_every_byte_token(bpe):
    ids = bpe("héllo wörld", add_special_tokens=False).input_ids
    text, words, groups = group_generated(bpe, ids)
    assert words == ["héllo", "wörld"]
    _each_token_once(bpe, ids, groups)
    assert len(groups[0]) >= 3, "the bytes of é belong to the word too"
    typed_ids, typed_words, typed_groups = group_typed(bpe, "héllo wörld")
    assert typed_ids == ids and typed_words == words and typed_groups == groups


def test_typed_and_generated_agree(bpe):
    text = "a dog riding a skateboard"
    ids, words, groups = group_typed(bpe, text)
    assert group_generated(bpe, ids) == (text, words, groups)


def test_whitespace_only_tokens_belong_to_no_word(bpe):
    ids = bpe(" a  dog", add_special_tokens=False).input_ids
    text, words, groups = group_generated(bpe, ids)
    assert words == ["a", "dog"] and text == "a  dog"
    assert len({i for g in groups for i in g}) < len(ids)


def test_word_level_tokenizer_is_one_token_per_word():
    tok = word_tokenizer(["a", "large", "red", "circle"])
    ids, words, groups = group_typed(tok, "a large red dog")
    assert groups == [[0], [1], [2], [3]] and ids[3] == tok.unk_token_id
