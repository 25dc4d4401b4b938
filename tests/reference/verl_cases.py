"""Chats whose token ids and loss masks are recorded from verl's own MultiTurnSFTDataset
(verl_masks.py, run by hand in a verl venv) and compared with jaxsft's (test_data_verl_masks.py).

Plain data only: this module is imported by both sides (no jaxsft, no verl). Each case is one
parquet file written with pyarrow from `rows`; `expect` says what jaxsft claims: "same" (verl's ids
and masks, row by row) or the name of a documented deviation (docs/DATA.md).
"""

import hashlib
import json

# A small Qwen3-style template: no default system prompt; an assistant turn after the last user
# message gets a think block when it is the last turn (or has reasoning); the generation prompt
# ends in an empty think block when thinking is off. DEFAULT_THINKING is what an absent
# `enable_thinking` means: true as in Qwen3, false for the "thinking off by default" variant.
_QWEN3 = (
    "{%- set thinking = enable_thinking if enable_thinking is defined else DEFAULT_THINKING -%}"
    "{%- set ns = namespace(last_query=messages|length - 1, found=false) -%}"
    "{%- for m in messages|reverse -%}{%- if not ns.found and m.role == 'user' -%}"
    "{%- set ns.found = true -%}{%- set ns.last_query = messages|length - 1 - loop.index0 -%}{%- endif -%}{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}"
    "{%- set content = m.content -%}{%- set reasoning = '' -%}"
    "{%- if '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}{%- endif -%}"
    "{%- if loop.index0 > ns.last_query and (loop.last or reasoning) -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' -}}"
    "{%- else -%}{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- else -%}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}{%- endif -%}"
)
TEMPLATES = {
    "qwen25": None,  # the bundled tokenizer's own template (renders like Qwen2.5-Instruct's)
    "qwen3": _QWEN3.replace("DEFAULT_THINKING", "true"),
    "qwen3_thinking_off_by_default": _QWEN3.replace("DEFAULT_THINKING", "false"),
}

TOOLS = [{"type": "function", "function": {"name": "run_python", "description": "Run code",
                                           "parameters": {"type": "object", "properties": {"code": {"type": "string"}},
                                                          "required": ["code"]}}}]
WEATHER = [{"type": "function", "function": {"name": "weather", "description": "Weather of a city",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                                                             "unit": {"type": "string"}},
                                                            "required": ["city"]}}}]


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def call(name, arguments, content="Let me run it."):
    return {"role": "assistant", "content": content, "tool_calls": [{"type": "function", "function": {"name": name, "arguments": arguments}}]}


def tool(text):
    return {"role": "tool", "content": text}


SYS = {"role": "system", "content": "You are terse."}


def case(name, template, rows, expect="same", **config):
    return {"name": name, "template": template, "rows": rows, "expect": expect,
            "config": {"ignore_input_ids_mismatch": False, "apply_chat_template_kwargs": {}, **config}}


def row(*messages, tools=None, enable_thinking="absent"):
    r = {"messages": list(messages)}
    if tools is not None:
        r["tools"] = tools
    if enable_thinking != "absent":
        r["enable_thinking"] = enable_thinking
    return r


CASES = [
    # ---- Qwen2.5-style (default system block, tools, merged tool responses) -------------------
    case("1-turn", "qwen25", [row(u("2+2?"), a("2+2 equals 4."))]),
    case("2-turn", "qwen25", [row(u("2+2?"), a("2+2 equals 4."), u("4+4?"), a("4+4 equals 8."))]),
    case("3-turn", "qwen25", [row(u("a"), a("b"), u("c"), a("d"), u("e"), a("f\n\ng"))]),
    case("system, 1 to 3 turns", "qwen25", [row(SYS, u("2+2?"), a("4")),
                                           row(SYS, u("2+2?"), a("4"), u("and 3+3?"), a("6")),
                                           row(SYS, u("x"), a("y"), u("z"), a(" w "), u("v"), a("```python\nu\n```"))]),
    case("one-token and empty answers", "qwen25", [row(u("2+2?"), a("4")), row(u("Say nothing."), a("")),
                                                  row(u("2+2?"), a("4"), u("3+3?"), a("6"))]),
    case("tools, 1 and 2 turns", "qwen25", [row(u("2+2?"), a("4"), tools=TOOLS),
                                           row(SYS, u("2+2?"), a("4"), u("3+3?"), a("6"), tools=TOOLS)]),
    case("tool call and one tool response", "qwen25",
         [row(SYS, u("Compute 2+2."), call("run_python", '{"code": "print(2+2)"}'), tool("4"), a("It prints 4."), tools=TOOLS),
          row(u("Compute 2+2."), call("run_python", '{"code": "print(2+2)"}', content=None), tool("4"), a("4."), tools=TOOLS)]),
    case("tools as an empty string", "qwen25", [row(u("2+2?"), a("4"), tools=""), row(u("3+3?"), a("6"), tools="")]),
    case("tools as a list of JSON strings", "qwen25", [row(u("2+2?"), a("4"), tools=[json.dumps(TOOLS[0])])],
         expect="tool_specs_as_json_strings"),
    case("consecutive tool messages", "qwen25",
         [row(SYS, u("Compute 2+2 twice."), call("run_python", '{"code": "print(2+2)"}'), tool("4"), tool("4"),
              a("Both runs print 4."), tools=TOOLS)], expect="consecutive_tool_messages"),
    case("consecutive tool messages, mismatch ignored", "qwen25",
         [row(u("Compute 2+2 twice."), call("run_python", '{"code": "print(2+2)"}'), tool("4"), tool("4"),
              a("Both print 4."), tools=TOOLS)], expect="consecutive_tool_messages", ignore_input_ids_mismatch=True),
    case("assistant first", "qwen25", [row(a("Hello!"), u("hi"), a("Bye."))], expect="assistant_first"),
    # Arrow merges the struct types of all rows: row 0's arguments/spec gain row 1's keys as nulls.
    case("tool-call arguments as structs with other rows' keys", "qwen25",
         [row(u("Weather in Paris?"), call("weather", {"city": "Paris"}, content=None), tool("sunny"), a("Sunny."), tools=WEATHER),
          row(u("Weather in Oslo, in C?"), call("weather", {"city": "Oslo", "unit": "C"}, content=None), tool("-3"),
              a("-3 C."), tools=WEATHER)], expect="arrow_nulls"),
    case("tool specs as structs with other rows' properties", "qwen25",
         [row(u("2+2?"), a("4"), tools=TOOLS), row(u("Weather?"), a("Which city?"), tools=WEATHER)], expect="arrow_nulls"),
    # ---- Qwen3-style (thinking) -----------------------------------------------------------------
    case("thinking on, mismatch ignored", "qwen3", [row(u("2+2?"), a("4"), enable_thinking=True),
                                                   row(u("2+2?"), a("4"), u("3+3?"), a("6"), enable_thinking=True)],
         ignore_input_ids_mismatch=True),
    case("thinking per row with nulls, mismatch ignored", "qwen3",
         [row(u("2+2?"), a("The answer is 4."), enable_thinking=True), row(u("2+2?"), a("The answer is 4."), enable_thinking=None),
          row(u("2+2?"), a("The answer is 4."), u("3+3?"), a("The answer is 6."), enable_thinking=False)],
         ignore_input_ids_mismatch=True),
    case("reasoning in an earlier turn, mismatch ignored", "qwen3",
         [row(u("2+2?"), a("<think>\nadd\n</think>\n\n4"), u("3+3?"), a("6"))], ignore_input_ids_mismatch=True),
    case("system and thinking, 3 turns, mismatch ignored", "qwen3",
         [row(SYS, u("a"), a("b"), u("c"), a("d"), u("e"), a("f"), enable_thinking=True)], ignore_input_ids_mismatch=True),
    # Issue 10 item 7: the generation prompt (with an empty think block) is longer than a one-token
    # turn; row 1 shows that the next row's mask is not shifted.
    case("generation prompt longer than the turn (issue 10 reproduction)", "qwen3_thinking_off_by_default",
         [row(u("2+2?"), a("4"), enable_thinking=False), row(u("Name colours."), a("Blue, red and green."), enable_thinking=False),
          row(u("2+2?"), a("4"), u("3+3?"), a("6"))], ignore_input_ids_mismatch=True),
    # The same with Qwen3's own default and enable_thinking=false in apply_chat_template_kwargs:
    # verl 0.7.0 and jaxsft derive the generation prompt without those kwargs (3 tokens), so
    # every content token is a target (verl 0.9.1 derives it with them and masks 13).
    case("thinking off in apply_chat_template_kwargs", "qwen3",
         [row(u("2+2?"), a("4")), row(u("Name colours."), a("Blue, red and green."))],
         ignore_input_ids_mismatch=True, apply_chat_template_kwargs={"enable_thinking": False}),
]


def digest(c: dict) -> str:
    """Changes whenever a case (or a template it uses) changes: the recorded masks must be redone."""
    return hashlib.sha256(json.dumps([c, TEMPLATES[c["template"]]], sort_keys=True).encode()).hexdigest()[:16]


def columns(c: dict) -> dict[str, list]:
    """The case's parquet columns (pass to pyarrow.table); a key a row lacks is null there."""
    keys = [k for k in ("messages", "tools", "enable_thinking") if any(k in r for r in c["rows"])]
    return {k: [r.get(k) for r in c["rows"]] for k in keys}
