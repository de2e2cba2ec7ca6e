"""Nothing foreign touched, on a real local Ray, real files and moto's S3 server over HTTP: `--overwrite` deletes only
the files vqbatch wrote, an output holding files vqbatch did not write is refused naming one, and `vqbatch demo`
never deletes a user's file."""

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vqbatch import read_dataset
from vqbatch.cli import main
from vqbatch.config import S3Config, load_job_config
from vqbatch.engine import run_job
from vqbatch.io.dataset import output_contents
from vqbatch.io.filesystems import OutputRoot, resolve
from vqbatch.proof import rerun


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c"], "prompt": ["a red circle", "a blue square", "a green dot"]}), path)
    return str(path)


def job(prompts, output, **overrides):
    return load_job_config(None, {"input.paths": [prompts], "output.uri": str(output), "model.uri": "noop",
                                  "compute.batch_size": 2, "compute.max_actors": 1, "output.rows_per_file": 2,
                                  **overrides})


def generate(prompts, output, *flags):
    return main(["generate", "--input", prompts, "--output", str(output), "--model", "noop", "--batch-size", "2",
                 "--num-actors", "1", "--quiet", *flags])


def keys(uri, s3=S3Config()):
    return sorted((row["id"], row["image_index"]) for row in read_dataset(uri, s3).to_pylist())


@pytest.mark.parametrize("user_file", ["notes.txt", "images/holiday.png", "versions/v0001/mine.parquet",
                                       "versions/v0001/images/ab/photo.png", "README.md"])
def test_overwrite_refuses_an_output_with_a_foreign_file_and_deletes_nothing(user_file, prompts, tmp_path,
                                                                             local_ray, capsys):
    output = tmp_path / "out"
    assert generate(prompts, output) == 0
    (output / user_file).parent.mkdir(parents=True, exist_ok=True)
    (output / user_file).write_bytes(b"the user's own")
    before = sorted(path.relative_to(output) for path in output.rglob("*"))
    capsys.readouterr()
    assert generate(prompts, output, "--overwrite") == 2
    error = capsys.readouterr().err
    assert "1 file(s) vqbatch did not write" in error and user_file in error and "Traceback" not in error
    assert sorted(path.relative_to(output) for path in output.rglob("*")) == before  # nothing deleted
    assert (output / user_file).read_bytes() == b"the user's own"


def test_overwrite_deletes_only_its_own_files_and_keeps_reruns(prompts, tmp_path, local_ray):
    output = tmp_path / "out"
    run_job(job(prompts, output, **{"sampling.images_per_prompt": 2}))
    reran = rerun(str(output), ids=["a"])
    assert main(["report", str(output)]) == 0
    own = output_contents(OutputRoot(*resolve(str(output), S3Config()))).own
    assert {"manifest.json", "_SUCCESS", "README.md", "report/report.html", "versions/v0001/fingerprint.json"} <= set(
        own) and any(name.startswith("versions/v0001/images/") for name in own)
    summary = run_job(job(prompts, output, **{"output.mode": "overwrite"}))  # one image per prompt now
    assert summary.version == 1 and keys(str(output)) == [("a", 0), ("b", 0), ("c", 0)]
    images = sorted(output.glob("versions/v0001/images/*/*.png"))
    assert len(images) == 3  # the second images of the old dataset are gone with it
    assert keys(reran.output_uri) == [("a", 0), ("a", 1)]  # the rerun dataset beside it is kept


def test_a_new_dataset_is_refused_in_a_folder_of_foreign_files(prompts, tmp_path, local_ray, capsys):
    output = tmp_path / "photos"
    output.mkdir()
    (output / "holiday.jpg").write_bytes(b"jpeg")
    assert generate(prompts, output) == 2
    assert "holiday.jpg" in capsys.readouterr().err
    assert sorted(path.name for path in output.iterdir()) == ["holiday.jpg"]


def test_demo_never_deletes_a_users_file(tmp_path, capsys):
    output = tmp_path / "demo"
    for user_file in ("mine.txt", "images/mine.png"):
        (output / user_file).parent.mkdir(parents=True, exist_ok=True)
        (output / user_file).write_bytes(b"kept")
        capsys.readouterr()
        assert main(["demo", "--output", str(output), "--quiet"]) == 2  # refused before Ray starts
        assert user_file in capsys.readouterr().err
        assert (output / user_file).read_bytes() == b"kept"


@pytest.mark.parametrize("user_files, named", [
    ({"manifest.json": '{"name": "my web app", "icons": []}'}, "not a vqbatch manifest"),
    ({"manifest.json": "[1, 2]"}, "not a vqbatch manifest"),
    ({"_SUCCESS": ""}, "_SUCCESS"),  # a Spark job's marker
    ({"report/report.html": "<html>mine</html>", "report/contact_sheet.png": "png"}, "report/report.html"),
])
def test_names_vqbatch_writes_are_foreign_without_a_vqbatch_manifest(user_files, named, prompts, tmp_path, capsys):
    output = tmp_path / "out"
    for relative, text in user_files.items():
        (output / relative).parent.mkdir(parents=True, exist_ok=True)
        (output / relative).write_text(text)
    for flags in (["--overwrite"], []):
        capsys.readouterr()
        assert generate(prompts, output, *flags) == 2  # refused before Ray starts
        error = capsys.readouterr().err
        assert named in error and "Traceback" not in error
    assert main(["demo", "--output", str(output), "--quiet"]) == 2
    assert {relative: (output / relative).read_text() for relative in user_files} == user_files  # nothing deleted


def test_s3_overwrite_refuses_a_foreign_object_and_replaces_its_own(prompts, s3_endpoint, local_ray,
                                                                   capsys):
    client = boto3.client("s3")
    client.create_bucket(Bucket="overwrite")
    s3 = {"s3.endpoint_url": s3_endpoint, "s3.access_key_id": "testing", "s3.secret_access_key": "testing"}
    run_job(job(prompts, "s3://overwrite/out", **s3))
    client.put_object(Bucket="overwrite", Key="out/versions/v0001/notes.txt", Body=b"mine")
    with pytest.raises(ValueError, match=r"holds 1 file\(s\) vqbatch did not write \(versions/v0001/notes.txt\)"):
        run_job(job(prompts, "s3://overwrite/out", **{"output.mode": "overwrite", **s3}))
    assert client.get_object(Bucket="overwrite", Key="out/versions/v0001/notes.txt")["Body"].read() == b"mine"
    client.delete_object(Bucket="overwrite", Key="out/versions/v0001/notes.txt")
    summary = run_job(job(prompts, "s3://overwrite/out", **{"output.mode": "overwrite",
                                                            "sampling.base_seed": 9, **s3}))
    assert summary.version == 1
    settings = S3Config(endpoint_url=s3_endpoint, access_key_id="testing", secret_access_key="testing")
    assert keys("s3://overwrite/out", settings) == [("a", 0), ("b", 0), ("c", 0)]
    seeds = {row["seed"] for row in read_dataset("s3://overwrite/out", settings).to_pylist()}
    listed = client.list_objects_v2(Bucket="overwrite", Prefix="out/versions/")["Contents"]
    assert len([item for item in listed if item["Key"].endswith(".png")]) == 3 and len(seeds) == 3
