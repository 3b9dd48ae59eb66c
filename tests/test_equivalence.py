"""The equivalence matrix (docs/correctness.md): however a step's global batch is cut, into
micro-batches, data-parallel ranks or padded rows, it computes the same loss, router losses,
statistics and gradients as one process on the whole batch. Float64, so that the tolerance
(relative 1e-9 of each tensor's largest entry) sees only summation order."""
from dataclasses import replace

import pytest
import torch

from moekit.config import ModelConfig, MoEConfig, TrainConfig
from moekit.model import Transformer
from moekit.parallel.processes import run_on_ranks
from moekit.train.equivalence import compare, left_padded, step_outcome
from moekit.moe.capacity import expert_capacity
from moekit.parallel.mesh import Mesh
from moekit.train.step import IGNORE_INDEX, train_step

TOLERANCE = 1e-9
MODEL = ModelConfig(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    ffn_size=48, max_seq_len=32,
                    moe=MoEConfig(hidden_size=32, ffn_size=24, num_experts=4, top_k=2,
                                  aux_loss="switch", aux_loss_coef=0.1, z_loss_coef=0.01))
STEP = TrainConfig(batch_size=8, seq_len=12, grad_clip=None, lb_scope="step")


def _batch(rows=8, seq=12, seed=1):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, MODEL.vocab_size, (rows, seq + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def _assert_equal_outcomes(got, want):
    failed = [check for check in compare(got, want, TOLERANCE) if not check.passed]
    assert not failed, failed


@pytest.mark.parametrize("aux_loss", ["switch", "skywork"])
def test_gradient_accumulation_gives_one_batch_step(aux_loss):
    model = replace(MODEL, moe=replace(MODEL.moe, aux_loss=aux_loss))
    inputs, targets = _batch()
    whole = step_outcome(model, STEP, inputs, targets)
    assert whole.figures["router_loss"] > 0
    for accum in (2, 4):
        _assert_equal_outcomes(step_outcome(model, replace(STEP, grad_accum=accum), inputs,
                                            targets), whole)


def test_the_step_projects_only_the_counted_positions():
    # train_step asks the model for logits where a target counts alone (logits_mask); the
    # reference is the whole sequence's logits with the ignored targets left out of the
    # cross-entropy, as F.cross_entropy(ignore_index=...) counts them. Router losses off, so
    # that the reference is the cross-entropy alone.
    config = replace(MODEL, moe=replace(MODEL.moe, aux_loss_coef=0.0, z_loss_coef=0.0,
                                        adaptive_aux=False, capacity_factor=None))
    inputs, targets = _batch()
    targets = targets.clone()
    targets[:, :5] = IGNORE_INDEX  # the prompts
    targets[2, 7:] = IGNORE_INDEX  # a short row's padding
    got = step_outcome(config, STEP, inputs, targets)
    torch.manual_seed(0)  # step_outcome's model
    model = Transformer(config).double().train()
    logits = model(inputs).logits
    counted = int((targets != IGNORE_INDEX).sum())
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                             ignore_index=IGNORE_INDEX, reduction="sum")
    (loss / counted).backward()
    assert float(got.figures["loss"]) == pytest.approx(loss.item() / counted, rel=1e-12)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(got.gradients[name], parameter.grad, rtol=1e-9, atol=1e-12)


def test_micro_scope_changes_with_the_cut_and_step_scope_does_not():
    # The reason for lb_scope="step": the balance loss of each micro-batch is not that of
    # the batch (a mean of ratios is not the ratio of the sums).
    inputs, targets = _batch()
    micro = replace(STEP, lb_scope="micro")
    one = step_outcome(MODEL, micro, inputs, targets).figures["router_loss"]
    four = step_outcome(MODEL, replace(micro, grad_accum=4), inputs, targets).figures["router_loss"]
    assert abs(float(one - four)) > 1e-6
    step = step_outcome(MODEL, STEP, inputs, targets).figures["router_loss"]
    assert float(step) == pytest.approx(float(one), rel=1e-12)  # one micro-batch: the same


# Capacities that drop routes (factor 0.75): with capacity_scope "step" the kept routes are
# those of the whole batch, whoever computes which rows (gshard's choice-major queues too; its
# own balance loss is one per forward, as any gate's own loss: off here).
CAPACITY_MODELS = {
    "layer's capacity": replace(MODEL, moe=replace(MODEL.moe, capacity_factor=0.75,
                                                   capacity_scope="step")),
    "gshard": replace(MODEL, moe=replace(MODEL.moe, router="gshard", aux_loss="none",
                                         router_options={"random_routing": False,
                                                         "balance_weight": 0.0},
                                         capacity_factor=0.75, capacity_scope="step")),
}


@pytest.mark.parametrize("name", CAPACITY_MODELS)
def test_step_capacity_keeps_the_routes_of_the_whole_batch_however_it_is_cut(name):
    model = CAPACITY_MODELS[name]
    inputs, targets = _batch()
    whole = step_outcome(model, STEP, inputs, targets)
    assert float(whole.figures["drop_rate"].max()) > 0.05  # the capacity binds
    for accum in (2, 4):
        _assert_equal_outcomes(step_outcome(model, replace(STEP, grad_accum=accum), inputs,
                                            targets), whole)
    padded = left_padded(inputs, targets, [0, 3, 1, 5, 2, 0, 4, 1])
    _assert_equal_outcomes(step_outcome(model, replace(STEP, grad_accum=2), *padded), whole)
    # The same cut with each micro-batch's own capacity keeps other routes.
    local = replace(model, moe=replace(model.moe, capacity_scope="local"))
    cut = step_outcome(local, replace(STEP, grad_accum=4), inputs, targets)
    assert not all(check.passed for check in compare(cut, whole, TOLERANCE))


def test_step_capacity_is_refused_with_a_pipeline():
    from moekit.parallel.pipeline import check_pipeline_model
    with pytest.raises(ValueError, match='pipeline=2 is not allowed with capacity_scope="step"'):
        check_pipeline_model(CAPACITY_MODELS["layer's capacity"], 2)


def test_step_capacity_plans_with_the_random_numbers_of_the_training_forwards():
    """Jitter draws random numbers in every forward (and a cut draws them in another order,
    so no two cuts compare): the plan's pre-passes must draw the training forwards' own, or
    an expert would keep other than its first routes of the step, min(routed, capacity)."""
    model_config = replace(CAPACITY_MODELS["layer's capacity"],
                           moe=replace(MODEL.moe, capacity_factor=0.75, capacity_scope="step",
                                       jitter=0.5))
    torch.manual_seed(0)
    model = Transformer(model_config).to(torch.float64).train()
    counts = {}

    def record(layer, inputs, output):
        if torch.is_grad_enabled():  # the training forwards, not the pre-passes
            counts[layer] = counts[layer] + output[1].counts if layer in counts else \
                output[1].counts
    for block in model.layers:
        block.ffn.register_forward_hook(record)
    inputs, targets = _batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    train_step(model, optimizer, inputs, targets, replace(STEP, grad_accum=4), Mesh())
    capacity = expert_capacity(inputs.numel(), 2, 4, 0.75)
    for layer_counts in counts.values():
        assert int(layer_counts.dropped) > 0
        assert layer_counts.tokens_per_expert_E.tolist() == \
            layer_counts.routed_per_expert_E.clamp(max=capacity).tolist()


@pytest.mark.parametrize("lb_scope", ["micro", "global", "step"])
def test_padding_never_counts(lb_scope):
    config = replace(STEP, lb_scope=lb_scope)
    inputs, targets = _batch()
    want = step_outcome(MODEL, config, inputs, targets)
    padded = left_padded(inputs, targets, [0, 3, 1, 5, 2, 0, 4, 1])
    _assert_equal_outcomes(step_outcome(MODEL, config, *padded), want)


def test_an_all_padding_micro_batch_adds_nothing():
    inputs, targets = _batch(rows=4)
    want = step_outcome(MODEL, replace(STEP, batch_size=4, grad_accum=2), inputs, targets)
    padded_inputs = torch.cat([inputs, torch.zeros_like(inputs)])
    padded_targets = torch.cat([targets, torch.full_like(targets, IGNORE_INDEX)])
    mask = torch.cat([torch.ones_like(inputs, dtype=torch.bool),
                      torch.zeros_like(inputs, dtype=torch.bool)])
    got = step_outcome(MODEL, replace(STEP, batch_size=8, grad_accum=4), padded_inputs,
                       padded_targets, mask)
    _assert_equal_outcomes(got, want)


def _data_parallel_outcomes(rank, world, cases):
    from moekit.parallel.mesh import world_mesh
    mesh = world_mesh()
    return [step_outcome(model, config, *batch, mesh=mesh) for model, config, batch in cases]


def _cases():
    """(name, model, config, batch) per check: one group of processes runs them all."""
    inputs, targets = _batch()
    padded = left_padded(inputs, targets, [0, 3, 1, 5, 2, 0, 4, 1])
    skywork = replace(MODEL, moe=replace(MODEL.moe, aux_loss="skywork"))
    return [("step", MODEL, STEP, (inputs, targets)),
            ("step, accum 2", MODEL, replace(STEP, grad_accum=2), (inputs, targets)),
            ("step, skywork", skywork, STEP, (inputs, targets)),
            ("step, padded", MODEL, STEP, padded),
            ("micro", MODEL, replace(STEP, lb_scope="micro"), (inputs, targets)),
            ("global", MODEL, replace(STEP, lb_scope="global"), (inputs, targets)),
            *((f"step capacity, {name}, accum 2", model, replace(STEP, grad_accum=2),
               (inputs, targets)) for name, model in CAPACITY_MODELS.items())]


def _single_process_reference(name, model, config, batch, ranks):
    """What one process computes for the same global batch: in scope micro, the ranks'
    shards are its micro-batches; in scope global, one micro-batch (its counts are global)."""
    if config.lb_scope == "micro":
        config = replace(config, grad_accum=config.grad_accum * ranks)
    return step_outcome(model, config, *batch)


@pytest.mark.parametrize("world", [2, 4])
def test_data_parallel_equals_one_process(world):
    cases = _cases()
    outcomes = run_on_ranks(_data_parallel_outcomes, world,
                            [(model, config, batch) for _, model, config, batch in cases])
    for rank_outcomes in outcomes[1:]:  # every rank logs the same figures
        for got, want in zip(rank_outcomes, outcomes[0]):
            _assert_equal_outcomes(got, want)
    for (name, model, config, batch), got in zip(cases, outcomes[0]):
        want = _single_process_reference(name, model, config, batch, world)
        failed = [check for check in compare(got, want, TOLERANCE) if not check.passed]
        assert not failed, (name, failed)


def test_recomputed_layers_give_the_same_step():
    # The bug this guards against: a recycling layer under activation checkpointing shuffled
    # again in the recomputed forward (input gradients off by up to 0.62).
    model = replace(MODEL, moe=replace(MODEL.moe, capacity_factor=0.8, jitter=0.05,
                                       overflow="recycle_random"))
    inputs, targets = _batch()
    torch.manual_seed(0)  # the weights step_outcome starts from
    probe = Transformer(model).double().train()
    assert all(stats.overflowed > 0 for stats in probe(inputs).moe_stats)  # routes recycle
    want = step_outcome(model, STEP, inputs, targets)
    _assert_equal_outcomes(step_outcome(model, replace(STEP, recompute=True), inputs, targets),
                           want)


def _expert_parallel_outcomes(rank, world, expert, cases):
    from moekit.parallel.mesh import world_mesh
    mesh = world_mesh(expert=expert)
    return [step_outcome(model, config, *batch, mesh=mesh, prepare=prepare)
            for model, config, batch, prepare in cases]


def _everything_to_expert_zero(model):
    for layer in (block.ffn for block in model.layers):
        layer.router.balance_bias[0] = 100.0  # selection only: the weights stay sigmoid scores


def _awkward_cases():
    """Expert parallelism with routings that leave ranks empty-handed."""
    inputs, targets = _batch()
    padded = left_padded(inputs, targets, [0, 3, 1, 5, 2, 0, 4, 1])
    sigmoid = replace(MODEL, moe=replace(MODEL.moe, router="sigmoid", top_k=1))
    every_expert = replace(MODEL, moe=replace(MODEL.moe, top_k=4))  # k = E
    skywork = replace(MODEL, moe=replace(MODEL.moe, aux_loss="skywork"))
    half_padding = (inputs, targets.masked_fill(torch.arange(8)[:, None] >= 4, IGNORE_INDEX),
                    torch.arange(8)[:, None].expand(8, 12) < 4)  # the last ranks: no token
    return [("step", MODEL, STEP, (inputs, targets, None), None),
            ("ranks with only padding", MODEL, STEP, half_padding, None),
            ("padded, accum 2", MODEL, replace(STEP, grad_accum=2), padded, None),
            ("skywork, clipped", skywork, replace(STEP, grad_clip=0.05), (inputs, targets, None),
             None),
            ("every token to expert 0", sigmoid, STEP, (inputs, targets, None),
             _everything_to_expert_zero),
            ("k equal to E", every_expert, STEP, (inputs, targets, None), None),
            ("step capacity, accum 2", CAPACITY_MODELS["layer's capacity"],
             replace(STEP, grad_accum=2), (inputs, targets, None), None)]


@pytest.mark.parametrize("world, expert", [(2, 2), (4, 4), (4, 2)])
def test_expert_parallel_equals_one_process(world, expert):
    cases = _awkward_cases()
    outcomes = run_on_ranks(_expert_parallel_outcomes, world, expert,
                            [case[1:] for case in cases])[0]
    for (name, model, config, batch, prepare), got in zip(cases, outcomes):
        want = step_outcome(model, config, *batch, prepare=prepare)
        failed = [check for check in compare(got, want, TOLERANCE) if not check.passed]
        assert not failed, (name, failed)
    assert outcomes[4].figures["expert_load"][:, 0].eq(1).all()  # expert 0 took everything


def _pipeline_outcomes(rank, world, pipeline, expert, cases):
    from moekit.parallel.mesh import world_mesh
    return [step_outcome(model, config, *batch,
                         mesh=world_mesh(expert=expert, pipeline=pipeline, stage_layers=stages))
            for model, config, batch, stages in cases]


def _pipeline_cases():
    """(name, model, config, batch, layers per stage): stages of unequal depth, a stage
    without an MoE layer, every loss scope, 1F1B (micro-batches >= stages) and GPipe."""
    inputs, targets = _batch()
    padded = left_padded(inputs, targets, [0, 3, 1, 5, 2, 0, 4, 1])
    deep = replace(MODEL, num_layers=4, moe_every=2)  # layers 1 and 3 are MoE layers
    skywork = replace(MODEL, moe=replace(MODEL.moe, aux_loss="skywork"))
    return [("step", MODEL, STEP, (inputs, targets, None), (1, 1)),
            ("step, accum 4 (1F1B)", MODEL, replace(STEP, grad_accum=4),
             (inputs, targets, None), (1, 1)),
            ("micro, accum 2", MODEL, replace(STEP, lb_scope="micro", grad_accum=2),
             (inputs, targets, None), (1, 1)),
            # one micro-batch: its partition is one process's on any number of data ranks
            ("global", MODEL, replace(STEP, lb_scope="global"), (inputs, targets, None),
             (1, 1)),
            ("padded, skywork, clipped, recomputed", skywork,
             replace(STEP, grad_clip=0.05, recompute=True), padded, (1, 1)),
            ("a dense first stage, 1 + 3 layers", deep, replace(STEP, grad_accum=2),
             (inputs, targets, None), (1, 3))]


@pytest.mark.parametrize("world, expert", [(2, 1), (4, 1), (4, 2)])
def test_pipeline_equals_one_process(world, expert):
    cases = _pipeline_cases()
    outcomes = run_on_ranks(_pipeline_outcomes, world, 2, expert,
                            [case[1:] for case in cases])[0]
    for (name, model, config, batch, _), got in zip(cases, outcomes):
        want = _single_process_reference(name, model, config, batch, world // 2)
        failed = [check for check in compare(got, want, TOLERANCE) if not check.passed]
        assert not failed, (name, failed)


def _edp_outcomes(rank, world, cases):
    from moekit.parallel.mesh import world_mesh
    return [step_outcome(model, config, *batch,
                         mesh=replace(world_mesh(expert=2, tensor=2), zero=zero))
            for model, config, batch, zero in cases]


def _edp_cases(world):
    """Expert data parallelism over pairs of ranks: tensor-parallel attention (GQA, QK-norm,
    CLA pairs), dense and shared-expert MLPs, the experts split between the pair; on 4 ranks
    (2 pairs) also with ZeRO-2 and ZeRO-3 (FSDP2 over the pairs' replicas: the
    tensor-parallel weights 2-D, the experts sharded over their 2 replicas)."""
    inputs, targets = _batch()
    padded = left_padded(inputs, targets, [0, 3, 1, 5, 2, 0, 4, 1])
    rich = replace(MODEL, num_layers=4, moe_every=2, qk_norm=True, cla_share=2, qkv_bias=True,
                   moe=replace(MODEL.moe, num_shared_experts=1, shared_expert_gate=True,
                               aux_loss="skywork"))
    clipped = replace(STEP, grad_accum=2, grad_clip=0.05)
    cases = [("step", MODEL, STEP, (inputs, targets, None), 0),
             ("padded, accum 2, clipped", MODEL, clipped, padded, 0),
             ("shared experts, dense layers, QK-norm, CLA, bias", rich,
              replace(STEP, recompute=True), (inputs, targets, None), 0)]
    if world == 4:
        cases += [("padded, accum 2, clipped, ZeRO-2", MODEL, clipped, padded, 2),
                  ("shared experts, dense layers, QK-norm, CLA, bias, ZeRO-3", rich,
                   replace(STEP, recompute=True), (inputs, targets, None), 3)]
    return cases


@pytest.mark.parametrize("world", [2, 4])
def test_expert_data_parallel_equals_one_process(world):
    cases = _edp_cases(world)
    outcomes = run_on_ranks(_edp_outcomes, world, [case[1:] for case in cases])[0]
    for (name, model, config, batch, _), got in zip(cases, outcomes):
        want = step_outcome(model, config, *batch)
        failed = [check for check in compare(got, want, TOLERANCE) if not check.passed]
        assert not failed, (name, failed)
