"""FasterMoE's smart schedule and shadowing in the expert-parallel dispatcher: every token's
output and every gradient equal one process holding all experts (real gloo processes,
float64), and the shadowing cost model against a hand computation."""
import pytest
import torch

from moekit import MoEConfig, MoELayer
from moekit.config import ExpertParallelConfig
from moekit.parallel import expert_parallel
from moekit.parallel.expert_parallel import expert_parameters, shard_experts
from moekit.parallel.processes import run_on_ranks
from moekit.parallel.shadowing import ShadowCostModel, choose_shadowed

MODES = {"overlap": ExpertParallelConfig(overlap=True),
         "shadow": ExpertParallelConfig(shadow=True),
         "both": ExpertParallelConfig(overlap=True, shadow=True)}


def _layer(num_experts):
    torch.manual_seed(0)
    config = MoEConfig(hidden_size=16, ffn_size=8, num_experts=num_experts, top_k=2,
                       router_options={"bias": True})
    layer = MoELayer(config).double()
    with torch.no_grad():  # a hot expert 0 (and a warm 1): the case shadowing is for
        layer.router.bias[:2] = torch.tensor([3.0, 1.5])
    return layer


def _tokens(world):
    return torch.randn(12 * world, 16, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64)


def _forward_backward(layer, x):
    x = x.clone().requires_grad_()
    y, _ = layer(x)
    (y.pow(2).sum() + y.sum()).backward()
    return y.detach(), x.grad


def _all_modes(rank, world, num_experts):
    import torch.distributed as dist
    shadowed = []
    real_shadow_experts = expert_parallel.shadow_experts

    def spy(rows, counts, experts_ids, *args):
        shadowed.append(experts_ids)
        return real_shadow_experts(rows, counts, experts_ids, *args)

    expert_parallel.shadow_experts = spy
    outcomes = {}
    for mode, options in MODES.items():
        layer = _layer(num_experts)
        shard_experts(layer, dist.group.WORLD, rank, world, options=options)
        y, x_grad = _forward_backward(layer, _tokens(world).chunk(world)[rank])
        outcomes[mode] = {"y": y, "x_grad": x_grad, "router": layer.router.weight.grad,
                          "experts": {n: p.grad for n, p in expert_parameters(layer)},
                          "shadowed": list(shadowed)}
        shadowed.clear()
    return outcomes


@pytest.mark.parametrize("world,num_experts", [(2, 4), (4, 8)])
def test_overlap_and_shadowing_equal_one_process(world, num_experts):
    reference = _layer(num_experts)
    y, x_grad = _forward_backward(reference, _tokens(world))
    whole = dict(reference.experts.named_parameters())
    ranks = run_on_ranks(_all_modes, world, num_experts, timeout=60)
    local = num_experts // world
    for mode, options in MODES.items():
        # The smart schedule alone computes every row as the one exchange does: 1e-12.
        # Shadowing sums a hot expert's gradient over ranks in another order: float tolerance.
        tolerance = dict(rtol=1e-12, atol=1e-12) if not options.shadow else {}
        torch.testing.assert_close(torch.cat([r[mode]["y"] for r in ranks]), y, **tolerance)
        torch.testing.assert_close(torch.cat([r[mode]["x_grad"] for r in ranks]), x_grad,
                                   **tolerance)
        torch.testing.assert_close(sum(r[mode]["router"] for r in ranks),
                                   reference.router.weight.grad, **tolerance)
        for rank, outcome in enumerate(ranks):
            for name, grad in outcome[mode]["experts"].items():
                want = whole[name.removeprefix("experts.")].grad[rank * local:(rank + 1) * local]
                torch.testing.assert_close(grad, want, **tolerance)
            # Shadowing did happen, the same experts on every rank, and the hot one first.
            assert outcome[mode]["shadowed"] == ranks[0][mode]["shadowed"]
            assert [0 in s for s in outcome[mode]["shadowed"]] == [True] * options.shadow


def test_shadowing_cost_model_by_hand():
    # 2 ranks, 2 experts (one each); rank 0 sends 6 rows to expert 0 and 2 to expert 1,
    # rank 1 sends 4 to expert 0 and 0 to expert 1. Prices in round numbers: 1 s per row
    # computed (3 passes x 1 FLOP / 3 FLOP/s), 1 s per row crossing (4 x 1 byte / 4 B/s).
    model = ShadowCostModel(row_flops=1, row_bytes=1, expert_bytes=3, link_bytes_per_s=4,
                            flops_per_s=3)
    counts_RE = torch.tensor([[6, 2], [4, 0]])
    none, hot = torch.tensor([False, False]), torch.tensor([True, False])
    # No shadowing: rank 0 computes 10 rows, sends 2 and receives 4 -> 10 + 4 = 14;
    # rank 1 computes 2, sends 4, receives 2 -> 2 + 4 = 6.
    assert model.step_time(counts_RE, none) == 14
    # Expert 0 shadowed: rank 0 computes its 6, sends 2, receives 0 -> 8; rank 1 computes
    # its 4 + expert 1's 2 = 6, sends 0, receives 2 -> 8; plus 2 x 3 / 4 for the weights.
    assert model.step_time(counts_RE, hot) == 8 + 1.5
    assert choose_shadowed(counts_RE, model).tolist() == [True, False]
    # Expensive weights: shadowing expert 0 no longer pays.
    costly = ShadowCostModel(row_flops=1, row_bytes=1, expert_bytes=20, link_bytes_per_s=4,
                             flops_per_s=3)
    assert costly.step_time(counts_RE, hot) == 8 + 10
    assert choose_shadowed(counts_RE, costly).tolist() == [False, False]
    # Uniform loads: nothing to gain.
    assert not choose_shadowed(torch.tensor([[3, 3], [3, 3]]), model).any()


def test_expert_parallel_options_are_checked():
    with pytest.raises(ValueError, match="link_gbps=0 is not allowed"):
        ExpertParallelConfig(link_gbps=0)
    with pytest.raises(ValueError, match="overlap='yes' is not allowed"):
        ExpertParallelConfig(overlap="yes")


def test_moekit_train_with_overlap_and_shadowing_trains_the_one_process_run(tmp_path):
    """From the CLI: 2 processes holding 2 of the 4 experts each, smart schedule and
    shadowing on, train the run one process trains. (Compute priced dear, so that any compute
    imbalance between the ranks makes it shadow; whether these loads do is theirs: the layer
    test above is the one that makes sure shadowing happens.)"""
    from test_distributed_train import CONFIG, _moekit, _records
    (tmp_path / "run.toml").write_text(CONFIG)
    one = _moekit("train", "--config", str(tmp_path / "run.toml"), "--out", str(tmp_path / "one"),
                  "--quiet")
    two = _moekit("train", "--config", str(tmp_path / "run.toml"), "--out", str(tmp_path / "two"),
                  "--quiet", "--nproc", "2", "--expert", "2", "--ep-overlap", "--ep-shadow",
                  "--ep-expert-gflops", "0.001")
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    got, want = _records(tmp_path / "two"), _records(tmp_path / "one")
    assert [r["kind"] for r in got] == [r["kind"] for r in want]
    for a, b in zip(got, want):
        for key in ("loss", "val_loss"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4), key


def test_overlap_and_shadowing_need_expert_parallelism(tmp_path):
    from test_distributed_train import _moekit
    for flags, message in ((["--ep-overlap"], "--ep-overlap is not allowed with --expert 1"),
                           (["--ep-shadow"], "--ep-shadow is not allowed with --expert 1"),
                           (["--ep-shadow", "--expert", "2", "--tensor", "2"],
                            "--ep-shadow is not allowed with --tensor 2")):
        result = _moekit("train", "--out", str(tmp_path / "run"), *flags, "--nproc", "2",
                         timeout=60)
        assert result.returncode == 2 and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_the_benchmark_refuses_a_zipf_exponent_that_is_not_positive():
    import pathlib
    import subprocess
    import sys
    script = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "faster_moe.py"
    result = subprocess.run([sys.executable, str(script), "--zipf", "0"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    # argparse's usage, then one line naming the value and what is allowed.
    assert result.stderr.strip().splitlines()[-1].endswith(
        "argument --zipf: 0.0 is not allowed: expected a number > 0")
