"""How training rows become batches (the `finetune` stage's library): packed, grouped by
length, or padded.

- packed: the rows of a batch are laid end to end in one sequence, with position ids that
  restart at every row, and no padding at all. transformers turns restarting position ids
  into a block-diagonal causal mask (masking_utils.find_packed_sequence_indices), so a row
  never attends to another, and the label of each row's first token is masked, so no row
  is trained to predict the next one. Every token computed is a token trained.
- group_by_length: rows of similar length share a batch, padded to the longest of them.
- padded: rows in random order, padded to the longest of the batch (the reference recipe).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

from qlora.data.chat_template import IGNORE_INDEX

Batching = Literal["packed", "group_by_length", "padded"]


@dataclass(frozen=True)
class BatchPlan:
    collator: object
    sampling: Literal["random", "group_by_length"]
    # What the Trainer counts as trained tokens: a packed batch has no padding to leave out,
    # and no attention mask to count it by.
    token_count: Literal["all", "non_padding"]


def batch_plan(batching: Batching, tokenizer) -> BatchPlan:
    if batching == "packed":
        return BatchPlan(DataCollatorWithFlattening(separator_id=IGNORE_INDEX), "random", "all")
    padder = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    sampling = "group_by_length" if batching == "group_by_length" else "random"
    return BatchPlan(padder, sampling, "non_padding")
