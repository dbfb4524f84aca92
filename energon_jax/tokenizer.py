"""The tokenizer of a model folder (Hugging Face files), or none: token-id mode."""
from __future__ import annotations

import os
from pathlib import Path

_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer_config.json")


class Tokenizer:
    """Thin wrapper over a Hugging Face fast tokenizer loaded from local files only."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "Tokenizer | None":
        folder = Path(folder)
        if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
            return None
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(folder), local_files_only=True))

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    def encode(self, text: str, pair: str | None = None, *, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf(text, pair, add_special_tokens=add_special_tokens)["input_ids"])

    def encode_with_types(self, text: str, pair: str | None = None) -> tuple[list[int], list[int]]:
        enc = self.hf(text, pair, return_token_type_ids=True)
        return list(enc["input_ids"]), list(enc["token_type_ids"])

    def decode(self, ids) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def save(self, folder: str | os.PathLike) -> None:
        self.hf.save_pretrained(str(folder))
