"""Saving and loading model weights in the diffusers layout: `config.json` + `diffusion_pytorch_model.*`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
import torch
from torch import nn

from vqbatch.configuration import Configured
from vqbatch.hub import local_checkpoint

WEIGHTS_NAME = "diffusion_pytorch_model"


def weights_file(folder: Path, variant: str | None) -> Path:
    """The weights file of a component folder: safetensors preferred over .bin, `variant` in the name."""
    stem = f"{WEIGHTS_NAME}.{variant}" if variant else WEIGHTS_NAME
    for suffix in (".safetensors", ".bin"):
        candidate = folder / (stem + suffix)
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no weights in {folder}: expected {stem}.safetensors or {stem}.bin")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


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
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @classmethod
    def from_pretrained(cls, path: str | Path, subfolder: str | None = None, torch_dtype: torch.dtype | None = None,
                        variant: str | None = None, device: str | torch.device | None = None):
        folder = local_checkpoint(path) / subfolder if subfolder else local_checkpoint(path)
        config = cls.load_config(folder)
        source = weights_file(folder, variant)
        with torch.device("meta"):
            model = cls.from_config(config)
        state = model.rename_legacy_keys(read_state_dict(source))
        check_state_dict(model, state, str(source))
        if torch_dtype is not None:
            state = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in state.items()}
        model.load_state_dict(state, strict=True, assign=True)
        return model.to(device=device).eval() if device is not None else model.eval()

    def rename_legacy_keys(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map key names of older checkpoint layouts to this model's names; by default there are none."""
        return state

    def save_pretrained(self, directory: str | Path, variant: str | None = None, safe_serialization: bool = True) -> None:
        folder = Path(directory)
        self.save_config(folder)
        stem = f"{WEIGHTS_NAME}.{variant}" if variant else WEIGHTS_NAME
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if safe_serialization:
            from safetensors.torch import save_file

            save_file(state, str(folder / f"{stem}.safetensors"), metadata={"format": "pt"})
        else:
            torch.save(state, folder / f"{stem}.bin")
