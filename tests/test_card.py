"""The dataset card: `README.md` at the output root that `datasets` and `huggingface_hub` read as a dataset card."""

import copy
import datetime
import json

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from huggingface_hub import DatasetCard

from conftest import SMALL_DATASET_OK
from vqbatch.config import load_job_config
from vqbatch.io.card import CARD_NAME, card_text
from vqbatch.io.dataset import prepare_output, publish
from vqbatch.io.formats import METADATA_SCHEMA, metadata_schema, sampled_table, write_shard


def test_each_publish_writes_a_card_that_datasets_loads(small_dataset):
    card = DatasetCard.load(small_dataset / CARD_NAME)
    manifest = json.loads((small_dataset / "manifest.json").read_text())
    files = [shard["file"] for shard in manifest["metadata_files"]]
    assert card.data.configs == [{"config_name": "default", "data_files": [{"split": "train", "path": files}]}]
    assert "text-to-image" in card.data.task_categories
    rows = datasets.load_dataset(str(small_dataset), split="train")
    assert rows.num_rows == SMALL_DATASET_OK + 2 and rows.column_names == metadata_schema("files").names
    assert rows.features["tokens"] == datasets.List(datasets.Value("int32"))
    assert rows.features["seed"] == datasets.Value("int64")
    text = card.text
    assert f"`{manifest['model']['uri']}` ({manifest['model']['dtype']})" in text and "`steps=2`" in text
    assert f"{SMALL_DATASET_OK} with an image and 2 error rows" in text
    assert "torch.Generator().manual_seed(seed)" in text and "load_dataset(" in text


def test_the_card_lists_every_version_and_only_the_published_files(small_dataset):
    manifest = json.loads((small_dataset / "manifest.json").read_text())
    second = copy.deepcopy(manifest["versions"][0])
    second.update(version=2, fingerprint="0123456789abcdef", rows_added=3)
    manifest["versions"].append(second)
    manifest["metadata_files"] = manifest["metadata_files"][:1]
    text = card_text(manifest, METADATA_SCHEMA)
    header = yaml.safe_load(text.split("---\n")[1])
    assert header["configs"][0]["data_files"][0]["path"] == [manifest["metadata_files"][0]["file"]]
    assert "| 2 |" in text and "`0123456789abcdef` | 3 |" in text
    assert [feature["name"] for feature in header["dataset_info"]["features"]] == METADATA_SCHEMA.names


@pytest.mark.parametrize("output_format", ["files", "webdataset", "parquet"])
def test_the_cards_first_recipe_loads_the_dataset_in_its_format(output_format, tmp_path, monkeypatch):
    output = tmp_path / "out"
    config = load_job_config(None, {"input.paths": "x", "model.uri": "noop", "output.uri": str(output),
                                    "output.format": output_format})
    rows = pa.table({"id": ["ok", "bad"], "prompt": ["red", " "], "image_index": pa.array([0, 0], pa.int32()),
                     "seed": [1, 2], "status": ["ok", "error"], "error": [None, "prompt is empty"]})
    sampled = sampled_table(rows, [[3, 4], None], [np.full((4, 4, 3), 9, np.uint8), None])
    publish(prepare_output(config.output, config.s3), [write_shard(sampled, config)], ["x"], config)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))

    text = DatasetCard.load(output / CARD_NAME).text
    assert ("versions/vNNNN/images/" in text) == (output_format == "files")  # where the images are
    recipe = text.split("## Load it", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    names = {}
    exec(recipe.replace("<this folder>", str(output)), names)
    if output_format == "webdataset":
        [sample] = list(names["samples"])
        assert sample["json"]["id"] == "ok" and sample["tokens.npy"].tolist() == [3, 4]
        assert np.asarray(sample["png"]).tolist() == np.full((4, 4, 3), 9).tolist()
    else:
        image = names["rows"].features["image"]
        assert image == (datasets.Image() if output_format == "parquet" else datasets.Value("string"))
        assert sorted(names["rows"]["id"]) == ["bad", "ok"]


def test_kept_columns_of_any_arrow_type_are_typed_as_datasets_types_them(small_dataset, tmp_path):
    manifest = json.loads((small_dataset / "manifest.json").read_text())
    table = pq.read_table([str(small_dataset / shard["file"]) for shard in manifest["metadata_files"]])
    rows = table.num_rows
    kept = {"taken": pa.array([datetime.date(2024, 1, 1 + i) for i in range(rows)], pa.date32()),
            "score": pa.array([i / 2 for i in range(rows)], pa.float32()),
            "exif": pa.array([{"iso": i, "lens": ["a", "b"]} for i in range(rows)]),
            "boxes": pa.array([[[i, i + 1]] for i in range(rows)], pa.list_(pa.list_(pa.int32()))),
            "crop": pa.array([[i, i, 8] for i in range(rows)], pa.list_(pa.int16(), 3)),
            "tags": pa.array([[f"t{i}"] for i in range(rows)], pa.large_list(pa.string())),
            "source": pa.array(["web"] * rows).dictionary_encode(),
            "when": pa.array([i for i in range(rows)], pa.timestamp("ms", tz="UTC"))}
    for name, column in kept.items():
        table = table.append_column(name, column)
    (tmp_path / "versions").mkdir()
    pq.write_table(table, tmp_path / "versions" / "part-0.parquet")
    manifest["metadata_files"] = [{**manifest["metadata_files"][0], "file": "versions/part-0.parquet", "rows": rows}]
    (tmp_path / CARD_NAME).write_text(card_text(manifest, table.schema))
    loaded = datasets.load_dataset(str(tmp_path), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert loaded.features == datasets.Features.from_arrow_schema(table.schema)
    assert loaded[3]["exif"] == {"iso": 3, "lens": ["a", "b"]} and loaded[3]["taken"] == datetime.date(2024, 1, 4)
