"""Each benchmark's code path on the tiny model, one short iteration: the results' structure and token equality.

Timings are not checked (they belong to `python -m benchmarks.run`, never to the tests). The engine and data-plane
benchmarks need a Ray cluster, too slow to start here: their own pieces (prompt files, the bare loop, the steady-rate
arithmetic, the memory sampler) are run without it; the engine itself is tested in tests/test_engine.py.
"""

import json
import math
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from benchmarks import engine, model, sampler
from benchmarks.ceiling import reference_ceiling
from benchmarks.pipelines import SIZES, Sampling, matching_pipeline, reference_pipeline, reference_tokens
from benchmarks.run import main
from vqbatch.config import validate_job_config
from vqbatch.engine import Progress

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # diffusers' deprecation notes on the reference


def test_model_benchmark_writes_json_and_table_with_equal_tokens(tmp_path, capsys):
    main(["model", "--config", "tiny", "--steps", "3", "--batch-sizes", "1,2", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "model-tiny.json").read_text())
    assert [row["batch"] for row in result["rows"]] == [1, 2]
    for row in result["rows"]:
        assert row["same_tokens"] is True
        assert row["reference_images_per_s"] > 0 and row["vqbatch_images_per_s"] > 0
        assert row["speedup"] == pytest.approx(row["vqbatch_images_per_s"] / row["reference_images_per_s"])
        for ceiling in ("ceiling_same_kernels", "forward_ceiling_same_kernels"):
            assert math.isfinite(row[ceiling]) and row[ceiling] > 1
    assert result["summary"]["all_same_tokens"] is True
    assert result["machine"]["cpu_cores"] >= 1 and result["machine"]["torch_threads"] >= 1
    table = (tmp_path / "model-tiny.md").read_text()
    assert "| same_tokens | ceiling_same_kernels | forward_ceiling_same_kernels |" in table
    assert "| batch | steps |" in table and table in capsys.readouterr().out


def test_ceiling_profiles_every_reference_forward_and_its_forced_kernels():
    reference = reference_pipeline(SIZES["tiny"])
    sampling = Sampling(guidance_scale=5.0, truncation_rate=0.86, seed=0, device="cpu")
    result = reference_ceiling(reference, lambda: reference_tokens(reference, ["a red circle"], 3, sampling))
    assert result.forwards == 3
    assert 0 < result.forward_forced_s < result.forward_s
    # the call also runs the text encoder's products, the VQ-VAE's convolutions and the random draws
    assert result.forwards * result.forward_forced_s < result.forced_s < result.call_s
    assert result.call > 1 and result.forward > 1


def test_sampler_benchmark_full_chain_row_matches_the_reference(tmp_path):
    main(["sampler", "--config", "tiny", "--step-counts", "3,10", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "sampler-tiny.json").read_text())["rows"]
    assert [(row["pipeline"], row["steps"]) for row in rows] == [("reference", 10), ("vqbatch skip", 3),
                                                                  ("vqbatch skip", 10)]
    assert rows[2]["same_tokens_as_reference"] is True and rows[1]["same_tokens_as_reference"] is None


def test_sampler_refuses_more_steps_than_the_chain():
    settings = sampler.Settings(size="tiny", step_counts=(11,), batch=1, guidance_scale=5.0, truncation_rate=0.86,
                                device="cpu", dtype="float32", seed=0)
    with pytest.raises(ValueError, match="at most the 'tiny' chain's 10 steps"):
        sampler.run(settings)


def test_flop_count_of_the_ithq_transformer():
    # 36 blocks of 1408 wide at 1024 latent tokens: about 2.2 GFLOP per token and forward, doubled by guidance
    flops = model.transformer_flops_per_image_step(SIZES["ithq"], guided=True)
    assert 4.4e12 < flops < 4.7e12


def test_engine_bare_loop_samples_every_prompt(tmp_path):
    checkpoint = matching_pipeline(reference_pipeline(SIZES["tiny"])).save_pretrained(tmp_path / "checkpoint")
    ids = engine.write_prompts(tmp_path / "prompts.parquet", 3)
    settings = engine.Settings(size="tiny", images=3, steps=2, batch=2, device="cpu", dtype="float32", seed=0)
    config = engine.job_config(settings, tmp_path / "prompts.parquet", checkpoint, tmp_path / "out", 1.0)
    prompts = pq.read_table(tmp_path / "prompts.parquet").column("prompt").to_pylist()
    bare = engine.run_bare_loop(config, ids, prompts, threads=1)
    assert sorted(bare.tokens) == ids and all(len(tokens) == 16 for tokens in bare.tokens.values())
    assert bare.steady_images_per_s > 0 and bare.end_to_end_images_per_s > 0


def test_engine_steady_rate_uses_the_second_half_of_the_files():
    progress = [Progress(images, 8, seconds) for images, seconds in [(2, 10.0), (4, 11.0), (6, 12.0), (8, 13.0)]]
    assert engine.steady_rate(progress) == pytest.approx(4 / 2)
    at_once = [Progress(images, 8, 10.0) for images in (2, 4, 6, 8)]
    assert engine.steady_rate(at_once) is None


def test_engine_running_rate_counts_from_the_first_file_to_the_last():
    progress = [Progress(images, 8, seconds) for images, seconds in [(2, 30.0), (4, 32.0), (6, 35.0), (8, 36.0)]]
    assert engine.first_to_last_file_rate(progress) == pytest.approx(6 / 6)
    assert engine.first_to_last_file_rate(progress[:1]) is None


def test_dataplane_prompt_files_are_sharded_and_distinct(tmp_path):
    pytest.importorskip("psutil", reason="the data-plane benchmark samples memory with psutil (bench extra)")
    from benchmarks import dataplane

    folder = dataplane.write_prompt_files(tmp_path / "prompts", 25_000)
    tables = [pq.read_table(path) for path in sorted(folder.iterdir())]
    assert [table.num_rows for table in tables] == [10_000, 10_000, 5_000]
    prompts = [prompt for table in tables for prompt in table.column("prompt").to_pylist()]
    assert len(set(prompts)) == 25_000
    settings = dataplane.Settings(row_counts=(25_000,), batch=100, rows_per_file=1000, output_format="webdataset",
                                  refresh_rows=5)
    config = dataplane.job_config(settings, folder, tmp_path / "out")
    assert config == validate_job_config(config.model_dump(mode="json"))
    assert config.model.uri == "noop" and config.output.format == "webdataset"
    added = dataplane.write_prompt_files(tmp_path / "added", 5, first=25_000)  # what a refresh adds: new ids
    new_ids = pq.read_table(added).column("id").to_pylist()
    assert len(new_ids) == 5 and not set(new_ids) & {i for table in tables for i in table.column("id").to_pylist()}
    refresh = dataplane.job_config(settings, [folder, added], tmp_path / "out", mode="refresh")
    assert refresh.output.mode == "refresh" and len(refresh.input.paths) == 2


def test_peak_memory_sees_the_driver_and_its_children():
    pytest.importorskip("psutil", reason="the memory sampler uses psutil (bench extra)")
    from benchmarks.memory import PeakMemory

    with PeakMemory(interval=0.05) as memory:
        child = subprocess.Popen([sys.executable, "-c", "import time; data = bytearray(64 * 2**20); time.sleep(1)"])
        child.wait()
    assert memory.peaks.driver_mib > 10
    assert 10 < memory.peaks.driver_start_mib <= memory.peaks.driver_mib
    assert memory.peaks.tree_total_mib >= memory.peaks.driver_mib + 50  # the child's 64 MiB buffer was seen


def test_quality_benchmark_scores_every_setting_and_reads_the_grid_against_the_targets(tmp_path):
    main(["quality", "--one-object", "4", "--two-object", "2", "--step-counts", "8,2", "--guidance-scales", "1,3",
          "--truncation-rates", "1,0.86", "--batch", "6", "--out", str(tmp_path)])  # the shipped default model
    result = json.loads((tmp_path / "quality.json").read_text())
    rows = result["rows"]
    assert [(r["sampler"], r["steps"], r["truncation_rate"], r["guidance_scale"], r["truncation_target"])
            for r in rows] == [
        (sampler, steps, truncation, guidance, target) for sampler in ("reference", "purity") for steps in (8, 2)
        for truncation in (1.0, 0.86) for guidance, target in ((1.0, "guided"), (3.0, "guided"), (3.0, "prompted"))
        if truncation < 1.0 or target == "guided"]  # untruncated, both targets are the same: one row
    for row in rows:
        assert row["transformer_calls"] == row["steps"] * (2 if row["guidance_scale"] > 1 else 1)
        for key in ("one_object_all", "two_object_all", "one_object_specks", "two_object_specks"):
            assert 0.0 <= row[key] <= 1.0
        assert row["one_object_all"] <= min(row[f"one_object_{a}"] for a in ("kind", "colour", "position", "size"))
    summary = result["summary"]
    assert summary["baseline"] == max(rows[:5], key=lambda r: r["one_object_all"])  # reference rows at 8 steps
    cheap = [r for r in rows if 4 * r["transformer_calls"] <= summary["baseline"]["transformer_calls"]]
    assert summary["best_with_4x_fewer_calls"]["one_object_all"] == max(r["one_object_all"] for r in cheap)
    best = summary["best_guided"]
    guided = [r for r in rows if r["guidance_scale"] == 3]
    assert (best["two_object_all"], best["one_object_all"]) == max((r["two_object_all"], r["one_object_all"])
                                                                    for r in guided)
    unguided = summary["unguided_same_setting"]
    assert {k: unguided[k] for k in ("sampler", "steps", "truncation_rate", "guidance_scale")} == {
        "sampler": best["sampler"], "steps": best["steps"], "truncation_rate": best["truncation_rate"],
        "guidance_scale": 1.0}
    untruncated = next(r for r in rows if r["truncation_rate"] == 1.0 and all(
        r[k] == best[k] for k in ("sampler", "steps", "guidance_scale")))
    assert summary["truncation_vs_none_two_object_points"] == pytest.approx(
        100 * (best["two_object_all"] - untruncated["two_object_all"]), abs=0.05)
    assert summary["guidance_gain_two_object_points"] == pytest.approx(
        100 * (best["two_object_all"] - unguided["two_object_all"]), abs=0.05)
    table = (tmp_path / "quality.md").read_text()
    assert "| sampler | steps | guidance_scale | truncation_rate | truncation_target |" in table
    assert "two_object_specks" in table


@pytest.mark.parametrize("flag, value, message", [("--samplers", "reference,fast", "'fast' not allowed"),
                                                  ("--guidance-scales", "1,x", "comma-separated finite numbers"),
                                                  ("--guidance-scales", "1,inf", "comma-separated finite numbers"),
                                                  ("--truncation-rates", "1,1.5", "truncation rates in (0, 1]"),
                                                  ("--truncation-targets", "guided,both", "'both' not allowed"),
                                                  ("--step-counts", "0", "positive integers")])
def test_quality_benchmark_refuses_a_bad_grid(flag, value, message, capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["quality", flag, value, "--out", str(tmp_path)])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "quality.json").exists()


def test_cpu_seconds_leave_out_a_process_that_exited_instead_of_subtracting_it():
    psutil = pytest.importorskip("psutil", reason="the CPU count uses psutil (bench extra)")
    from benchmarks import dataplane

    burn = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\ntime.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", burn])
    while sum(psutil.Process(child.pid).cpu_times()[:2]) < 0.3:
        time.sleep(0.05)
    before = dataplane.tree_cpu_seconds()
    assert before[child.pid] >= 0.3
    child.kill()
    child.wait()
    assert 0 <= dataplane.cpu_seconds_since(before) < 0.3
