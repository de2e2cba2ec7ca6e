"""A small random-weight VQ-Diffusion checkpoint, built offline, for tests and the demo.

Everything is made here without a network: a CLIP byte-level BPE tokenizer whose merges are learned from a
built-in word list, a tiny CLIP text encoder, and tiny vqbatch models, all written in the diffusers layout by
`VQDiffusionPipeline.save_pretrained`. The same seed always gives the same files.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from vqbatch.configuration import write_json
from vqbatch.models.embeddings import LearnedClassifierFreeSamplingEmbeddings
from vqbatch.models.transformer import VQDiffusionTransformer
from vqbatch.models.vq_model import VQModel
from vqbatch.pipeline import VQDiffusionPipeline
from vqbatch.schedulers.vq_diffusion import VQDiffusionScheduler

# ---------------------------------------------------------------------------------------------------------------
# Offline CLIP tokenizer
# ---------------------------------------------------------------------------------------------------------------

START_TOKEN, END_TOKEN = "<|startoftext|>", "<|endoftext|>"
WORD_END = "</w>"  # CLIP's BPE marks the last symbol of every word
MAX_PROMPT_TOKENS = 77  # CLIP's context length; the tokenizer pads every prompt to it
NUM_MERGES = 200

TRAINING_TEXT = """
a photo of a red circle on a blue square next to a green triangle
the small yellow star above the large purple heart below an orange ring
one two three four five six seven eight nine ten shapes in the middle of the picture
a drawing of black and white stripes with a pink moon left of a brown diamond
an image of the sky at night with many bright stars and a cat sitting on the grass
a teddy bear playing in the pool while a dog runs along the beach at sunset
"""


def byte_symbols() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: one printable unicode character per byte value, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, spare = {}, 256
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:  # control and space bytes get the next free code points above 255
            symbols[byte] = chr(spare)
            spare += 1
    return [symbols[byte] for byte in range(256)]


def word_symbols(word: str, alphabet: list[str]) -> tuple[str, ...]:
    symbols = [alphabet[byte] for byte in word.encode("utf-8")]
    return (*symbols[:-1], symbols[-1] + WORD_END)


def most_frequent_pair(words: Counter) -> tuple[str, str] | None:
    pairs = Counter()
    for symbols, count in words.items():
        for pair in zip(symbols, symbols[1:]):
            pairs[pair] += count
    if not pairs:
        return None
    best = max(pairs.values())
    return min(pair for pair, count in pairs.items() if count == best)  # ties broken alphabetically


def merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged, i = [], 0
    while i < len(symbols):
        if symbols[i:i + 2] == pair:
            merged.append(pair[0] + pair[1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return tuple(merged)


def learn_merges(text: str, num_merges: int) -> list[tuple[str, str]]:
    """Byte-pair encoding (Sennrich et al.): repeatedly join the most frequent adjacent pair of symbols."""
    alphabet = byte_symbols()
    words = Counter(word_symbols(word, alphabet) for word in text.lower().split())
    merges = []
    for _ in range(num_merges):
        pair = most_frequent_pair(words)
        if pair is None:
            break
        merges.append(pair)
        words = Counter({merge_pair(symbols, pair): count for symbols, count in words.items()})
    return merges


def clip_vocabulary(merges: Iterable[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary order: bytes, bytes ending a word, merged symbols, then the two special tokens."""
    alphabet = byte_symbols()
    tokens = [*alphabet, *(symbol + WORD_END for symbol in alphabet), *(a + b for a, b in merges), START_TOKEN, END_TOKEN]
    return {token: index for index, token in enumerate(tokens)}


def write_tokenizer_files(folder: str | Path, num_merges: int = NUM_MERGES, text: str = TRAINING_TEXT) -> Path:
    """Write vocab.json, merges.txt and the tokenizer config that `CLIPTokenizer.from_pretrained` reads.

    The merges are learned from `text`: a model trained on its own captions passes them, so that their words
    become single tokens.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = learn_merges(text, num_merges)
    (folder / "vocab.json").write_text(json.dumps(clip_vocabulary(merges), ensure_ascii=False), encoding="utf-8")
    merge_lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_PROMPT_TOKENS, "bos_token": START_TOKEN,
        "eos_token": END_TOKEN, "unk_token": END_TOKEN, "pad_token": END_TOKEN, "do_lower_case": True})
    write_json(folder / "special_tokens_map.json", {
        "bos_token": START_TOKEN, "eos_token": END_TOKEN, "unk_token": END_TOKEN, "pad_token": END_TOKEN})
    return folder


def tiny_tokenizer() -> CLIPTokenizer:
    """The offline tokenizer, read back from its files the way a checkpoint's tokenizer is read."""
    with tempfile.TemporaryDirectory() as folder:
        return CLIPTokenizer.from_pretrained(write_tokenizer_files(folder))


# ---------------------------------------------------------------------------------------------------------------
# Tiny models
# ---------------------------------------------------------------------------------------------------------------

IMAGE_SIZE = 32  # pixels per side
LATENT_SIZE = 8  # tokens per side: three VQ-VAE levels halve the image twice
CODEBOOK_SIZE = 64
TEXT_WIDTH = 32  # CLIP hidden size, the transformer's cross-attention width

VQVAE_CONFIG = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=8, num_vq_embeddings=CODEBOOK_SIZE,
    norm_num_groups=8, vq_embed_dim=8, sample_size=IMAGE_SIZE)
TRANSFORMER_CONFIG = dict(
    num_attention_heads=2, attention_head_dim=16, num_layers=2, cross_attention_dim=TEXT_WIDTH, attention_bias=True,
    sample_size=LATENT_SIZE, num_vector_embeds=CODEBOOK_SIZE + 1, activation_fn="geglu-approximate",
    num_embeds_ada_norm=100)


def tiny_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_PROMPT_TOKENS,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModel(config).eval()


def tiny_components(seed: int = 0) -> dict[str, object]:
    """The components of a tiny random VQ-Diffusion pipeline, `VQDiffusionPipeline(**tiny_components(seed))`.

    The global random state is left as it was; the same seed always gives the same weights.
    """
    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = tiny_text_encoder(tokenizer)
        vqvae = VQModel(**VQVAE_CONFIG)
        transformer = VQDiffusionTransformer(**TRANSFORMER_CONFIG)
        unconditional = LearnedClassifierFreeSamplingEmbeddings(learnable=True, hidden_size=TEXT_WIDTH,
                                                                length=MAX_PROMPT_TOKENS)
        torch.nn.init.normal_(unconditional.embeddings, std=TEXT_WIDTH ** -0.5)  # unit-norm-ish rows, like the text
    scheduler = VQDiffusionScheduler(num_vec_classes=CODEBOOK_SIZE + 1, num_train_timesteps=100)
    return dict(vqvae=vqvae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
                scheduler=scheduler, learned_classifier_free_sampling_embeddings=unconditional)


def tiny_pipeline(seed: int = 0) -> VQDiffusionPipeline:
    return VQDiffusionPipeline(**tiny_components(seed))


def write_tiny_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """Write the tiny pipeline of `seed` to `path` in the diffusers layout and return the folder.

    The tokenizer folder also gets vocab.json and merges.txt, as published CLIP checkpoints have them.
    """
    folder = tiny_pipeline(seed).save_pretrained(path)
    write_tokenizer_files(folder / "tokenizer")
    return folder
