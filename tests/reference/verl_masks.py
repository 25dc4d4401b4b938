"""Record verl's own token ids and loss masks for the chats of verl_cases.py (not run in CI).

    python3 -m venv .venv-verl
    .venv-verl/bin/pip install torch==2.13.0 && .venv-verl/bin/pip install --no-deps verl==0.7.0
    .venv-verl/bin/pip install "transformers<5" "datasets<4" pandas pyarrow omegaconf ray \
        "tensordict>=0.8,<=0.10,!=0.9.0" codetiming pillow qwen_vl_utils torchvision
    .venv-verl/bin/python tests/reference/verl_masks.py      # writes tests/reference/verl_masks.json

(torchvision lifts torch to its own pin; the JSON records the versions used. Run from a clean venv
with these lines, the JSON comes out byte-identical.)

verl 0.7.0 is the last release with the FSDP SFT trainer; its MultiTurnSFTDataset needs
transformers 4 (it imports AutoModelForVision2Seq), so the bundled tokenizer is loaded here as a
PreTrainedTokenizerFast from the same tokenizer.json and chat template (the CI test checks the ids
agree with jaxsft's wherever verl's semantics are claimed). Each case is written to its own parquet
file with pyarrow and read by verl as it reads a user's file (pandas); every row goes through
`__getitem__` with pad_mode=right, and the padding is cut off with the attention mask.
"""

import importlib.metadata as md
import json
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import OmegaConf
from transformers import PreTrainedTokenizerFast
from verl.utils.dataset.multiturn_sft_dataset import MultiTurnSFTDataset

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from verl_cases import CASES, TEMPLATES, columns, digest  # noqa: E402

TOKENIZER = HERE.parent.parent / "jaxsft" / "assets" / "tokenizer"
MAX_LENGTH = 4096


def tokenizer(template: str | None) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER / "tokenizer.json"), eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = template if template is not None else (TOKENIZER / "chat_template.jinja").read_text()
    return tok


def run_case(c: dict, workdir: Path) -> dict:
    path = workdir / f"case{CASES.index(c)}.parquet"
    pq.write_table(pa.table(columns(c)), path)
    config = OmegaConf.create({"max_length": MAX_LENGTH, "truncation": "error", "pad_mode": "right", **c["config"]})
    ds = MultiTurnSFTDataset(str(path), tokenizer(TEMPLATES[c["template"]]), config)
    rows = []
    for i in range(len(ds)):
        try:
            item = ds[i]
        except Exception as e:  # verl refuses the row (its sanity check)
            rows.append({"error": f"{type(e).__name__}: {str(e).splitlines()[0]}"})
            continue
        n = int(item["attention_mask"].sum())
        rows.append({"input_ids": item["input_ids"][:n].tolist(), "loss_mask": item["loss_mask"][:n].tolist()})
    return {"digest": digest(c), "system_prompt": list(ds.system_prompt), "generation_prompt": list(ds.generation_prompt),
            "rows": rows}


def main() -> None:
    versions = {p: md.version(p) for p in ("verl", "transformers", "tokenizers", "torch", "pandas", "pyarrow")}
    with tempfile.TemporaryDirectory() as tmp:
        cases = {c["name"]: run_case(c, Path(tmp)) for c in CASES}
    out = HERE / "verl_masks.json"
    out.write_text(json.dumps({"versions": versions, "max_length": MAX_LENGTH, "cases": cases}, indent=1) + "\n")
    print(f"wrote {out}: {len(cases)} cases, {sum(len(c['rows']) for c in cases.values())} rows ({versions})")


if __name__ == "__main__":
    main()
