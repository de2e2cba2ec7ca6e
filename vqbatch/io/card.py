"""The dataset card: `README.md` at the output root, in the Hugging Face dataset-card form, rewritten at each publish.

    ---                               YAML header: what `datasets.load_dataset(<output>)` and the Hub read
    pretty_name, task_categories, tags
    configs: default -> the published metadata files (the manifest's), one `train` split
    dataset_info: features            one per metadata column, typed as the Parquet files are
    ---
    prose                             the model, the parameters, the counts per version, the seed contract, how
                                      to load the dataset in its format
"""

from __future__ import annotations

import pyarrow as pa
import yaml

from vqbatch.io.filesystems import write_bytes_atomically
from vqbatch.io.formats import IMAGE_STRUCT

CARD_NAME = "README.md"
CARD_MARKER = "written by vqbatch"  # in every card's text: a README.md without it is not a card vqbatch wrote
# the Arrow types whose name in `datasets` differs from Arrow's own (`str(type)`), which it uses for every other one
ARROW_TO_HF = {pa.float16(): "float16", pa.float32(): "float32", pa.float64(): "float64", pa.date32(): "date32",
               pa.date64(): "date64"}


# Where each `output.format` keeps the images, and how to load them (the card's first recipe)
STORED = {"files": "one file per image under `versions/vNNNN/images/`",
          "webdataset": "in WebDataset tar shards (`manifest.json`'s `data_files`: `<key>.<image format>`, "
                        "`<key>.json` with the row's metadata, `<key>.tokens.npy`)",
          "parquet": "inside the metadata Parquet files (`image`: a struct {bytes, path}, an HF `Image`)"}
HF_LOAD = """from datasets import load_dataset

rows = load_dataset("<this folder>", split="train")   # one row per image: id, prompt, seed, tokens, image, ...
# `image` is {} (null on error rows)"""
LOAD = {
    "files": HF_LOAD.format("a path relative to this folder"),
    "webdataset": """import json, webdataset

manifest = json.load(open("<this folder>/manifest.json"))    # `data_files`: the tars, which hold the ok rows
samples = webdataset.WebDataset(["<this folder>/" + name for name in manifest["data_files"]], shardshuffle=False)
samples = samples.decode("pil")   # a dict per ok row: the image (under png, jpg or webp), json, tokens.npy""",
    "parquet": HF_LOAD.format("an HF `Image`"),
}


def is_dataset_card(text: bytes) -> bool:
    """Whether a `README.md`'s bytes are a card vqbatch wrote."""
    return CARD_MARKER.encode() in text


def hf_feature(field: pa.Field) -> dict:
    """One `dataset_info.features` entry: the column's name and type (`hf_type`)."""
    return {"name": field.name, **hf_type(field.type)}


def hf_type(data_type: pa.DataType) -> dict:
    """A column type as `datasets` writes it in a card: {"dtype": name}, {"struct": [entries]}, {"list" or
    "large_list": item type (and "length" for a fixed-size list)}; the parquet format's `image` struct {bytes, path}
    is HF's `image` type, a dictionary-encoded column its values' type."""
    if data_type == IMAGE_STRUCT:
        return {"dtype": "image"}
    if pa.types.is_dictionary(data_type):
        return hf_type(data_type.value_type)
    if pa.types.is_struct(data_type):
        return {"struct": [hf_feature(data_type.field(index)) for index in range(data_type.num_fields)]}
    if pa.types.is_list(data_type) or pa.types.is_large_list(data_type) or pa.types.is_fixed_size_list(data_type):
        item = hf_type(data_type.value_type)
        item = item.get("dtype", item.get("struct", item))  # a name, the fields of a struct, or a nested list
        length = {"length": data_type.list_size} if pa.types.is_fixed_size_list(data_type) else {}
        return {"large_list" if pa.types.is_large_list(data_type) else "list": item, **length}
    return {"dtype": ARROW_TO_HF.get(data_type, str(data_type))}


def card_header(manifest: dict, schema: pa.Schema) -> dict:
    return {
        "pretty_name": "vqbatch synthetic images",
        "task_categories": ["text-to-image"],
        "tags": ["synthetic", "vq-diffusion", "vqbatch"],
        "configs": [{"config_name": "default", "data_files": [
            {"split": "train", "path": [shard["file"] for shard in manifest["metadata_files"]]}]}],
        "dataset_info": {"features": [hf_feature(field) for field in schema],
                         "splits": [{"name": "train", "num_examples": manifest["rows"]}]},
    }


def card_text(manifest: dict, schema: pa.Schema) -> str:
    header = yaml.safe_dump(card_header(manifest, schema), sort_keys=False, allow_unicode=True)
    model, sampling, output = manifest["model"], manifest["sampling"], manifest["output"]
    output_format = output.get("format", "files")
    versions = "\n".join(
        f"| {entry['version']} | {entry['created']} | `{entry['fingerprint']}` | {entry['rows_added']} | "
        f"{entry['rows_ok']} | {entry['rows_failed']} |" for entry in manifest["versions"])
    versions = versions or "| - | - | - | - | - | - |"  # a dataset written without versions (`vqbatch rerun`)
    parameters = ", ".join(f"`{name}={value}`" for name, value in sampling.items())
    return f"""---
{header}---

# vqbatch synthetic images

Text-to-image samples of **VQ-Diffusion** {CARD_MARKER}: {manifest['rows']} rows,
{manifest['ok']} with an image and {manifest['errors']} error rows (each with the reason in `error`).

## Model and parameters

- Model: `{model['uri']}` ({model['dtype']})
- Sampling: {parameters}
- Images: {output['image_format']} (quality {output['image_quality']} for jpeg/webp), {STORED[output_format]}

## Versions

| version | created | fingerprint | rows added | ok | failed |
| --- | --- | --- | --- | --- | --- |
{versions}

The published rows are the metadata files listed in `manifest.json` (and in this card's `configs`); a row's key is
(`id`, `image_index`). `manifest.json` also holds every version's full generation fingerprint.

## Seeds: every image can be made again

An image's seed is its row's `seed` column. It was sampled with `torch.Generator().manual_seed(seed)` alone, so
`VQDiffusionPipeline(...)(prompt, generator=torch.Generator().manual_seed(seed), <the parameters above>)` returns
its `tokens` again; `vqbatch rerun --output <this folder> --ids <id>` and `vqbatch verify` do it for you, and
`vqbatch decode <this folder> --ids <id> --to DIR` re-renders the image from the stored tokens.

## Load it

```python
{LOAD[output_format]}
```

```python
import pyarrow.parquet as pq, json

manifest = json.load(open("<this folder>/manifest.json"))
table = pq.read_table(["<this folder>/" + shard["file"] for shard in manifest["metadata_files"]])
```

Look at it: `vqbatch report <this folder>` writes `report/report.html` (sampled images with their prompts,
versions, errors, speed); `vqbatch inspect <this folder>` prints a summary.
"""


def write_dataset_card(location, manifest: dict, schema: pa.Schema) -> None:
    """Write `README.md` at the output root for the published `manifest` (metadata columns `schema`)."""
    write_bytes_atomically(location.filesystem, location.path(CARD_NAME),
                           card_text(manifest, schema).encode("utf-8"))
