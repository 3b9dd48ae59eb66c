"""ZeRO with expert parallelism, and ZeRO-2/3 (FSDP2): the optimizer's state (and, for 2 and 3,
the gradients and parameters) sharded over the ranks changes nothing in what a step computes.
Real gloo processes, float64; the reference is one process taking the same steps."""
from dataclasses import replace

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


def _train(mesh, run, steps=range(STEPS), resume_from=None):
    """Train ``MODEL`` in float64 under ``mesh`` for ``steps``, writing a checkpoint after each
    into ``run``; returns the steps' records."""
    from moekit.model import Transformer
    from moekit.model.io import load_weights
    from moekit.parallel.parallelize import parallelize
    from moekit.train import checkpoint as ckpt
    from moekit.train.optim import build_optimizer, set_learning_rate
    from moekit.train.step import train_step
    from moekit.train.tokenizer import train_tokenizer
    torch.manual_seed(0)
    model = Transformer(MODEL).double().train()
    if resume_from is not None:
        load_weights(model, resume_from)
    parallel_model = parallelize(model, mesh)
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


def _zero_1_layouts(rank, world, out, experts):
    """Per expert degree: plain data parallelism, ZeRO-1, and ZeRO-1 resumed from its first
    checkpoint."""
    from moekit.parallel.mesh import world_mesh
    records = {}
    for expert in experts:
        for zero in (0, 1):
            mesh = replace(world_mesh(expert=expert), zero=zero)
            records[expert, zero] = _train(mesh, out / f"ep{expert}-zero{zero}")
        mesh = replace(world_mesh(expert=expert), zero=1)
        records[expert, "resumed"] = _train(
            mesh, out / f"ep{expert}-resumed", range(1, STEPS),
            resume_from=out / f"ep{expert}-zero1" / "checkpoints" / "step-000001")
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


def test_zero_1_with_expert_parallelism_takes_the_one_process_steps(tmp_path):
    """ZeRO-1 with expert parallelism: on 4 ranks DP 2 x EP 2 (each expert's moments sharded
    over its 2 replicas, the rest over all 4) and EP 4 (one replica: the experts' moments kept
    whole); on 2 ranks EP 2. The same updates as without ZeRO, bit for bit, and as one
    process to float64 rounding, with clipping on; the checkpoints hold the whole state by
    parameter name; a run resumed from its first checkpoint continues bit for bit on 2 ranks
    and to rounding on 4 (DDP's buckets, docs/parallel.md)."""
    from moekit.parallel.mesh import Mesh
    reference = _train(Mesh(), tmp_path / "one")
    assert reference[0]["grad_norm"] > TRAIN.grad_clip  # clipping was on
    for world, experts in ((4, (2, 4)), (2, (2,))):
        out = tmp_path / f"world{world}"
        records = run_on_ranks(_zero_1_layouts, world, out, experts, timeout=240)[0]
        for expert in experts:
            for step in range(1, STEPS + 1):
                zero = _state(out / f"ep{expert}-zero1", step)
                _assert_equal(zero, _state(out / f"ep{expert}-zero0", step))
                _assert_close(zero, _state(tmp_path / "one", step))
            assert records[expert, 1] == records[expert, 0]
            _assert_records_close(records[expert, 1], reference)
            resumed = _state(out / f"ep{expert}-resumed", STEPS)
            uninterrupted = _state(out / f"ep{expert}-zero1", STEPS)
            if world == 2:
                _assert_equal(resumed, uninterrupted)
                assert records[expert, "resumed"] == records[expert, 1][1:]
            else:
                _assert_close(resumed, uninterrupted)
                _assert_records_close(records[expert, "resumed"], records[expert, 1][1:])
