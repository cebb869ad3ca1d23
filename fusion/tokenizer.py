"""Tokenizer construction: an untrained byte-level tokenizer for tiny random models, and wrapping trained ones."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"  # end of a document; also used as padding
PAD_TOKEN = "<|pad|>"


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins ByteLevel uses for raw bytes."""
    return sorted(pre_tokenizers.ByteLevel.alphabet())


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A ByteLevel BPE with no merges: every byte is a token (vocab 256 + specials)."""
    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return wrap_tokenizer(tok)


def wrap_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a ``tokenizers.Tokenizer`` for transformers, adding EOS/PAD if it lacks them."""
    for special in (EOS_TOKEN, PAD_TOKEN):
        if tok.token_to_id(special) is None:
            tok.add_special_tokens([special])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
