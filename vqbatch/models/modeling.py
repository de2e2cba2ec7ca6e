"""Saving and loading model weights in the diffusers layout: `config.json` + `diffusion_pytorch_model.*`."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from pathlib import Path
import torch
from torch import nn

from vqbatch.configuration import Configured, write_json
from vqbatch.hub import component_folder
from vqbatch.models.weight_files import find_weight_files, index_file_name, shard_name_pattern, single_file_name

LOADING_INFO_KEYS = ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")  # diffusers' loading info
DEFAULT_MAX_SHARD_SIZE = "10GB"  # diffusers' default: larger state dicts are written as shards


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def read_weight_files(paths: list[Path]) -> dict[str, torch.Tensor]:
    """One state dict from a single file or from every shard of an index."""
    state: dict[str, torch.Tensor] = {}
    for path in paths:
        state.update(read_state_dict(path))
    return state


def resolve_dtype(torch_dtype: torch.dtype | None, dtype: torch.dtype | None) -> torch.dtype | None:
    """`dtype` is diffusers' newer name for `torch_dtype`; either may be given, both only when they agree."""
    for name, value in (("torch_dtype", torch_dtype), ("dtype", dtype)):
        if value is not None and not isinstance(value, torch.dtype):
            raise ValueError(f"{name} must be a torch.dtype such as torch.float16, got {value!r}")
    if torch_dtype is not None and dtype is not None and torch_dtype != dtype:
        raise ValueError(f"torch_dtype={torch_dtype} and dtype={dtype} disagree; give one of them (dtype is the "
                         "newer name of torch_dtype)")
    return dtype if dtype is not None else torch_dtype


def remove_stale_weights(folder: Path, weight_format: str, variant: str | None) -> None:
    """Delete the weight files an earlier save of this format and variant left (a single file, an index, shards),
    so the folder never holds two versions of the weights."""
    stale = [folder / single_file_name(weight_format, variant), folder / index_file_name(weight_format, variant)]
    stale += folder.glob(shard_name_pattern(weight_format, variant).replace("{suffix}", "-*-of-*"))
    for path in stale:
        path.unlink(missing_ok=True)


def write_weights(state: dict[str, torch.Tensor], folder: Path, variant: str | None, safe_serialization: bool,
                  max_shard_size: int | str) -> None:
    """One weights file, or shards and their index when the state dict is larger than `max_shard_size`."""
    from huggingface_hub import split_torch_state_dict_into_shards

    weight_format = "safetensors" if safe_serialization else "bin"
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size,
                                               filename_pattern=shard_name_pattern(weight_format, variant))
    remove_stale_weights(folder, weight_format, variant)
    for filename, names in split.filename_to_tensors.items():
        shard = {name: state[name] for name in names}
        if safe_serialization:
            from safetensors.torch import save_file

            save_file(shard, str(folder / filename), metadata={"format": "pt"})
        else:
            torch.save(shard, folder / filename)
    if split.is_sharded:
        write_json(folder / index_file_name(weight_format, variant),
                   {"metadata": dict(split.metadata), "weight_map": split.tensor_to_filename})


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Strict loading: name every missing, unexpected and wrongly shaped key in one error."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                 for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    problems = [f"{label} ({len(keys)}): {', '.join(keys[:20])}{' ...' if len(keys) > 20 else ''}"
                for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("wrongly shaped keys", misshaped)) if keys]
    if problems:
        raise ValueError(f"{type(model).__name__} weights from {source} do not fit its config: " + "; ".join(problems))


class PretrainedModel(nn.Module, Configured):
    """An `nn.Module` with a validated config that reads and writes a diffusers component folder.

    Subclasses keep every tensor they need in parameters or persistent buffers, so a model built on the meta
    device and filled from a file has no tensor left to initialise.
    """

    @property
    def dtype(self) -> torch.dtype:
        """The first parameter's or buffer's dtype; the default dtype for a model without tensors."""
        tensor = self.first_tensor()
        return tensor.dtype if tensor is not None else torch.get_default_dtype()

    @property
    def device(self) -> torch.device:
        """The first parameter's or buffer's device; the CPU for a model without tensors."""
        tensor = self.first_tensor()
        return tensor.device if tensor is not None else torch.device("cpu")

    def first_tensor(self) -> torch.Tensor | None:
        return next(itertools.chain(self.parameters(), self.buffers()), None)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, subfolder: str | None = None,
                        torch_dtype: torch.dtype | None = None, variant: str | None = None,
                        device: str | torch.device | None = None, *, dtype: torch.dtype | None = None,
                        revision: str | None = None, use_safetensors: bool | None = None,
                        low_cpu_mem_usage: bool = True, output_loading_info: bool = False):
        """Load a diffusers component folder: a local path, an s3:// URI or a hub id (at `revision`), plus
        `subfolder`. Weights come from one file or from the shards of a `*.index.json`; `variant` picks
        `*.<variant>.*` files. `low_cpu_mem_usage=True` builds the model without weights and assigns the loaded
        tensors (one copy in memory); False builds it initialised, then copies them in: the same model.
        `output_loading_info=True` returns `(model, info)` like diffusers; loading is strict, so a checkpoint that
        does not fit fails with every problem named and the info's lists are empty."""
        folder = component_folder(pretrained_model_name_or_path, subfolder, revision)
        config = cls.load_config(folder)
        sources = find_weight_files(folder, variant, use_safetensors)
        with torch.device("meta" if low_cpu_mem_usage else "cpu"):
            model = cls.from_config(config)
        state = model.rename_legacy_keys(read_weight_files(sources))
        check_state_dict(model, state, ", ".join(map(str, sources)))
        torch_dtype = resolve_dtype(torch_dtype, dtype)
        if torch_dtype is not None:
            state = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in state.items()}
        model.load_state_dict(state, strict=True, assign=low_cpu_mem_usage)
        if torch_dtype is not None and not low_cpu_mem_usage:
            model.to(torch_dtype)
        model = model.to(device=device).eval() if device is not None else model.eval()
        return (model, {key: [] for key in LOADING_INFO_KEYS}) if output_loading_info else model

    def rename_legacy_keys(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map key names of older checkpoint layouts to this model's names; by default there are none."""
        return state

    def save_pretrained(self, save_directory: str | Path, variant: str | None = None, safe_serialization: bool = True,
                        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> None:
        """Write `config.json` and the weights, as shards with a `*.index.json` past `max_shard_size` (an int of
        bytes or a string such as "5GB", as diffusers takes it)."""
        folder = Path(save_directory)
        self.save_config(folder)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        write_weights(state, folder, variant, safe_serialization, max_shard_size)
