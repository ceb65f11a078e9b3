"""Helpers for tests and benchmarks: a tiny random Llama with a real tokenizer, saved like any local model."""

from __future__ import annotations

import os
from typing import Optional

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A MOVE to stop Mr. Gaitskell from nominating any more Labour life Peers",
    "is to be made at a meeting of Labour M Ps tomorrow.",
    "Handwritten text recognition reads lines of ink, one character at a time!",
    "0123456789 ()[]{}<>,.;:'\"-+=*/\\?!&%$#@",
]


def make_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer (any text encodes) with BOS/EOS/PAD, trained offline in well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_tiny_llama(folder: str, hidden: int = 64, layers: int = 2, heads: int = 4, intermediate: int = 128,
                    seed: int = 0, vocab: int = 320, kv_heads: Optional[int] = None,
                    tie_embeddings: bool = False) -> str:
    """Save a tiny random LlamaForCausalLM and its tokenizer into ``folder`` (save_pretrained); return ``folder``.

    ``vocab`` caps the BPE vocabulary (the model's vocab_size is the tokenizer's real size); ``kv_heads`` < ``heads``
    gives grouped-query attention and ``tie_embeddings`` shares embedding and LM head, as Llama-3.2 and SmolLM2 do.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer(vocab)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                         max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=tie_embeddings)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def render_line(text: str, size: int = 22):
    """A gray uint8 (h, w) image of ``text`` in dark ink on white paper, in Pillow's built-in font (no font files)."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=size)
    left, top, right, bottom = font.getbbox(text)
    img = Image.new("L", (right - left + 8, bottom - top + 8), 255)
    ImageDraw.Draw(img).text((4 - left, 4 - top), text, font=font, fill=0)
    return np.asarray(img)


def write_text_shards(folder: str, splits: dict, alphabet: Optional[str] = None) -> str:
    """A shard set of rendered lines (:func:`render_line`): ``splits`` maps a split to its texts; the manifest's
    alphabet is ``alphabet`` or the texts' characters, sorted. Return ``folder``."""
    from htr_dist.data.shards import png_bytes, write_manifest, write_split

    entries = {}
    for split, texts in splits.items():
        samples = ({"key": f"{split}-{i:05d}", "png": png_bytes(render_line(t)), "text": t,
                    "meta": {"form": f"{split}-{i // 8}", "writer": "w0"}} for i, t in enumerate(texts))
        entries[split] = write_split(samples, folder, split)
    chars = alphabet or "".join(sorted(set("".join(t for texts in splits.values() for t in texts))))
    write_manifest(folder, "rendered", "htr_dist.testing.write_text_shards", entries, chars, {})
    return folder
