"""Skywork-MoE's non-uniform pipeline split against an exhaustive search over every split."""
import itertools
from dataclasses import replace

import pytest

from moekit.config import preset
from moekit.plan.pipeline import head_cost, layer_costs, plan_stages, uniform_stages


def _compositions(layers, parts):
    for cuts in itertools.combinations(range(1, layers), parts - 1):
        bounds = (0, *cuts, layers)
        yield tuple(b - a for a, b in zip(bounds, bounds[1:]))


def _slowest(costs, head, stages):
    start, worst = 0, 0.0
    for index, count in enumerate(stages):
        stage = sum(costs[start:start + count]) + (head if index == len(stages) - 1 else 0)
        worst, start = max(worst, stage), start + count
    return worst


@pytest.mark.parametrize("name, layers, pipeline", [("tiny", 8, 2), ("tiny", 9, 4),
                                                    ("skywork-moe-146b", 24, 5),
                                                    ("hunyuan-large-389b", 12, 3)])
def test_the_split_is_the_best_of_all_splits(name, layers, pipeline):
    config = replace(preset(name), num_layers=layers)
    costs, head = layer_costs(config, 4096), head_cost(config)
    plan = plan_stages(config, pipeline, 4096)
    best = min(_slowest(costs, head, s) for s in _compositions(layers, pipeline))
    assert sum(plan.stage_layers) == layers and len(plan.stage_layers) == pipeline
    assert max(plan.stage_costs) == pytest.approx(best, rel=1e-12)


def test_skywork_moe_split_of_24_layers_over_5_stages():
    # The report's example: 24 layers as [5, 5, 5, 5, 4] over 5 stages, the loss's stage last.
    config = replace(preset("skywork-moe-146b"), num_layers=24)
    assert plan_stages(config, 5, 8192).stage_layers == (5, 5, 5, 5, 4)


def test_a_heavy_output_projection_moves_layers_off_the_last_stage():
    # The tiny model at 8 layers and a vocabulary of 8,192: the head costs more than 3 layers.
    config = replace(preset("tiny"), num_layers=8, vocab_size=8192)
    planned, uniform = plan_stages(config, 2, 128), uniform_stages(config, 2, 128)
    assert uniform.stage_layers == (4, 4) and planned.stage_layers == (7, 1)
    assert planned.step_time(8, 1024, 1e12) < uniform.step_time(8, 1024, 1e12)
    assert planned.bubble(8) < uniform.bubble(8)


def test_measured_times_plan_the_split_by_hand():
    # 8 layers of 1.0 and a head of 4.7: 6 + 2 gives stages of 6.0 and 6.7, 7 + 1 of 7.0 and
    # 5.7, 5 + 3 of 5.0 and 7.7: 6 + 2 is the fastest. By FLOPs the head is heavier (7 + 1).
    config = replace(preset("tiny"), num_layers=8, vocab_size=8192)
    planned = plan_stages(config, 2, 128, layer_times=[1.0] * 8, head_time=4.7)
    assert planned.stage_layers == (6, 2)
    assert planned.stage_costs == pytest.approx((6.0, 6.7))
    assert plan_stages(config, 2, 128, layer_times=[1.0] * 8).stage_layers == (7, 1)


def test_bad_pipelines_are_refused():
    with pytest.raises(ValueError, match="pipeline=9 is not allowed: more stages"):
        plan_stages(preset("tiny"), 9, 128)
    with pytest.raises(ValueError, match="layer_times has 3 entries"):
        plan_stages(preset("tiny"), 2, 128, layer_times=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="head_time is not allowed without layer_times"):
        plan_stages(preset("tiny"), 2, 128, head_time=3.0)


def test_plan_prints_the_split_beside_the_uniform_one(capsys):
    import json

    from moekit.cli import main
    assert main(["plan", "--preset", "tiny", "--pipeline", "2", "--world-size", "2",
                 "--json"]) == 0
    split = json.loads(capsys.readouterr().out)["pipeline_split"]
    assert split["uniform"]["stage_layers"] == [2, 2]
    assert split["planned"]["stage_layers"] == [3, 1]  # the output projection is the 4th layer
    assert split["planned"]["relative_step_time"] < 1 and split["micro_batches"] == 8
