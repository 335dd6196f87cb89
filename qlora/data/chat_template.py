"""Chat-template rendering and tokenization with the prompt masked out of the labels.

dataset (token counts), validate (length checks) and finetune (training) all use these two
functions, so the lengths checked are exactly the lengths trained.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # label value that torch's cross-entropy skips


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> tuple[str, str]:
    """Split a conversation into (prompt, completion) text with the model's chat template.

    The prompt is everything up to and including the assistant header; the completion is
    the answer plus the template's end-of-turn marker, which the model must learn to emit.
    """
    prompt = tokenizer.apply_chat_template(
        messages[:-1], tokenize=False, add_generation_prompt=True
    )
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if full.startswith(prompt):
        return prompt, full[len(prompt) :]
    # A template that renders history differently with a generation prompt: fall back to the
    # answer followed by EOS, which every tokenizer has.
    return prompt, messages[-1]["content"] + (tokenizer.eos_token or "")


def encode(
    tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str, max_length: int
) -> dict[str, list[int]]:
    """input_ids and labels, the prompt's positions set to IGNORE_INDEX (train on the
    response only). The template already holds the special tokens, so none are added."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    input_ids = (prompt_ids + completion_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:max_length]
    return {"input_ids": input_ids, "labels": labels}
