"""Data: row readers with file/line errors, chat templates, collators and the step batcher."""

from .io import BadRows, DataError, Row, load_rows, read_jsonl
from .templates import as_messages, encode_prompt, encode_response, prompt_text

__all__ = ["BadRows", "DataError", "Row", "as_messages", "encode_prompt", "encode_response", "load_rows",
           "prompt_text", "read_jsonl"]
