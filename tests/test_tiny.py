"""The tiny offline checkpoint: `vqbatch tiny-model`, its determinism, its tokenizer, and a generation from it."""

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import CLIPTokenizer

from vqbatch.cli import main
from vqbatch.pipeline import VQDiffusionPipeline
from vqbatch.tiny import (IMAGE_SIZE, MAX_PROMPT_TOKENS, byte_symbols, learn_merges, tiny_components,
                          write_tokenizer_files)


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The same seed written twice by the CLI, and another seed once."""
    root = tmp_path_factory.mktemp("cli")
    for name, seed in (("first", 7), ("again", 7), ("other", 8)):
        assert main(["tiny-model", str(root / name), "--seed", str(seed)]) == 0
    return root


def test_cli_writes_the_diffusers_layout(written, capsys):
    assert main(["tiny-model", str(written / "printed")]) == 0
    assert str(written / "printed") in capsys.readouterr().out
    files = files_of(written / "first")
    for name in ("model_index.json", "scheduler/scheduler_config.json", "text_encoder/model.safetensors",
                 "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json",
                 "vqvae/diffusion_pytorch_model.safetensors", "transformer/diffusion_pytorch_model.safetensors",
                 "learned_classifier_free_sampling_embeddings/diffusion_pytorch_model.safetensors"):
        assert name in files


def test_same_seed_same_bytes_other_seed_other_weights(written):
    first, again, other = (files_of(written / name) for name in ("first", "again", "other"))
    assert first == again
    changed = {name for name in first if first[name] != other.get(name)}
    assert {"transformer/diffusion_pytorch_model.safetensors", "vqvae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors"} <= changed
    assert "tokenizer/vocab.json" not in changed  # the tokenizer does not depend on the seed


def test_checkpoint_loads_and_generates_one_image(written):
    pipe = VQDiffusionPipeline.from_pretrained(written / "first")
    assert pipe.tokenizer.model_max_length == MAX_PROMPT_TOKENS
    output = pipe("a small yellow star", generator=torch.Generator().manual_seed(0))  # all defaults: 100 steps
    (image,) = output.images
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE) and image.mode == "RGB"
    assert np.asarray(image).std() > 0  # random weights still draw something, not a flat colour


def test_in_memory_components_equal_the_written_weights(written):
    pipe = VQDiffusionPipeline(**tiny_components(seed=7))
    loaded = VQDiffusionPipeline.from_pretrained(written / "first")
    for ours, theirs in zip(pipe.models(), loaded.models()):
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        assert all(torch.equal(ours.state_dict()[k], theirs.state_dict()[k]) for k in ours.state_dict())


def test_building_components_leaves_the_global_random_state_alone():
    before = torch.random.get_rng_state()
    tiny_components(seed=5)
    assert torch.equal(torch.random.get_rng_state(), before)


# ---------------------------------------------------------------------------------------------------------------
# The offline tokenizer


def test_byte_alphabet_is_a_bijection_of_printable_characters():
    symbols = byte_symbols()
    assert len(set(symbols)) == 256
    assert symbols[ord("a")] == "a" and symbols[ord(" ")] != " "  # space gets a visible stand-in
    assert all(symbol.isprintable() for symbol in symbols)


def test_merges_join_the_most_frequent_pairs_first():
    merges = learn_merges("aab aab aab ab", num_merges=2)
    assert merges == [("a", "b</w>"), ("a", "ab</w>")]  # "a b</w>" occurs 4 times, then "a ab</w>" 3 times


def test_tokenizer_files_round_trip_prompts(tmp_path):
    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer_files(tmp_path))
    ids = tokenizer(["A red circle", "zebra 42!"], padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    assert ids.shape == (2, MAX_PROMPT_TOKENS)
    assert tokenizer.convert_ids_to_tokens(ids[0, :4].tolist()) == ["<|startoftext|>", "a</w>", "red</w>", "circle</w>"]
    assert tokenizer.batch_decode(ids, skip_special_tokens=True) == ["a red circle", "zebra 4 2 !"]
    assert (ids[0, 5:] == tokenizer.pad_token_id).all()
