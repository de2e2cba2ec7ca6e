"""Whole checkpoints in the diffusers layout: diffusers -> vqbatch, vqbatch -> diffusers, strict errors, variants,
s3:// against a local moto server, and hub ids without a network."""

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from vq_reference import (assert_same_generation, hub_cache, reference_components, reference_pipeline, run_ours,
                          run_reference)

from vqbatch.pipeline import MODEL_INDEX_NAME, VQDiffusionPipeline
from vqbatch.tiny import (CODEBOOK_SIZE, MAX_PROMPT_TOKENS, TEXT_WIDTH, TRANSFORMER_CONFIG, VQVAE_CONFIG,
                          tiny_components, tiny_text_encoder, tiny_tokenizer, write_tiny_checkpoint)

# model_index.json as microsoft/vq-diffusion-ithq publishes it (library names aside, which vqbatch does not read)
ITHQ_MODEL_INDEX = {
    "_class_name": "VQDiffusionPipeline",
    "_diffusers_version": "0.11.0.dev0",
    "learned_classifier_free_sampling_embeddings": ["diffusers", "LearnedClassifierFreeSamplingEmbeddings"],
    "scheduler": ["diffusers", "VQDiffusionScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "transformer": ["diffusers", "Transformer2DModel"],
    "vqvae": ["diffusers", "VQModel"],
}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=0)


def diffusers_components(seed):
    """Random-weight diffusers components of the tiny sizes, built with diffusers' own classes."""
    from diffusers import Transformer2DModel, VQDiffusionScheduler, VQModel
    from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import \
        LearnedClassifierFreeSamplingEmbeddings

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    unconditional = LearnedClassifierFreeSamplingEmbeddings(learnable=True, hidden_size=TEXT_WIDTH,
                                                            length=MAX_PROMPT_TOKENS)
    torch.nn.init.normal_(unconditional.embeddings, std=0.2)
    return dict(vqvae=VQModel(**VQVAE_CONFIG).eval(), text_encoder=tiny_text_encoder(tokenizer), tokenizer=tokenizer,
                transformer=Transformer2DModel(**TRANSFORMER_CONFIG).eval(),
                scheduler=VQDiffusionScheduler(num_vec_classes=CODEBOOK_SIZE + 1),
                learned_classifier_free_sampling_embeddings=unconditional.eval())


def assert_same_weights(ours: torch.nn.Module, theirs: torch.nn.Module):
    our_state, their_state = ours.state_dict(), theirs.state_dict()
    assert our_state.keys() == their_state.keys()
    for key in our_state:
        assert torch.equal(our_state[key], their_state[key]), key


def files_of(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file())


# ---------------------------------------------------------------------------------------------------------------
# diffusers <-> vqbatch


def test_checkpoint_saved_by_diffusers_loads_and_generates_the_same(tmp_path):
    components = diffusers_components(seed=1)
    for name, component in components.items():
        if name == "vqvae":
            component.save_pretrained(tmp_path / name, safe_serialization=False)  # the older .bin weights
        else:
            component.save_pretrained(tmp_path / name)
    (tmp_path / MODEL_INDEX_NAME).write_text(json.dumps(ITHQ_MODEL_INDEX))
    assert (tmp_path / "vqvae" / "diffusion_pytorch_model.bin").is_file()

    pipe = VQDiffusionPipeline.from_pretrained(tmp_path)
    for name in ("vqvae", "transformer", "learned_classifier_free_sampling_embeddings", "text_encoder"):
        assert_same_weights(getattr(pipe, name), components[name])
    assert pipe.scheduler.config.num_vec_classes == CODEBOOK_SIZE + 1
    options = dict(num_inference_steps=10, truncation_rate=0.86, num_images_per_prompt=2)
    prompts = ["a red circle", "a blue star"]
    assert_same_generation(run_ours(pipe, prompts, seed=0, **options),
                           run_reference(reference_pipeline(components), prompts, seed=0, **options))


def test_checkpoint_saved_by_vqbatch_loads_into_diffusers(tiny_checkpoint):
    index = json.loads((tiny_checkpoint / MODEL_INDEX_NAME).read_text())
    assert {name: entry[1] for name, entry in index.items() if not name.startswith("_")} == {
        name: entry[1] for name, entry in ITHQ_MODEL_INDEX.items() if not name.startswith("_")}
    theirs = reference_components(tiny_checkpoint)
    ours = VQDiffusionPipeline.from_pretrained(tiny_checkpoint)
    for name in ("vqvae", "transformer", "learned_classifier_free_sampling_embeddings", "text_encoder"):
        assert_same_weights(getattr(ours, name), theirs[name])
    assert theirs["scheduler"].config.num_vec_classes == ours.scheduler.config.num_vec_classes
    assert theirs["tokenizer"].model_max_length == MAX_PROMPT_TOKENS


def test_save_then_load_round_trips(tmp_path):
    pipe = VQDiffusionPipeline(**tiny_components(seed=4))
    loaded = VQDiffusionPipeline.from_pretrained(pipe.save_pretrained(tmp_path / "saved"))
    for ours, theirs in zip(pipe.models(), loaded.models()):
        assert_same_weights(ours, theirs)
    assert loaded.scheduler.config == pipe.scheduler.config
    assert loaded.tokenizer("a red circle").input_ids == pipe.tokenizer("a red circle").input_ids


# ---------------------------------------------------------------------------------------------------------------
# strict errors


@pytest.fixture
def copy_of_tiny(tiny_checkpoint, tmp_path):
    for path in files_of(tiny_checkpoint):
        target = tmp_path / path.relative_to(tiny_checkpoint)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    return tmp_path


def edit_model_index(folder, **entries):
    path = folder / MODEL_INDEX_NAME
    path.write_text(json.dumps({**json.loads(path.read_text()), **entries}))


def test_unknown_class_names_are_refused(copy_of_tiny):
    edit_model_index(copy_of_tiny, transformer=["diffusers", "UNet2DConditionModel"])
    with pytest.raises(ValueError, match="unknown class 'UNet2DConditionModel' for component 'transformer'; "
                                         "supported: Transformer2DModel, VQDiffusionTransformer"):
        VQDiffusionPipeline.from_pretrained(copy_of_tiny)


def test_malformed_model_index_entries_are_refused(copy_of_tiny):
    edit_model_index(copy_of_tiny, scheduler="VQDiffusionScheduler")
    with pytest.raises(ValueError, match="must map 'scheduler' to \\[library, class name\\], got 'VQDiffusionScheduler'"):
        VQDiffusionPipeline.from_pretrained(copy_of_tiny)


@pytest.mark.parametrize("removed, error, message", [
    (MODEL_INDEX_NAME, FileNotFoundError, "config file not found: .*model_index.json"),
    ("vqvae", FileNotFoundError, "checkpoint has no component folder .*vqvae"),
    ("transformer/diffusion_pytorch_model.safetensors", FileNotFoundError, "no weights in .*transformer"),
    ("scheduler/scheduler_config.json", FileNotFoundError, "config file not found: .*scheduler_config.json"),
])
def test_missing_files_are_named(copy_of_tiny, removed, error, message):
    target = copy_of_tiny / removed
    if target.is_dir():
        for path in files_of(target):
            path.unlink()
        target.rmdir()
    else:
        target.unlink()
    with pytest.raises(error, match=message):
        VQDiffusionPipeline.from_pretrained(copy_of_tiny)


def test_wrongly_shaped_and_missing_weights_are_named(copy_of_tiny):
    weights = copy_of_tiny / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["out.weight"] = torch.zeros(3, 3)
    del state["norm_out.bias"]
    save_file(state, weights)
    with pytest.raises(ValueError, match=r"missing keys \(1\): norm_out.bias; wrongly shaped keys \(1\): "
                                         r"out.weight: file \(3, 3\) vs model \(64, 32\)"):
        VQDiffusionPipeline.from_pretrained(copy_of_tiny)


def test_tokenizer_without_max_length_pads_to_the_text_encoder_context(copy_of_tiny):
    config_path = copy_of_tiny / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    del config["model_max_length"]
    config_path.write_text(json.dumps(config))
    pipe = VQDiffusionPipeline.from_pretrained(copy_of_tiny)
    assert pipe.tokenizer.model_max_length == pipe.text_encoder.config.max_position_embeddings == MAX_PROMPT_TOKENS
    assert pipe("a red circle", num_inference_steps=2, output_type="latent").tokens.shape[0] == 1


# ---------------------------------------------------------------------------------------------------------------
# variants and dtypes


def test_fp16_variant_files(tmp_path):
    pipe = VQDiffusionPipeline(**tiny_components(seed=2))
    pipe.save_pretrained(tmp_path)
    pipe.to(torch.float16).save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert (tmp_path / "text_encoder" / "model.fp16.safetensors").is_file()

    half = VQDiffusionPipeline.from_pretrained(tmp_path, variant="fp16")
    assert {model.dtype for model in half.models()} == {torch.float16}
    for ours, theirs in zip(pipe.models(), half.models()):
        assert_same_weights(ours, theirs)
    upcast = VQDiffusionPipeline.from_pretrained(tmp_path, variant="fp16", torch_dtype=torch.float32)
    assert {model.dtype for model in upcast.models()} == {torch.float32}
    full = VQDiffusionPipeline.from_pretrained(tmp_path)
    assert {model.dtype for model in full.models()} == {torch.float32}
    with pytest.raises(FileNotFoundError, match="expected one of diffusion_pytorch_model.bf16.safetensors"):
        VQDiffusionPipeline.from_pretrained(tmp_path, variant="bf16")


def test_a_variant_loads_where_its_files_are_and_plain_files_elsewhere(tmp_path):
    pipe = VQDiffusionPipeline(**tiny_components(seed=2))
    pipe.save_pretrained(tmp_path)
    pipe.transformer.to(torch.float16).save_pretrained(tmp_path / "transformer", variant="fp16")  # only it has fp16
    loaded = VQDiffusionPipeline.from_pretrained(tmp_path, variant="fp16")
    assert_same_weights(loaded.transformer, pipe.transformer)
    assert_same_weights(loaded.vqvae, pipe.vqvae.to(torch.float16))  # its plain files, in the transformer's dtype
    assert loaded.dtype == torch.float16


def test_torch_dtype_and_device(tiny_checkpoint):
    pipe = VQDiffusionPipeline.from_pretrained(tiny_checkpoint, torch_dtype=torch.bfloat16, device="cpu")
    assert {model.dtype for model in pipe.models()} == {torch.bfloat16}
    assert pipe.device == torch.device("cpu") and pipe.dtype == torch.bfloat16
    images = pipe("a red circle", num_inference_steps=3, output_type="np").images
    assert np.isfinite(images).all()


# ---------------------------------------------------------------------------------------------------------------
# where checkpoints come from


def test_s3_checkpoint_is_downloaded_once_per_content_and_loads(s3_endpoint, tiny_checkpoint, tmp_path):
    client = boto3.client("s3")
    client.create_bucket(Bucket="models")
    for path in files_of(tiny_checkpoint):
        client.upload_file(str(path), "models", f"tiny/seed0/{path.relative_to(tiny_checkpoint)}")

    pipe = VQDiffusionPipeline.from_pretrained("s3://models/tiny/seed0")
    local = VQDiffusionPipeline.from_pretrained(tiny_checkpoint)
    for ours, theirs in zip(pipe.models(), local.models()):
        assert_same_weights(ours, theirs)
    cached = Path(os.environ["VQBATCH_CACHE"]) / "s3" / "models" / "tiny" / "seed0"
    (download,) = cached.iterdir()
    written = {path: path.stat().st_mtime_ns for path in files_of(download)}
    again = VQDiffusionPipeline.from_pretrained("s3://models/tiny/seed0")  # unchanged objects: the same download
    assert_same_weights(again.transformer, local.transformer)
    assert list(cached.iterdir()) == [download] and {path: path.stat().st_mtime_ns for path in written} == written

    retrained = write_tiny_checkpoint(tmp_path / "seed1", seed=1)
    weights = "transformer/diffusion_pytorch_model.safetensors"
    client.upload_file(str(retrained / weights), "models", f"tiny/seed0/{weights}")  # the object changes
    with ThreadPoolExecutor(2) as pool:  # two loaders on one machine at once: each sees a whole folder
        loaded = list(pool.map(VQDiffusionPipeline.from_pretrained, ["s3://models/tiny/seed0"] * 2))
    for pipe in loaded:
        assert_same_weights(pipe.transformer, VQDiffusionPipeline.from_pretrained(retrained).transformer)
        assert_same_weights(pipe.vqvae, local.vqvae)
    assert len(list(cached.iterdir())) == 2 and not list(cached.glob(".*"))  # a new download, no partial left
    with pytest.raises(FileNotFoundError, match="no checkpoint files under s3://models/other"):
        VQDiffusionPipeline.from_pretrained("s3://models/other")


def test_hub_id_without_network_is_a_clear_error(offline_hub):
    with pytest.raises(OSError, match="could not fetch 'vqbatch-tests/no-such-model' from the Hugging Face hub"):
        VQDiffusionPipeline.from_pretrained("vqbatch-tests/no-such-model")


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        VQDiffusionPipeline.from_pretrained(tmp_path / "nowhere" / "at" / "all")


# ---------------------------------------------------------------------------------------------------------------
# sharded weights, loading options, hub revisions

SHARD_BYTES = 20_000  # small enough that every tiny model but the embeddings is split into several shards


def shard_files_of(folder: Path, variant: str | None = None) -> list[Path]:
    stem = f"diffusion_pytorch_model.{variant}" if variant else "diffusion_pytorch_model"
    return sorted(folder.glob(f"{stem}-*-of-*.safetensors"))


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_sharded_weights_round_trip_with_diffusers_both_ways(tmp_path, variant):
    from diffusers import Transformer2DModel as TheirTransformer
    from diffusers import VQModel as TheirVQModel

    from vqbatch import VQDiffusionTransformer, VQModel

    index_name = "diffusion_pytorch_model.safetensors.index" + (f".{variant}" if variant else "") + ".json"
    for ours_class, their_class, config in ((VQModel, TheirVQModel, VQVAE_CONFIG),
                                            (VQDiffusionTransformer, TheirTransformer, TRANSFORMER_CONFIG)):
        torch.manual_seed(3)
        ours = ours_class(**config)
        ours.save_pretrained(tmp_path / "ours", variant=variant, max_shard_size=SHARD_BYTES)
        assert len(shard_files_of(tmp_path / "ours", variant)) > 1 and (tmp_path / "ours" / index_name).is_file()
        assert not list((tmp_path / "ours").glob("diffusion_pytorch_model*[!0-9].safetensors"))  # no single file
        assert_same_weights(their_class.from_pretrained(tmp_path / "ours", variant=variant), ours)

        theirs = their_class(**config)
        theirs.save_pretrained(tmp_path / "theirs", variant=variant, max_shard_size=SHARD_BYTES)
        assert len(shard_files_of(tmp_path / "theirs", variant)) > 1
        assert_same_weights(ours_class.from_pretrained(tmp_path / "theirs", variant=variant), theirs)
        assert json.loads((tmp_path / "ours" / index_name).read_text())["weight_map"].keys() == \
            json.loads((tmp_path / "theirs" / index_name).read_text())["weight_map"].keys()


def test_sharded_pipeline_round_trip_replaces_the_single_files(tmp_path):
    pipe = VQDiffusionPipeline(**tiny_components(seed=5))
    pipe.save_pretrained(tmp_path)
    pipe.save_pretrained(tmp_path, max_shard_size=SHARD_BYTES)  # over the single files of the first save
    assert not (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").exists()
    assert len(shard_files_of(tmp_path / "transformer")) > 1
    loaded = VQDiffusionPipeline.from_pretrained(tmp_path)
    for ours, theirs in zip(pipe.models(), loaded.models()):
        assert_same_weights(ours, theirs)
    options = dict(num_inference_steps=4, truncation_rate=0.9)
    assert_same_generation(run_ours(loaded, "a red circle", seed=2, **options),
                           run_reference(reference_pipeline(reference_components(tmp_path)), "a red circle", seed=2,
                                         **options))


def test_missing_shard_is_named(tmp_path):
    from vqbatch import VQModel

    VQModel(**VQVAE_CONFIG).save_pretrained(tmp_path, max_shard_size=SHARD_BYTES)
    lost = shard_files_of(tmp_path)[-1]
    lost.unlink()
    with pytest.raises(FileNotFoundError, match=f"names shard files that are missing: {lost.name}"):
        VQModel.from_pretrained(tmp_path)


def test_loading_options_as_diffusers_has_them(tiny_checkpoint):
    from vqbatch import VQDiffusionTransformer

    plain = VQDiffusionTransformer.from_pretrained(tiny_checkpoint, subfolder="transformer")
    model, info = VQDiffusionTransformer.from_pretrained(tiny_checkpoint, subfolder="transformer", dtype=torch.float16,
                                                        low_cpu_mem_usage=False, output_loading_info=True)
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    assert model.dtype == torch.float16 and not model.training
    assert_same_weights(model, plain.to(torch.float16))
    with pytest.raises(ValueError, match="torch_dtype=torch.float32 and dtype=torch.float16 disagree"):
        VQDiffusionTransformer.from_pretrained(tiny_checkpoint, subfolder="transformer", torch_dtype=torch.float32,
                                               dtype=torch.float16)
    for keyword in ("torch_dtype", "dtype"):
        with pytest.raises(ValueError, match=f"{keyword} must be a torch.dtype such as torch.float16, got 'float16'"):
            VQDiffusionPipeline.from_pretrained(tiny_checkpoint, **{keyword: "float16"})
    pipe = VQDiffusionPipeline.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16, low_cpu_mem_usage=False)
    assert {model.dtype for model in pipe.models()} == {torch.bfloat16}
    with pytest.raises(FileNotFoundError, match="expected one of diffusion_pytorch_model.bin"):
        VQDiffusionPipeline.from_pretrained(tiny_checkpoint, use_safetensors=False)


def test_components_given_by_name_replace_the_checkpoints(tiny_checkpoint):
    from vqbatch import VQDiffusionScheduler, VQDiffusionTransformer

    scheduler = VQDiffusionScheduler(num_vec_classes=CODEBOOK_SIZE + 1, num_train_timesteps=50)
    pipe = VQDiffusionPipeline.from_pretrained(tiny_checkpoint, scheduler=scheduler)
    assert pipe.scheduler is scheduler
    assert pipe("a red circle", num_inference_steps=50, output_type="latent").tokens.shape[0] == 1
    transformer = VQDiffusionTransformer.from_pretrained(tiny_checkpoint, subfolder="transformer", dtype=torch.float16)
    pipe = VQDiffusionPipeline.from_pretrained(tiny_checkpoint, transformer=transformer)
    assert pipe.transformer is transformer and {model.dtype for model in pipe.models()} == {torch.float16}
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['shceduler'\]; components that may be "
                                        r"passed: vqvae, .*, scheduler"):
        VQDiffusionPipeline.from_pretrained(tiny_checkpoint, shceduler=scheduler)


def test_progress_bar_as_diffusers_has_it(tiny_checkpoint):
    import io

    pipe = VQDiffusionPipeline.from_pretrained(tiny_checkpoint)
    shown = io.StringIO()
    pipe(["a red circle"], num_inference_steps=3, output_type="latent")  # hidden by default: nothing to capture
    pipe.set_progress_bar_config(disable=False, file=shown, desc="sampling")
    pipe(["a red circle"], num_inference_steps=3, output_type="latent")
    assert "sampling" in shown.getvalue() and "3/3" in shown.getvalue()
    with pipe.progress_bar(total=5) as bar:
        bar.update(5)
    assert "5/5" in shown.getvalue()
    with pytest.raises(ValueError, match="exactly one of iterable and total"):
        pipe.progress_bar()


def test_a_component_fetches_only_its_folder_of_a_hub_snapshot(offline_hub, tmp_path, monkeypatch):
    import huggingface_hub

    from vqbatch import VQDiffusionScheduler, VQModel

    pipe = VQDiffusionPipeline(**tiny_components(seed=6))
    hub_cache(offline_hub, "vqbatch-tests/tiny", {"main": pipe.save_pretrained(tmp_path / "main")})
    fetched, snapshot_download = [], huggingface_hub.snapshot_download

    def recording_snapshot_download(repo_id, **options):
        fetched.append(options["allow_patterns"])
        return snapshot_download(repo_id, **options)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", recording_snapshot_download)
    assert_same_weights(VQModel.from_pretrained("vqbatch-tests/tiny", subfolder="vqvae"), pipe.vqvae)
    assert VQDiffusionScheduler.from_pretrained("vqbatch-tests/tiny", subfolder="scheduler").config == \
        pipe.scheduler.config
    VQDiffusionPipeline.from_pretrained("vqbatch-tests/tiny")
    assert fetched == [["vqvae/*"], ["scheduler/*"], None]  # the other components' weights stay on the hub


def test_hub_id_loads_its_revision_from_the_hub_cache(offline_hub, tmp_path):
    full = VQDiffusionPipeline(**tiny_components(seed=6))
    half = VQDiffusionPipeline(**tiny_components(seed=7)).to(torch.float16)
    hub_cache(offline_hub, "vqbatch-tests/tiny", {"main": full.save_pretrained(tmp_path / "main"),
                                                  "fp16": half.save_pretrained(tmp_path / "fp16")})
    main = VQDiffusionPipeline.from_pretrained("vqbatch-tests/tiny")
    assert_same_weights(main.transformer, full.transformer)
    fp16 = VQDiffusionPipeline.from_pretrained("vqbatch-tests/tiny", torch_dtype=torch.float16, revision="fp16")
    assert fp16.dtype == torch.float16
    assert_same_weights(fp16.transformer, half.transformer)
    from vqbatch import VQDiffusionScheduler, VQModel

    assert_same_weights(VQModel.from_pretrained("vqbatch-tests/tiny", subfolder="vqvae", revision="fp16"), half.vqvae)
    assert VQDiffusionScheduler.from_pretrained("vqbatch-tests/tiny", subfolder="scheduler",
                                                revision="fp16").config == half.scheduler.config
    config = VQModel.load_config("vqbatch-tests/tiny", subfolder="vqvae", revision="fp16")
    assert config == half.vqvae.config and VQModel.from_config(config).config == half.vqvae.config
    assert VQDiffusionScheduler.load_config("vqbatch-tests/tiny", subfolder="scheduler") == full.scheduler.config
    with pytest.raises(OSError, match="'vqbatch-tests/tiny' at revision 'v2'"):
        VQDiffusionPipeline.from_pretrained("vqbatch-tests/tiny", revision="v2")
