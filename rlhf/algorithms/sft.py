"""Supervised fine-tuning: next-token cross-entropy on the assistant's tokens (sft.loss_on).

Rows (TRL's dataset types): {text} language modelling (every token trained, EOS appended); {messages} conversational;
{prompt, completion} (or {prompt, response}) prompt-completion, as text or as message lists (the completion's
leading messages extend the prompt; its last is the assistant reply).

sft.loss_on picks the trained tokens of a conversation: "assistant" (default, as TRL's assistant-only loss) every
assistant turn, "last_turn" only the final reply, "all" every token. A {prompt, response} row is a conversation
whose last turn is the response, so for single-turn data the first two agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..data import BadRows, Row, encode_prompt, encode_response
from ..data.batching import attention_mask, pad
from ..data.io import open_source
from ..data.mapped import MapOptions, RowsInMemory, encode_source
from ..data.preference import reply_of
from ..data.templates import as_messages, assistant_spans, split_messages
from ..models import load_causal_lm, token_logprobs
from ..models.forward import flat_token_logprobs, pair_layout
from ..ops import masked_mean, masked_sum
from .base import Algorithm
from .supervised import make_batcher, report_skipped, sharded_eval, step_stream, total_steps

IGNORE = -100


def sft_prompt_response(row: Row):
    """(prompt, response) of an SFT row: {prompt, response|completion} or {messages: [...]}. """
    if "messages" in row.data:
        messages = row.get("messages", list)
        try:
            prompt, response = split_messages(messages)
        except (ValueError, AttributeError, KeyError) as e:
            raise row.fail("messages", str(e)) from None
        if not prompt:  # a chat template cannot render an empty conversation
            raise row.fail("messages", "no message before the assistant's reply: the prompt needs at least one")
        return prompt, response
    prompt = row.get("prompt", (str, list))
    if "response" in row.data or "completion" not in row.data:
        return prompt, row.get("response", str)
    leading, response = reply_of(row, "completion", row.get("completion", (str, list)))
    return (as_messages(prompt) + leading if leading else prompt), response


def encode_text_row(row: Row, tokenizer, max_length: int) -> dict:
    """{input_ids, labels} of a language-modelling row {text}: the text (with the tokenizer's special tokens) and
    EOS, cut at max_length, every token trained."""
    text = row.get("text", str)
    if not text.strip():
        raise row.fail("text", "empty text")
    ids = (tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])[:max_length]
    return {"input_ids": ids, "labels": list(ids)}


def encode_sft(row: Row, tokenizer, max_length: int, max_prompt_length: int, loss_on: str = "assistant") -> dict:
    """{input_ids, labels}: the prompt (every turn before the final reply, chat template applied), then the reply
    with EOS, cut at max_length. labels copy input_ids on trained tokens (see sft.loss_on), IGNORE elsewhere.
    A {text} row (no prompt, no messages) is language modelling: see encode_text_row."""
    if "text" in row.data and not {"prompt", "messages"} & row.data.keys():
        return encode_text_row(row, tokenizer, max_length)
    prompt, response = sft_prompt_response(row)
    if not response.strip():
        raise row.fail("response", "empty response")
    p = encode_prompt(tokenizer, prompt)
    if len(p) > max_prompt_length:
        raise row.fail("prompt", f"{len(p)} tokens > data.max_prompt_length={max_prompt_length}")
    r = encode_response(tokenizer, response)[: max_length - len(p)]
    labels = list(p) if loss_on == "all" else [IGNORE] * len(p)
    if loss_on == "assistant" and not isinstance(prompt, str):
        try:
            spans = assistant_spans(tokenizer, as_messages(prompt), p)
        except ValueError as e:
            raise row.fail("messages" if "messages" in row.data else "prompt", str(e)) from None
        for start, end in spans:
            labels[start:end] = p[start:end]
    return {"input_ids": p + r, "labels": labels + r}


@dataclass
class SFTBatch:
    """input_ids, attention_mask, labels: [B, T], right-padded; labels are IGNORE on prompt and pad."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def collate_sft(pad_id: int):
    def collate(examples: list[dict]) -> SFTBatch:
        ids = [e["input_ids"] for e in examples]
        return SFTBatch(pad(ids, pad_id), attention_mask(ids), pad([e["labels"] for e in examples], IGNORE))
    return collate


def sft_token_loss(model, batch: SFTBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NLL of the labelled tokens, their mask [B, T-1])."""
    device = next(model.parameters()).device
    target_mask = (batch.labels[:, 1:] != IGNORE).float()
    if pair_layout(model) == "varlen":  # the rows end to end, unpadded
        logp = flat_token_logprobs(model, batch.input_ids, batch.attention_mask, target_mask)
    else:
        logp = token_logprobs(model, batch.input_ids.to(device), batch.attention_mask.to(device),
                              positions=target_mask.to(device))
    target_mask = target_mask.to(device)
    return -masked_sum(logp, target_mask), target_mask


class SFTEncoder:
    """Row -> {input_ids, labels} columns for the cached map (rlhf.data.mapped)."""

    columns = ("input_ids", "labels")

    def __init__(self, tokenizer, max_length: int, max_prompt_length: int, loss_on: str):
        self.tokenizer, self.max_length, self.max_prompt_length, self.loss_on = (tokenizer, max_length,
                                                                                 max_prompt_length, loss_on)

    @classmethod
    def from_config(cls, cfg, tokenizer) -> "SFTEncoder":
        return cls(tokenizer, cfg.data.max_length, cfg.data.max_prompt_length, cfg.sft.loss_on)

    def features(self) -> dict:
        from datasets import Sequence, Value

        return {"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32"))}

    def settings(self) -> tuple:
        return (self.max_length, self.max_prompt_length, self.loss_on)

    def resolve(self, rows) -> None:
        pass

    def encode(self, row: Row) -> dict:
        return encode_sft(row, self.tokenizer, self.max_length, self.max_prompt_length, self.loss_on)


def sft_example(columns: dict, index: int) -> dict:
    return {"input_ids": columns["input_ids"], "labels": columns["labels"]}


class SFT(Algorithm):
    progress_keys = ("train/loss",)

    def __init__(self, cfg, trainer):
        super().__init__(cfg, trainer)
        d, tok = cfg.data, trainer.tokenizer
        self.bad = BadRows(d.on_bad_row)
        self.train_examples = self._examples("train")
        self.eval_examples = self._examples("eval") if d.eval else []
        self.skipped = report_skipped(trainer, self.bad, "train")
        self.batcher = make_batcher(trainer, self.train_examples, collate_sft(tok.pad_token_id))

    def _examples(self, which: str) -> Sequence[dict]:
        """data.train's or data.eval's examples ('train' / 'eval'): of the dataset object given to the Trainer, or
        of the file, folder or hub dataset the config names."""
        t, d = self.trainer, self.cfg.data
        if t.objects.dataset(which) is not None:
            return self._encode(t.rows(which))
        return self._load(getattr(d, which), getattr(d, f"{which}_split"), d.limit if which == "train" else 0)

    def _load(self, spec: str, split: str, limit: int = 0) -> Sequence[dict]:
        """The encoded examples of a data spec, through the cached map (rlhf.data.mapped)."""
        identity, make_source = open_source(spec, split, limit)
        return encode_source(make_source, identity, SFTEncoder.from_config(self.cfg, self.trainer.tokenizer), self.bad, MapOptions.from_config(self.cfg.data),
                             make=sft_example)

    def _encode(self, rows: list[Row]) -> Sequence[dict]:
        """The encoded examples of rows already read (mapped in memory)."""
        if not rows:
            return []
        return encode_source(lambda: RowsInMemory(rows), None, SFTEncoder.from_config(self.cfg, self.trainer.tokenizer), self.bad,
                             MapOptions.from_config(self.cfg.data), make=sft_example)

    def build_model(self):
        return load_causal_lm(self.cfg.model, self.trainer.tokenizer, model=self.trainer.objects.model)

    def total_steps(self) -> int:
        return total_steps(self.cfg, self.batcher)

    def steps(self, start_step):
        return step_stream(self.batcher, start_step)

    def loss_weight(self, batch: SFTBatch) -> float:
        return float((batch.labels[:, 1:] != IGNORE).sum())

    def loss(self, model, batch: SFTBatch):
        nll_sum, mask = sft_token_loss(model, batch)
        return nll_sum, {"train/tokens": mask.sum()}

    def after_step(self, model, step):
        return self.skipped if step == 1 else {}

    def evaluates(self) -> bool:
        return bool(self.eval_examples)

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        if not self.eval_examples:
            return {}

        def sums(model, batch):
            nll, mask = sft_token_loss(model, batch)
            return [nll], float(mask.sum())
        out = sharded_eval(self.trainer, model, self.eval_examples, self.cfg.optim.micro_batch_size,
                           collate_sft(self.trainer.tokenizer.pad_token_id), ("loss",), sums)
        out["eval/perplexity"] = float(torch.exp(torch.tensor(out["eval/loss"])))
        return out
