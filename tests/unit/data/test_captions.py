"""Choosing one caption among a .json's keys and lists (acc_clip.data.captions): the weighted priority order
of --json-text-key-probs, fallbacks, lists, and the deterministic validation choice."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from acc_clip.data.captions import caption_from_json, key_order, one_caption, split_keys
from acc_clip.data.common import sample_seed

DRAWS = 10_000
SIGMAS = 4.5


def sample_rng(index: int, epoch: int = 0) -> random.Random:
    return random.Random(sample_seed(7, epoch, index))  # how the shard loader seeds a sample's draw


def within_binomial_error(count: int, draws: int, p: float) -> bool:
    """|f - p| <= 4.5 sigma, sigma = sqrt(p (1 - p) / n): the draws are seeded, so this always passes or always
    fails; a correct draw fails it for about 1 seed in 150,000, one that ignores the weights by dozens of sigmas."""
    return abs(count / draws - p) <= SIGMAS * (p * (1 - p) / draws) ** 0.5


def test_split_keys_reads_semicolon_lists_as_open_clip_main():
    assert split_keys("jpg;png;jpeg;webp") == ("jpg", "png", "jpeg", "webp")
    assert split_keys(" a ; ;b;") == ("a", "b")
    assert split_keys(";") == ()


def test_key_frequencies_follow_the_probabilities_over_ten_thousand_samples():
    document = {"a": "caption a", "b": "caption b", "c": "caption c", "d": "caption d"}
    weights = [6, 3, 1]  # d has none: a fallback only; they need not sum to 1
    drawn = Counter(caption_from_json(document, ["a", "b", "c", "d"], weights, sample_rng(i)) for i in range(DRAWS))
    for key, weight in zip("abc", weights):
        assert within_binomial_error(drawn[f"caption {key}"], DRAWS, weight / 10), (key, drawn)
    assert drawn["caption d"] == 0


def test_a_key_without_a_caption_passes_to_the_next_in_the_drawn_order():
    # a is drawn first 60% of the time but is empty: then b or c, whichever was drawn next, in proportion 3:1.
    document = {"a": "  ", "b": "caption b", "c": "caption c"}
    drawn = Counter(caption_from_json(document, ["a", "b", "c"], [6, 3, 1], sample_rng(i)) for i in range(DRAWS))
    assert within_binomial_error(drawn["caption b"], DRAWS, 0.75), drawn
    # Keys of weight 0 stand in, in their given order, when every weighted key is empty or absent.
    fallbacks = {"a": "", "y": "caption y", "z": "caption z"}
    assert {caption_from_json(fallbacks, ["a", "z", "y"], [1], sample_rng(i)) for i in range(50)} == {"caption z"}


def test_the_order_is_the_given_one_without_weights_or_in_validation():
    assert key_order(["a", "b", "c"], None, sample_rng(0)) == ["a", "b", "c"]
    assert key_order(["a", "b", "c"], [1, 5, 5], None) == ["a", "b", "c"]
    orders = {tuple(key_order(["a", "b", "c"], [1, 1, 0], sample_rng(i))) for i in range(100)}
    assert orders == {("a", "b", "c"), ("b", "a", "c")}  # positive weights drawn, the zero one last


def test_a_list_value_gives_one_caption_drawn_per_sample_and_epoch():
    value = ["first", "", "second", 3, "third "]
    assert one_caption(value, None) == "first"  # validation: the first non-empty string
    by_epoch = [[one_caption(value, sample_rng(i, epoch)) for i in range(300)] for epoch in (0, 1)]
    assert set(by_epoch[0]) == {"first", "second", "third"}  # never an empty or non-string entry
    assert by_epoch[0] != by_epoch[1]
    assert [one_caption(value, sample_rng(i, 0)) for i in range(300)] == by_epoch[0]  # a pure function of the seed
    assert one_caption(["", " "], sample_rng(0)) == one_caption({"x": 1}, None) == one_caption(None, None) == ""


@pytest.mark.parametrize("document", [None, "a string", ["a list"], {}, {"a": 5}, {"a": ""}])
def test_no_caption_is_an_empty_string(document):
    assert caption_from_json(document, ["a"], None, sample_rng(0)) == ""
