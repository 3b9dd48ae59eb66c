"""ZeRO with expert parallelism, and ZeRO-2/3 (FSDP2): the optimizer's state (and, for 2 and 3,
the gradients and parameters) sharded over the ranks changes nothing in what a step computes.
Real gloo processes, float64; the reference is one process taking the same steps."""
import contextlib
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from moekit.config import ModelConfig, MoEConfig, TrainConfig
from moekit.parallel.processes import run_on_ranks

MODEL = ModelConfig(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    ffn_size=48, max_seq_len=32,
                    moe=MoEConfig(hidden_size=32, ffn_size=24, num_experts=4, top_k=2,
                                  aux_loss="switch", aux_loss_coef=0.1, z_loss_coef=0.01))
# Clipping on (the norm is above 0.05), a learning rate that changes between the steps.
TRAIN = TrainConfig(batch_size=8, seq_len=12, grad_clip=0.05, lb_scope="step", lr=1e-2,
                    warmup_steps=2, steps=3)
STEPS = 3


def _batch(step):
    generator = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, MODEL.vocab_size, (8, 13), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


# ModuleExperts of different widths (one odd, so FSDP2 pads its shards) in place of the
# stacked experts.
EXPERT_WIDTHS = (24, 13, 16, 9)


def _with_module_experts(model):
    """``model`` with every MoE layer's experts made ModuleExperts: SwiGLU MLPs of
    ``EXPERT_WIDTHS``, drawn by nn.Linear from the current random state."""
    from moekit.moe import MLP, ModuleExperts
    for block in model.layers:
        block.ffn.experts = ModuleExperts([MLP(MODEL.hidden_size, width)
                                           for width in EXPERT_WIDTHS]).double()
    return model


def _train(mesh, run, steps=range(STEPS), resume_from=None, module_experts=False):
    """Train ``MODEL`` (with ``module_experts``: ``_with_module_experts``) in float64 under
    ``mesh`` for ``steps``, writing a checkpoint after each into ``run``; returns the steps'
    records."""
    from moekit.model import Transformer
    from moekit.model.io import check_weights_fit
    from moekit.parallel.parallelize import parallelize
    from moekit.train import checkpoint as ckpt
    from moekit.train.optim import build_optimizer, set_learning_rate
    from moekit.train.step import train_step
    from moekit.train.tokenizer import train_tokenizer
    torch.manual_seed(0)
    # As moekit train starts: each rank draws, or reads, only what it holds (a model whose
    # experts are not Transformer's own is drawn whole, then sharded).
    in_parts = mesh.world_size > 1 and (resume_from is not None or not module_experts)
    with torch.device("meta") if in_parts else contextlib.nullcontext():
        model = Transformer(MODEL).double().train()
        if module_experts:
            _with_module_experts(model)
    if not in_parts:
        parallel_model = parallelize(model, mesh)
    else:
        if resume_from is not None:
            check_weights_fit(model, resume_from)
        parallel_model = parallelize(model, mesh, resume_from, torch.device("cpu"))
    optimizer = build_optimizer(model, TRAIN, mesh)
    if resume_from is not None:
        ckpt.restore_optimizer_state(resume_from, model, optimizer, mesh)
    records = []
    for step in steps:
        set_learning_rate(optimizer, step, TRAIN)
        records.append(train_step(parallel_model, optimizer, *_batch(step), TRAIN, mesh))
        ckpt.save_checkpoint(run, step + 1, model, optimizer, train_tokenizer([], 257), {},
                             STEPS, mesh)
        if mesh.data_size > 1:
            dist.barrier()  # rank 0 has written it: every rank may read it
    return records


def _state(run, step):
    """A checkpoint's weights and optimizer tensors, without the per-rank random states."""
    from safetensors.torch import load_file
    folder = run / "checkpoints" / f"step-{step:06d}"
    tensors = {**load_file(folder / "model.safetensors"),
               **{f"optimizer:{k}": v for k, v in load_file(folder / "optimizer.safetensors")
                  .items() if not k.startswith("rng.")}}
    return tensors


def _layouts(rank, world, out, layouts):
    """Per layout (expert degree, ZeRO level): the run, and the run resumed from its first
    checkpoint."""
    from moekit.parallel.mesh import world_mesh
    records = {}
    for expert, zero in layouts:
        run = out / f"ep{expert}-zero{zero}"
        records[expert, zero] = _train(replace(world_mesh(expert=expert), zero=zero), run)
        records[expert, zero, "resumed"] = _train(
            replace(world_mesh(expert=expert), zero=zero), out / f"ep{expert}-zero{zero}-resumed",
            range(1, STEPS), resume_from=run / "checkpoints" / "step-000001")
    return records


def _assert_close(got: dict, want: dict, tolerance=1e-9):
    assert got.keys() == want.keys()
    for key, value in want.items():
        scale = max(float(value.abs().max()), 1e-12)
        assert float((got[key] - value).abs().max()) <= tolerance * scale, key


def _assert_equal(got: dict, want: dict):
    assert got.keys() == want.keys()
    assert [k for k in want if not torch.equal(got[k], want[k])] == []


def _assert_records_close(got: list[dict], want: list[dict]):
    for a, b in zip(got, want, strict=True):
        for key in ("loss", "router_loss", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-9 * abs(b[key]), key


def _assert_run_and_resume(out, name, records, key, reference):
    """The run ``out / name`` took the one-process steps (``out / "one"``, ``reference``), and
    resumed from its first checkpoint it continued as the uninterrupted run, bit for bit."""
    run = out / name
    for step in range(1, STEPS + 1):
        _assert_close(_state(run, step), _state(out / "one", step))
    _assert_records_close(records[key], reference)
    _assert_equal(_state(out / f"{name}-resumed", STEPS), _state(run, STEPS))
    assert records[(*key, "resumed")] == records[key][1:]


def test_zero_1_with_expert_parallelism_takes_the_one_process_steps(tmp_path):
    """ZeRO-1 with expert parallelism: on 4 ranks DP 2 x EP 2 (each expert's moments sharded
    over its 2 replicas, the rest over all 4) and EP 4 (one replica: the experts' moments kept
    whole); on 2 ranks EP 2. The same updates as without ZeRO, bit for bit, and as one
    process to float64 rounding, with clipping on; the checkpoints hold the whole state by
    parameter name; a run resumed from its first checkpoint continues bit for bit on 2 ranks
    and on 4 (DDP's buckets settled before the first step, docs/parallel.md)."""
    from moekit.parallel.mesh import Mesh
    reference = _train(Mesh(), tmp_path / "one")
    assert reference[0]["grad_norm"] > TRAIN.grad_clip  # clipping was on
    for world, experts in ((4, (2, 4)), (2, (2,))):
        out = tmp_path / f"world{world}"
        layouts = [(expert, zero) for expert in experts for zero in (0, 1)]
        records = run_on_ranks(_layouts, world, out, layouts, timeout=240)[0]
        for expert in experts:
            for step in range(1, STEPS + 1):
                zero = _state(out / f"ep{expert}-zero1", step)
                _assert_equal(zero, _state(out / f"ep{expert}-zero0", step))
                _assert_close(zero, _state(tmp_path / "one", step))
            assert records[expert, 1] == records[expert, 0]
            _assert_records_close(records[expert, 1], reference)
            _assert_equal(_state(out / f"ep{expert}-zero1-resumed", STEPS),
                          _state(out / f"ep{expert}-zero1", STEPS))
            assert records[expert, 1, "resumed"] == records[expert, 1][1:]


def test_zero_2_and_3_take_the_one_process_steps_and_checkpoints_move_between_layouts(
        tmp_path):
    """FSDP2 on 4 ranks: ZeRO-2 and ZeRO-3 over every rank, and ZeRO-3 with DP 2 x EP 2 (the
    experts on the expert-parallel path). AdamW steps with clipping on agree with one
    process to float64 rounding; checkpoints hold every tensor whole under its name; resumed
    from the first checkpoint, each run continues bit for bit; the checkpoints load at other
    layouts bit for bit."""
    from moekit.parallel.mesh import Mesh
    reference = _train(Mesh(), tmp_path / "one")
    layouts = [(1, 2), (1, 3), (2, 3)]
    records = run_on_ranks(_layouts, 4, tmp_path, layouts, timeout=240)[0]
    for expert, zero in layouts:
        _assert_run_and_resume(tmp_path, f"ep{expert}-zero{zero}", records, (expert, zero),
                               reference)
    # Written by the 4 ranks of ZeRO-3 with DP 2 x EP 2, each its shards: restored at 1
    # process, EP 2, ZeRO-2 on 2 ranks and EP 4 with ZeRO-1, and written again from what each
    # rank then holds, every parameter and moment comes back bit for bit.
    from moekit.model import load_model
    folder = tmp_path / "ep2-zero3" / "checkpoints" / "step-000002"
    assert load_model(folder).layers[0].ffn.experts.down_proj.shape[0] == 4  # read directly
    out = tmp_path / "again"
    _restore_and_rewrite(0, 1, [(1, 0)], folder, out)  # one process
    run_on_ranks(_restore_and_rewrite, 2, [(2, 0), (1, 2)], folder, out, timeout=240)
    run_on_ranks(_restore_and_rewrite, 4, [(4, 1)], folder, out, timeout=240)
    for layout in ("ep1-zero0", "ep2-zero0", "ep1-zero2", "ep4-zero1"):
        _assert_equal(_state(out / layout, 2), _state(tmp_path / "ep2-zero3", 2))


# Skywork-MoE's parts with ZeRO on 4 ranks: name -> (layout, ZeRO levels).
ZERO_LAYOUTS = {"dp2-edp2": (dict(expert=2, tensor=2), (0, 1, 2, 3)),
                "pp2-ep2": (dict(expert=2, pipeline=2, stage_layers=(1, 1)), (0, 1, 3)),
                "pp2-dp2": (dict(pipeline=2, stage_layers=(1, 1)), (2,))}


# New models drawn in parts under ZeRO-3 (name -> layout): FSDP2 over the replicas of the
# experts, and over the dp group of EDP's tensor-parallel weights.
HELD_LAYOUTS = {"dp2-edp2": dict(expert=2, tensor=2), "dp2-ep2": dict(expert=2),
                "pp2-ep2": dict(expert=2, pipeline=2, stage_layers=(1, 1))}


def _drawn_in_parts(layout: dict) -> tuple[dict, dict]:
    """A new model drawn in parts under ``layout`` with ZeRO-3: the shapes of this rank's
    parts of some of layer 0's parameters, and every tensor gathered whole (on rank 0)."""
    from moekit.model import Transformer
    from moekit.parallel.mesh import world_mesh
    from moekit.parallel.parallelize import parallelize, whole_tensors
    from moekit.parallel.tensor_parallel import local
    torch.manual_seed(5)
    with torch.device("meta"):
        model = Transformer(MODEL).double()
    mesh = replace(world_mesh(**layout), zero=3)
    parallelize(model, mesh, device=torch.device("cpu"))
    names = ("layers.0.ffn.experts.gate_up_proj", "layers.0.ffn.experts.down_proj",
             "layers.0.attn.q_proj.weight", "layers.0.ffn.router.weight")
    held = {name: tuple(local(p).shape) for name, p in model.named_parameters() if name in names}
    return held, whole_tensors({**dict(model.named_parameters()), **dict(model.named_buffers())},
                               model, mesh)


def _layouts_with_zero(rank, world, out):
    """Each layout at each of its ZeRO levels: the run, and the run resumed from its first
    checkpoint; the kinds of optimizer ZeRO-1 builds; what ZeRO-3 leaves on each rank."""
    from moekit.model import Transformer
    from moekit.parallel.mesh import world_mesh
    from moekit.parallel.parallelize import parallelize
    from moekit.train.optim import build_optimizer, optimizer_parts
    records = {(name, "drawn"): _drawn_in_parts(layout) for name, layout in HELD_LAYOUTS.items()}
    for name, (layout, zeros) in ZERO_LAYOUTS.items():
        if 1 in zeros:
            model = Transformer(MODEL).double()
            mesh = replace(world_mesh(**layout), zero=1)
            parallelize(model, mesh)
            records[name, "parts"] = sorted(type(part).__name__ for part in
                                            optimizer_parts(build_optimizer(model, TRAIN, mesh)))
        for zero in zeros:
            run = out / f"{name}-zero{zero}"
            records[name, zero] = _train(replace(world_mesh(**layout), zero=zero), run)
            records[name, zero, "resumed"] = _train(
                replace(world_mesh(**layout), zero=zero), out / f"{name}-zero{zero}-resumed",
                range(1, STEPS), resume_from=run / "checkpoints" / "step-000001")
    return records


def test_zero_with_expert_data_and_pipeline_parallelism(tmp_path):
    """ZeRO-1 with DP 2 x EDP 2 (the tensor-parallel weights' moments kept whole, the rest
    sharded over the dp group) and with PP 2 x EP 2; ZeRO-2/3 with DP 2 x EDP 2 (FSDP2 over
    the dp group, the tensor-parallel weights 2-D) and under a pipeline (over a stage's
    ranks): each takes the one-process steps, and a run resumed from its first checkpoint
    continues as the uninterrupted one. ZeRO-3 shards each expert group's experts over
    their replicas, and keeps them whole where there is one replica."""
    from moekit.model import Transformer
    from moekit.parallel.mesh import Mesh
    reference = _train(Mesh(), tmp_path / "one")
    records = run_on_ranks(_layouts_with_zero, 4, tmp_path, timeout=240)[0]
    # A new model drawn in parts has the one-process model's values, bit for bit.
    torch.manual_seed(5)
    one = Transformer(MODEL).double()
    for name in HELD_LAYOUTS:  # (rank 0 gathers every stage's tensors)
        _assert_equal(records[name, "drawn"][1],
                      {**dict(one.named_parameters()), **dict(one.named_buffers())})
    # Layer 0: 4 experts (gate_up [4, 48, 32], down [4, 32, 24]), q_proj [32, 32], router
    # [4, 32]. DP 2 x EDP 2: 2 experts per group, over 2 replicas; q_proj's columns over the
    # group, then over dp; the router over dp.
    assert records["dp2-edp2", "drawn"][0] == {
        "layers.0.ffn.experts.gate_up_proj": (1, 48, 32),
        "layers.0.ffn.experts.down_proj": (1, 32, 24),
        "layers.0.attn.q_proj.weight": (8, 32), "layers.0.ffn.router.weight": (2, 32)}
    # DP 2 x EP 2: the experts as above; the rest over all 4 ranks.
    assert records["dp2-ep2", "drawn"][0] == {
        "layers.0.ffn.experts.gate_up_proj": (1, 48, 32),
        "layers.0.ffn.experts.down_proj": (1, 32, 24),
        "layers.0.attn.q_proj.weight": (8, 32), "layers.0.ffn.router.weight": (1, 32)}
    # PP 2 x EP 2 (rank 0 holds stage 0): the stage's 2 ranks are one expert group, each
    # expert has one replica and stays whole.
    assert records["pp2-ep2", "drawn"][0] == {
        "layers.0.ffn.experts.gate_up_proj": (2, 48, 32),
        "layers.0.ffn.experts.down_proj": (2, 32, 24),
        "layers.0.attn.q_proj.weight": (16, 32), "layers.0.ffn.router.weight": (2, 32)}
    # Under EDP the tensor-parallel weights' moments stay whole, the rest are sharded; a
    # pipeline stage shards its replicated parameters' over its 2 ranks, its experts have one
    # replica each.
    assert records["dp2-edp2", "parts"] == ["AdamW", "ZeroRedundancyOptimizer"]
    assert records["pp2-ep2", "parts"] == ["AdamW", "ZeroRedundancyOptimizer"]
    for name, (_, zeros) in ZERO_LAYOUTS.items():
        for zero in zeros:
            _assert_run_and_resume(tmp_path, f"{name}-zero{zero}", records, (name, zero),
                                   reference)


def test_moekit_train_with_zero_3_and_expert_parallelism(tmp_path):
    """The command: ``--nproc 4 --expert 2 --zero 3`` (each expert sharded over its 2
    replicas, its gradient divided by all 4 ranks) trains the one-process run (float32
    rounding, as test_distributed_train's data-parallel run), validating on 3 batches that the
    4 ranks share unevenly; its checkpoint is a model folder that ``load_model`` reads."""
    from test_distributed_train import CONFIG, _moekit, _records

    from moekit.model import load_model
    (tmp_path / "run.toml").write_text(CONFIG.replace("eval_batches = 2", "eval_batches = 3"))
    runs = {"one": [], "sharded": ["--nproc", "4", "--expert", "2", "--zero", "3"]}
    for name, flags in runs.items():
        result = _moekit("train", "--config", str(tmp_path / "run.toml"), "--out",
                         str(tmp_path / name), "--quiet", *flags)
        assert result.returncode == 0, result.stderr
    got, want = _records(tmp_path / "sharded"), _records(tmp_path / "one")
    assert [r["kind"] for r in got] == [r["kind"] for r in want]
    # The first step to 2e-4: plain data parallelism on 4 ranks (--nproc 4) takes a first
    # gradient norm 1.1e-4 from one process's in float32 on this model.
    for index, (a, b) in enumerate(zip(got, want)):
        for key in ("loss", "grad_norm", "val_loss"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=2e-4 if index == 0 else 1e-2), key
    model = load_model(tmp_path / "sharded" / "checkpoints" / "step-000004")
    assert model.layers[1].ffn.experts.gate_up_proj.shape[0] == 4


def _restore_and_rewrite(rank, world, layouts, folder, out):
    """Restore the checkpoint ``folder`` under each layout (expert degree, ZeRO level) and
    write it again from what this rank then holds."""
    from moekit.model import Transformer
    from moekit.model.io import load_weights
    from moekit.parallel.mesh import Mesh, world_mesh
    from moekit.parallel.parallelize import parallelize
    from moekit.train import checkpoint as ckpt
    from moekit.train.optim import build_optimizer
    from moekit.train.tokenizer import train_tokenizer
    for expert, zero in layouts:
        mesh = replace(world_mesh(expert=expert) if world > 1 else Mesh(), zero=zero)
        model = Transformer(MODEL).double()
        load_weights(model, folder)
        parallelize(model, mesh)
        optimizer = build_optimizer(model, TRAIN, mesh)
        step = ckpt.restore_optimizer_state(folder, model, optimizer, mesh)
        ckpt.save_checkpoint(out / f"ep{expert}-zero{zero}", step, model, optimizer,
                             train_tokenizer([], 257), {}, 1, mesh)


def _module_experts_at_zero_3(rank, world, out):
    """DP 2 x EP 2 with ZeRO-3 of a model with ModuleExperts: the run, the run resumed from
    its first checkpoint (read in parts), and the shapes this rank holds of layer 0's
    experts."""
    from moekit.parallel.mesh import world_mesh
    from moekit.parallel.parallelize import parallelize, whole_tensors
    from moekit.parallel.tensor_parallel import local
    mesh = replace(world_mesh(expert=2), zero=3)
    records = {"run": _train(mesh, out / "module-zero3", module_experts=True),
               "resumed": _train(mesh, out / "module-zero3-resumed", range(1, STEPS),
                                 out / "module-zero3" / "checkpoints" / "step-000001",
                                 module_experts=True)}
    from moekit.model import Transformer
    torch.manual_seed(0)
    model = _with_module_experts(Transformer(MODEL).double())
    parallelize(model, mesh)
    records["held"] = {name: tuple(local(p).shape) for name, p in model.named_parameters()
                       if name.startswith("layers.0.ffn.experts.")}
    records["whole"] = whole_tensors(dict(model.named_parameters()), model, mesh)
    return records


def test_module_experts_sharded_over_their_replicas_take_the_one_process_steps(tmp_path):
    """FSDP2 shards ModuleExperts as it shards stacked experts: under DP 2 x EP 2 with ZeRO-3
    each expert module is a unit over its 2 replicas, so a rank holds half of each of its
    experts' weights (and gradients and moments). AdamW steps with clipping on agree with
    one process to float64 rounding, checkpoints name every expert as one process does, and a
    run resumed from one (each rank reading its parts) continues bit for bit."""
    from moekit.parallel.mesh import Mesh
    reference = _train(Mesh(), tmp_path / "one", module_experts=True)
    records = run_on_ranks(_module_experts_at_zero_3, 4, tmp_path, timeout=240)
    # Rank 0 holds experts 0 and 1 of layer 0, under their own names, each weight's rows
    # halved over the 2 replicas (13 rows: 7 and 6).
    assert records[0]["held"] == {
        "layers.0.ffn.experts.experts.0.gate_proj.weight": (12, 32),
        "layers.0.ffn.experts.experts.0.up_proj.weight": (12, 32),
        "layers.0.ffn.experts.experts.0.down_proj.weight": (16, 24),
        "layers.0.ffn.experts.experts.1.gate_proj.weight": (7, 32),
        "layers.0.ffn.experts.experts.1.up_proj.weight": (7, 32),
        "layers.0.ffn.experts.experts.1.down_proj.weight": (16, 13)}
    assert {name.split(".")[5] for name in records[3]["held"]} == {"2", "3"}
    # Gathered whole (FSDP2's shards, then every rank's experts), the model is one process's.
    from moekit.model import Transformer
    torch.manual_seed(0)
    one = _with_module_experts(Transformer(MODEL).double())
    _assert_equal(records[0]["whole"], dict(one.named_parameters()))
    _assert_run_and_resume(tmp_path, "module-zero3", {("run",): records[0]["run"],
                                                      ("run", "resumed"): records[0]["resumed"]},
                           ("run",), reference)
