"""Prompt and response encoding, with the tokenizer's chat template when it has one."""

from __future__ import annotations

from typing import Union

Prompt = Union[str, list]  # plain text, or a list of {"role", "content"} messages


def as_messages(prompt: Prompt) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return list(prompt)


def prompt_text(tokenizer, prompt: Prompt) -> str:
    """The exact text the model sees before its response."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(as_messages(prompt), add_generation_prompt=True, tokenize=False)
    if isinstance(prompt, str):
        return prompt
    return "\n".join(m["content"] for m in prompt) + "\n"


def encode_prompt(tokenizer, prompt: Prompt) -> list[int]:
    text = prompt_text(tokenizer, prompt)
    # chat templates already carry their special tokens; plain prompts get the tokenizer's (e.g. BOS)
    add_special = not getattr(tokenizer, "chat_template", None)
    return tokenizer(text, add_special_tokens=add_special)["input_ids"]


def encode_response(tokenizer, response: str, add_eos: bool = True) -> list[int]:
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id] if add_eos else ids


def split_messages(messages: list) -> tuple[list, str]:
    """A chat transcript -> (prompt messages, final assistant reply)."""
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("the last message must be the assistant's reply")
    return messages[:-1], messages[-1]["content"]
