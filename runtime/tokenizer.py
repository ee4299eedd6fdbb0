"""Tokenizers: the checkpoint's own, or a byte-level one for models built with random weights.

No tokenizer may be downloaded at run time, so specs with random LLM weights get a byte-level
BPE without merges (256 byte tokens + ChatML special tokens + the family's image tokens, as the
real checkpoints' tokenizers carry them: `<image>` for LLaVA, `<img>` `</img>` `<IMG_CONTEXT>` for
InternVL): a real `tokenizers` tokenizer that round-trips any text, saved into the checkpoint
directory like any other.
"""

from __future__ import annotations

from pathlib import Path

from runtime.specs import CHATML_TEMPLATE

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
IMAGE_TOKENS = {"faceinsight": ["<image>"], "facellm": ["<img>", "</img>", "<IMG_CONTEXT>"]}


def byte_level_tokenizer(family: str | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS + IMAGE_TOKENS.get(family, []))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, chat_template=CHATML_TEMPLATE, model_max_length=1 << 20,
    )


def load_tokenizer(path: str | Path, gguf_file: str | None = None):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if gguf_file:
        return AutoTokenizer.from_pretrained(str(path), gguf_file=gguf_file, local_files_only=True)
    if (Path(path) / "tokenizer.json").exists():
        # Read the tokenizer files alone: AutoTokenizer would also parse config.json, which in a
        # facert checkpoint is facert's, not a transformers config.
        return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
