"""The step-time simulator against hand computations of each part."""
import pytest

from moekit.config import preset
from moekit.plan import Layout, count_parameters, training_flops_per_token
from moekit.plan.simulate import Link, Machine, simulate_step

LINK = Link(bandwidth=1e9, latency=1e-5)
MACHINE = Machine(flops=1e12, efficiency=0.5, devices_per_node=8, inside_node=LINK,
                  between_nodes=Link(bandwidth=1e8, latency=1e-4))


def test_one_device_is_compute_only():
    config = preset("tiny")
    got = simulate_step(config, Layout(), MACHINE, micro_batch=4, seq_len=128, micro_batches=2)
    flops = training_flops_per_token(config, 128).model_flops
    assert got.compute == pytest.approx(2 * 4 * 128 * flops / 0.5e12)
    assert got.all_to_all == got.all_reduce == got.point_to_point == got.bubble == 0
    assert got.step == got.compute
    with_recompute = simulate_step(config, Layout(), MACHINE, 4, 128, 2, recompute=True)
    assert with_recompute.compute == pytest.approx(got.compute * 4 / 3)


def test_expert_parallel_exchanges_and_reductions_by_hand():
    config = preset("tiny")  # 4 layers, all MoE, D 128, top-2 of 8, fp32 here
    got = simulate_step(config, Layout(data=2, expert=2), MACHINE, micro_batch=4, seq_len=128,
                        micro_batches=1, bytes_per_number=4)
    rows = 4 * 128 * 2 * (2 - 1) / 2  # half of a device's routes go to the other rank
    counts = 8 // 2 * 8  # the other rank's 4 experts' counts, int64
    assert got.all_to_all == pytest.approx(
        4 * (4 * LINK.seconds(rows * 128 * 4, 1) + LINK.seconds(counts, 1)))
    exchange = Link(bandwidth=5e8, latency=3e-4)  # the all-to-all's own rate, measured apart
    measured = simulate_step(config, Layout(data=2, expert=2),
                             Machine(flops=1e12, efficiency=0.5, devices_per_node=8,
                                     inside_node=LINK, between_nodes=LINK, all_to_all=exchange),
                             4, 128, 1, bytes_per_number=4)
    assert measured.all_to_all == pytest.approx(
        4 * (4 * exchange.seconds(rows * 128 * 4, 1) + exchange.seconds(counts, 1)))
    assert measured.all_reduce == got.all_reduce  # the gradients' ring keeps the level's link
    params = count_parameters(config)
    experts = params.component("routed_experts").total
    ring = 2 * (2 - 1) / 2
    replicated = LINK.seconds(ring * (params.total - experts) * 4, 2)
    assert got.all_reduce == pytest.approx(replicated)  # each expert held once: no reduction


def test_a_pipeline_pays_its_bubble_and_boundaries():
    config = preset("tiny")
    got = simulate_step(config, Layout(pipeline=2), MACHINE, 4, 128, micro_batches=4)
    assert got.point_to_point == pytest.approx(4 * 2 * LINK.seconds(4 * 128 * 128 * 2))
    assert got.bubble == pytest.approx((got.compute + got.point_to_point) / 4)
    spread = Machine(flops=1e12, efficiency=0.5, devices_per_node=1, inside_node=LINK,
                     between_nodes=Link(bandwidth=1e8, latency=1e-4))
    slower = simulate_step(config, Layout(pipeline=2), spread, 4, 128, micro_batches=4)
    assert slower.point_to_point > got.point_to_point  # the stages are on two nodes now


def test_bad_machines_are_refused():
    with pytest.raises(ValueError, match="efficiency=1.5 is not allowed"):
        Machine(flops=1e12, efficiency=1.5, devices_per_node=8, inside_node=LINK,
                between_nodes=LINK)
    with pytest.raises(ValueError, match="micro_batches=0 is not allowed"):
        simulate_step(preset("tiny"), Layout(), MACHINE, 4, 128, 0)


def test_expert_data_parallelism_replaces_the_all_to_all_by_the_tensor_groups_reduces():
    config = preset("tiny")
    edp = simulate_step(config, Layout(data=1, tensor=2, expert=2), MACHINE, 4, 128, 1)
    activations = 4 * 128 * 128 * 2
    assert edp.all_to_all == 0
    assert edp.tensor_parallel == pytest.approx(4 * 4 * LINK.seconds(activations, 2))
    assert edp.compute == pytest.approx(
        simulate_step(config, Layout(), MACHINE, 4, 128, 1).compute / 2)


def test_plan_simulate_prints_the_prediction_and_its_sensitivity(capsys):
    import json

    from moekit.cli import main
    assert main(["plan", "--preset", "tiny", "--world-size", "2", "--expert", "2",
                 "--peak-tflops", "10", "--efficiency", "0.5", "--simulate", "--json"]) == 0
    simulation = json.loads(capsys.readouterr().out)["simulation"]
    assert simulation["prediction"]["all_to_all"] > 0
    low, high = simulation["sensitivity"]["efficiency"]
    assert low < simulation["prediction"]["tokens_per_device_per_second"] < high
    assert main(["plan", "--preset", "tiny", "--simulate"]) == 2
    assert "--simulate needs the device's peak" in capsys.readouterr().err


def test_the_dispatch_copies_by_hand():
    config = preset("tiny")  # 4 MoE layers, D 128, top-2
    copying = Machine(flops=1e12, efficiency=0.5, devices_per_node=8, inside_node=LINK,
                      between_nodes=LINK, copy_bandwidth=1e10)
    one = simulate_step(config, Layout(), copying, micro_batch=4, seq_len=128, micro_batches=2,
                        bytes_per_number=4)
    tokens, routes, row_bytes = 4 * 128, 4 * 128 * 2, 128 * 4
    # per layer: 10 row passes per route, 2 per token; 4 layers, 2 micro-batches
    assert one.dispatch == pytest.approx(2 * 4 * (10 * routes + 2 * tokens) * row_bytes / 1e10)
    assert one.imbalance == 0  # one device: nothing to wait for
    assert one.step == pytest.approx(one.compute + one.dispatch)
    assert simulate_step(config, Layout(), MACHINE, 4, 128, 2).dispatch == 0  # not modelled


def test_the_busiest_expert_rank_sets_the_pace_by_hand():
    config = preset("tiny")
    copying = Machine(flops=1e12, efficiency=0.5, devices_per_node=8, inside_node=LINK,
                      between_nodes=LINK, copy_bandwidth=1e10)
    loads = [1.0, 1.5, 1.25, 1.25]  # the busiest rank's rows over the mean, per layer
    got = simulate_step(config, Layout(data=2, expert=2), copying, micro_batch=4, seq_len=128,
                        micro_batches=1, bytes_per_number=4, expert_load=loads)
    tokens, routes, row_bytes = 4 * 128, 4 * 128 * 2, 128 * 4
    expert_flops = 6 * 2 * 3 * 128 * 128  # per token and layer: top-2 SwiGLU experts, D = F = 128
    excess = (0 + 0.5 + 0.25 + 0.25)  # summed over the layers
    assert got.imbalance == pytest.approx(tokens * expert_flops * excess / 0.5e12)
    received = sum(routes * load for load in loads)  # the busiest rank's, over the layers
    assert got.dispatch == pytest.approx(
        (4 * (10 * routes + 2 * tokens) + 8 * received) * row_bytes / 1e10)
    balanced = simulate_step(config, Layout(data=2, expert=2), copying, 4, 128, 1,
                             bytes_per_number=4)
    assert balanced.imbalance == 0
    assert got.step == pytest.approx(balanced.step + got.imbalance
                                     + got.dispatch - balanced.dispatch)
    for bad in (0.9, [1.0, 1.2]):
        with pytest.raises(ValueError, match="expert_load=.* is not allowed"):
            simulate_step(config, Layout(data=2, expert=2), copying, 4, 128, 1, expert_load=bad)


def test_plan_simulate_takes_the_capacity_factor_as_the_load_bound(capsys):
    import json

    from moekit.cli import main
    flags = ["plan", "--preset", "tiny", "--world-size", "2", "--expert", "2", "--peak-tflops",
             "10", "--efficiency", "0.5", "--copy-gbps", "100", "--simulate", "--json"]
    assert main(flags) == 0  # tiny trains with capacity factor 1.25: the busiest rank <= 1.25
    simulation = json.loads(capsys.readouterr().out)["simulation"]
    assert simulation["inputs"]["expert_load"] == 1.25
    assert simulation["prediction"]["imbalance"] > 0 and simulation["prediction"]["dispatch"] > 0
    assert main(flags + ["--expert-load", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["simulation"]["prediction"]["imbalance"] == 0
    assert main(flags + ["--expert-load", "0.5"]) == 2
    assert "expert_load=0.5 is not allowed" in capsys.readouterr().err
