"""The tokenizer of a model folder (Hugging Face files), or none: token-id mode."""
from __future__ import annotations

import os
from pathlib import Path

_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer_config.json")


class Tokenizer:
    """Thin wrapper over a Hugging Face fast tokenizer loaded from local files only.

    lower_case: every text is lower-cased (`str.lower`) before the tokenizer sees it, as
    sentence-transformers does for a folder whose sentence_bert_config.json says
    `"do_lower_case": true` (convert/bert.py `sentence_lower_case`). Encode through the methods
    here, not `self.hf`, or the setting is skipped.
    """

    def __init__(self, hf_tokenizer, *, lower_case: bool = False):
        self.hf = hf_tokenizer
        self.lower_case = bool(lower_case)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, *, lower_case: bool = False) -> "Tokenizer | None":
        folder = Path(folder)
        if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
            return None
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(folder), local_files_only=True), lower_case=lower_case)

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    def _texts(self, text: str, pair: str | None) -> tuple[str, str | None]:
        if not self.lower_case:
            return text, pair
        return text.lower(), None if pair is None else pair.lower()

    def encode(self, text: str, pair: str | None = None, *, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf(*self._texts(text, pair), add_special_tokens=add_special_tokens)["input_ids"])

    def encode_with_types(self, text: str, pair: str | None = None, *,
                          max_length: int | None = None) -> tuple[list[int], list[int]]:
        """(token ids, token types) with special tokens. max_length: truncate to that many tokens as
        Hugging Face does (keeps [CLS]/[SEP], trims the longer text of a pair first)."""
        cut = {} if max_length is None else dict(truncation=True, max_length=max_length)
        enc = self.hf(*self._texts(text, pair), return_token_type_ids=True, **cut)
        return list(enc["input_ids"]), list(enc["token_type_ids"])

    def decode(self, ids) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def save(self, folder: str | os.PathLike) -> None:
        self.hf.save_pretrained(str(folder))
