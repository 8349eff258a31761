"""Turn chat messages into the text a model reads, one increment at a time.

Compression works on increments (each new turn is a chunk), but chat templates render whole
conversations. :class:`ChatFormat` renders ``history + new`` and keeps only what ``history`` did not
already produce, so each chunk is exactly the text the full conversation would contain.
"""

from __future__ import annotations

import contextlib
import logging
import re
import weakref
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)

Message = dict[str, str]
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."  # short: it stays uncompressed in every memory
ROLES = ("system", "user", "assistant")
#: The plain format's generation prompt (a model without a chat template): the answer follows after a space.
PLAIN_PROMPT = "Assistant:"
_LINE_BREAKS: weakref.WeakKeyDictionary[Any, frozenset[int]] = weakref.WeakKeyDictionary()
_CONTROLS: weakref.WeakKeyDictionary[Any, list[str]] = weakref.WeakKeyDictionary()
#: Where :meth:`ChatFormat.delta_ids` lays each message's content out (private-use characters no template writes).
_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"
_MARKS = re.compile(f"{_MARK_OPEN}(\\d+){_MARK_CLOSE}")


def line_break_ids(tokenizer: Any, vocab_size: int | None = None) -> frozenset[int]:
    """Ids of the tokens whose text holds a line break, found once per tokenizer (``vocab_size`` where the
    tokenizer does not tell its own size; none where neither is known)."""
    found = _LINE_BREAKS.get(tokenizer)
    if found is None:
        size = len(tokenizer) if hasattr(tokenizer, "__len__") else vocab_size
        found = frozenset(i for i in range(int(size or 0)) if "\n" in str(tokenizer.decode([i])))
        _LINE_BREAKS[tokenizer] = found
    return found


def check_text(text: str, where: str = "the text") -> None:
    """Refuse text that holds a lone surrogate, which is no character: what Python makes of a byte that is not
    UTF-8 on the command line or standard input (``surrogateescape``); no tokenizer can read it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = err.object[err.start : err.end]
        raise ValueError(
            f"{where} holds {bad!a} at character {err.start}, which is not a Unicode character (a lone surrogate: "
            "what a byte that is not UTF-8 becomes when read from a terminal or file in another encoding); give "
            "UTF-8 text"
        ) from None


def check_messages(messages: Sequence[Any]) -> list[Message]:
    """Validate chat messages; raise a clear error naming the bad one."""
    if isinstance(messages, dict):
        messages = [messages]
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {msg!r}")
        if msg["role"] not in ROLES:
            raise ValueError(f"message {i} has role {msg['role']!r}; use one of {', '.join(ROLES)}")
        if not isinstance(msg["content"], str):
            raise ValueError(f"message {i} content must be a string")
        check_text(msg["content"], f"message {i} content")
        out.append({"role": msg["role"], "content": msg["content"]})
    return out


class ChatFormat:
    """Renders messages with the tokenizer's chat template, or a plain ``Role: text`` format without one.

    The plain format writes one turn per line (``User: ...``, ``Assistant: ...``): an answer follows the
    generation prompt ``Assistant:`` after a space and ends at the line break, which is therefore a stop token.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.templated = bool(getattr(tokenizer, "chat_template", None))

    def render(self, messages: list[Message], generation_prompt: bool = False) -> str:
        if self.templated:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
            return str(text)
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
        return text + (PLAIN_PROMPT if generation_prompt else "")

    def _encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text, add_special_tokens=False)]

    def _after(self, head: str, text: str) -> list[int]:
        """The tokens ``text`` gets where it follows ``head`` in one string (alone where the two merge)."""
        before, whole = self._encode(head), self._encode(head + text)
        return whole[len(before) :] if whole[: len(before)] == before else self._encode(text)

    def answer_ids(self, answer: str) -> list[int]:
        """An assistant's answer as the conversation holds it right after the generation prompt: what training
        labels and option scoring read. A chat template starts the answer on a line of its own, tokenized alone;
        the plain format writes it after ``Assistant:`` and a space, which its first word carries (" Paris", one
        token in byte-level BPE; "Paris" alone would be another), as in every rendered turn of the history."""
        if not answer:
            return []
        if any(c in answer for c in self._controls()):  # read as text, as delta_ids reads a message
            return self._encode_as_text(answer if self.templated else " " + answer)
        return self._after(PLAIN_PROMPT, " " + answer) if not self.templated else self._encode(answer)

    def end_of_turn_ids(self) -> list[int]:
        """What ends an answer: the template's end-of-turn token (else EOS); in the plain format, the line break
        (EOS where the tokenizer cannot write one: T5's drops it)."""
        if not self.templated:
            ids = self._after("Assistant: a", "\n")
            if ids and "\n" in str(self.tokenizer.decode(ids)):
                return ids
        eos = getattr(self.tokenizer, "eos_token_id", None)
        stops = self.stop_ids()
        return [eos if eos in stops else min(stops)] if stops else []

    def delta(self, history: list[Message], new: list[Message], generation_prompt: bool = False) -> str:
        """Text that ``new`` adds after ``history``."""
        before = self.render(history) if history else ""
        after = self.render(history + new, generation_prompt)
        if after.startswith(before):
            return after[len(before) :]
        logger.warning("chat template does not render incrementally; formatting the new turns on their own")
        return self.render(new, generation_prompt)

    def delta_ids(
        self, history: list[Message], new: list[Message], generation_prompt: bool = False, *, check: bool = False
    ) -> list[int]:
        """Token ids of :meth:`delta`: the chat format's own control tokens as control tokens, and every message's
        content as text, even where it spells one. A user's ``<|im_end|><|im_start|>system ...`` was read as the
        control tokens themselves, a turn of the user's making (OpenAI's API reads such text as text). Where no
        new message spells one, the delta is tokenized whole, as before. ``check``: refuse text no tokenizer can
        read first (:func:`check_text`), on the text rendered here."""
        text = self.delta(history, new, generation_prompt)
        if check:
            check_text(text)
        messages = [*history, *new]
        controls = self._controls()
        if not any(c in m["content"] for m in new for c in controls):  # the delta holds only new's content
            return self._encode(text)
        marks = [f"{_MARK_OPEN}{i}{_MARK_CLOSE}" for i in range(len(messages))]
        marked = [{**m, "content": mark} for m, mark in zip(messages, marks, strict=True)]
        layout = self.delta(marked[: len(history)], marked[len(history) :], generation_prompt)
        pieces = _MARKS.split(layout)  # template text, a message's index, template text, ...
        contents = [messages[int(p)]["content"] if i % 2 else p for i, p in enumerate(pieces)]
        if "".join(contents) != text:  # the template changes content (trims it, say): it cannot be laid out apart
            bad = next(c for m in new for c in controls if c in m["content"])
            raise ValueError(
                f"a message holds {bad!r}, which this model's chat format reads as a control token, and its chat "
                "template changes message text, so the message cannot be kept as plain text; remove it"
            )
        ids: list[int] = []
        for i, piece in enumerate(contents):
            if i % 2:
                ids += self._encode_as_text(piece)
            elif piece:
                ids += self._encode(piece)
        return ids

    def _encode_as_text(self, text: str) -> list[int]:
        """``text``'s ids with every special token it spells read as its characters."""
        return [int(t) for t in self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)]

    def _controls(self) -> list[str]:
        """The tokenizer's special tokens as text (``<|im_start|>``, ``</s>``, ...)."""
        try:
            return _CONTROLS[self.tokenizer]
        except (KeyError, TypeError):  # TypeError: a tokenizer that cannot be weakly referenced
            pass
        decoder = getattr(self.tokenizer, "added_tokens_decoder", {}) or {}
        found = {str(t) for t in getattr(self.tokenizer, "all_special_tokens", [])}
        found |= {str(t.content) for t in decoder.values() if getattr(t, "special", False)}
        controls = sorted(t for t in found if t)
        with contextlib.suppress(TypeError):
            _CONTROLS[self.tokenizer] = controls
        return controls

    def stop_ids(self) -> set[int]:
        """Token ids that end an answer: EOS and the template's end-of-turn token; in the plain format, the line
        break too (tokens holding one), or the model writes the next ``User:`` turn itself."""
        ids = set() if self.templated else set(line_break_ids(self.tokenizer, getattr(self.tokenizer, "vocab_size", 0)))
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
            tid = self.tokenizer.convert_tokens_to_ids(token)
            unk = getattr(self.tokenizer, "unk_token_id", None)
            if isinstance(tid, int) and tid != unk:
                ids.add(tid)
        return ids


class TextStream:
    """Token ids in, text pieces out: decodes the answer so far and yields only what is new (waiting while a
    multi-byte character is incomplete), so a streamed answer concatenates to exactly the decoded answer."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.text = ""

    def push(self, token: int) -> str:
        """The text ``token`` adds ("" while a character is incomplete)."""
        self.tokens.append(token)
        text = str(self.tokenizer.decode(self.tokens, skip_special_tokens=True))
        if text.endswith("\ufffd") or len(text) <= len(self.text):
            return ""
        piece, self.text = text[len(self.text) :], text
        return piece
