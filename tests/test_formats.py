"""Output formats end to end on a real local Ray: files, webdataset and parquet, on local folders and on moto's S3
server, read back with HF `datasets`, `webdataset`, pyarrow and DuckDB as the README's recipes do, and
`read_dataset`'s one published view after a refresh under a changed fingerprint."""

import io
import json
import tarfile
import warnings
from pathlib import Path

import boto3
import datasets as hf_datasets
import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset
from ray.util.annotations import RayDeprecationWarning

from conftest import published_dataset
from vqbatch import read_dataset
from vqbatch.config import load_job_config
from vqbatch.engine import refresh, run_job
from vqbatch.io.dataset import prepare_output, publish
from vqbatch.io.formats import sampled_table, tar_members, write_shard
from vqbatch.io.images import decode_image
from vqbatch.proof import rerun, verify
from vqbatch.keys import sample_key
from vqbatch.tiny import write_tiny_checkpoint

FORMATS = ["files", "webdataset", "parquet"]
README = Path(__file__).resolve().parents[1] / "README.md"
PROMPTS = 6  # p3 has a blank prompt: its two rows are error rows
IMAGES_PER_PROMPT = 2


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, local_ray):
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny", seed=0))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory, local_ray):
    path = tmp_path_factory.mktemp("prompts") / "prompts.parquet"
    ids = [f"p{i}" for i in range(PROMPTS)]
    texts = [" " if i == 3 else f"a small shape number {i}" for i in range(PROMPTS)]
    pq.write_table(pa.table({"id": ids, "prompt": texts, "licence": [f"cc-by-{i}" for i in range(PROMPTS)],
                             "split": ["train" if i % 2 else "test" for i in range(PROMPTS)]}), path)
    return str(path)


def job(prompts, output, output_format, model="noop", **overrides):
    return load_job_config(None, {"input.paths": [prompts], "output.uri": str(output), "model.uri": model,
                                  "output.format": output_format, "input.keep_columns": ["licence", "split"],
                                  "sampling.steps": 2, "sampling.images_per_prompt": IMAGES_PER_PROMPT,
                                  "compute.batch_size": 4, "compute.max_actors": 1, "compute.cpus_per_actor": 0.5,
                                  "output.rows_per_file": 5, **overrides})


def data_files(root: Path) -> list[str]:
    """The README's recipe: the manifest lists the published view's files."""
    return [str(root / name) for name in json.loads((root / "manifest.json").read_text())["data_files"]]


def load_with_its_reader(root: Path, output_format: str) -> dict:
    """{(id, image_index): (decoded image, prompt, seed, tokens, licence)} of every ok row, read by the tool a
    trainer would use for `output_format`: HF datasets (imagefolder / parquet) or webdataset."""
    files = data_files(root)
    cache = str(root.parent / f"hf-cache-{root.name}")
    if output_format == "webdataset":
        samples = webdataset.WebDataset(files, shardshuffle=False, empty_check=False).decode("rgb8")
        return {(sample["json"]["id"], sample["json"]["image_index"]):
                (sample["png"], sample["json"]["prompt"], sample["json"]["seed"], sample["tokens.npy"].tolist(),
                 sample["json"]["licence"]) for sample in samples}
    if output_format == "files":
        loaded = hf_datasets.load_dataset("imagefolder", data_files=files, split="train", cache_dir=cache,
                                          metadata_filenames=[Path(name).name for name in files])
    else:
        loaded = hf_datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=cache)
    assert isinstance(loaded.features["image"], hf_datasets.Image)
    return {(row["id"], row["image_index"]): (np.asarray(row["image"].convert("RGB")), row["prompt"], row["seed"],
                                              row["tokens"], row["licence"])
            for row in loaded if row["status"] == "ok"}


def check_rows_match_metadata(root: Path, output_format: str, uri: str | None = None) -> pa.Table:
    """Every published row once; each ok row's image, prompt, seed, tokens and kept columns as its reader sees them
    equal what `read_dataset` says."""
    rows = read_dataset(uri or str(root), images=True)
    keys = list(zip(rows.column("id").to_pylist(), rows.column("image_index").to_pylist()))
    assert sorted(keys) == sorted((f"p{i}", k) for i in range(PROMPTS) for k in range(IMAGES_PER_PROMPT))
    ok = [row for row in rows.to_pylist() if row["status"] == "ok"]
    assert len(ok) == (PROMPTS - 1) * IMAGES_PER_PROMPT
    loaded = load_with_its_reader(root, output_format)
    assert sorted(loaded) == sorted((row["id"], row["image_index"]) for row in ok)
    for row in ok:
        image, prompt, seed, tokens, licence = loaded[(row["id"], row["image_index"])]
        np.testing.assert_array_equal(image, decode_image(row["image"]["bytes"]))
        assert (prompt, seed, tokens, licence) == (row["prompt"], row["seed"], row["tokens"], row["licence"])
        assert row["split"] == ("train" if int(row["id"][1:]) % 2 else "test")
    return rows


@pytest.mark.parametrize("output_format", FORMATS)
def test_each_format_reads_back_with_its_tools_verifies_and_reruns(output_format, prompts, tiny_model, tmp_path):
    output = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RayDeprecationWarning)  # vqbatch's own Ray calls use no deprecated argument
        summary = run_job(job(prompts, output, output_format, tiny_model))
    assert (summary.rows, summary.errors) == (PROMPTS * IMAGES_PER_PROMPT, IMAGES_PER_PROMPT)
    rows = check_rows_match_metadata(output, output_format)
    assert len({row["image"]["bytes"] for row in rows.to_pylist() if row["image"]}) > 1  # the tiny model's images

    report = verify(str(output), sample=100, batch_size=2)
    assert report.passed and len(report.checks) == (PROMPTS - 1) * IMAGES_PER_PROMPT
    reran = rerun(str(output), ids=["p1"], into=str(tmp_path / "rerun"), batch_size=2)
    again = read_dataset(reran.output_uri, images=True).to_pylist()
    originals = {(row["id"], row["image_index"]): row for row in rows.to_pylist()}
    assert sorted((row["id"], row["image_index"]) for row in again) == [("p1", 0), ("p1", 1)]
    for row in again:
        original = originals[(row["id"], row["image_index"])]
        assert row["tokens"] == original["tokens"] and row["licence"] == original["licence"]
        np.testing.assert_array_equal(decode_image(row["image"]["bytes"]), decode_image(original["image"]["bytes"]))


@pytest.mark.parametrize("output_format", FORMATS)
def test_s3_output_of_each_format(output_format, prompts, s3_endpoint, tmp_path):
    s3 = boto3.client("s3")
    bucket = f"formats-{output_format}"
    s3.create_bucket(Bucket=bucket)
    run_job(job(prompts, f"s3://{bucket}/out", output_format, **{  # Ray workers get the endpoint from the config
        "s3.endpoint_url": s3_endpoint, "s3.access_key_id": "testing", "s3.secret_access_key": "testing"}))
    local = tmp_path / "copy"  # the published view, copied down as a trainer's loader would read it
    manifest = json.loads(s3.get_object(Bucket=bucket, Key="out/manifest.json")["Body"].read())
    for name in ["manifest.json", *published_files(s3, bucket, manifest, output_format)]:
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, f"out/{name}", str(local / name))
    check_rows_match_metadata(local, output_format, uri=f"s3://{bucket}/out")


def published_files(s3, bucket: str, manifest: dict, output_format: str) -> list[str]:
    if output_format != "files":
        return manifest["data_files"]
    images = [item["Key"].removeprefix("out/") for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix="out/versions/v0001/images/") for item in page["Contents"]]
    return [*manifest["data_files"], *images]


def readme_recipes(output_format: str) -> str:
    """The README's reading recipes that apply to `output_format`, as one script (the `...` loop body runs)."""
    section = README.read_text().split("## Read the dataset", 1)[1].split("\n## ", 1)[0]
    blocks = [block.split("\n", 1)[1] for block in section.split("```python")[1:]]
    blocks = [block.split("```", 1)[0] for block in blocks]
    manifest, hf, wds, metadata = blocks
    chosen = {"files": hf.split("\n", 2)[0] + "\n" + hf.split("\n", 2)[2],
              "parquet": "\n".join(hf.splitlines()[:2]), "webdataset": wds}[output_format]
    return "\n".join([manifest, chosen, metadata])


@pytest.mark.parametrize("output_format", FORMATS)
def test_a_refresh_under_a_changed_fingerprint_is_one_row_per_key(output_format, prompts, tmp_path, monkeypatch):
    output = tmp_path / "out" / "run1"
    run_job(job(prompts, output, output_format))
    summary = refresh(job(prompts, output, output_format, **{"sampling.steps": 3}), allow_new_fingerprint=True)
    assert summary.version == 2 and summary.rows == PROMPTS * IMAGES_PER_PROMPT

    rows = read_dataset(str(output))
    assert rows.num_rows == PROMPTS * IMAGES_PER_PROMPT and set(rows.column("steps").to_pylist()) == {3}
    globbed = sorted(output.glob("versions/*/part-*.parquet"))  # what the user globbed: both versions
    assert pq.read_table(globbed).num_rows == 2 * rows.num_rows
    metadata = [str(output / shard["file"]) for shard in json.loads((output / "manifest.json").read_text())[
        "metadata_files"]]
    query = f"select count(*), count(distinct (id, image_index)) from read_parquet({metadata})"
    counted = duckdb.sql(query).fetchall()[0]
    assert counted == (rows.num_rows, rows.num_rows)  # the DuckDB recipe reads the manifest's files
    if output_format == "webdataset":
        samples = list(webdataset.WebDataset(data_files(output), shardshuffle=False))
        assert len(samples) == len({sample["__key__"] for sample in samples}) == (PROMPTS - 1) * IMAGES_PER_PROMPT

    monkeypatch.chdir(tmp_path)  # the recipes read `out/run1`
    monkeypatch.setattr(hf_datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    names = {}
    exec(readme_recipes(output_format), names)
    assert names["table"].num_rows == rows.num_rows
    loaded = list(names["samples"]) if output_format == "webdataset" else names["ds"]
    assert len(loaded) == (PROMPTS - 1) * IMAGES_PER_PROMPT if output_format == "webdataset" else rows.num_rows


def test_a_refresh_carrying_other_input_columns_is_a_changed_fingerprint_so_every_row_has_them(prompts, tmp_path):
    output = tmp_path / "out"
    run_job(job(prompts, output, "parquet", **{"input.keep_columns": ["licence"]}))
    more = job(prompts, output, "parquet")  # licence and split
    with pytest.raises(ValueError, match=r"changed.*encoding.keep_columns: \['licence'\] -> \['licence', 'split'\]"):
        refresh(more)
    assert refresh(more, allow_new_fingerprint=True).version == 2
    rows = read_dataset(str(output))
    assert rows.num_rows == PROMPTS * IMAGES_PER_PROMPT and None not in rows.column("split").to_pylist()
    loaded = hf_datasets.load_dataset("parquet", data_files=data_files(output), split="train",
                                      cache_dir=str(tmp_path / "hf-cache"))
    assert loaded.num_rows == rows.num_rows and "split" in loaded.column_names


def test_tar_shards_hold_whole_samples_under_webdataset_safe_keys(prompts, tmp_path):
    output = tmp_path / "out"
    run_job(job(prompts, output, "webdataset"))
    for tar in data_files(output):
        with tarfile.open(tar) as archive:
            names = archive.getnames()
        keys = {name.split(".", 1)[0] for name in names}
        assert all("." not in key and "/" not in key for key in keys)
        assert sorted(names) == sorted(f"{key}.{part}" for key in keys for part in ("json", "png", "tokens.npy"))
        tokens = np.load(io.BytesIO(tarfile.open(tar).extractfile(f"{sorted(keys)[0]}.tokens.npy").read()))
        assert tokens.dtype == np.int32


def test_a_webdataset_shard_of_error_rows_only_is_no_data_file_and_hf_datasets_loads_the_tars(tmp_path):
    output = tmp_path / "out"
    config = job("x.parquet", output, "webdataset")
    rows = pa.table({"id": ["ok", "bad"], "prompt": ["red", " "], "image_index": pa.array([0, 0], pa.int32()),
                     "seed": [1, 2], "status": ["ok", "error"], "error": [None, "prompt is empty"]})
    sampled = sampled_table(rows, [[3, 4], None], [np.zeros((4, 4, 3), np.uint8), None])
    location = prepare_output(config.output, config.s3)
    shards = [write_shard(sampled.slice(position, 1), config, "versions/v0001") for position in (0, 1)]
    manifest = publish(location, shards, ["x"], config)
    assert manifest["data_files"] == [shards[0]["file"].removesuffix(".parquet") + ".tar"]  # the empty tar is not
    loaded = hf_datasets.load_dataset("webdataset", data_files=data_files(output), split="train",
                                      cache_dir=str(tmp_path / "hf-cache"))
    assert [(row["json"]["id"], row["tokens.npy"]) for row in loaded] == [("ok", [3, 4])]
    assert read_dataset(str(output)).num_rows == 2  # the error row is in the view's metadata


def test_kept_columns_are_checked_before_ray_starts(tmp_path):
    pq.write_table(pa.table({"id": ["a"], "prompt": ["p"], "licence": ["cc"], "seed": [1]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"id": ["b"], "prompt": ["p"], "licence": [3], "seed": [2]}), tmp_path / "b.parquet")
    both = [str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")]
    with pytest.raises(ValueError, match="column 'licence' has different types across input files"):
        run_job(job(both[0], tmp_path / "out", "files", **{"input.paths": both}))
    with pytest.raises(ValueError, match="input.keep_columns: input file .*a.parquet has no column 'source'"):
        run_job(job(both[0], tmp_path / "out", "files", **{"input.paths": both, "input.keep_columns": ["source"]}))
    with pytest.raises(ValueError, match="'seed' would overwrite the output's own column"):
        run_job(job(both[0], tmp_path / "out", "files", **{"input.keep_columns": ["seed"]}))
    with pytest.raises(ValueError, match="output.format.*'files', 'webdataset' or 'parquet'|output.format"):
        job(both[0], tmp_path / "out", "tar")
    assert not (tmp_path / "out").exists()


def test_a_webdataset_samples_json_is_its_metadata_row_less_the_tokens(tmp_path):
    """`<key>.json` holds the row's metadata: every column of its metadata row, in order, but the tokens (their own
    member), with `image` naming the sample's image member."""
    published_dataset(tmp_path / "out", "webdataset", ["ok", "error", "ok"])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    metadata = pq.read_table(tmp_path / "out" / manifest["metadata_files"][0]["file"]).to_pylist()
    members = dict(tar_members((tmp_path / "out" / manifest["data_files"][0]).read_bytes()))
    samples = {name.removesuffix(".json"): json.loads(data) for name, data in members.items() if name.endswith(".json")}
    expected = {sample_key(row["id"], row["image_index"]):
                {name: value for name, value in row.items() if name != "tokens"}
                for row in metadata if row["status"] == "ok"}
    assert samples == expected and len(samples) == 2
    for key, sample in samples.items():
        assert list(sample) == list(expected[key]) and sample["image"].endswith(f"/{key}.png")
        assert sample["steps"] == metadata[0]["steps"] and sample["model"] == "noop"
