"""Integrity and repair on a real local Ray, real files and moto's S3 server over HTTP: `verify` reports every row
whose published files are gone or unreadable (exit 1, rows named, no traceback), checks the manifest's counts and
refuses entries outside the output root; `refresh` samples the lost rows again and records the repair, after which
every key is there once and `verify` passes."""

import json
import os

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vqbatch import read_dataset
from vqbatch.cli import main
from vqbatch.config import S3Config, load_job_config
from vqbatch.engine import refresh, run_job
from vqbatch.io.dataset import read_manifest
from vqbatch.io.filesystems import OutputRoot, resolve
from vqbatch.proof import verify

IDS = [f"r{i}" for i in range(6)]
IMAGES_PER_PROMPT = 2
EVERY_KEY = sorted((row_id, index) for row_id in IDS for index in range(IMAGES_PER_PROMPT))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.parquet"
    pq.write_table(pa.table({"key": IDS, "text": [f"a small shape number {i}" for i in range(len(IDS))]}), path)
    return str(path)


def job(prompts, output, output_format, **overrides):
    """Noop-model jobs with custom column names (the manifest must record them to name lost rows)."""
    return load_job_config(None, {"input.paths": [prompts], "input.id_column": "key", "input.prompt_column": "text",
                                  "output.uri": str(output), "model.uri": "noop", "output.format": output_format,
                                  "sampling.images_per_prompt": IMAGES_PER_PROMPT, "compute.batch_size": 4,
                                  "compute.max_actors": 1, "output.rows_per_file": 3, **overrides})


def keys_of(rows: list[dict]) -> list[tuple[str, int]]:
    return sorted((row["id"], row["image_index"]) for row in rows)


class Damage:
    """Deletes or truncates published files on a local folder or an S3 prefix, remembering the keys it loses."""

    def __init__(self, uri, s3=S3Config()):
        self.uri, self.s3 = uri, s3
        self.location = OutputRoot(*resolve(uri, s3))
        self.manifest = read_manifest(self.location)
        self.lost: dict[tuple[str, int], str] = {}  # key -> the file its problem names
        self.files: set[str] = set()  # the metadata files of the damaged shards

    def shard(self, position: int) -> tuple[str, list[dict]]:
        relative = self.manifest["metadata_files"][position]["file"]
        return relative, pq.read_table(self.location.path(relative), filesystem=self.location.filesystem).to_pylist()

    def delete(self, relative: str) -> None:
        self.location.filesystem.delete_file(self.location.path(relative))

    def truncate(self, relative: str) -> None:
        path = self.location.path(relative)
        with self.location.filesystem.open_input_stream(path) as stream:
            data = stream.read()
        with self.location.filesystem.open_output_stream(path) as stream:
            stream.write(data[: len(data) // 2])

    def lose_metadata_file(self, position: int, how: str) -> str:
        relative, rows = self.shard(position)
        getattr(self, how)(relative)
        self.lost.update({key: relative for key in keys_of(rows)})
        self.files.add(relative)
        return relative

    def drop_first_row(self, position: int) -> str:
        """Rewrite a metadata file without its first row: a file that reads, holding fewer rows than listed."""
        relative, rows = self.shard(position)
        path = self.location.path(relative)
        table = pq.read_table(path, filesystem=self.location.filesystem)
        pq.write_table(table.slice(1), path, filesystem=self.location.filesystem)
        self.lost[keys_of(rows[:1])[0]] = relative
        self.files.add(relative)
        return relative

    def lose_first_image(self, position: int) -> str:
        """The first image of the first shard from `position` on that holds more than one row (so the shard keeps
        rows and is written again without the lost one)."""
        relative, rows = self.shard(position)
        while len(rows) < 2:
            position += 1
            relative, rows = self.shard(position)
        row = next(row for row in rows if row["status"] == "ok")
        self.delete(row["image"])
        self.lost[(row["id"], row["image_index"])] = row["image"]
        self.files.add(relative)
        return row["image"]

    def lose_tar(self, position: int) -> str:
        relative, rows = self.shard(position)
        tar = relative.removesuffix(".parquet") + ".tar"
        self.delete(tar)
        self.lost.update({key: tar for key in keys_of(row for row in rows if row["status"] == "ok")})
        self.files.add(relative)
        return tar


def verify_by_cli(uri, capsys, *extra) -> tuple[int, dict, str]:
    capsys.readouterr()
    code = main(["verify", "--output", uri, "--sample", "100", "--json", *extra])
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if captured.out.strip() else {}, captured.err


def check_reported_and_repaired(damage: Damage, config, capsys) -> None:
    code, report, errors = verify_by_cli(damage.uri, capsys)
    assert code == 1 and "Traceback" not in errors, errors
    named = {(check["id"], check["image_index"]): check["problem"] for check in report["mismatches"]}
    assert sorted(named) == sorted(damage.lost)
    for key, file in damage.lost.items():
        assert file in named[key], (key, named[key])
    assert not report["passed"] and report["rows_lost"] == len(damage.lost)

    summary = refresh(config)
    assert (summary.version, summary.rows) == (2, len(damage.lost))
    manifest = read_manifest(damage.location)
    repair = manifest["versions"][-1]["repair"]
    assert sorted(repair["rows_lost"]) == sorted(damage.files) and len(repair["problems"]) == len(damage.files)
    assert keys_of(read_dataset(damage.uri, damage.s3).to_pylist()) == EVERY_KEY  # every key once
    assert verify(damage.uri, sample=100, s3=damage.s3).passed
    assert refresh(config).version is None  # repaired: nothing left to add


def test_files_format_lost_metadata_file_and_image(prompts, tmp_path, local_ray, capsys):
    config = job(prompts, tmp_path / "out", "files")
    run_job(config)
    damage = Damage(str(tmp_path / "out"))
    lost_file = damage.lose_metadata_file(0, "delete")
    damage.lose_first_image(1)
    check_reported_and_repaired(damage, config, capsys)
    manifest = read_manifest(damage.location)
    assert manifest["versions"][0]["lost_metadata_files"] == [lost_file]
    assert manifest["versions"][-1]["repair"]["lost_metadata_files"] == [lost_file]


def test_webdataset_lost_tar_and_truncated_metadata_file(prompts, tmp_path, local_ray, capsys):
    config = job(prompts, tmp_path / "out", "webdataset")
    run_job(config)
    damage = Damage(str(tmp_path / "out"))
    damage.lose_tar(0)
    truncated = damage.lose_metadata_file(1, "truncate")
    code, report, _ = verify_by_cli(damage.uri, capsys)
    assert code == 1 and any("does not read" in check["problem"] and truncated in check["problem"]
                             for check in report["mismatches"])
    check_reported_and_repaired(damage, config, capsys)


def test_parquet_format_truncated_and_deleted_metadata_files(prompts, tmp_path, local_ray, capsys):
    config = job(prompts, tmp_path / "out", "parquet")
    run_job(config)
    damage = Damage(str(tmp_path / "out"))
    damage.lose_metadata_file(0, "truncate")
    damage.lose_metadata_file(2, "delete")
    check_reported_and_repaired(damage, config, capsys)


@pytest.mark.parametrize("output_format", ["files", "parquet"])
def test_rows_gone_from_a_metadata_file_that_reads_are_named_and_repaired(prompts, tmp_path, local_ray, capsys,
                                                                          output_format):
    config = job(prompts, tmp_path / "out", output_format)
    run_job(config)
    damage = Damage(str(tmp_path / "out"))
    shortened = damage.drop_first_row(0)
    damage.lose_metadata_file(2, "delete")
    check_reported_and_repaired(damage, config, capsys)
    assert read_manifest(damage.location)["versions"][-1]["repair"]["metadata_files_with_rows_gone"] == [shortened]


def test_every_metadata_file_lost_leaves_nothing_to_draw_and_every_row_named(prompts, tmp_path, local_ray, capsys):
    config = job(prompts, tmp_path / "out", "files")
    run_job(config)
    damage = Damage(str(tmp_path / "out"))
    for position in range(len(damage.manifest["metadata_files"])):
        damage.lose_metadata_file(position, "delete")
    assert sorted(damage.lost) == EVERY_KEY
    check_reported_and_repaired(damage, config, capsys)


def test_s3_output_lost_metadata_file_and_image(prompts, s3_endpoint, local_ray, capsys):
    boto3.client("s3").create_bucket(Bucket="integrity")
    s3 = S3Config(endpoint_url=s3_endpoint, access_key_id="testing", secret_access_key="testing")
    config = job(prompts, "s3://integrity/out", "files", **{"s3.endpoint_url": s3_endpoint,
                                                           "s3.access_key_id": "testing",
                                                           "s3.secret_access_key": "testing"})
    run_job(config)
    damage = Damage("s3://integrity/out", s3)
    damage.lose_metadata_file(1, "delete")
    damage.lose_first_image(3)
    check_reported_and_repaired(damage, config, capsys)


def test_an_image_that_does_not_decode_is_a_mismatch(prompts, tmp_path, local_ray, capsys):
    run_job(job(prompts, tmp_path / "out", "files"))
    damage = Damage(str(tmp_path / "out"))
    _, rows = damage.shard(0)
    broken = next(row for row in rows if row["status"] == "ok")
    (tmp_path / "out" / broken["image"]).write_bytes(b"not an image")
    for integrity in ("decode", "exists"):  # found reading every image, or when the row is drawn
        code, report, errors = verify_by_cli(damage.uri, capsys, "--integrity", integrity)
        assert code == 1 and "Traceback" not in errors
        assert [(check["id"], check["image_index"]) for check in report["mismatches"]] == [
            (broken["id"], broken["image_index"])]
        assert "does not decode" in report["mismatches"][0]["problem"]


def test_manifest_counts_are_checked_and_entries_outside_the_root_refused(prompts, tmp_path, local_ray, capsys):
    output = tmp_path / "out"
    config = job(prompts, output, "files")
    run_job(config)
    path = output / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "rows": manifest["rows"] + 1}))
    code, report, _ = verify_by_cli(str(output), capsys)
    assert code == 1 and report["mismatches"] == []
    assert report["problems"] == [f"the manifest says the dataset holds {manifest['rows'] + 1} rows; its metadata "
                                  f"files list {manifest['rows']}"]
    shards = [{**manifest["metadata_files"][0], "ok": 0}, *manifest["metadata_files"][1:]]
    path.write_text(json.dumps({**manifest, "metadata_files": shards}))
    code, report, _ = verify_by_cli(str(output), capsys)
    assert code == 1 and any(f"the manifest says {shards[0]['file']} holds" in line for line in report["problems"])

    for outside in ("../elsewhere/part-0.parquet", "/etc/passwd", "s3://other-bucket/part-0.parquet",
                    "versions/../../x.parquet"):
        escaped = {**manifest["metadata_files"][0], "file": outside}
        path.write_text(json.dumps({**manifest, "metadata_files": [escaped]}))
        code, _, errors = verify_by_cli(str(output), capsys)
        assert code == 2 and f"names {outside!r}, which is not a path inside its output root" in errors
        with pytest.raises(ValueError, match="not a path inside its output root"):
            read_dataset(str(output))
        history = [{**manifest["versions"][0], "metadata_files": [escaped]}]
        path.write_text(json.dumps({**manifest, "versions": history}))
        with pytest.raises(ValueError, match="not a path inside its output root"):
            refresh(config)
    assert os.path.exists("/etc/passwd")


def test_an_image_path_outside_the_root_is_refused(prompts, tmp_path, local_ray, capsys):
    output = tmp_path / "out"
    run_job(job(prompts, output, "files"))
    damage = Damage(str(output))
    relative, _ = damage.shard(0)
    table = pq.read_table(output / relative)
    images = ["../../secret.png" if image else image for image in table.column("image").to_pylist()]
    table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.string()))
    pq.write_table(table, output / relative)
    code, _, errors = verify_by_cli(str(output), capsys)
    assert code == 2 and "'../../secret.png', which is not a path inside its output root" in errors
