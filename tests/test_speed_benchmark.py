"""The speed benchmark's CPU dry run of a recipe's path (the GPU suite runs the same at 8B shapes) and its projection."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest

from benchmarks.peers.job import load_recipe
from cbq_lightning.windows import window_schedule

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def speed():
    return importlib.import_module("benchmarks.speed")


@pytest.fixture(scope="module")
def dry_run(speed, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The shipped W4A16 recipe (GPTQ start, clip search, CFP, rotations) at the tiny shape, 4 samples, 1 epoch."""
    path = tmp_path_factory.mktemp("speed") / "record.json"
    argv = ["--config", str(REPO / "configs" / "w4a16.yaml"), "--shape", "tiny", "--device", "cpu",
            "--measure-samples", "4", "--measure-epochs", "1", "--data.seqlen", "32", "--output", str(path)]
    assert speed.main(argv) == 0
    return json.loads(path.read_text())


def test_record_holds_every_stage_and_the_ratio(speed, dry_run: dict) -> None:
    measured, projected = dry_run["measured"], dry_run["projected"]
    assert set(measured["stages_s"]) == set(speed.STAGES) == set(projected["stages_s"])
    stages = measured["stages_s"]
    # the recipe's own stages ran, each timed apart; quantize is GPTQ's here, validation is off in the recipe
    for stage in ("gptq_start", "clip_search", "cfp", "input_statistics", "teacher_caching", "training_steps",
                  "advancing", "checkpoint", "trainer_overhead"):
        assert stages[stage] > 0, stage
    assert stages["quantize"] == 0 and stages["validation"] == 0
    assert all(seconds >= 0 for seconds in stages.values())
    # exclusive stage times: together they are the window's wall time, nothing counted twice or left out
    assert math.isclose(sum(stages.values()), measured["window_s"], rel_tol=1e-6)
    batches = math.ceil(4 / load_recipe(REPO / "configs" / "w4a16.yaml").train.batch_size)
    assert measured["steps"] == batches == len(measured["step_times_s"])  # 4 samples, 1 epoch, the recipe's batch
    work = stages["teacher_caching"] + stages["advancing"]
    # the denominator bracketing the work: before the window's entry and before its leave, averaged
    assert len(measured["plain_forwards_s"]) == 2 and min(measured["plain_forwards_s"]) > 0
    assert math.isclose(measured["plain_forward_s"], sum(measured["plain_forwards_s"]) / 2, rel_tol=1e-12)
    assert math.isclose(dry_run["window_work_over_forward"], work / measured["plain_forward_s"], rel_tol=1e-9)
    cpu = measured["cpu_time_stages_s"]
    assert set(cpu) == set(speed.STAGES) and measured["plain_forward_cpu_time_s"] > 0
    assert math.isclose(dry_run["window_work_over_forward_cpu_time"],
                        (cpu["teacher_caching"] + cpu["advancing"]) / measured["plain_forward_cpu_time_s"], rel_tol=1e-9)
    assert dry_run["autoround"]["status"] == "skipped" and dry_run["cbq_over_autoround"] is None
    assert dry_run["peak_gpu_gib"] is None and dry_run["peak_rss_gib"] > 0
    assert dry_run["window"] == {"size": 2, "overlap": 1, "built_blocks": 4, "measured_index": 1}


def test_projection_is_the_recipe_budget_over_the_shape(dry_run: dict) -> None:
    recipe = load_recipe(REPO / "configs" / "w4a16.yaml", ["--data.seqlen", "32"])
    projected = dry_run["projected"]
    assert projected["samples"] == recipe.data.num_samples and projected["seqlen"] == 32
    steps = recipe.train.epochs * math.ceil(recipe.data.num_samples / recipe.train.batch_size)
    assert projected["steps_per_window"] == steps
    assert math.isclose(projected["stages_s"]["training_steps"], steps * projected["step_s"], rel_tol=1e-9)
    assert math.isclose(projected["window_s"], sum(projected["stages_s"].values()), rel_tol=1e-9)
    assert projected["windows"] == len(window_schedule(4, recipe.window))  # the tiny shape's 4 blocks
    assert projected["total_min"] > projected["calibration_min"] > 0 and projected["evaluation_s"] > 0


def test_per_sample_stages_scale_to_the_budget_and_the_others_do_not(speed) -> None:
    """Measuring 4 of the recipe's 16 samples: caching, advancing and the other per-sample stages count 4 times,
    the block's quantization once, the steps as the recipe's epochs x batches at the steady step time."""
    recipe = load_recipe(REPO / "configs" / "tiny.yaml")
    stages = {stage: 1.0 for stage in speed.STAGES}
    run = speed.WindowRun(stages=stages, steps=[9.0, 2.0, 2.0], plain_forward_s=1.0, plain_forwards_s=[1.0],
                          window_s=sum(stages.values()),
                          capture_s=0.5, samples=4, batch_size=recipe.train.batch_size)
    shape = {**speed.SHAPES["tiny"], "blocks": 10}
    projected = speed.project(run, recipe, 3, shape, rotation_s=2.0, built_blocks=4,
                              evaluation={"block": 0.1, "head": 0.2})
    scale = recipe.data.num_samples / 4
    for stage in speed.PER_SAMPLE:
        assert projected["stages_s"][stage] == scale
    for stage in ("gptq_start", "clip_search", "cfp", "trainer_overhead"):
        assert projected["stages_s"][stage] == 1.0
    assert projected["step_s"] == 2.0  # the first step's warm-up is left out
    assert projected["stages_s"]["training_steps"] == 2.0 * recipe.train.epochs * math.ceil(
        recipe.data.num_samples / recipe.train.batch_size)
    assert projected["rotation_s"] == 2.0 * 10 / 4 and projected["capture_s"] == 0.5 * scale
    assert projected["windows"] == len(window_schedule(10, recipe.window))


def _idle_window(speed, plain_forward_s: float):
    """A measured window of 4 samples whose every stage and step took no time: the projection then holds only what
    the test sets (the plain forward) and what it derives from it."""
    return speed.WindowRun(stages={stage: 0.0 for stage in speed.STAGES}, steps=[0.0], plain_forward_s=plain_forward_s,
                           plain_forwards_s=[plain_forward_s], window_s=0.0, capture_s=0.0, samples=4, batch_size=4)


@pytest.mark.parametrize(("flags", "cuda", "passes"), [
    ([], False, 4 * 3 + 2),  # CPU: blocks kept, three forwards' worth per training pass, two measuring passes
    ([], True, 4 * 4 + 2),  # CUDA: blocks recomputed in the backward by default, one forward more
    (["--extensions.end_to_end.checkpoint_blocks", "false"], True, 4 * 3 + 2),
])
def test_the_end_to_end_phase_is_projected_from_the_plain_forward_and_the_head(
    speed, flags: list[str], cuda: bool, passes: int,
) -> None:
    """Hand-computed: the plain forward of a 2-block window over 4 samples takes 0.8 s (0.1 s per block and sample);
    the head 0.2 s per 128-token evaluation sequence, the phase samples 64 positions (0.1 s); 10 blocks, 16 samples,
    4 epochs: 16 x (10 x 0.1 + 0.1) x passes. The phase counts in the calibration time; none without it."""
    recipe = load_recipe(REPO / "configs" / "tiny.yaml",
                         ["--extensions.end_to_end", "{epochs: 4, tokens: 64}", "--eval.seqlen", "128", *flags])
    run = _idle_window(speed, plain_forward_s=0.8)
    shape = {**speed.SHAPES["tiny"], "blocks": 10}
    evaluation = {"block": 0.1, "head": 0.2}
    assert recipe.data.num_samples == 16 and recipe.window.size == 2
    expected = 16 * (10 * 0.1 + 64 * 0.2 / 128) * passes
    assert math.isclose(speed.end_to_end_s(run, recipe, 10, evaluation, cuda), expected, rel_tol=1e-9)
    projected = speed.project(run, recipe, 3, shape, rotation_s=0.0, built_blocks=4, evaluation=evaluation, cuda=cuda)
    assert math.isclose(projected["end_to_end_s"], expected, rel_tol=1e-9)
    assert math.isclose(projected["calibration_min"] * 60, expected, rel_tol=1e-9)  # every other stage is 0 here
    without = load_recipe(REPO / "configs" / "tiny.yaml")
    assert speed.end_to_end_s(run, without, 10, evaluation, cuda) == 0.0


@pytest.mark.parametrize(("flags", "sets"), [
    ([], 2), (["--eval.fp_reference", "false"], 1),
    (["--extensions.end_to_end", "{evaluate_before: true}"], 3),
    (["--extensions.end_to_end", "{evaluate_before: true}", "--eval.fp_reference", "false"], 2),
])
def test_every_evaluation_the_run_makes_is_projected(speed, flags: list[str], sets: int) -> None:
    """Per dataset: the quantized model, the FP reference (``eval.fp_reference``) and the model before the
    end-to-end phase (``extensions.end_to_end.evaluate_before``), each over the same windows."""
    recipe = load_recipe(REPO / "configs" / "tiny.yaml", flags)
    run = _idle_window(speed, plain_forward_s=0.0)
    projected = speed.project(run, recipe, 3, {**speed.SHAPES["tiny"], "blocks": 10}, rotation_s=0.0,
                              built_blocks=4, evaluation={"block": 0.1, "head": 0.2})
    assert projected["evaluation"]["sets"] == sets * len(recipe.eval.datasets)
    assert math.isclose(projected["evaluation_s"], sets * len(recipe.eval.datasets) * recipe.eval.max_windows * 1.2)
