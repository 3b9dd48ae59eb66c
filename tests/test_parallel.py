"""The non-uniform serving split: the plan against hand-computed shares and Skywork's published
FP8 serving setup, and a real run on 2 CPU processes (gloo) against the single-process model."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moekit import MoEConfig
from moekit.config import ModelConfig, preset
from moekit.model import Transformer, generate, load_model, save_model
from moekit.parallel import plan_split, split_model
from moekit.quant import quantize_model

GIB = 1 << 30


def _config():
    return ModelConfig(vocab_size=97, hidden_size=32, num_layers=4, num_heads=8, num_kv_heads=4,
                       ffn_size=48, max_seq_len=64, cla_share=2, qk_norm=True, moe_every=2,
                       moe=MoEConfig(hidden_size=32, ffn_size=16, num_experts=8, top_k=2,
                                     num_shared_experts=1))


def test_shares_follow_free_memory():
    model = Transformer(_config())
    expert_bytes = (32 * 32 + 16 * 32) * 4  # one expert of one layer: gate_up + down, fp32
    head_bytes = sum(p.numel() for b in model.layers for name, p in b.attn.named_parameters()
                     if "norm" not in name) * 4 // 4
    everything = sum(t.numel() * t.element_size() for t in [*model.parameters(),
                                                             *model.buffers()])
    replicated = everything - 16 * expert_bytes - 4 * head_bytes
    # Room beyond the replicated weights 3 : 1 -> the 2 x 8 experts 12 : 4 (layer 0's eight
    # and the first four of layer 1 on device 0), key/value heads 3 : 1.
    split = 16 * expert_bytes + 4 * head_bytes
    plan = plan_split(model, [replicated + split * 3 // 4 + 8, replicated + split // 4 + 8])
    assert plan.expert_ranges == [[(0, 8), (8, 8)], [(0, 4), (4, 8)]]
    assert plan.kv_head_ranges == [(0, 3), (3, 4)]
    assert plan.bytes_per_device == [replicated + 12 * expert_bytes + 3 * head_bytes,
                                     replicated + 4 * expert_bytes + 1 * head_bytes]


def test_skywork_fp8_on_eight_24gib_cards():
    # Skywork-MoE (arXiv 2406.06563) serves its 146B model in FP8 on one server of 8 RTX 4090
    # (24 GB each): about 146 GB of weights. Here one card is partly taken (6 GiB free less).
    with torch.device("meta"):
        model = quantize_model(Transformer(preset("skywork-moe-146b")), experts="fp8",
                               attention="fp8", embeddings="fp8")
    free = [16 * GIB] + [24 * GIB] * 7  # an even split puts 17.5-17.6 GiB on every card
    plan = plan_split(model, free)
    assert sum(plan.bytes_per_device) > 146e9  # the replicated part is counted on every card
    assert all(used <= room for used, room in zip(plan.bytes_per_device, free))
    held = [sum(layer[d][1] - layer[d][0] for layer in plan.expert_ranges) for d in range(8)]
    assert sum(held) == 16 * 52 and held[0] < min(held[1:])  # the busy card takes fewer
    with pytest.raises(ValueError, match="does not fit these devices"):
        plan_split(model, [17 * GIB] * 8)


def test_bad_plans():
    model = Transformer(_config())
    with pytest.raises(ValueError, match="5 devices but only 4 key/value heads"):
        plan_split(model, [GIB] * 5)
    with pytest.raises(ValueError, match="device 1 has 10 bytes free"):
        plan_split(model, [GIB, 10])
    with pytest.raises(ValueError, match="free_bytes=\\[\\] is not allowed"):
        plan_split(model, [])


def _worker(rank, world, folder, free):
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    model = load_model(folder, dtype=torch.float64)
    split_model(model, plan_split(model, free), rank)
    ids = torch.arange(30).remainder(97).view(2, 15)
    result = {"logits": model(ids).logits, "tokens": generate(model, [[1, 2, 3], [4]], 6)}
    if rank == 0:
        torch.save(result, f"{folder}/split.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    model = Transformer(_config())
    save_model(model, tmp_path)
    model = load_model(tmp_path, dtype=torch.float64)
    total = sum(p.numel() for p in model.parameters()) * 8
    mp.spawn(_worker, args=(2, str(tmp_path), [3 * total, total]), nprocs=2)
    result = torch.load(tmp_path / "split.pt")
    ids = torch.arange(30).remainder(97).view(2, 15)
    torch.testing.assert_close(result["logits"], model(ids).logits)
    assert result["tokens"] == generate(model, [[1, 2, 3], [4]], 6)


def test_every_device_keeps_a_key_value_head():
    model = Transformer(_config())
    everything = sum(t.numel() * t.element_size() for t in [*model.parameters(),
                                                             *model.buffers()])
    head_bytes = 10240  # (2 x (q + o + k + v) + 2 x (q + o)) = 10,240 weights x 4 bytes / 4
    plan = plan_split(model, [100 * everything, everything + head_bytes])
    assert plan.kv_head_ranges == [(0, 3), (3, 4)]  # 4 : 0 by share, raised to 3 : 1
    assert [layer[1] for layer in plan.expert_ranges] == [(8, 8), (8, 8)]  # no experts
