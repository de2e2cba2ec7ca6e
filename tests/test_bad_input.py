"""Bad input through the real engine: every row lands once with the right status; job-level errors before models load."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from conftest import ray_started_locally
from vqbatch.config import S3Config, load_job_config
from vqbatch.engine import run_job
from vqbatch.io.dataset import OutputRoot, read_metadata
from vqbatch.io.filesystems import resolve
from vqbatch.pipeline import VQDiffusionPipeline
from vqbatch.tiny import write_tiny_checkpoint

LONG_PROMPT = " ".join(["a red circle next to a blue square"] * 30)  # about 240 words: far past 77 tokens
WTF8_SURROGATE = b"a cat \xed\xa0\x80 on a mat"  # a lone UTF-16 surrogate (U+D800) encoded as if it were UTF-8

# id -> (prompt as raw UTF-8 bytes or None, expected status, expected error (a fragment), expected prompt_truncated)
CORPUS = {
    "good": (b"a small red circle", "ok", None, False),
    "null": (None, "error", "prompt is null", None),
    "empty": (b"", "error", "prompt is empty", None),
    "spaces": (" \t\n\u3000 ".encode(), "error", "prompt is empty", None),
    "controls": ("\x00\x07\u200b\u200f\ufeff".encode(), "error", "only whitespace, control and format characters", None),
    "emoji": ("a 🐱 and a 🚀 👩‍👩‍👧".encode(), "ok", None, False),
    "rtl": ("שלום עולם مرحبا بالعالم".encode(), "ok", None, False),
    "inner-controls": ("a red\x00 circle\x1b[31m with\u200b a tab\t".encode(), "ok", None, False),
    "long": (LONG_PROMPT.encode(), "ok", None, True),
    "surrogate": (WTF8_SURROGATE, "error", "prompt is not valid UTF-8", None),
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny", seed=0))


def write_corpus(path):
    """The corpus as a Parquet string column holding exactly these bytes (pyarrow itself refuses lone surrogates)."""
    prompts = pa.array([raw for raw, *_ in CORPUS.values()], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"id": list(CORPUS), "prompt": prompts}), path)


def test_a_bad_input_corpus_runs_through_the_engine_and_every_row_says_what_happened(tiny_model, tmp_path):
    write_corpus(tmp_path / "corpus.parquet")
    config = load_job_config(None, {"input.paths": str(tmp_path / "corpus.parquet"), "model.uri": tiny_model,
                                    "output.uri": str(tmp_path / "out"), "sampling.steps": 2,
                                    "sampling.images_per_prompt": 2, "compute.batch_size": 4})
    with ray_started_locally():
        summary = run_job(config)
    rows = read_metadata(OutputRoot(*resolve(str(tmp_path / "out"), S3Config()))).to_pylist()
    assert sorted((row["id"], row["image_index"]) for row in rows) == sorted((i, k) for i in CORPUS for k in (0, 1))
    for row in rows:
        raw, status, error, truncated = CORPUS[row["id"]]
        assert (row["status"], row["prompt_truncated"]) == (status, truncated), row["id"]
        assert row["error"] is None if error is None else error in row["error"], (row["id"], row["error"])
        assert (row["tokens"] is not None) == (status == "ok") and (row["image"] is not None) == (status == "ok")
        if raw is not None and status == "ok":
            assert row["prompt"] == raw.decode("utf-8")  # stored exactly as given
    surrogate = next(row for row in rows if row["id"] == "surrogate")
    assert surrogate["prompt"] == "a cat \\xed\\xa0\\x80 on a mat"  # kept, bad bytes escaped
    assert (summary.ok, summary.errors) == (10, 10)


def test_the_long_prompt_is_past_the_loaded_tokenizers_limit(tiny_model):
    """The corpus's `long` row is truncated by the model's own tokenizer, and the `good` row is not."""
    tokenizer = VQDiffusionPipeline.from_pretrained(tiny_model).tokenizer
    lengths = {key: len(tokenizer(CORPUS[key][0].decode(), verbose=False).input_ids) for key in ("long", "good")}
    assert lengths["long"] > 3 * tokenizer.model_max_length and lengths["good"] < tokenizer.model_max_length == 77


# ---------------------------------------------------------------- job-level errors, before Ray starts or a model loads

def write_pair(folder, first: dict, second: dict | None = None):
    folder.mkdir()
    pq.write_table(pa.table(first), folder / "a.parquet")
    if second is not None:
        pq.write_table(pa.table(second), folder / "b.parquet")


def corrupt_a_data_page(folder):
    """A file whose footer still reads but whose compressed column data is damaged."""
    folder.mkdir()
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(500)], "prompt": [f"prompt {i}" * 5 for i in range(500)]}),
                   folder / "a.parquet", compression="zstd", write_page_checksum=True)
    data = bytearray((folder / "a.parquet").read_bytes())
    for offset in range(200, 1200):
        data[offset] ^= 0x5A
    (folder / "a.parquet").write_bytes(bytes(data))


@pytest.mark.parametrize("make_input, message", [
    (lambda d: write_pair(d, {"id": ["1", "2", "1", "3", "3", "3"], "prompt": list("abcdef")}),
     r"id column 'id' has 2 duplicate id\(s\), e.g. '1' \(2 rows\), '3' \(3 rows\)"),
    (lambda d: write_pair(d, {"id": ["1", "2"], "prompt": ["a", "b"]}, {"id": ["3", "2"], "prompt": ["c", "d"]}),
     r"1 duplicate id\(s\), e.g. '2' \(2 rows\)"),
    (lambda d: write_pair(d, {"id": [1, 2], "prompt": ["a", "b"]}, {"id": [2, 3], "prompt": ["c", "d"]}),
     r"1 duplicate id\(s\), e.g. '2' \(2 rows\)"),
    (lambda d: write_pair(d, {"id": ["1", None, "1"], "prompt": list("abc")},
                          {"id": [None, "2"], "prompt": list("xy")}),
     r"id column 'id' is null in 2 row\(s\) of 2 input file\(s\), rows counted from 0: .*a.parquet \(1 row\(s\): 1\); "
     r".*b.parquet \(1 row\(s\): 0\)"),
    (lambda d: write_pair(d, {"id": [1, None, None], "prompt": list("abc")}),
     r"is null in 2 row\(s\) of 1 input file\(s\), rows counted from 0: .*a.parquet \(2 row\(s\): 1, 2\)"),
    (lambda d: write_pair(d, {"id": ["1"], "prompt": [5]}), r"column 'prompt' has type int64; it must be a string"),
    (lambda d: write_pair(d, {"id": ["1"], "prompt": ["a"]}, {"id": ["2"], "prompt": [b"b"]}),
     r"b.parquet: column 'prompt' has type binary; it must be a string"),
    (lambda d: write_pair(d, {"id": [1.5], "prompt": ["a"]}), r"column 'id' has type double; it must be a string or"),
    (lambda d: write_pair(d, {"id": ["1"], "prompt": ["a"], "seed": [0.5]}), r"seed column 'seed' has type double"),
    (lambda d: write_pair(d, {"key": ["1"], "prompt": ["a"]}), r"has no column 'id' \(columns: key, prompt\)"),
    (corrupt_a_data_page, r"cannot read input file .*a.parquet as Parquet"),
])
def test_bad_input_files_are_job_errors_before_any_model_loads(tmp_path, make_input, message):
    make_input(tmp_path / "in")
    config = load_job_config(None, {"input.paths": str(tmp_path / "in"), "model.uri": str(tmp_path / "no-model"),
                                    "output.uri": str(tmp_path / "out")})
    with pytest.raises(ValueError, match=message):
        run_job(config)  # the model folder does not exist: the input is checked first
    assert not (tmp_path / "out").exists() and not ray.is_initialized()
