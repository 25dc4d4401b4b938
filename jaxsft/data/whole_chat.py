"""Whole-chat loss masks (`data.multiturn.mask_mode=whole_chat`): each conversation is rendered
once, exactly as `apply_chat_template(messages, tools=..., **kwargs)` renders it, and the loss is
on each assistant turn as rendered there.

This is for templates that do not compose per message, which verl's per-message tokenisation
(`jaxsft.data.tokenize.ChatEncoder`) cannot train faithfully: Qwen3's template strips the `<think>`
reasoning from assistant turns before the last user message and gives the turns after it their
reasoning (the last one an empty think block if it has none), so a lone assistant turn, rendered
as verl does, never shows its reasoning. Here the tokens are the model's view of the conversation:
earlier turns' reasoning is absent because the model never sees it at inference either, and the
reasoning of the turns after the last user message is trained.

Where the template has `{% generation %}` markers, the targets are what they enclose
(transformers' `return_assistant_tokens_mask`). Otherwise the turns are located in the rendered
text: an assistant turn's targets begin after the text that opens every assistant turn (the
common prefix of the generation prompt and of how a probe turn begins, in the last place and
before another message: `<|im_start|>assistant\\n` for Qwen, the assistant header for Llama 3)
and end with the text that closes one (`<|im_end|>\\n`, `<|eot_id|>`). So a turn supervises its
content, any reasoning and tool-call text the template renders, and its end-of-turn text: for a
template that composes per message (Qwen2.5's), exactly the tokens per_message supervises. A token
is a target when it starts inside such a span (character offsets of a fast tokenizer). A turn must
contain its message's answer (the content after any `</think>`); a row where that fails cannot be
located and is an error naming the row.
"""

from __future__ import annotations

import os
import re
from typing import Any, Sequence

import numpy as np

from jaxsft.data.errors import DataError, at
from jaxsft.data.source import ChatRow
from jaxsft.data.tokenize import CHUNK_ROWS, ChatEncoder, _render, drops_reasoning

PROBE = "jaxsft-probe-answer"  # content of the probe assistant turns (no whitespace or tags to rewrite)
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")
_WAY_OUT = "use data.multiturn.mask_mode=per_message (verl's per-message rendering) for this template"


def turn_markers(tokenizer) -> tuple[str, str] | str:
    """(opening, closing): the texts just before and just after an assistant turn's targets; or,
    when they cannot be found from the template, why not. Rendered without
    data.apply_chat_template_kwargs, as the per-message prefixes are."""
    user, probe = {"role": "user", "content": ""}, {"role": "assistant", "content": PROBE}
    where = "the tokenizer's chat template on probe turns"
    try:
        one, gen, last, middle = (_render(tokenizer, m, path=where, row=None, **kw) for m, kw in (
            ([user], {}), ([user], {"add_generation_prompt": True}), ([user, probe], {}), ([user, probe, user], {})))
    except DataError as e:
        return str(e)
    if PROBE not in last or PROBE not in middle or not gen.startswith(one):
        return "a probe assistant turn does not render its content, or the generation prompt is not appended"
    leads = [gen[len(one):]] + [t[len(os.path.commonprefix([one, t])):t.index(PROBE)] for t in (last, middle)]
    opening = os.path.commonprefix(leads)
    closing = os.path.commonprefix([t[t.index(PROBE) + len(PROBE):] for t in (last, middle)])
    if not opening or not closing:
        return f"no text {'opens' if not opening else 'closes'} every assistant turn"
    return opening, closing


def answer_of(message: dict) -> str:
    """The part of an assistant message every template renders verbatim: its content after any
    `</think>`, stripped ('' when there is none to check, e.g. a tool call without content)."""
    content = message.get("content")
    return content.split("</think>")[-1].strip() if isinstance(content, str) else ""


def assistant_spans(text: str, messages: Sequence[dict], opening: str, closing: str) -> list[tuple[int, int]] | None:
    """Character spans of the assistant turns' targets in `text`, in message order; None when a
    turn cannot be located. An opening whose turn lacks the message's answer (such text inside a
    user message) is skipped; a turn running into the next opening lost its closing: None."""
    spans, pos = [], 0
    for m in messages:
        if m.get("role") != "assistant":
            continue
        answer = answer_of(m)
        while True:
            i = text.find(opening, pos)
            if i < 0:
                return None
            start = i + len(opening)
            j = text.find(closing, start)
            if j < 0 or opening in text[start:j]:
                return None
            if answer in text[start:j]:
                break
            pos = i + 1
        spans.append((start, j + len(closing)))
        pos = j + len(closing)
    return spans


def span_mask(offsets, spans: list[tuple[int, int]]) -> np.ndarray:
    """1 for each token that starts inside one of `spans` (character offsets per token)."""
    starts = np.asarray([a for a, _ in offsets], np.int64)
    mask = np.zeros(len(starts), np.int8)
    for s, e in spans:
        mask[(starts >= s) & (starts < e)] = 1
    return mask


class WholeChatEncoder(ChatEncoder):
    """Multi-turn tokenisation of each conversation rendered once (module docstring)."""

    def __init__(self, tokenizer, template_kwargs: dict[str, Any] | None = None, *,
                 enable_thinking_default: bool | None = None, ignore_mismatch: bool = False):
        super().__init__(tokenizer, template_kwargs, enable_thinking_default=enable_thinking_default,
                         ignore_mismatch=ignore_mismatch)
        self.markers = turn_markers(tokenizer)
        self._marked: dict[str, bool] = {}

    def _has_generation_markers(self, row: ChatRow) -> bool:
        try:
            template = self.tokenizer.get_chat_template(None, row.tools)
        except Exception:  # no template for these tools: the render says so, naming the row
            return False
        if template not in self._marked:
            self._marked[template] = bool(_GENERATION.search(template))
        return self._marked[template]

    def encode(self, rows: Sequence[ChatRow], path: str, first_row: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for c in range(0, len(rows), CHUNK_ROWS):
            chunk = list(enumerate(rows[c:c + CHUNK_ROWS], start=first_row + c))
            texts = [_render(self.tokenizer, row.messages, tools=row.tools, path=path, row=r, **self._row_kwargs(row))
                     for r, row in chunk]
            plain = [k for k, (_, row) in enumerate(chunk) if not self._has_generation_markers(row)]
            if plain and not self.tokenizer.is_fast:
                raise DataError(at(path, chunk[plain[0]][0], "data.multiturn.mask_mode=whole_chat locates the assistant "
                                                              "turns with token offsets, which needs a fast tokenizer "
                                                              f"(tokenizer.json); or {_WAY_OUT}"))
            enc = self.tokenizer([texts[k] for k in plain], add_special_tokens=False,
                                 return_offsets_mapping=True) if plain else None
            tokenized = {k: (enc["input_ids"][n], enc["offset_mapping"][n]) for n, k in enumerate(plain)}
            for k, (r, row) in enumerate(chunk):
                if k in tokenized:
                    ids, mask = self._located(texts[k], *tokenized[k], row, path, r)
                else:
                    ids, mask = self._marked_turns(row, path, r)
                if any(drops_reasoning(m, texts[k]) for m in row.messages):
                    self.reasoning_dropped_rows += 1
                out.append((np.asarray(ids, np.int32), mask))
        return out

    def _located(self, text, ids, offsets, row: ChatRow, path: str, r: int):
        if isinstance(self.markers, str):
            raise DataError(at(path, r, f"cannot locate the assistant turns of the whole-chat rendering: "
                                        f"{self.markers}, and the template has no {{% generation %}} markers; {_WAY_OUT}"))
        spans = assistant_spans(text, row.messages, *self.markers)
        if spans is None:
            opening, closing = self.markers
            raise DataError(at(path, r, f"cannot locate the assistant turns in the whole-chat rendering (each should "
                                        f"start after {opening!r}, hold its answer and end with {closing!r}); "
                                        f"{_WAY_OUT}"))
        return ids, span_mask(offsets, spans)

    def _marked_turns(self, row: ChatRow, path: str, r: int):
        """The template's own {% generation %} spans, as transformers maps them to tokens."""
        try:
            enc = self.tokenizer.apply_chat_template(row.messages, tools=row.tools, tokenize=True, return_dict=True,
                                                     return_assistant_tokens_mask=True, **self._row_kwargs(row))
        except Exception as e:
            raise DataError(at(path, r, f"the chat template failed ({type(e).__name__}: {e})")) from None
        return enc["input_ids"], np.asarray(enc["assistant_masks"], np.int8)
