"""eval/encode.py batches sentences by their length in tokens: each batch pads to a longest that
is close to all of its sentences, and every embedding comes back in the caller's order."""

from __future__ import annotations

import torch
from transformers import AutoTokenizer

from simcse_dist.eval.encode import encode


def test_batches_follow_token_lengths_and_rows_come_back_in_order(tiny_bert):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    # characters and tokens disagree: short words are many tokens in few characters
    sentences = [
        "a b c d e f g h i j k l",
        "Extraordinarily",
        "x y z",
        "Uncharacteristically understated",
        "1 2 3 4 5 6 7 8",
        "Internationalization",
        "o p",
    ] * 3
    tokens = [len(ids) for ids in tokenizer(sentences)["input_ids"]]
    seen: list[tuple[int, int]] = []

    def forward(input_ids, attention_mask, **_):  # [b, L] -> [b, 1]: each sentence's token count
        seen.append(tuple(input_ids.shape))
        return attention_mask.sum(-1, keepdim=True).float()

    out = encode(forward, tokenizer, sentences, torch.device("cpu"), batch_size=4)
    assert out[:, 0].tolist() == tokens  # the caller's order
    longest_first = sorted(tokens, reverse=True)
    expected = [(len(longest_first[i : i + 4]), longest_first[i]) for i in range(0, len(tokens), 4)]
    assert seen == expected  # batches of the token-sorted sentences, each padded to its first
