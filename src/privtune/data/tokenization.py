"""Tokenizer training and record encoding.

One record is one training example (truncated to ``max_length``), so a record is the unit of
privacy: packing records into blocks would let one record touch several examples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on (public) texts and wrap it for transformers."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(  # its progress bar writes blank lines to stdout, the stage's JSON
        texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, pad_token=EOS, unk_token=EOS
    )


def ensure_pad_token(tokenizer) -> None:
    """Causal LMs often ship without a pad token; padding positions are masked anyway."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


@dataclass
class EncodedRecords:
    """Padded token ids with per-record lengths; labels are derived (-100 past the length)."""

    input_ids: torch.Tensor  # (N, T) long
    lengths: torch.Tensor  # (N,) long

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def slice(self, start: int | None = None, stop: int | None = None) -> EncodedRecords:
        """A contiguous range of records (no copy)."""
        return EncodedRecords(self.input_ids[start:stop], self.lengths[start:stop])

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Gather a batch, trimmed to its longest record to save compute."""
        lengths = self.lengths[index]
        width = int(lengths.max()) if len(index) else 1
        ids = self.input_ids[index, :width]
        positions = torch.arange(width).unsqueeze(0)
        mask = (positions < lengths.unsqueeze(1)).long()
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def bos_id(tokenizer) -> int:
    """The sequence-start token; causal LMs without one start with their eos token."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode_records(texts: Sequence[str], tokenizer, max_length: int) -> EncodedRecords:
    """Encode each text as [bos] text [eos], truncated to max_length tokens."""
    ensure_pad_token(tokenizer)
    bos = bos_id(tokenizer)
    eos = tokenizer.eos_token_id
    body = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    ids = torch.full((len(texts), max_length), tokenizer.pad_token_id, dtype=torch.long)
    lengths = torch.zeros(len(texts), dtype=torch.long)
    for row, tokens in enumerate(body):
        seq = ([bos] + tokens + [eos])[:max_length]
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        lengths[row] = len(seq)
    return EncodedRecords(ids, lengths)


def length_percentile(texts: Sequence[str], tokenizer, percentile: float) -> int:
    """Length in tokens of [bos] text [eos] at ``percentile`` (0-100) of the texts, rounded up:
    what `base.max_length: auto` truncates records to."""
    if not texts:
        raise ValueError("no texts to measure")
    body = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    lengths = np.array([len(tokens) + 2 for tokens in body])
    return int(np.ceil(np.percentile(lengths, percentile)))
