"""Reruns and proof: read stored rows, regenerate them from their stored seeds and parameters, compare.

    metadata rows (id, prompt, seed, model, steps, ...)      read from a published dataset
      -> select (`--ids` or a `--where` filter)              rerun; verify draws a random sample instead
      -> regenerate with the engine's own sampler            `sampler.build_model`, one per (model, sampling) group
      -> rerun: write a separate dataset                     `<output>/reruns/rerun-<digest of the rows>` by default
         verify: compare tokens and images bit for bit       a `VerifyReport`

Regeneration runs in this process, without Ray: it is meant for the few rows a user reruns or samples. It samples
with the same sampler the engine's actors call (`vqbatch.sampler`), so a row regenerates exactly when sampling does
not depend on which other rows shared its batch (see docs/reproducibility.md).

An image matches when its stored file, decoded, has the same pixels as the regenerated image after the same
encoding (`encode_image` with the stored format and the dataset's quality) and decoding. For PNG that is the
8-bit pixels the sampler produced. File bytes are not compared: the same pixels may compress to other bytes
under another zlib or JPEG/WebP encoder build.
"""

from __future__ import annotations

import ast
import functools
import operator
import posixpath
import random
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vqbatch.config import JobConfig, ModelConfig, OutputConfig, S3Config, SamplingConfig
from vqbatch.choices import INTEGRITY_CHECKS, check_choice
from vqbatch.io.dataset import (RERUNS_DIR, check_output, prepare_output, publish, read_manifest, read_metadata,
                                version_folder)
from vqbatch.io.filesystems import OutputRoot, resolve, to_uri
from vqbatch.io.formats import FILE_NAME, METADATA_SCHEMA, sampled_table, shard_format, write_shard
from vqbatch.io.images import decode_image, encode_image
from vqbatch.io.prompts import IMAGE_ROW_SCHEMA
from vqbatch.keys import key_column, keys_digest
from vqbatch.lineage import recorded_batch_shape
from vqbatch.io.integrity import Inspection, inspect_shards, lost_input_keys, manifest_count_problems
from vqbatch.io.view import latest_per_key, read_dataset
from vqbatch.sampler import build_model

PARAMETER_COLUMNS = ("model", "steps", "guidance_scale", "truncation_rate", "truncation_target", "timestep_spacing",
                     "sampler", "prior_weight", "noise")  # one sampler each
# what datasets written before a setting existed were sampled with
LEGACY_SAMPLING = {"noise": "gumbel", "truncation_target": "guided"}


# ---------------------------------------------------------------------------------------------------------------
# Stored rows
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StoredDataset:
    location: OutputRoot
    manifest: dict
    metadata: pa.Table  # METADATA_SCHEMA of its format, every published row (`read_dataset`)

    @classmethod
    def open(cls, uri: str, s3: S3Config) -> "StoredDataset":
        location = OutputRoot(*resolve(uri, s3))
        return cls(location, read_manifest(location), read_dataset(uri, s3))

    @classmethod
    def inspect(cls, uri: str, s3: S3Config, decode: bool) -> tuple["StoredDataset", Inspection]:
        """The dataset's rows of its readable metadata files (each key once), and what is lost
        (`vqbatch.io.integrity`)."""
        location = OutputRoot(*resolve(uri, s3))
        manifest = read_manifest(location)
        output_format = manifest["output"].get("format", "files")
        inspection = inspect_shards(location, manifest["metadata_files"], output_format, decode)
        return cls(location, manifest, latest_per_key(read_metadata(location, list(inspection.readable)))), inspection

    @property
    def output_format(self) -> str:
        return self.manifest["output"].get("format", "files")

    @property
    def kept_columns(self) -> list[str]:
        """The input columns the dataset carries (`input.keep_columns`): those after the metadata's own."""
        own = {*METADATA_SCHEMA.names, FILE_NAME}
        return [name for name in self.metadata.column_names if name not in own]

    @property
    def metadata_uris(self) -> list[str]:
        return [to_uri(self.location.filesystem, self.location.path(shard["file"]))
                for shard in self.manifest["metadata_files"]]

    def ok_rows(self) -> pa.Table:
        return self.metadata.filter(pc.field("status") == "ok")


def rows_with_ids(metadata: pa.Table, ids: list[str]) -> pa.Table:
    """Every image row of each id in `ids`; an id the dataset lacks is a ValueError naming it."""
    missing = sorted(set(ids) - set(metadata.column("id").to_pylist()))
    if missing:
        raise ValueError(f"ids not in the dataset: {', '.join(map(repr, missing[:10]))}; give ids from its "
                         "`id` column")
    return metadata.filter(pc.field("id").isin(ids))


def rows_where(metadata: pa.Table, condition: str) -> pa.Table:
    """The rows for which the Python-syntax `condition` over metadata columns holds (see `filter_expression`)."""
    try:
        return metadata.filter(filter_expression(condition, metadata.column_names))
    except (pa.ArrowNotImplementedError, pa.ArrowTypeError) as error:  # e.g. a string column compared with 1
        columns = ", ".join(f"{field.name} ({field.type})" for field in metadata.schema)
        raise ValueError(f"--where {condition!r} compares a column with a value of another type ({error}); "
                         f"columns: {columns}") from None


def filter_expression(condition: str, columns: list[str]) -> pc.Expression:
    """Parse e.g. `"image_index == 1 and id in ('a', 'b')"` into a pyarrow expression; nothing is evaluated.

    Allowed: comparisons (==, !=, <, <=, >, >=, in, not in) of a column name with literals, joined by and/or/not.
    """
    try:
        tree = ast.parse(condition.strip(), mode="eval").body
    except SyntaxError as error:
        raise ValueError(f"--where {condition!r} is not a valid filter ({error.msg}); write e.g. "
                         "\"image_index == 0 and id in ('a', 'b')\"") from None
    return expression_of(tree, condition, columns)


COMPARISONS = {ast.Eq: "__eq__", ast.NotEq: "__ne__", ast.Lt: "__lt__", ast.LtE: "__le__", ast.Gt: "__gt__",
               ast.GtE: "__ge__"}


def expression_of(node: ast.AST, condition: str, columns: list[str]) -> pc.Expression:
    if isinstance(node, ast.BoolOp):
        parts = [expression_of(value, condition, columns) for value in node.values]
        return functools.reduce(operator.and_ if isinstance(node.op, ast.And) else operator.or_, parts)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return ~expression_of(node.operand, condition, columns)
    if isinstance(node, ast.Compare) and isinstance(node.left, ast.Name) and len(node.ops) == 1:
        return comparison(filter_column(node.left.id, columns), node.ops[0], node.comparators[0], condition)
    raise ValueError(f"--where {condition!r}: cannot filter on {ast.unparse(node)!r}; allowed: a column compared "
                     "with literals (==, !=, <, <=, >, >=, in, not in), joined by and/or/not")


def filter_column(name: str, columns: list[str]) -> pc.Expression:
    if name not in columns:
        raise ValueError(f"--where: unknown column {name!r}; allowed: {', '.join(columns)}")
    return pc.field(name)


def comparison(column: pc.Expression, op: ast.cmpop, value: ast.AST, condition: str) -> pc.Expression:
    try:
        literal = ast.literal_eval(value)
    except ValueError:
        raise ValueError(f"--where {condition!r}: {ast.unparse(value)!r} is not a literal (a quoted string, "
                         "a number, or a tuple of them)") from None
    if isinstance(op, (ast.In, ast.NotIn)):
        if not isinstance(literal, (tuple, list, set)):
            raise ValueError(f"--where {condition!r}: `in` needs a tuple of literals, got {literal!r}")
        member = column.isin(list(literal))
        return member if isinstance(op, ast.In) else ~member
    if type(op) not in COMPARISONS:
        raise ValueError(f"--where {condition!r}: operator {type(op).__name__} is not allowed; allowed: "
                         "==, !=, <, <=, >, >=, in, not in")
    return getattr(column, COMPARISONS[type(op)])(literal)


# ---------------------------------------------------------------------------------------------------------------
# Regeneration
# ---------------------------------------------------------------------------------------------------------------

def regenerate(rows: pa.Table, manifest: dict, batch_size: int, s3: S3Config,
               device: str = "auto") -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Tokens (P,) and pixels (H, W, 3) uint8 of each ok row of `rows`, in row order, from its stored seed.

    Rows are grouped by their stored model and sampling parameters; each group loads the engine's sampler once
    (an s3:// model read with `s3`) and samples its rows at the batch shape the dataset was sampled at (`batch_size`
    for datasets that did not record one), each call padded to that shape as the engine's were.
    """
    assert set(rows.column("status").to_pylist()) <= {"ok"}, "only ok rows have a seed to regenerate from"
    if batch_size < 1:
        raise ValueError(f"batch size must be a positive number of images, got {batch_size}")
    batch_shape = recorded_batch_shape(manifest) or batch_size
    tokens, pixels = [None] * rows.num_rows, [None] * rows.num_rows
    prompts, seeds = rows.column("prompt").to_pylist(), rows.column("seed").to_pylist()
    for (model, sampling), positions in parameter_groups(rows, manifest, device):
        sampler = build_model(model, sampling, batch_shape, s3)  # the engine's sampler: the code that made the dataset
        for batch in chunks(positions, batch_shape):
            batch_tokens, batch_pixels = sampler.sample([prompts[i] for i in batch], [seeds[i] for i in batch])
            for position, row_tokens, image in zip(batch, batch_tokens, batch_pixels):
                tokens[position], pixels[position] = row_tokens, image
    return tokens, pixels


def parameter_groups(rows: pa.Table, manifest: dict,
                     device: str) -> Iterator[tuple[tuple[ModelConfig, SamplingConfig], list[int]]]:
    """(model, sampling) configs rebuilt from the stored columns, with the positions of the rows that used them."""
    names = [name for name in PARAMETER_COLUMNS if name in rows.column_names]  # older datasets lack sampler columns
    groups: dict[tuple, list[int]] = {}
    for position, key in enumerate(zip(*(rows.column(name).to_pylist() for name in names))):
        groups.setdefault(key, []).append(position)
    for key, positions in groups.items():
        stored = dict(zip(names, key))
        model = ModelConfig(uri=stored.pop("model"), dtype=manifest["model"]["dtype"], device=device)
        yield (model, SamplingConfig(**{**LEGACY_SAMPLING, **manifest["sampling"], **stored})), positions


def chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


# ---------------------------------------------------------------------------------------------------------------
# Rerun
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RerunSummary:
    output_uri: str  # where the rerun dataset was written
    rows: int  # rows regenerated
    skipped: list[tuple[str, int]]  # (id, image_index) of selected error rows: they have no seed to rerun from


def rerun(output_uri: str, ids: list[str] | None = None, where: str | None = None, into: str | None = None,
          batch_size: int = 8, overwrite: bool = False, s3: S3Config | None = None,
          device: str = "auto") -> RerunSummary:
    """Regenerate the rows of `ids` (every image of each) or those matching `where` into a separate dataset.

    The rerun dataset has the source's layout; it goes to `into`, by default
    `<output_uri>/reruns/rerun-<16 hex digits naming the selected (id, image_index) keys>`.
    """
    if (ids is None) == (where is None):
        raise ValueError("give exactly one of ids or where to choose the rows to rerun")
    s3 = s3 or S3Config()
    source = StoredDataset.open(output_uri, s3)
    selected = rows_with_ids(source.metadata, ids) if ids is not None else rows_where(source.metadata, where)
    chosen = selected.filter(pc.field("status") == "ok")
    if chosen.num_rows == 0:
        raise ValueError(f"no ok rows to rerun: the selection holds {selected.num_rows} row(s), none with "
                         "status 'ok'")
    into = into or posixpath.join(output_uri.rstrip("/"), RERUNS_DIR, f"rerun-{keys_digest(chosen)}")
    config = rerun_config(source, chosen, into, batch_size, overwrite, s3, device)
    check_output(config.output, s3)
    tokens, pixels = regenerate(chosen, source.manifest, batch_size, s3, device)
    location = prepare_output(config.output, s3)
    image_rows = chosen.select([*IMAGE_ROW_SCHEMA.names, *source.kept_columns])
    per_file, folder = config.output.rows_per_file, version_folder(1)
    truncated = (chosen.column("prompt_truncated").to_pylist() if "prompt_truncated" in chosen.column_names
                 else [None] * chosen.num_rows)  # datasets written before the column existed lack it
    shards = [write_shard(sampled_table(image_rows.slice(start, per_file),
                                        [row.tolist() for row in tokens[start:start + per_file]],
                                        pixels[start:start + per_file], truncated[start:start + per_file]),
                          config, folder)
              for start in range(0, chosen.num_rows, per_file)]
    publish(location, shards, source.metadata_uris, config)
    skipped = selected.filter(pc.field("status") != "ok").select(["id", "image_index"]).to_pylist()
    return RerunSummary(into, chosen.num_rows, [(row["id"], row["image_index"]) for row in skipped])


def rerun_config(source: StoredDataset, chosen: pa.Table, into: str, batch_size: int, overwrite: bool,
                 s3: S3Config, device: str) -> JobConfig:
    """The job config a rerun writes with: the source's settings, the chosen rows' one parameter set, and the S3
    settings the rerun was given (its shards are written through them)."""
    groups = list(parameter_groups(chosen, source.manifest, device))
    if len(groups) > 1:
        sets = "; ".join(f"{model.uri} {sampling.model_dump(include=set(PARAMETER_COLUMNS))}"
                         for (model, sampling), _ in groups[:3])
        raise ValueError(f"the chosen rows were made with {len(groups)} model/sampling settings ({sets}); rerun "
                         "one setting at a time, e.g. --where \"steps == 100 and ...\"")
    (model, sampling), _ = groups[0]
    output = OutputConfig(**{**source.manifest["output"], "uri": into, "mode": "overwrite" if overwrite else "error"})
    return JobConfig(input={"paths": source.metadata_uris}, model=model, sampling=sampling,
                     compute={"batch_size": recorded_batch_shape(source.manifest) or batch_size}, output=output, s3=s3)


# ---------------------------------------------------------------------------------------------------------------
# Verify
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RowCheck:
    id: str
    image_index: int
    tokens_differing: int  # latent pixels whose stored and regenerated tokens differ
    pixels_differing: int  # image pixels (H x W positions) that differ; every pixel when the sizes differ
    problem: str | None = None  # the row's stored files are gone or unreadable: it was not regenerated

    @property
    def matches(self) -> bool:
        return self.tokens_differing == 0 and self.pixels_differing == 0 and self.problem is None


@dataclass(frozen=True)
class VerifyReport:
    output_uri: str
    rows_ok: int  # intact rows with status ok in the dataset: the population sampled from
    checks: list[RowCheck]  # the regenerated rows
    lost: list[RowCheck] = field(default_factory=list)  # rows whose stored files are gone or unreadable
    problems: list[str] = field(default_factory=list)  # the manifest's counts; lost files whose rows have no name

    @property
    def tokens_matched(self) -> int:
        return sum(check.tokens_differing == 0 for check in self.checks)

    @property
    def images_matched(self) -> int:
        return sum(check.pixels_differing == 0 and check.problem is None for check in self.checks)

    @property
    def mismatches(self) -> list[RowCheck]:
        return self.lost + [check for check in self.checks if not check.matches]

    @property
    def passed(self) -> bool:
        return not self.mismatches and not self.problems

    def to_dict(self) -> dict:
        return {"output": self.output_uri, "rows_ok": self.rows_ok, "rows_checked": len(self.checks),
                "tokens_matched": self.tokens_matched, "images_matched": self.images_matched,
                "rows_lost": len(self.lost), "passed": self.passed,
                "mismatches": [asdict(check) for check in self.mismatches], "problems": self.problems}


def verify(output_uri: str, sample: int, seed: int = 0, batch_size: int = 8, s3: S3Config | None = None,
           device: str = "auto", integrity: str = "decode") -> VerifyReport:
    """Check the dataset's integrity (`vqbatch.io.integrity`: every published file there, with `integrity="decode"`
    every stored image read and decoded; the manifest's counts), then regenerate `sample` random intact ok rows (all
    when fewer; the draw depends only on `seed`) and compare each one's tokens and image with what the dataset
    stores, bit for bit. Every row whose files are gone or unreadable is a mismatch naming its problem."""
    if sample < 1:
        raise ValueError(f"sample must be a positive number of rows, got {sample}")
    check_choice("integrity", integrity, INTEGRITY_CHECKS)
    s3 = s3 or S3Config()
    dataset, inspection = StoredDataset.inspect(output_uri, s3, decode=integrity == "decode")
    lost, problems = lost_checks(dataset, inspection, s3)
    lost_keys = {(check.id, check.image_index) for check in lost}
    population = dataset.ok_rows()
    population = population.filter(pa.array([key not in lost_keys for key in zip(
        population.column("id").to_pylist(), population.column("image_index").to_pylist())], pa.bool_()))
    drawn = sorted(random.Random(seed).sample(range(population.num_rows), min(sample, population.num_rows)))
    rows = population.take(pa.array(drawn, pa.int64()))  # typed: none may be drawn
    tokens, pixels = regenerate(rows, dataset.manifest, batch_size, s3, device)
    quality = dataset.manifest["output"]["image_quality"]
    checks = [check_row(row, row_tokens, image, stored_image(dataset, rows.slice(position, 1)), quality)
              for position, (row, row_tokens, image) in enumerate(zip(rows.to_pylist(), tokens, pixels))]
    problems += [*manifest_count_problems(dataset.manifest), *inspection.count_problems]
    return VerifyReport(output_uri, population.num_rows, checks, lost, problems)


def lost_checks(dataset: StoredDataset, inspection: Inspection, s3: S3Config) -> tuple[list[RowCheck], list[str]]:
    """A failed check per lost row: those of readable metadata files by their problem, those of metadata files that
    are gone or do not read, and those gone from a file that reads, named from the input files the manifest
    records; a problem line when they cannot be."""
    checks = [RowCheck(row["id"], row["image_index"], 0, 0, row["problem"]) for row in inspection.lost_rows]
    unlisted = [damage for damage in inspection.damaged if damage.whole or damage.rows_gone]
    if not unlisted:
        return checks, []
    problem = "; ".join(damage.problem for damage in unlisted)
    named = key_column(pa.table({"id": [check.id for check in checks],
                                 "image_index": pa.array([check.image_index for check in checks], pa.int32())}))
    try:
        keys = lost_input_keys(dataset.manifest, pa.concat_arrays([inspection.held, named]), s3)
    except (ValueError, OSError) as error:
        return checks, [f"{problem}: its rows cannot be named, the input files the manifest records do not read "
                        f"({error})"]
    return checks + [RowCheck(row_id, index, 0, 0, f"not in any readable metadata file ({problem})")
                     for row_id, index in keys], []


def stored_image(dataset: StoredDataset, row: pa.Table) -> bytes | str:
    """The stored image bytes of a one-row table, or why they cannot be read."""
    try:
        return shard_format(dataset.output_format).image_bytes(dataset.location.filesystem, dataset.location.root,
                                                              row)[0]
    except (OSError, KeyError, tarfile.TarError) as error:
        return f"its stored image does not read ({type(error).__name__}: {error})"


def check_row(row: dict, tokens: np.ndarray, pixels: np.ndarray, stored: bytes | str, quality: int) -> RowCheck:
    stored_tokens = np.asarray(row["tokens"])  # (P,)
    tokens_differing = (int(np.sum(stored_tokens != tokens)) if stored_tokens.shape == tokens.shape
                        else max(stored_tokens.size, tokens.size))
    regenerated = decode_image(encode_image(pixels, row["image_format"], quality))  # (H, W, 3)
    everywhere = regenerated.shape[0] * regenerated.shape[1]
    if isinstance(stored, str):
        return RowCheck(row["id"], row["image_index"], tokens_differing, everywhere, stored)
    try:
        stored_pixels = decode_image(stored)  # (H, W, 3)
    except (OSError, ValueError) as error:  # PIL's UnidentifiedImageError is an OSError
        return RowCheck(row["id"], row["image_index"], tokens_differing, everywhere,
                        f"its stored image does not decode ({type(error).__name__})")
    pixels_differing = (int(np.any(stored_pixels != regenerated, axis=-1).sum())
                        if stored_pixels.shape == regenerated.shape else everywhere)
    return RowCheck(row["id"], row["image_index"], tokens_differing, pixels_differing)


def format_report(report: VerifyReport) -> str:
    checked = len(report.checks)
    lines = [f"verified {checked} of {report.rows_ok} ok rows of {report.output_uri}: tokens "
             f"{report.tokens_matched}/{checked} and images {report.images_matched}/{checked} match bit for bit"]
    lines += [f"MISMATCH id={check.id!r} image_index={check.image_index}: " + (check.problem or (
              f"{check.tokens_differing} token(s) and {check.pixels_differing} pixel(s) differ"))
              for check in report.mismatches]
    lines += [f"PROBLEM {problem}" for problem in report.problems]
    if report.passed:
        lines.append("PASSED")
    else:
        lines.append(f"FAILED: {len(report.mismatches) - len(report.lost)} row(s) do not reproduce, "
                     f"{len(report.lost)} row(s) lost, {len(report.problems)} problem(s) with the manifest")
    return "\n".join(lines)
