"""Turn chat messages into the text a model reads, one increment at a time.

Compression works on increments (each new turn is a chunk), but chat templates render whole
conversations. :class:`ChatFormat` renders ``history + new`` and keeps only what ``history`` did not
already produce, so each chunk is exactly the text the full conversation would contain.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)

Message = dict[str, str]
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."  # short: it stays uncompressed in every memory
ROLES = ("system", "user", "assistant")


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
    """Renders messages with the tokenizer's chat template, or a plain ``Role: text`` format without one."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.templated = bool(getattr(tokenizer, "chat_template", None))

    def render(self, messages: list[Message], generation_prompt: bool = False) -> str:
        if self.templated:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
            return str(text)
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
        return text + ("Assistant:" if generation_prompt else "")

    def delta(self, history: list[Message], new: list[Message], generation_prompt: bool = False) -> str:
        """Text that ``new`` adds after ``history``."""
        before = self.render(history) if history else ""
        after = self.render(history + new, generation_prompt)
        if after.startswith(before):
            return after[len(before) :]
        logger.warning("chat template does not render incrementally; formatting the new turns on their own")
        return self.render(new, generation_prompt)

    def stop_ids(self) -> set[int]:
        """Token ids that end an answer (EOS and the template's end-of-turn token)."""
        ids = set()
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
