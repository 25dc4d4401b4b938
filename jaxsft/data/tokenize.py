"""Token ids and loss masks with verl's semantics (multi-turn: MultiTurnSFTDataset, Feb 2026;
single-turn: SFTDataset's intended mask). `loss_mask[t] = 1` means token t is a training target.

Multi-turn: each message is rendered on its own with the tokenizer's chat template. Messages after
the first that are not system messages lose the template's default system block (a count of
tokens found once from the template, as verl does); an assistant turn is a target except for its
generation prompt (`<|im_start|>assistant\\n`), so it supervises its content, `<|im_end|>` and the
`\\n` after it. The concatenation must equal the whole conversation rendered at once, or the row
is refused unless `data.ignore_input_ids_mismatch` (then the per-message tokens are kept, as in
verl). Two cases verl gets wrong are handled correctly here:
- a run of consecutive tool messages is rendered as one unit, because Qwen's template merges them
  into one user block (verl renders them one by one and fails the check);
- an assistant message first in the conversation does not supervise the default system block the
  template puts in front of it (verl masks only the generation prompt there).

Checked row by row against verl 0.7.0's own MultiTurnSFTDataset: tests/test_data_verl_masks.py.
This is `data.multiturn.mask_mode=per_message`; `whole_chat` (jaxsft.data.whole_chat) renders
each conversation once instead, for templates that do not compose per message (Qwen3's).

Rows are rendered to text and then tokenised in batches: the same ids as `apply_chat_template(...,
tokenize=True)`, which tokenises the rendered text with `add_special_tokens=False`.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from jaxsft.data.errors import DataError, at
from jaxsft.data.source import ChatRow

CHUNK_ROWS = 512  # rows rendered, then tokenised, together


def _render(tokenizer, messages, *, path: str, row: int | None, **kwargs) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except Exception as e:  # jinja errors, raise_exception() in templates, type errors on odd content
        raise DataError(at(path, row, f"the chat template failed ({type(e).__name__}: {e})")) from None


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def reasoning_of(message: dict) -> str:
    """An assistant message's reasoning: its `reasoning_content`, else the text between `<think>`
    and `</think>` in its content (stripped; '' when it has none)."""
    if message.get("role") != "assistant":
        return ""
    reasoning, content = message.get("reasoning_content"), message.get("content")
    if not (isinstance(reasoning, str) and reasoning.strip()) and isinstance(content, str) and "</think>" in content:
        reasoning = content.split("</think>")[0].split("<think>")[-1]
    return reasoning.strip() if isinstance(reasoning, str) else ""


def drops_reasoning(message: dict, rendered: str) -> bool:
    """Whether `rendered` (the text the message was rendered into) leaves out its reasoning."""
    reasoning = reasoning_of(message)
    return bool(reasoning) and reasoning not in rendered


def render_units(messages: Sequence[dict]) -> list[tuple[int, int]]:
    """Message ranges rendered on their own: every message, except that consecutive tool
    messages form one range."""
    units, start = [], 0
    for i in range(1, len(messages) + 1):
        if i == len(messages) or not (messages[i]["role"] == "tool" and messages[i - 1]["role"] == "tool"):
            units.append((start, i))
            start = i
    return units


class ChatEncoder:
    """Multi-turn tokenisation; the template-derived prefixes are computed once."""

    def __init__(self, tokenizer, template_kwargs: dict[str, Any] | None = None, *,
                 enable_thinking_default: bool | None = None, ignore_mismatch: bool = False):
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("the tokenizer has no chat template; multi-turn data (data.multiturn.enable=true) needs one")
        self.tokenizer = tokenizer
        self.kwargs = dict(template_kwargs or {})
        self.enable_thinking_default = enable_thinking_default
        self.ignore_mismatch = ignore_mismatch
        # verl's derivation: the default system block is what one empty user turn renders beyond
        # the length of a user block; the generation prompt is what add_generation_prompt appends.
        # Without data.apply_chat_template_kwargs, as verl 0.7.0 (the release of record): with
        # them, a Qwen3 template with enable_thinking=false adds its empty think block to the
        # generation prompt, which a lone assistant turn does not render, so up to 10 of each
        # turn's own tokens would go untrained (verl 0.9.1 forwards them and has that problem).
        empty = {"role": "user", "content": ""}
        where = "the tokenizer's chat template on empty user turns"
        one, two, gen = _encode(tokenizer, [
            _render(tokenizer, [empty], path=where, row=None),
            _render(tokenizer, [empty, empty], path=where, row=None),
            _render(tokenizer, [empty], path=where, row=None, add_generation_prompt=True)])
        block = len(two) - len(one)
        self.system_prefix = one[:len(one) - block]
        self.generation_prompt = gen[len(one):]
        self.mismatched_rows = 0
        self.reasoning_dropped_rows = 0  # kept rows whose rendering leaves out assistant reasoning
        # Assistant turns that do not start with the generation prompt (e.g. a Qwen3 template with
        # enable_thinking=false: the prompt ends in an empty think block, a lone turn has none).
        # verl masks len(generation_prompt) tokens regardless, and so does this; counted for a warning.
        self.unprompted_turns = self.untrained_tokens = 0
        self.unprompted_example: tuple[str, int] | None = None

    def _row_kwargs(self, row: ChatRow) -> dict[str, Any]:
        thinking = row.enable_thinking if row.enable_thinking is not None else self.enable_thinking_default
        return self.kwargs if thinking is None else {**self.kwargs, "enable_thinking": thinking}

    def encode(self, rows: Sequence[ChatRow], path: str, first_row: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
        """(input_ids int32[L], loss_mask int8[L]) per row; `first_row` is the file row of rows[0]."""
        out = []
        for c in range(0, len(rows), CHUNK_ROWS):
            chunk = rows[c:c + CHUNK_ROWS]
            texts, layout = [], []
            for r, row in enumerate(chunk, start=first_row + c):
                kw = self._row_kwargs(row)
                units = render_units(row.messages)
                dropped = False
                for a, b in units:
                    texts.append(_render(self.tokenizer, row.messages[a:b], tools=row.tools if a == 0 else None,
                                         path=path, row=r, **kw))
                    dropped = dropped or any(drops_reasoning(m, texts[-1]) for m in row.messages[a:b])
                texts.append(_render(self.tokenizer, row.messages, tools=row.tools, path=path, row=r, **kw))
                layout.append((units, dropped))
            ids = iter(_encode(self.tokenizer, texts))
            for r, (row, (units, dropped)) in enumerate(zip(chunk, layout), start=first_row + c):
                parts = [(row.messages[a]["role"], a, next(ids)) for a, _ in units]
                out.append(self._assemble(parts, next(ids), path, r, dropped))
        return out

    def _assemble(self, parts, full: list[int], path: str, row: int, dropped: bool) -> tuple[np.ndarray, np.ndarray]:
        sp, gp = self.system_prefix, self.generation_prompt
        ids, mask = [], []
        for role, start, toks in parts:
            if start > 0 and role != "system":
                toks = toks[len(sp):]  # count-based, as verl: the default system block of a lone message
            ids += toks
            if role == "assistant":
                head = len(sp) if start == 0 and sp and toks[:len(sp)] == sp else 0
                if toks[head:head + len(gp)] != gp:
                    self._note_unprompted_turn(toks[head:], path, row)
                # A turn shorter than the generation prompt is all prompt (verl's slice assignment
                # clamps the same way); never more mask entries than tokens.
                skip = min(head + len(gp), len(toks))
                mask += [0] * skip + [1] * (len(toks) - skip)
            else:
                mask += [0] * len(toks)
        if ids != full:
            if not self.ignore_mismatch:
                k = next((i for i, (a, b) in enumerate(zip(ids, full)) if a != b), min(len(ids), len(full)))
                raise DataError(at(path, row, f"the per-message tokens differ from the whole conversation rendered at once "
                                              f"(first difference at token {k}; {len(ids)} vs {len(full)} tokens): the chat "
                                              f"template does not compose per message here. Either set "
                                              f"data.multiturn.mask_mode=whole_chat to train on the conversation as rendered "
                                              f"at once (the loss on each assistant turn as the template renders it), or "
                                              f"data.ignore_input_ids_mismatch=true to train on the per-message tokens "
                                              f"(verl's behaviour; a turn whose reasoning the template drops when it is "
                                              f"rendered alone, as Qwen3's, then trains none of it)"))
            self.mismatched_rows += 1
            self.reasoning_dropped_rows += dropped
        return np.asarray(ids, np.int32), np.asarray(mask, np.int8)

    def _note_unprompted_turn(self, turn: list[int], path: str, row: int) -> None:
        gp = self.generation_prompt
        same = next((k for k, (a, b) in enumerate(zip(turn, gp)) if a != b), min(len(turn), len(gp)))
        self.unprompted_turns += 1
        self.untrained_tokens += min(len(gp), len(turn)) - same  # turn tokens masked as if prompt
        self.unprompted_example = self.unprompted_example or (path, row)


class PairEncoder:
    """Single-turn: the prompt as one user turn plus the generation prompt (not targets), then the
    response and the eos token (all targets, the eos included — verl's intended semantics)."""

    def __init__(self, tokenizer, template_kwargs: dict[str, Any] | None = None):
        if tokenizer.eos_token is None:
            raise DataError("the tokenizer has no eos token; single-turn data needs one to end each response")
        self.tokenizer = tokenizer
        self.kwargs = dict(template_kwargs or {})

    def encode(self, pairs: Sequence[tuple[str, str]], path: str, first_row: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for c in range(0, len(pairs), CHUNK_ROWS):
            chunk = pairs[c:c + CHUNK_ROWS]
            prompts = [_render(self.tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True,
                               path=path, row=r, **self.kwargs) for r, (p, _) in enumerate(chunk, start=first_row + c)]
            responses = [resp + self.tokenizer.eos_token for _, resp in chunk]
            for p, r in zip(_encode(self.tokenizer, prompts), _encode(self.tokenizer, responses)):
                out.append((np.asarray(p + r, np.int32), np.concatenate([np.zeros(len(p), np.int8), np.ones(len(r), np.int8)])))
        return out


def truncate(ids: np.ndarray, mask: np.ndarray, max_length: int, mode: str, path: str, row: int):
    """verl's data.truncation: right keeps the first max_length tokens, left the last, error refuses."""
    n = len(ids)
    if n <= max_length:
        return ids, mask
    if mode == "right":
        return ids[:max_length], mask[:max_length]
    if mode == "left":
        return ids[n - max_length:], mask[n - max_length:]
    raise DataError(at(path, row, f"{n} tokens exceed data.max_length={max_length} (data.truncation=error; "
                                  f"set data.truncation=right or left to cut such rows)"))
