"""Offline ByteLevel BPE tokenizers for the zoo, one vocabulary size per model.

Different vocabularies give different token boundaries (with vocab 1024 most entity names are one
token, with 512 they are two or three), so the fusion layer has real token alignment to do. Every
tokenizer encodes each answer token (``" A"`` .. ``" D"``, ``" none"``) as exactly one token: the
training text repeats them so BPE learns those merges, and ``train_tokenizer`` checks it.
"""

from __future__ import annotations

import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from bus.errors import ModelError
from fusion.prompts import (
    LETTERS,
    answer_texts,
    format_hint_request,
    format_question,
    format_rephrase_request,
    format_with_hint,
)
from fusion.tokenizer import EOS_TOKEN, PAD_TOKEN, wrap_tokenizer
from ops.zoo.world import World, make_question, paraphrase

ANSWER_REPEAT_RATIO = 0.5  # answer-token lines per other line of training text (forces their merges)
_QUESTIONS_PER_FACT = 2  # sample questions per fact in the training text


def tokenizer_corpus(world: World) -> list[str]:
    """The text BPE is trained on: every fact sentence and prompts of every format, deterministically."""
    rng = random.Random(f"tokenizer-corpus/{world.spec.seed}")
    lines = list(world.corpus())
    for i, fact in enumerate(world.facts):
        for j in range(_QUESTIONS_PER_FACT):
            q = make_question(world, fact, rng, f"tok-{i}-{j}")
            lines.append(format_question(q.stem, q.options) + " " + q.answer_letter)
            lines.append(format_with_hint(fact.sentence(), q.stem, q.options) + " " + q.answer_letter)
            lines.append(format_hint_request(q.stem) + " " + fact.sentence())
            lines.append(format_rephrase_request(q.stem) + " " + paraphrase(fact.entity, fact.attribute, q.phrasing))
    answers = " ".join(answer_texts(with_none=True))
    lines.extend([f"Answer:{answers}"] * round(len(lines) * ANSWER_REPEAT_RATIO))
    return lines


def train_tokenizer(world: World, vocab_size: int) -> PreTrainedTokenizerFast:
    """A ByteLevel BPE of (at most) ``vocab_size`` tokens trained on the world's text, wrapped for transformers."""
    if vocab_size < 300:
        raise ModelError(f"vocab size {vocab_size} is too small for a byte-level BPE (need >= 300)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(world), trainer=trainer)
    wrapped = wrap_tokenizer(tok)
    check_answer_tokens(wrapped)
    return wrapped


def check_answer_tokens(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """The id of each answer token; ``ModelError`` if one of them is not exactly one token."""
    ids: dict[str, int] = {}
    for text in answer_texts(with_none=True):
        enc = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(enc) != 1:
            raise ModelError(f"answer {text!r} is {len(enc)} tokens in a vocab of {len(tokenizer)}, expected one")
        ids[text] = enc[0]
    letters = [ids[f" {letter}"] for letter in LETTERS]
    if len(set(letters)) != len(letters):
        raise ModelError("answer letters share a token id")
    return ids
