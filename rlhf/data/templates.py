"""Prompt and response encoding, with the tokenizer's chat template when it has one."""

from __future__ import annotations

from typing import Union

Prompt = Union[str, list]  # plain text, or a list of {"role", "content"} messages


def as_messages(prompt: Prompt) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return list(prompt)


def render(tokenizer, messages: list, generation_prompt: bool = True) -> str:
    """The text of a conversation: the chat template's, or without one the contents one per line."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    return "\n".join(m["content"] for m in messages) + "\n"


def prompt_text(tokenizer, prompt: Prompt) -> str:
    """The exact text the model sees before its response."""
    if isinstance(prompt, str) and not getattr(tokenizer, "chat_template", None):
        return prompt
    return render(tokenizer, as_messages(prompt))


def encode_text(tokenizer, text: str) -> list[int]:
    # chat templates already carry their special tokens; plain prompts get the tokenizer's (e.g. BOS)
    add_special = not getattr(tokenizer, "chat_template", None)
    return tokenizer(text, add_special_tokens=add_special)["input_ids"]


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """encode_text of each text, in one batched tokenizer call."""
    add_special = not getattr(tokenizer, "chat_template", None)
    return tokenizer(texts, add_special_tokens=add_special)["input_ids"] if texts else []


def encode_prompt(tokenizer, prompt: Prompt) -> list[int]:
    return encode_text(tokenizer, prompt_text(tokenizer, prompt))


def assistant_spans(tokenizer, messages: list, prompt_ids: list[int]) -> list[tuple[int, int]]:
    """[start, end) token spans of the assistant turns of `messages` within prompt_ids = encode_prompt(messages).

    The conversation is rendered prefix by prefix, so this holds for any chat template: a turn starts after the
    tokens of the messages before it plus the generation prompt (its role marker), and ends where the tokens of the
    messages through it end (its end-of-turn marker included). A template whose prefixes do not tokenize to
    prefixes of the whole (one that rewrites earlier turns) raises ValueError. A conversation opening with an
    assistant turn has no prefix to render: that turn's span starts at token 0."""
    spans = []
    for j, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = encode_text(tokenizer, render(tokenizer, messages[:j])) if j else []
        through = encode_text(tokenizer, render(tokenizer, messages[:j + 1], generation_prompt=False))
        if prompt_ids[:len(before)] != before or prompt_ids[:len(through)] != through or len(before) > len(through):
            raise ValueError(f"message {j} (assistant): the chat template's tokens of the conversation up to it are "
                             "not a prefix of the whole conversation's; its tokens cannot be located")
        spans.append((len(before), len(through)))
    return spans


def encode_response(tokenizer, response: str, add_eos: bool = True) -> list[int]:
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id] if add_eos else ids


def encode_responses(tokenizer, responses: list[str]) -> list[list[int]]:
    """encode_response (EOS appended) of each response, in one batched tokenizer call."""
    ids = tokenizer(responses, add_special_tokens=False)["input_ids"] if responses else []
    eos = [tokenizer.eos_token_id]
    return [r + eos for r in ids]


def split_messages(messages: list) -> tuple[list, str]:
    """A chat transcript -> (prompt messages, final assistant reply)."""
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("the last message must be the assistant's reply")
    return messages[:-1], messages[-1]["content"]
