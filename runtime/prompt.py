"""Prompts: the chat template with image and segmentation tokens spliced in.

Visual and segmentation embeddings enter the LLM the way TensorRT-LLM does it: placeholder ids
at and above `vocab_size` index a per-request prompt-embedding table. Request b's table holds its
image tokens then its seg tokens; id `vocab_size + i` is row i. Every backend uses these two
functions.
"""

from __future__ import annotations

import torch

IMAGE_MARK = "<image>"
SEG_MARK = "<seg>"
MAX_QUESTION_CHARS = 16_384


class PromptError(ValueError):
    """A question that cannot be asked: empty, or too long for the model."""


def build_prompt_ids(tokenizer, question: str, vocab_size: int, num_image_tokens: int,
                     num_seg_tokens: int = 0, max_prompt_tokens: int | None = None) -> list[int]:
    if not isinstance(question, str):
        raise PromptError(f"question must be text, got {type(question).__name__}")
    if not question.strip():
        raise PromptError("question is empty")
    if len(question) > MAX_QUESTION_CHARS:
        raise PromptError(f"question is {len(question)} characters, over the {MAX_QUESTION_CHARS}-character bound")
    if IMAGE_MARK in question or SEG_MARK in question:
        raise PromptError(f"question may not contain the reserved markers {IMAGE_MARK} or {SEG_MARK}")
    marks = IMAGE_MARK + ("\n" + SEG_MARK if num_seg_tokens else "")
    text = tokenizer.apply_chat_template([{"role": "user", "content": f"{marks}\n{question}"}],
                                         tokenize=False, add_generation_prompt=True)
    ids: list[int] = []
    bos = tokenizer.bos_token
    if bos and getattr(tokenizer, "add_bos_token", False) and not text.startswith(bos):
        ids.append(tokenizer.bos_token_id)
    before_image, rest = text.split(IMAGE_MARK, 1)
    ids += tokenizer.encode(before_image, add_special_tokens=False)
    ids += range(vocab_size, vocab_size + num_image_tokens)
    if num_seg_tokens:
        between, rest = rest.split(SEG_MARK, 1)
        ids += tokenizer.encode(between, add_special_tokens=False)
        ids += range(vocab_size + num_image_tokens, vocab_size + num_image_tokens + num_seg_tokens)
    ids += tokenizer.encode(rest, add_special_tokens=False)
    if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
        raise PromptError(f"prompt is {len(ids)} tokens, over the model's {max_prompt_tokens}-token bound "
                          "(shorten the question or lower max_tokens)")
    return ids


def splice_prompt_table(embed_tokens, input_ids: torch.Tensor, prompt_table: torch.Tensor,
                        vocab_size: int) -> torch.Tensor:
    """Token embeddings [B, T, D] with rows of `prompt_table` [B, P, D] at ids >= vocab_size."""
    virtual = input_ids >= vocab_size
    text = embed_tokens(torch.where(virtual, torch.zeros_like(input_ids), input_ids))
    if prompt_table is None or prompt_table.shape[1] == 0:
        return text
    rows = (input_ids - vocab_size).clamp(min=0, max=prompt_table.shape[1] - 1)
    table = torch.gather(prompt_table.to(text.dtype), 1, rows[..., None].expand(-1, -1, text.shape[-1]))
    return torch.where(virtual[..., None], table, text)
