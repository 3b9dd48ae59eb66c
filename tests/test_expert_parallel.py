"""Expert parallelism at the layer: the all-to-all dispatcher gives every token the output and
every expert the gradient that one process with all experts gives (the model-level matrix is
in test_equivalence.py). Real gloo processes, float64."""
import torch
import torch.nn as nn

from moekit import MoEConfig, MoELayer, ModuleExperts
from moekit.parallel.expert_parallel import expert_parameters, shard_experts
from moekit.parallel.processes import run_on_ranks

CONFIG = MoEConfig(hidden_size=16, ffn_size=8, num_experts=4, top_k=2)


def _layer():
    torch.manual_seed(0)
    experts = [nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 16)) for _ in range(4)]
    return MoELayer(CONFIG, experts=ModuleExperts(experts)).double()


def _tokens():
    return torch.randn(24, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _shard_forward_backward(rank, world):
    import torch.distributed as dist
    layer = _layer()
    shard_experts(layer, dist.group.WORLD, rank, world)
    x = _tokens().chunk(world)[rank].requires_grad_()
    y, _ = layer(x)
    y.pow(2).sum().backward()
    return {"y": y.detach(), "x_grad": x.grad,
            "experts": {name: p.grad for name, p in expert_parameters(layer)},
            "router": layer.router.weight.grad}


def test_module_experts_under_expert_parallelism_equal_one_process():
    reference = _layer()
    x = _tokens().requires_grad_()
    y, _ = reference(x)
    y.pow(2).sum().backward()
    ranks = run_on_ranks(_shard_forward_backward, 2)
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach(), rtol=1e-12,
                               atol=1e-12)
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in ranks]), x.grad, rtol=1e-12,
                               atol=1e-12)
    torch.testing.assert_close(sum(r["router"] for r in ranks), reference.router.weight.grad)
    for rank, outcome in enumerate(ranks):  # rank r holds experts 2r and 2r + 1, by name
        assert {name.split(".")[2] for name in outcome["experts"]} == {str(2 * rank),
                                                                      str(2 * rank + 1)}
        for name, grad in outcome["experts"].items():
            want = dict(reference.named_parameters())[name].grad
            torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-12)


def _reload_and_save(rank, world, expert, folder, out):
    """Restore a checkpoint with the experts spread over ``expert`` ranks; return this rank's
    expert tensors and moments, and write the checkpoint again from the spread state."""
    from moekit.model import Transformer, read_model_config
    from moekit.model.io import load_weights
    from moekit.parallel.mesh import world_mesh
    from moekit.parallel.parallelize import parallelize
    from moekit.train import checkpoint as ckpt
    from moekit.train.loop import read_run
    from moekit.train.optim import build_optimizer
    from moekit.train.tokenizer import load_tokenizer
    mesh = world_mesh(expert=expert)
    model = Transformer(read_model_config(folder))
    load_weights(model, folder)
    parallelize(model, mesh)
    optimizer = build_optimizer(model, read_run(folder.parent.parent)[1])
    step = ckpt.restore_optimizer_state(folder, model, optimizer, mesh)
    held = {name: (p.detach().clone(), {k: v.clone() for k, v in optimizer.state[p].items()})
            for name, p in expert_parameters(model)}
    ckpt.save_checkpoint(out, step, model, optimizer, load_tokenizer(folder), {}, 2, mesh)
    return held


def test_checkpoints_load_bit_identically_at_any_expert_degree(tmp_path):
    from safetensors.torch import load_file

    from moekit.config import DataConfig, ModelConfig, TrainConfig
    from moekit.train.loop import train
    model = ModelConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=2, ffn_size=64,
                        max_seq_len=64, moe=MoEConfig(hidden_size=32, ffn_size=32,
                                                      num_experts=4, top_k=2))
    result = train(model, TrainConfig(steps=2, batch_size=4, seq_len=32, warmup_steps=1,
                                      eval_every=2, eval_batches=1, checkpoint_every=2),
                   DataConfig(vocab_size=300), tmp_path / "run", show_progress=False)
    weights = load_file(result.checkpoint / "model.safetensors")
    moments = load_file(result.checkpoint / "optimizer.safetensors")
    for world, expert in ((2, 2), (4, 4), (4, 2)):
        out = tmp_path / f"again-{world}-{expert}"
        ranks = run_on_ranks(_reload_and_save, world, expert, result.checkpoint, out)
        local = 4 // expert
        for rank, held in enumerate(ranks):
            part = slice((rank % expert) * local, (rank % expert + 1) * local)
            for name, (weight, state) in held.items():
                assert torch.equal(weight, weights[name][part]), (world, expert, rank, name)
                for key in ("exp_avg", "exp_avg_sq"):
                    assert torch.equal(state[key], moments[f"{name}.{key}"][part])
        # Written again from the spread state: the same files, every expert whole.
        again = out / "checkpoints" / "step-000002"
        for file, original in (("model.safetensors", weights),
                               ("optimizer.safetensors", moments)):
            rewritten = load_file(again / file)
            per_rank = {key for key in rewritten if key.startswith("rng.torch.rank")}
            assert len(per_rank) == (world if file.startswith("optimizer") else 0)
            rewritten = {key: value for key, value in rewritten.items() if key not in per_rank}
            assert rewritten.keys() == original.keys()
            assert all(torch.equal(rewritten[k], original[k]) for k in original), file


def _prompt_and_batch():
    generator = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 61, (1, 9), generator=generator)
    others = torch.randint(0, 61, (7, 12), generator=generator)
    lengths = [12, 5, 9, 12, 3, 7, 11]
    batch = torch.zeros(8, 12, dtype=torch.long)
    mask = torch.zeros(8, 12, dtype=torch.bool)
    for row, (ids, length) in enumerate(zip(others, lengths)):  # left-padded
        batch[row, 12 - length:], mask[row, 12 - length:] = ids[:length], True
    batch[7, 3:], mask[7, 3:] = prompt[0], True  # the prompt, last row
    return prompt, batch, mask


def _model(dtype):
    from moekit.config import ModelConfig
    from moekit.model import Transformer
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4,
                         num_kv_heads=2, ffn_size=48, max_seq_len=32,
                         moe=MoEConfig(hidden_size=32, ffn_size=24, num_experts=4, top_k=2))
    return Transformer(config).to(dtype).eval()


def _prompt_under_expert_parallelism(rank, world, dtype):
    import torch.distributed as dist
    model = _model(dtype)
    shard_experts(model, dist.group.WORLD, rank, world)
    prompt, batch, mask = _prompt_and_batch()
    with torch.no_grad():  # rank 0: the prompt alone; rank 1: it inside a padded batch
        return model(prompt).logits[0] if rank == 0 else model(batch, mask).logits[7, 3:]


def test_a_prompt_gets_the_same_logits_alone_and_in_a_padded_batch():
    prompt, batch, mask = _prompt_and_batch()
    for dtype, tolerance in ((torch.float64, 1e-9), (torch.float32, 1e-5)):
        model = _model(dtype)
        with torch.no_grad():
            alone, inside = model(prompt).logits[0], model(batch, mask).logits[7, 3:]
        scale = alone.abs().max()
        assert (inside - alone).abs().max() <= tolerance * scale
        for got in run_on_ranks(_prompt_under_expert_parallelism, 2, dtype):
            assert (got - alone).abs().max() <= tolerance * scale, dtype


def _save_with_rank_seeds(rank, world, out, restore_from=None):
    from moekit.config import TrainConfig, preset
    from moekit.model import Transformer
    from moekit.parallel.mesh import world_mesh
    from moekit.train import checkpoint as ckpt
    from moekit.train.optim import build_optimizer
    from moekit.train.tokenizer import train_tokenizer
    mesh = world_mesh()
    model = Transformer(preset("tiny"))
    optimizer = build_optimizer(model, TrainConfig())
    if restore_from is not None:
        ckpt.restore_optimizer_state(restore_from, model, optimizer, mesh)
        return torch.get_rng_state()
    torch.manual_seed(100 + rank)  # the ranks' random streams apart, as padding can make them
    expected = torch.get_rng_state()
    ckpt.save_checkpoint(out, 1, model, optimizer, train_tokenizer([], 257), {}, 1, mesh)
    return expected


def test_each_rank_resumes_its_own_random_state(tmp_path):
    saved = run_on_ranks(_save_with_rank_seeds, 2, tmp_path / "run")
    folder = tmp_path / "run" / "checkpoints" / "step-000001"
    restored = run_on_ranks(_save_with_rank_seeds, 2, None, folder)
    assert all(torch.equal(a, b) for a, b in zip(saved, restored))
    assert not torch.equal(saved[0], saved[1])
    # On another number of ranks: every rank continues rank 0's stream.
    assert all(torch.equal(state, saved[0])
               for state in run_on_ranks(_save_with_rank_seeds, 4, None, folder))


def test_arrived_rows_go_to_expert_order_and_back_as_a_naive_loop_orders_them():
    from moekit.parallel.expert_parallel import block_transpose_orders, reorder_rows
    generator = torch.Generator().manual_seed(3)
    for ranks, local in ((1, 1), (2, 4), (3, 2), (4, 3)):
        sizes_RL = torch.randint(0, 4, (ranks, local), generator=generator)
        sizes_RL[0, 0] = 0  # an empty block
        # The naive order: walk expert by expert, sender by sender, through each block.
        starts = {}
        position = 0
        for r in range(ranks):
            for expert in range(local):
                starts[r, expert] = position
                position += int(sizes_RL[r, expert])
        naive = [starts[r, expert] + i for expert in range(local) for r in range(ranks)
                 for i in range(int(sizes_RL[r, expert]))]
        by_expert, by_sender = block_transpose_orders(sizes_RL, position)
        assert by_expert.tolist() == naive
        rows = torch.randn(position, 3, dtype=torch.float64, requires_grad=True)
        grouped = reorder_rows(rows, by_expert, by_sender)
        assert torch.equal(grouped, rows[torch.tensor(naive, dtype=torch.long)])
        assert torch.equal(reorder_rows(grouped, by_sender, by_expert), rows)
        weights = torch.randn(position, 3, dtype=torch.float64)
        (grouped * weights).sum().backward()
        assert torch.equal(rows.grad, weights[by_sender])  # each row's gradient, moved back
