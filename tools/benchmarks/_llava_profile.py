"""A length profile of a real instruction set, for benchmarks that need realistic text.

The figures are word counts (question, answer) of LLaVA-Bench (COCO)'s 90 GPT-4 samples, 30 of
each of the three instruction types LLaVA-Instruct-158K holds and the paper's Table 10 uses
(multi-turn conversation, detailed description, complex reasoning): the files
playground/data/coco2014_val_qa_eval/qa90_{questions,gpt4_answer}.jsonl of
github.com/haotian-liu/LLaVA at commit 8959d5c383ed194be6baf94c99d050bdbc2d137f, counted with
str.split(). Only the counts are kept here.

A profile sample takes its type by Table 10's shares (120k conversations, 100k detailed
descriptions, 40k complex reasoning). A conversation has 2 to 5 turns, each a question and answer
drawn from the conversation pairs (the generator's own few-shot conversations in that repository,
playground/data/prompts/conversation/00{0,1}_conv.txt, have 5 and 9 turns; 2 to 5 is kept as the
cautious range); the other types have one turn. Text is pseudo-words, 4 for every 3 words counted
(LLaMA's tokenizer gives about 1.3 tokens per English word), so that a tokenizer trained on the
file gives about LLaMA's token counts.
"""

import json
import pathlib

import numpy as np

CONVERSATION = (
    (11, 16), (11, 20), (8, 19), (8, 7), (8, 10), (10, 7), (8, 15), (9, 23), (8, 7), (7, 7),
    (8, 32), (8, 7), (8, 17), (10, 24), (8, 21), (12, 32), (8, 10), (9, 11), (14, 14), (8, 20),
    (8, 8), (10, 10), (11, 17), (9, 8), (12, 16), (8, 14), (9, 26), (8, 39), (10, 20), (10, 17),
)  # fmt: skip
DETAIL = (
    (9, 69), (4, 96), (5, 76), (4, 83), (4, 103), (10, 66), (10, 50), (5, 103), (10, 84), (8, 76),
    (11, 57), (8, 78), (5, 55), (10, 91), (10, 92), (5, 59), (8, 61), (8, 57), (10, 96), (11, 95),
    (8, 92), (10, 59), (8, 71), (8, 62), (10, 39), (8, 121), (4, 88), (10, 91), (10, 65), (11, 110),
)  # fmt: skip
COMPLEX = (
    (8, 132), (16, 110), (12, 105), (15, 150), (12, 156), (15, 122), (9, 90), (14, 83), (18, 190), (12, 102),
    (10, 86), (10, 108), (11, 81), (9, 128), (17, 118), (11, 98), (11, 112), (13, 120), (11, 107), (14, 110),
    (18, 109), (13, 106), (9, 117), (12, 166), (7, 105), (8, 71), (19, 108), (12, 106), (8, 78), (13, 105),
)  # fmt: skip
# Table 10: (pairs, share of the samples, turns drawn from)
TYPES = {
    "conversation": (CONVERSATION, 120, (2, 3, 4, 5)),
    "detail": (DETAIL, 100, (1,)),
    "complex": (COMPLEX, 40, (1,)),
}
TOKENS_PER_WORD = 4 / 3


def write_jsonl(path: str | pathlib.Path, count: int = 2000, seed: int = 0) -> str:
    """`count` text-only samples of the profile's lengths in our JSONL format; returns the path."""
    rng = np.random.default_rng(seed)
    vocabulary = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 9))) for _ in range(3000)]
    zipf = 1 / np.arange(1, len(vocabulary) + 1)
    names = list(TYPES)
    shares = np.array([TYPES[n][1] for n in names], float)

    def text(words: int) -> str:
        return " ".join(rng.choice(vocabulary, max(1, round(words * TOKENS_PER_WORD)), p=zipf / zipf.sum()))

    with open(path, "w") as f:
        for index in range(count):
            pairs, _, turns = TYPES[names[rng.choice(len(names), p=shares / shares.sum())]]
            conversation = []
            for _ in range(rng.choice(turns)):
                question, answer = pairs[rng.integers(len(pairs))]
                conversation += [dict(value=text(question)), dict(value=text(answer))]
            for turn, role in zip(conversation, ["human", "gpt"] * len(conversation)):
                turn["from"] = role
            f.write(json.dumps(dict(id=f"profile{index}", conversations=conversation)) + "\n")
    return str(path)
