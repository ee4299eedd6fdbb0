"""Tiny llava-hf and InternVL3-hf checkpoint directories written by transformers itself, and the
reference answer: transformers' own processor (or, for InternVL, its image processor and tokenizer,
see below) and `model.generate`, greedy, on the same directory.

Nothing here uses facert: the reference input is built with transformers' tools only, so comparing
facert's answer with it tests facert's prompt, pixels and generation.

- Tokenizers are trained here (no download): a LLaMA-style SentencePiece-like BPE (Metaspace, <s>
  prepended, `<image>` added) and a Qwen2-style byte-level BPE (ChatML tokens, `<img>`, `</img>`,
  `<IMG_CONTEXT>`), each with merges, so that tokenizing pieces apart would give other ids than
  tokenizing the whole prompt.
- Weights are seeded with a wide initialiser so that a tiny model's greedy tokens depend on its image.
- InternVLProcessor cannot be built here: it wants a video processor, which needs torchvision, and no
  torchvision wheel exists for this torch. The reference for InternVL therefore runs what
  InternVLProcessor runs, with transformers' own pieces: the chat template, GotOcr2ImageProcessor
  with crop_to_patches (InternVLProcessor's default), each image marker replaced by
  `<img>` + `<IMG_CONTEXT>` x image_seq_length x tiles + `</img>` (InternVLProcessor's
  _insert_media_placeholders), then the tokenizer on the whole text.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CORPUS = [
    "Is this person smiling? Describe the face: hair, eyes, mouth and nose.",
    "USER: ASSISTANT: What colour is the hair? Does the person wear glasses?",
    "Are these two images of the same person? Answer yes or no.",
    "Line one.\nLine two.\n\nThe end.",
    "A man with short brown hair smiles; a woman with long blond hair does not.",
] * 40

LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
INTERNVL_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)


def llama_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    alphabet = sorted(set("".join(CORPUS)) | set("\u2581") | set("0123456789?!.,;:'\"()-"))
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                                        initial_alphabet=alphabet))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    t = LlamaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                           pad_token="<unk>")
    t.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return t


def qwen2_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                                                      "context_image_token": "<IMG_CONTEXT>"})
    t.chat_template = INTERNVL_TEMPLATE
    return t


def _wide_init(model, seed: int, std: float = 0.15) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def make_llava_hf(out: Path, seed: int = 0, image_size: int = 56, patch: int = 14) -> Path:
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    out = Path(out)
    tok = llama_tokenizer()
    vcfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                            image_size=image_size, patch_size=patch, projection_dim=32)
    tcfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=1024,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=0)
    grid = (image_size // patch) ** 2
    cfg = LlavaConfig(vision_config=vcfg.to_dict(), text_config=tcfg.to_dict(),
                      image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=grid)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    _wide_init(model, seed)
    proc = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                                             crop_size={"height": image_size, "width": image_size}),
                          tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


def make_internvl_hf(out: Path, seed: int = 0, image_size: int = 32, patch: int = 8) -> Path:
    from transformers import (GotOcr2ImageProcessor, InternVLConfig, InternVLForConditionalGeneration,
                              InternVLVisionConfig, Qwen2Config)

    out = Path(out)
    tok = qwen2_tokenizer()
    vcfg = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=[image_size, image_size], patch_size=[patch, patch])
    tcfg = Qwen2Config(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=2048,
                       tie_word_embeddings=True, eos_token_id=tok.eos_token_id)
    cfg = InternVLConfig(vision_config=vcfg.to_dict(), text_config=tcfg.to_dict(),
                         image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), downsample_ratio=0.5)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(cfg).eval()
    _wide_init(model, seed)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    GotOcr2ImageProcessor(size={"height": image_size, "width": image_size}, image_mean=[0.485, 0.456, 0.406],
                          image_std=[0.229, 0.224, 0.225]).save_pretrained(out)
    # what InternVLProcessor.save_pretrained would add (it cannot be built here: see the module docstring)
    seq = int((image_size // patch) ** 2 * 0.25)
    (out / "processor_config.json").write_text(json.dumps({"image_seq_length": seq,
                                                           "processor_class": "InternVLProcessor"}))
    return out


def user_turn(num_images: int, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": question}]}]


def _until_eos(tokens: list[int], model) -> list[int]:
    """generate's tokens up to its stop token: facert reports an answer's tokens without the stop token."""
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i]
    return tokens


def _pil(images):
    import io

    from PIL import Image

    return [Image.open(io.BytesIO(b)).convert("RGB") for b in images]


@torch.no_grad()
def reference_llava(path: Path, images: list[bytes], messages: list[dict], max_new_tokens: int) -> list[int]:
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    proc = LlavaProcessor.from_pretrained(path)
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    text = proc.apply_chat_template(messages, add_generation_prompt=True)
    inputs = proc(images=_pil(images), text=text, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return _until_eos(out[0, inputs["input_ids"].shape[1]:].tolist(), model)


@torch.no_grad()
def reference_internvl(path: Path, images: list[bytes], messages: list[dict], max_new_tokens: int,
                       max_patches: int | None = None) -> tuple[list[int], int]:
    """(greedy tokens, total tiles)."""
    from transformers import AutoTokenizer, GotOcr2ImageProcessor, InternVLForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(path)
    ip = GotOcr2ImageProcessor.from_pretrained(path)
    seq = json.loads((Path(path) / "processor_config.json").read_text())["image_seq_length"]
    model = InternVLForConditionalGeneration.from_pretrained(path).eval()
    kwargs = {"crop_to_patches": True}
    if max_patches is not None:
        kwargs["max_patches"] = max_patches
    pix = ip(images=_pil(images), return_tensors="pt", **kwargs)
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # InternVLProcessor._insert_media_placeholders: every marker to a placeholder, then each in turn expanded
    text = text.replace("<IMG_CONTEXT>", "<placeholder>")
    for n in pix["num_patches"]:
        text = text.replace("<placeholder>", "<img>" + "<IMG_CONTEXT>" * (seq * int(n)) + "</img>", 1)
    ids = tok(text, return_tensors="pt")
    out = model.generate(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"],
                         pixel_values=pix["pixel_values"], max_new_tokens=max_new_tokens, do_sample=False)
    return _until_eos(out[0, ids["input_ids"].shape[1]:].tolist(), model), int(sum(pix["num_patches"]))
