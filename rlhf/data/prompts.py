"""PPO prompts: rows {prompt} (text, or a message list; TRL's prompt-only type) -> encoded prompt columns.

The other fields of a row travel with it (as JSON) to the reward functions, which receive them by name.
"""

from __future__ import annotations

import json

from .io import Row
from .templates import encode_prompt, prompt_text


class PromptEncoder:
    """Row -> {ids, text, chat, columns} for the cached map (rlhf.data.mapped): the encoded prompt (chat template
    applied), the prompt as reward functions receive it, the prompt as the data gives it and the row's other
    fields (both JSON)."""

    columns = ("ids", "text", "chat", "others")

    def __init__(self, tokenizer, max_prompt_length: int):
        self.tokenizer, self.max_prompt_length = tokenizer, max_prompt_length

    def features(self) -> dict:
        from datasets import Sequence, Value

        return {"ids": Sequence(Value("int32")), "text": Value("string"), "chat": Value("string"),
                "others": Value("string")}

    def settings(self) -> tuple:
        return (self.max_prompt_length,)

    def resolve(self, rows) -> None:
        pass

    def encode(self, row: Row) -> dict:
        prompt = row.get("prompt", (str, list))
        ids = encode_prompt(self.tokenizer, prompt)
        if len(ids) > self.max_prompt_length:
            raise row.fail("prompt", f"{len(ids)} tokens > data.max_prompt_length={self.max_prompt_length}")
        text = prompt if isinstance(prompt, str) else prompt_text(self.tokenizer, prompt)
        others = {k: v for k, v in row.data.items() if k != "prompt"}
        return {"ids": ids, "text": text, "chat": json.dumps(prompt), "others": json.dumps(others, default=str)}


def prompt_columns(columns: dict, index: int) -> tuple:
    """(ids, text, others, chat) of one encoded prompt."""
    return columns["ids"], columns["text"], json.loads(columns["others"]), json.loads(columns["chat"])
