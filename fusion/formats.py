"""How a pretrained model reads a question: its chat template (or a plain frame), BOS, where an answer starts.

The toy zoo's models answer by letter in ``fusion.prompts``' format. A pretrained checkpoint instead reads
the question in its own frame and answers in text: a chat model through its chat template (with a short
system line asking for a brief answer), a base model as ``Question: ...\\nAnswer:`` after its BOS. Callers
never build these strings: they hand the *content* (the question, or notes and the question) to
``PromptFormat.frame`` and get the whole prompt back with the character span of the content in it, which is
what aligns two models' tokens (both read the same content; their frames differ).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from bus.errors import ModelError

SYSTEM_LINE = "Answer the question with the answer only, in as few words as possible."
PLAIN_HEAD = "Question: "  # a base model's frame: head + content + tail, then the answer after a space
PLAIN_TAIL = "\nAnswer:"
NOTES_HEAD = "Notes:\n"  # a transmitter's local notes, one per line, before the question
QUESTION_LABEL = "Question: "  # what opens the question after a notes block
_MARK = "\x00FEDREFINE-CONTENT\x00"  # stands in for the content while the chat template renders


@dataclass(frozen=True)
class Framed:
    """A whole prompt and the character span ``(start, end)`` of the content inside it."""

    text: str
    start: int
    end: int

    def span(self, offset: int, length: int) -> tuple[int, int]:
        """Absolute span of ``length`` characters that start ``offset`` characters into the content."""
        return self.start + offset, self.start + offset + length


@dataclass(frozen=True)
class PromptFormat:
    """One model's question frame: a chat template or a plain head/tail, and what precedes and ends an answer."""

    kind: Literal["chat", "plain"]
    head: str  # text before the content
    tail: str  # text after the content; the answer's first token follows it
    add_special_tokens: bool  # whether the tokenizer adds its own BOS (a chat template writes its own)
    answer_lead: str  # text an answer starts with right after the prompt ("" after a chat header, " " after "Answer:")
    stop_tokens: tuple[int, ...]  # token ids that end an answer (EOS, end of turn)

    @classmethod
    def for_tokenizer(cls, tokenizer) -> PromptFormat:
        """The chat frame when the tokenizer has a chat template, else the plain one."""
        stops = {t for t in (tokenizer.eos_token_id,) if t is not None}
        template = getattr(tokenizer, "chat_template", None)
        if template:
            messages = [{"role": "system", "content": SYSTEM_LINE}, {"role": "user", "content": _MARK}]
            try:
                text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # jinja errors of a foreign template
                raise ModelError(f"the model's chat template does not render: {exc}") from exc
            if text.count(_MARK) != 1:
                raise ModelError("the model's chat template does not place the user message exactly once")
            head, tail = text.split(_MARK)
            end_of_turn = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<end_of_turn>", "<|eot_id|>"])
            unk = tokenizer.unk_token_id
            stops |= {t for t in end_of_turn if t is not None and t != unk}
            return cls("chat", head, tail, False, "", tuple(sorted(stops)))
        return cls("plain", PLAIN_HEAD, PLAIN_TAIL, True, " ", tuple(sorted(stops)))

    def frame(self, content: str) -> Framed:
        """The whole prompt around ``content`` (a question, or notes then a question)."""
        return Framed(self.head + content + self.tail, len(self.head), len(self.head) + len(content))


def notes_block(notes: list[str] | tuple[str, ...]) -> str:
    """The note lines as a model reads them before a question (``Notes:`` then one ``- line`` each)."""
    return NOTES_HEAD + "".join(f"- {' '.join(n.split())}\n" for n in notes)


def notes_content(notes: list[str] | tuple[str, ...], question: str) -> tuple[str, int]:
    """A transmitter's content: its notes, then the question; and where the question starts in it."""
    if not notes:
        return question, 0
    lead = notes_block(notes) + QUESTION_LABEL
    return lead + question, len(lead)
