"""Post-training (docs/post_training.md): chat data, packing, SFT, DPO, EMA, LoRA, bad input.

Every model here is tiny (D=32, 2 layers, byte tokenizer) and starts from random weights: the
tests check what is computed, against references that share no code with it."""
import json
import math
import shutil
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from moekit.cli import main
from moekit.config import ModelConfig, MoEConfig, TrainConfig
from moekit.model.io import load_model, save_model
from moekit.model.transformer import Transformer
from moekit.moe import GroupedExperts, MoELayer
from moekit.parallel.mesh import Mesh, world_mesh
from moekit.parallel.processes import run_on_ranks
from moekit.train import lora
from moekit.train.chat import chat_tokens, read_chat_template, render_chat
from moekit.train.chat_data import read_preference_file
from moekit.train.dpo import DirectPreference, _summed_logprobs, dpo_loss, dropless, pair_rows
from moekit.train.ema import WeightAverage
from moekit.train.instructions import (expected_answer, exact_answer_reward, instruction_set,
                                       preference_set)
from moekit.train.optim import build_optimizer
from moekit.train.post_train import PostTrainSettings, post_train
from moekit.train.sft import SupervisedFineTuning, pack
from moekit.train.step import IGNORE_INDEX, train_step
from moekit.train.tokenizer import train_tokenizer

CHATML = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}</s>{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def tiny_config(**moe) -> ModelConfig:
    return ModelConfig(vocab_size=257, hidden_size=32, num_layers=2, num_heads=2, ffn_size=64,
                       max_seq_len=128, moe=MoEConfig(hidden_size=32, ffn_size=32,
                                                      num_experts=4, top_k=2, **moe))


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([], 257)


def _model_folder(folder, config, tokenizer):
    torch.manual_seed(0)
    save_model(Transformer(config), folder)
    tokenizer.save(folder)
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer):
    """A model folder (random weights, byte tokenizer) as moekit train writes one, with a
    training capacity (the tiny preset's) and a shared expert."""
    return _model_folder(tmp_path_factory.mktemp("base") / "model",
                         tiny_config(capacity_factor=1.25, num_shared_experts=1,
                                     shared_ffn_size=32), tokenizer)


@pytest.fixture(scope="module")
def plain_base(tmp_path_factory, tokenizer):
    """Dropless and without shared experts: what Mixtral holds, and what data parallelism
    trains as one process does (a capacity counts each rank's tokens)."""
    return _model_folder(tmp_path_factory.mktemp("plain") / "model", tiny_config(), tokenizer)


def test_chat_template_jinja_is_read_before_tokenizer_config(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "old"}))
    assert read_chat_template(tmp_path) == "old"
    (tmp_path / "chat_template.jinja").write_text(CHATML)
    assert read_chat_template(tmp_path) == CHATML  # where transformers 5 saves it


@pytest.mark.parametrize("template", [None, CHATML])
def test_training_form_marks_the_assistant_tokens(tokenizer, template):
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]
    tokens = chat_tokens(messages, template, tokenizer)
    marked = tokenizer.decode([t for t, a in zip(tokens.ids, tokens.assistant) if a])
    prompt = render_chat(messages[:1], template, "</s>")
    if template is None:  # " 4\n" + end-of-text (decoded away), then " 6\n" + end-of-text
        assert marked == " 4\n 6\n" and tokens.ids.count(tokenizer.eos_id) == 2
        assert prompt == "user: 2+2?\nassistant:"
    else:
        assert marked == "4</s>6</s>"
        assert tokenizer.decode(tokens.ids) == "<|user|>2+2?</s><|assistant|>4</s>" \
            "<|user|>3+3?</s><|assistant|>6</s>"
    # the prompt serve renders is where the first assistant turn starts
    assert tokenizer.decode(tokens.ids[:tokens.assistant.index(True)]) == prompt


def test_packed_documents_compute_as_they_would_alone():
    model = Transformer(tiny_config()).eval()
    first, second = torch.randint(0, 257, (1, 5)), torch.randint(0, 257, (1, 7))
    ids = torch.cat([first, second, torch.zeros(1, 3, dtype=torch.long)], 1)
    documents = torch.tensor([[0] * 5 + [1] * 7 + [-1] * 3])
    mask = torch.tensor([[True] * 12 + [False] * 3])
    packed = model(ids, mask, document_ids=documents).logits
    torch.testing.assert_close(packed[:, :5], model(first).logits)
    torch.testing.assert_close(packed[:, 5:12], model(second).logits)


def test_sft_step_loss_is_the_mean_over_assistant_tokens_of_conversations_run_alone(tokenizer):
    train, _ = instruction_set(seed=3, size=12)
    conversations = [x.messages() for x in train]
    rows = pack(conversations, None, tokenizer, seq_len=96)
    assert len(rows) < len(conversations)  # several conversations share a row
    model = Transformer(tiny_config())
    expected_sum, count = 0.0, 0
    with torch.no_grad():
        model.eval()
        for messages in conversations:  # the reference: each conversation alone, by hand
            tokens = chat_tokens(list(messages), None, tokenizer)
            logits = model(torch.tensor([tokens.ids[:-1]])).logits[0].double()
            logp = logits.log_softmax(-1)
            for position, (target, trained) in enumerate(zip(tokens.ids[1:],
                                                             tokens.assistant[1:])):
                if trained:
                    expected_sum -= logp[position, target].item()
                    count += 1
    config = TrainConfig(batch_size=len(rows), seq_len=96, lr=1e-9, grad_clip=None)
    record = train_step(model, build_optimizer(model, config), rows.inputs, rows.targets,
                        config, Mesh(), rows.mask, rows.document_ids)
    assert (rows.targets != IGNORE_INDEX).sum() == count
    assert record["loss"] == pytest.approx(expected_sum / count, rel=1e-5)
    assert record["router_loss"] > 0  # the aux losses train alongside


def test_dpo_loss_matches_a_hand_computation():
    policy_chosen, policy_rejected = torch.tensor([-3.0, -1.0]), torch.tensor([-4.0, -0.5])
    reference_chosen, reference_rejected = torch.tensor([-3.5, -1.2]), torch.tensor([-3.0, -1.5])
    loss, chosen, rejected = dpo_loss(policy_chosen, policy_rejected, reference_chosen,
                                      reference_rejected, beta=0.5)
    # pair 1: 0.5 * ((-3 + 3.5) - (-4 + 3)) = 0.75; pair 2: 0.5 * ((-1 + 1.2) - (-0.5 + 1.5)) = -0.4
    expected = [math.log(1 + math.exp(-0.75)), math.log(1 + math.exp(0.4))]
    assert loss.tolist() == pytest.approx(expected)
    assert chosen.tolist() == pytest.approx([0.25, 0.1])
    assert rejected.tolist() == pytest.approx([-0.5, 0.5])


def test_dpo_log_probabilities_do_not_depend_on_the_batch(tokenizer):
    """A training capacity would drop different tokens in different batches: DPO scores
    dropless, so a pair's log-probabilities are the same alone or beside others."""
    model = Transformer(tiny_config(capacity_factor=0.5)).train()
    pairs = preference_set(instruction_set(seed=1, size=8)[0])

    def logprobs(chosen_pairs):
        inputs, targets, mask = pair_rows(chosen_pairs, None, tokenizer, 64)
        with torch.no_grad(), dropless(model):
            logits = model(inputs, mask).logits
        picked = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        return (picked * (targets != IGNORE_INDEX)).sum(-1)

    torch.testing.assert_close(logprobs(pairs[:1])[0], logprobs(pairs)[0])
    assert model.training  # the policy still trains
    # What DPO computes: the head at the response tokens alone, summed per row.
    inputs, targets, mask = pair_rows(pairs, None, tokenizer, 64)
    with torch.no_grad(), dropless(model):
        selected = model(inputs, mask, logits_mask=targets != IGNORE_INDEX).logits
    torch.testing.assert_close(_summed_logprobs(selected, targets), logprobs(pairs))


def test_instruction_set_is_seeded_split_and_checkable():
    train, held_out = instruction_set(seed=5, size=100)
    assert (train, held_out) == instruction_set(seed=5, size=100)
    assert len(held_out) == 20 and not {x.prompt for x in train} & {x.prompt for x in held_out}
    assert {x.kind for x in held_out} == {"arithmetic", "sorting", "reversal", "counting"}
    assert expected_answer("What is 12 * 3?") == "36"
    assert expected_answer("Sort these numbers: 10 2 7") == "2 7 10"
    assert expected_answer("Reverse this word: abc") == "cba"
    assert expected_answer("How many times does a appear in banana?") == "3"
    for pair in preference_set(train):
        prompt = pair.prompt[0]["content"]
        assert exact_answer_reward(prompt, pair.chosen) == 1.0
        assert exact_answer_reward(prompt, pair.rejected) == 0.0


def test_lora_experts_match_a_per_expert_loop():
    model = Transformer(tiny_config(num_shared_experts=1, shared_ffn_size=32)).eval()
    ids = torch.randint(0, 257, (2, 9))
    base = model(ids).logits
    lora.add_adapters(model, lora.LoRAConfig(rank=4, router=True))
    torch.testing.assert_close(model(ids).logits, base)  # B starts at zero
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for parameter in model.parameters():
        if parameter.requires_grad:
            torch.nn.init.normal_(parameter, std=0.1)
    experts = model.layers[0].ffn.experts
    counts = torch.tensor([3, 0, 4, 2])
    x = torch.randn(9, 32)
    reference, start = [], 0  # per expert, in float64, from the merged matrices by hand
    for e, n in enumerate(counts.tolist()):
        rows = x[start:start + n].double()
        start += n
        w_in = experts.gate_up_proj[e].double() + experts.scale * (
            experts.in_lora_B[e].double() @ experts.in_lora_A[e].double())
        w_down = experts.down_proj[e].double() + experts.scale * (
            experts.down_lora_B[e].double() @ experts.down_lora_A[e].double())
        gate, up = (rows @ w_in.T).chunk(2, dim=-1)
        reference.append((F.silu(gate) * up) @ w_down.T)
    torch.testing.assert_close(experts(x, counts).double(), torch.cat(reference),
                               rtol=1e-4, atol=1e-5)
    # Experts 2 and 3 as expert parallelism keeps them on a rank: their rows, factors too,
    # the base frozen.
    part = experts.part(2, 4)
    torch.testing.assert_close(part(x[3:], counts[2:]).double(), torch.cat(reference[2:]),
                               rtol=1e-4, atol=1e-5)
    assert sorted(n for n, p in part.named_parameters() if p.requires_grad) == [
        "down_lora_A", "down_lora_B", "in_lora_A", "in_lora_B"]
    adapted = model(ids).logits
    assert not torch.allclose(adapted, base)
    with lora.adapters_off(model):
        torch.testing.assert_close(model(ids).logits, base)
    torch.testing.assert_close(lora.merged_model(model).eval()(ids).logits, adapted,
                               rtol=1e-4, atol=1e-5)
    optimizer = build_optimizer(model, TrainConfig())
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad}


def _by_hand(x, blocks, weight, lora_A, lora_B, scale):
    """Each block of rows of x through its own W + scale B A, in float64 (lists per block)."""
    out, start = [], 0
    for e, n in enumerate(blocks):
        merged = weight[e].double() + scale * lora_B[e].double() @ lora_A[e].double()
        out.append(x[start:start + n].double() @ merged.T)
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("blocks, merges", [([3, 0, 4, 2], False), ([400, 0, 500, 300], True)])
def test_lora_products_and_their_gradients_match_by_hand(blocks, merges, dtype):
    """Both ways of computing a low-rank product (the update beside the base weight, or merged
    into it: ``merging_pays`` picks by the number of rows; float64 takes autograd's ops) give
    the output and every gradient of the merged matrices, per expert, by hand."""
    torch.manual_seed(0)
    experts = lora.LoRAExperts.wrap(GroupedExperts(4, 32, 32).to(dtype), rank=4, scale=1.5)
    linear = lora.LoRALinear.wrap(torch.nn.Linear(32, 64, dtype=dtype), rank=4, scale=1.5)
    for module in (experts, linear):
        for parameter in module.parameters():
            torch.nn.init.normal_(parameter, std=0.2)  # every factor, and the base trains too
    rows = sum(blocks)
    assert lora.merging_pays(rows, 4, 64, 32) == lora.merging_pays(rows, 1, 64, 32) == merges
    x = torch.randn(rows, 32, dtype=dtype, requires_grad=True)
    counts = torch.tensor(blocks)
    outputs = (experts(x, counts), linear(x))
    inputs = [x, experts.gate_up_proj, experts.in_lora_A, experts.in_lora_B, experts.down_proj,
              experts.down_lora_A, experts.down_lora_B, linear.weight, linear.lora_A,
              linear.lora_B, linear.bias]
    grads_out = [torch.randn_like(y) for y in outputs]
    grads = torch.autograd.grad(outputs, inputs, grads_out)

    leaves = [t.detach().double().requires_grad_() for t in inputs]
    (x_, in_W, in_A, in_B, down_W, down_A, down_B, lin_W, lin_A, lin_B, lin_b) = leaves
    gate, up = _by_hand(x_, blocks, in_W, in_A, in_B, 1.5).chunk(2, dim=-1)
    expected = (_by_hand(F.silu(gate) * up, blocks, down_W, down_A, down_B, 1.5),
                _by_hand(x_, [rows], lin_W[None], lin_A[None], lin_B[None], 1.5) + lin_b)
    expected_grads = torch.autograd.grad(expected, leaves, [g.double() for g in grads_out])
    tolerance = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {}
    for got, want in zip(outputs + grads, expected + expected_grads):
        torch.testing.assert_close(got.double(), want, **tolerance)


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "gelu", "relu"])
@pytest.mark.parametrize("blocks, base_trains", [([400, 0, 500, 300], False),
                                                 ([3, 0, 4, 2], True)])
def test_lora_expert_mlp_is_one_autograd_step_that_matches_by_hand(activation, blocks,
                                                                    base_trains):
    """The routed experts' adapted MLP (both projections and the activation) is one autograd
    step in every activation, merged (many rows) or not: its output and every gradient (the
    input's, each factor's, the base weights' where they train) are the merged matrices' per
    expert in float64, with autograd's activation."""
    torch.manual_seed(0)
    experts = lora.LoRAExperts.wrap(GroupedExperts(4, 32, 32, activation), rank=4, scale=1.5)
    for parameter in experts.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    experts.in_proj.requires_grad_(base_trains)
    experts.down_proj.requires_grad_(base_trains)
    x = torch.randn(sum(blocks), 32, requires_grad=True)
    y = experts(x, torch.tensor(blocks))
    assert type(y.grad_fn).__name__ == "_LowRankExpertMLPBackward"
    inputs = [x] + [p for p in experts.parameters() if p.requires_grad]
    grad_out = torch.randn_like(y)
    grads = torch.autograd.grad(y, inputs, grad_out)

    leaves = {name: p.detach().double().requires_grad_()
              for name, p in experts.named_parameters()}
    x_ = x.detach().double().requires_grad_()
    act = {"swiglu": F.silu, "geglu": F.gelu, "gelu": F.gelu, "relu": F.relu}[activation]
    in_name = "gate_up_proj" if experts.gated else "up_proj"
    h = _by_hand(x_, blocks, leaves[in_name], leaves["in_lora_A"], leaves["in_lora_B"], 1.5)
    if experts.gated:
        gate, up = h.chunk(2, dim=-1)
        a = act(gate) * up
    else:
        a = act(h)
    expected = _by_hand(a, blocks, leaves["down_proj"], leaves["down_lora_A"],
                        leaves["down_lora_B"], 1.5)
    by_name = {id(p): name for name, p in experts.named_parameters()}
    expected_inputs = [x_] + [leaves[by_name[id(p)]] for p in inputs[1:]]
    expected_grads = torch.autograd.grad(expected, expected_inputs, grad_out.double())
    for got, want in zip((y, *grads), (expected, *expected_grads)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_lora_layers_that_read_one_input_compute_it_together_as_by_hand():
    """q, k and v (and an MLP's gate and up) read the same input: the first called computes
    all three, with one x [A_q; A_k; A_v]^T, the others take theirs. Outputs
    and every gradient are the merged matrices' by hand; another input, or a layer called
    again, gets them computed anew."""
    torch.manual_seed(0)
    config = replace(tiny_config(num_shared_experts=1, shared_ffn_size=32), num_kv_heads=1,
                     qkv_bias=True)
    model = Transformer(config)
    lora.add_adapters(model, lora.LoRAConfig(rank=4))
    attention, shared_mlp = model.layers[0].attn, model.layers[0].ffn.shared_experts
    layers = [attention.q_proj, attention.k_proj, attention.v_proj]
    assert all(layer.shared_input is layers[0].shared_input for layer in layers)
    assert shared_mlp.gate_proj.shared_input is shared_mlp.up_proj.shared_input is not None
    assert attention.o_proj.shared_input is None
    for layer in layers:
        torch.nn.init.normal_(layer.lora_B, std=0.2)
        torch.nn.init.normal_(layer.bias, std=0.2)
    x = torch.randn(2, 40, 32, requires_grad=True)
    other = torch.randn(2, 40, 32, requires_grad=True)
    assert layers[0].shared_input.takes(x)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        outputs = [layers[1](x), layers[0](x), layers[2](x)]  # k first
    counts = {e.key: e.count for e in prof.key_averages()}
    assert (counts["aten::addmm"], counts["aten::mm"]) == (3, 4)  # merges, x W_i'^T, x A^T
    assert layers[0].shared_input.source is None  # all taken: nothing held
    outputs.append(layers[1](other))
    outputs += [layers[0](x), layers[1](x)]  # q and k again: computed anew
    inputs = [x, other] + [t for layer in layers for t in (layer.lora_A, layer.lora_B)]
    grads_out = [torch.randn_like(y) for y in outputs]
    grads = torch.autograd.grad(outputs, inputs, grads_out)

    leaves = [t.detach().double().requires_grad_() for t in inputs]
    x_, other_ = leaves[:2]
    by_hand = [x_ @ (layer.weight.double() + layer.scale * B @ A).T
               + layer.bias.double() for layer, A, B in zip(layers, leaves[2::2], leaves[3::2])]
    k_other = other_ @ (layers[1].weight.double() + layers[1].scale * leaves[5] @ leaves[4]).T
    expected = [by_hand[1], by_hand[0], by_hand[2], k_other + layers[1].bias.double(),
                by_hand[0], by_hand[1]]
    expected_grads = torch.autograd.grad(expected, leaves, [g.double() for g in grads_out])
    for got, want in zip(outputs + list(grads), expected + list(expected_grads)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    assert layers[2].shared_input.pending.keys() == {id(layers[2])}  # v's of the last


def test_lora_forms_x_a_once_in_the_forward_and_only_for_b_s_gradient():
    """With the update merged, a projection's products are the merge, the base product and x
    A^T (B's gradient operand, formed while x is in cache and kept), then in the backward the
    input gradient, g B, B's and A's gradients: x A^T is not formed again. Without gradients
    (evaluation, DPO's reference) it is not formed at all."""
    def products(run, kinds) -> int:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            run()
        return sum(event.count for event in prof.key_averages() if event.key in kinds)

    torch.manual_seed(0)
    experts = lora.LoRAExperts.wrap(GroupedExperts(4, 32, 32).requires_grad_(False), rank=4,
                                    scale=1.5)
    linear = lora.LoRALinear.wrap(torch.nn.Linear(32, 64).requires_grad_(False), rank=4,
                                  scale=1.5)
    blocks = torch.tensor([400, 0, 500, 300])
    x = torch.randn(int(blocks.sum()), 32, requires_grad=True)
    assert lora.merging_pays(len(x), 4, 64, 32)
    grouped, dense = {"aten::_grouped_mm", "aten::baddbmm"}, {"aten::mm", "aten::addmm"}
    for module, inputs, kinds, projections in ((experts, (x, blocks), grouped, 2),
                                               (linear, (x,), dense, 1)):
        with torch.no_grad():
            assert products(lambda: module(*inputs), kinds) == 2 * projections
        outputs = []
        assert products(lambda: outputs.append(module(*inputs)), kinds) == 3 * projections
        assert products(lambda: outputs[0].backward(torch.randn_like(outputs[0])),
                        kinds) == 4 * projections


def test_lora_reaches_the_experts_when_decoding_a_token():
    """A few routes take the small-batch path, each through its expert's own weights: with
    adapters, those weights merged with their updates."""
    model = Transformer(tiny_config()).eval()
    lora.add_adapters(model, lora.LoRAConfig(rank=4))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.3)
    ids = torch.randint(0, 257, (1, 1))  # 2 routes per layer
    torch.testing.assert_close(model(ids).logits, lora.merged_model(model).eval()(ids).logits,
                               rtol=1e-4, atol=1e-5)


def test_lora_reaches_the_ffn_of_dense_layers():
    config = replace(tiny_config(), moe_every=2)
    model = Transformer(config).eval()
    dense = [layer.ffn for layer in model.layers if not isinstance(layer.ffn, MoELayer)]
    assert len(dense) == 1
    ids = torch.randint(0, 257, (2, 9))
    lora.add_adapters(model, lora.LoRAConfig(rank=4))
    assert all(isinstance(getattr(dense[0], name), lora.LoRALinear)
               for name in ("gate_proj", "up_proj", "down_proj"))
    torch.nn.init.normal_(dense[0].down_proj.lora_B, std=0.1)
    x = torch.randn(5, 64)  # the FFN's width
    by_hand = dense[0].down_proj.weight + dense[0].down_proj.scale * (
        dense[0].down_proj.lora_B @ dense[0].down_proj.lora_A)
    torch.testing.assert_close(dense[0].down_proj(x), x @ by_hand.T)
    torch.testing.assert_close(lora.merged_model(model).eval()(ids).logits, model(ids).logits,
                               rtol=1e-5, atol=1e-5)


def test_ema_follows_its_formula():
    layer = torch.nn.Linear(2, 2)
    average = WeightAverage(layer, decay=0.75)
    start = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(1.0)
    average.update()
    torch.testing.assert_close(average.average["weight"], start + 0.25)
    with average.applied():
        torch.testing.assert_close(layer.weight, start + 0.25)
    torch.testing.assert_close(layer.weight.detach(), start + 1.0)


def _run(*args) -> int:
    return main([*map(str, args), "--quiet", "--batch-size", "4", "--seq-len", "64",
                 "--eval-every", "2", "--eval-batches", "1", "--warmup-steps", "0"])


def _cut_after_step_2(run, copy):
    """``copy``: the run folder as a run killed after its step-2 checkpoint would leave it."""
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints/step-000003")
    shutil.rmtree(copy / "ema", ignore_errors=True)


def test_sft_with_lora_runs_resumes_exactly_and_writes_a_plain_model(base, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert _run("sft", "--init-from", base, "--out", whole, "--steps", "3",
                "--lora-rank", "4", "--checkpoint-every", "2") == 0
    _cut_after_step_2(whole, cut)
    assert main(["sft", "--out", str(cut), "--resume", "--quiet"]) == 0
    final = [whole / "checkpoints/step-000003", cut / "checkpoints/step-000003"]
    from safetensors.torch import load_file
    adapters = [load_file(f / lora.ADAPTER_FILE) for f in final]
    assert adapters[0].keys() == adapters[1].keys()
    for name in adapters[0]:
        torch.testing.assert_close(adapters[0][name], adapters[1][name], rtol=0, atol=0)
    merged = load_model(final[0])  # a plain model folder: generate, eval, export read it
    records = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    assert all("accuracy" in r for r in records if r["kind"] == "eval")
    assert merged.config == load_model(base).config


def test_dpo_offline_and_online_with_ema_resumes_exactly(base, tmp_path):
    assert _run("dpo", "--init-from", base, "--online", "--online-prompts", "2", "--samples",
                "3", "--ema-decay", "0.5", "--sft-weight", "0.1", "--out", tmp_path / "whole",
                "--steps", "3", "--checkpoint-every", "2") == 0
    _cut_after_step_2(tmp_path / "whole", tmp_path / "cut")
    assert main(["dpo", "--out", str(tmp_path / "cut"), "--resume", "--quiet"]) == 0
    from safetensors.torch import load_file
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = (load_file(tmp_path / run / "checkpoints/step-000003" / name)
                for run in ("whole", "cut"))
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    records = [json.loads(line) for line in
               (tmp_path / "whole/metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert all(r["online_pairs"] + r["skipped"] == 2 for r in train)
    assert all(r["margin"] == pytest.approx(r["chosen_reward"] - r["rejected_reward"])
               for r in train)
    assert train[0]["kl"] == pytest.approx(0, abs=1e-6)  # the first step: policy = reference
    assert (tmp_path / "whole/ema/model.safetensors").is_file()
    assert (tmp_path / "whole/plots/dpo.png").is_file()


BAD = [
    ("sft", "chat.jsonl", '{"messages": [{"role": "assistant", "content": "hi"}]}\nnot json\n',
     [], "chat.jsonl:2: not valid JSON"),
    ("sft", "chat.jsonl", '{"text": "x"}\n', [], 'chat.jsonl:1: missing field "messages"'),
    ("dpo", "pairs.jsonl", '{"prompt": "p", "chosen": "a"}\n', [],
     "pairs.jsonl:1: missing field 'rejected'"),
    ("dpo", "pairs.jsonl", '{"prompt": "p", "chosen": "a", "rejected": "a"}\n', [],
     '"chosen" equals "rejected"'),
    ("sft", None, None, ["--lora-rank", "0"], "LoRA rank 0 is not allowed"),
    ("sft", None, None, ["--lora-rank", "40"], "LoRA rank 40 is larger than the layer"),
    ("dpo", None, None, ["--ema-decay", "1.5"], "ema decay 1.5 is not allowed"),
    ("dpo", None, None, ["--online", "--reward", "no_such_module:f"], "cannot be imported"),
    ("dpo", None, None, ["--online", "--precompute-reference"],
     "precompute_reference is not allowed online"),
    ("sft", None, None, ["--pipeline", "2"], "--pipeline 2 is not supported by moekit sft"),
    ("dpo", None, None, ["--tensor", "2", "--expert", "2"],
     "--tensor 2 is not supported by moekit dpo"),
    ("sft", None, None, ["--lora-rank", "4", "--expert", "2", "--ep-shadow"],
     "--ep-shadow is not supported with --lora-rank"),
]


@pytest.mark.parametrize("command, name, text, flags, message", BAD)
def test_bad_input_is_one_line_and_writes_nothing(base, tmp_path, capsys, command, name, text,
                                                  flags, message):
    data = []
    if name is not None:
        (tmp_path / name).write_text(text)
        data = ["--data", str(tmp_path / name)]
    out = tmp_path / "run"
    assert main([command, "--init-from", str(base), "--out", str(out), *data, *flags,
                 "--quiet"]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert not out.exists()


def test_a_tokenizer_that_does_not_fit_the_model_is_refused(base, tmp_path, capsys):
    folder = tmp_path / "mismatch"
    save_model(load_model(base), folder)
    train_tokenizer(["some text to learn merges from " * 50], 300).save(folder)
    assert main(["sft", "--init-from", str(folder), "--out", str(tmp_path / "run")]) == 2
    assert "do not belong together" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_preference_file_takes_string_and_message_prompts(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "hi", "chosen": "a", "rejected": "b"}\n\n'
                    '{"prompt": [{"role": "system", "content": "s"}, {"role": "user", '
                    '"content": "q"}], "chosen": "c", "rejected": "d"}\n')
    pairs = read_preference_file(path)
    assert pairs[0].prompt == ({"role": "user", "content": "hi"},)
    assert [m["role"] for m in pairs[1].prompt] == ["system", "user"]


def test_hunyuan_schedule_sets_its_rates_dropout_and_three_epochs(base, tmp_path, tokenizer):
    conversations = [[{"role": "user", "content": f"say {i}"},
                      {"role": "assistant", "content": str(i)}] for i in range(20)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations))
    assert _run("sft", "--init-from", base, "--data", data, "--out", tmp_path / "run",
                "--schedule", "hunyuan") == 0
    record = json.loads((tmp_path / "run/run.json").read_text())
    rows = len(pack(conversations[:18], None, tokenizer, 64))  # the last tenth validates
    assert record["train"]["steps"] == math.ceil(3 * rows / 4)
    assert (record["train"]["lr"], record["train"]["min_lr_ratio"]) == (2e-5, 0.1)
    model = record["model"]
    assert (model["attention_dropout"], model["hidden_dropout"]) == (0.1, 0.2)


def test_dropout_is_active_in_training_only():
    model = Transformer(ModelConfig.from_dict({**tiny_config().to_dict(),
                                               "attention_dropout": 0.5,
                                               "hidden_dropout": 0.5}))
    ids = torch.randint(0, 257, (1, 8))
    model.eval()
    torch.testing.assert_close(model(ids).logits, model(ids).logits)
    model.train()
    assert not torch.allclose(model(ids).logits, model(ids).logits)


def test_lora_run_exports_base_and_a_peft_adapter_that_gives_moekits_logits(plain_base,
                                                                             tmp_path):
    from peft import PeftModel  # in the test extra
    from transformers import AutoModelForCausalLM
    base = plain_base
    assert _run("sft", "--init-from", base, "--out", tmp_path / "run", "--steps", "2",
                "--lora-rank", "4", "--lr", "0.05") == 0
    assert main(["export", "--from", str(tmp_path / "run"), "--out", str(tmp_path / "hf"),
                 "--layout", "mixtral"]) == 0
    assert main(["export", "--from", str(tmp_path / "run"), "--out",
                 str(tmp_path / "merged"), "--layout", "mixtral", "--merge-lora"]) == 0
    adapted = load_model(tmp_path / "run/checkpoints/step-000002")  # the merged weights
    ids = torch.randint(0, 257, (2, 12))
    with torch.no_grad():
        expected = adapted(ids).logits
        hf_base = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
        base_logits = hf_base(ids).logits
        peft_model = PeftModel.from_pretrained(hf_base, tmp_path / "hf/adapter")
        got = peft_model(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(ids).logits
    torch.testing.assert_close(base_logits, load_model(base)(ids).logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(base_logits, expected, atol=1e-3)  # the adapters changed it
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("adapter, layout, why", [
    ("layers.0.ffn.shared_experts.gate_proj.lora_A", "granitemoeshared",
     "is one part of a matrix that granitemoeshared holds fused"),
    ("layers.0.ffn.experts.in_lora_A", "granitemoe", "its experts are not the fused"),
    ("layers.0.ffn.router.lora_A", "mixtral", "they include the router's")])
def test_peft_export_refuses_adapters_it_would_misname(adapter, layout, why):
    from moekit.convert.peft_adapter import peft_tensors
    factor = torch.zeros(2, 4, 8) if ".experts." in adapter else torch.zeros(4, 8)
    with pytest.raises(ValueError, match=f"{why}.*export with --merge-lora"):
        peft_tensors({adapter: factor}, layout)


def _records_without_timings(run):
    timings = {"tokens_per_s", "model_flops_per_s"}
    return [{k: v for k, v in json.loads(line).items() if k not in timings}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def _stage(command: str):
    train, held_out = instruction_set(size=200)
    if command == "sft":
        return SupervisedFineTuning([x.messages() for x in train],
                                    [x.messages() for x in held_out], held_out[:8])
    return DirectPreference(preference_set(train), preference_set(held_out), sft_weight=0.1)


# LoRA on every target the model has, the router too; every run with an average of the
# weights.
LORA = lora.LoRAConfig(rank=4, router=True)
EMA_DECAY = 0.5


def _post_train_on(rank, world, command, base, out, expert=1, zero=0, adapters=None,
                   resume=False):
    """Post-train on this rank (with LoRA ``adapters``; ``resume``: continue the run ``out``),
    a checkpoint after each step; returns, for each model that came to ``parallelize`` (the
    policy, DPO's reference model), whether it came on the meta device with its folder, to
    be read in parts."""
    from unittest import mock

    import moekit.train.dpo as preference
    import moekit.train.post_train as post_training
    from moekit.parallel import parallelize as layouts
    config = TrainConfig(steps=2, batch_size=4, seq_len=64, lr=1e-3, warmup_steps=0,
                         eval_every=2, eval_batches=1, lb_scope="step", checkpoint_every=1)
    mesh = replace(world_mesh("cpu", expert), zero=zero) if world > 1 else Mesh()
    in_parts = []

    def parallelize(model, mesh, weights=None, device=None, **options):
        in_parts.append(weights is not None and all(p.is_meta for p in model.parameters()))
        return layouts.parallelize(model, mesh, weights, device, **options)

    with mock.patch.object(post_training, "parallelize", parallelize), \
            mock.patch.object(preference, "parallelize", parallelize):
        post_train(_stage(command), PostTrainSettings(stage=command, init_from=str(base),
                                                      lora=adapters, ema_decay=EMA_DECAY),
                   config, out, mesh=mesh, show_progress=False, resume=resume)
    return in_parts


@pytest.fixture(scope="module")
def one_process_runs(plain_base, tmp_path_factory):
    folder = tmp_path_factory.mktemp("one-process")
    for command in ("sft", "dpo"):
        _post_train_on(0, 1, command, plain_base, folder / command)
        _post_train_on(0, 1, command, plain_base, folder / f"{command}-lora", adapters=LORA)
    return folder


# Each stage under data parallelism, and the layouts that change how its step computes:
# experts spread over the ranks (EP; DPO's on 4 ranks, DP 2 x EP 2, each expert on two), the
# parameters sharded (FSDP2's ZeRO-3), the optimizer state sharded (ZeRO-1); DPO's reference
# model laid out as the policy (its experts spread, FSDP2's shards); LoRA's frozen base and
# trainable adapters sharded together by FSDP2, and its experts' factors spread with them.
LAYOUTS = [("sft", {}), ("dpo", {}), ("sft", {"expert": 2}), ("dpo", {"expert": 2, "world": 4}),
           ("sft", {"zero": 3}), ("dpo", {"zero": 1}), ("dpo", {"zero": 3}),
           ("sft", {"zero": 3, "lora": True}), ("dpo", {"zero": 2, "lora": True}),
           ("sft", {"expert": 2, "lora": True})]


@pytest.mark.parametrize("command, layout", LAYOUTS,
                         ids=[f"{c}-{'-'.join(f'{k}{v}' for k, v in l.items()) or 'dp'}"
                              for c, l in LAYOUTS])
def test_several_processes_post_train_the_one_process_run(plain_base, one_process_runs, tmp_path,
                                                      command, layout):
    """lb_scope "step": the router loss of the global batch however it is cut (rows hold
    different numbers of real tokens, which "global" weighs per rank)."""
    # Each rank read the model in parts (a meta model filled from the folder), and DPO's
    # reference too (with LoRA the reference is the policy with its adapters off).
    adapters = LORA if layout.get("lora") else None
    models = 2 if command == "dpo" and adapters is None else 1
    world, options = layout.get("world", 2), (layout.get("expert", 1), layout.get("zero", 0),
                                              adapters)
    assert run_on_ranks(_post_train_on, world, command, plain_base, tmp_path / "two",
                        *options) == [[True] * models] * world
    reference = one_process_runs / (command + ("-lora" if adapters else ""))
    one = _records_without_timings(reference)
    assert [r.keys() for r in _records_without_timings(tmp_path / "two")] == \
        [r.keys() for r in one]
    _same_figures(tmp_path / "two", reference)
    # The average, gathered whole, as one process writes it (to 2 lr: Adam moves a weight by
    # up to lr a step, in the sign of gradients that are sums in another order, some near
    # zero), its model folder read by load_model with every expert of every layer.
    for file in ("checkpoints/step-000002/ema.safetensors", "ema/model.safetensors"):
        _close_by_name(tmp_path / "two" / file, reference / file, atol=2e-3)
    experts = [layer.experts for layer in load_model(tmp_path / "two/ema").modules()
               if isinstance(layer, MoELayer)]
    assert [e.in_proj.shape[0] for e in experts] == [4, 4]
    if adapters is None and "expert" not in layout:
        return
    # The same adapters, and the merged model, by name, as one process writes; resumed from
    # its first checkpoint (each rank reading its parts of the base, the adapters, the
    # average, and of the model folder its own weights, not the average's beside them), the
    # run continues bit for bit.
    from safetensors.torch import load_file
    shutil.copytree(tmp_path / "two", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed/checkpoints/step-000002")
    run_on_ranks(_post_train_on, world, command, plain_base, tmp_path / "resumed", *options,
                 True)
    last = "checkpoints/step-000002/"
    files = [*([last + lora.ADAPTER_FILE] if adapters else []), last + "model.safetensors",
             last + "optimizer.safetensors", last + "ema.safetensors", "ema/model.safetensors"]
    for file in files:
        got, resumed = (load_file(run / file) for run in (tmp_path / "two", tmp_path / "resumed"))
        assert got.keys() == resumed.keys()
        assert [name for name in got if not torch.equal(got[name], resumed[name])] == []
        if adapters is not None and file.startswith(last) and "optimizer" not in file:
            # (the optimizer's file holds each rank's random state)
            _close_by_name(tmp_path / "two" / file, reference / file)


def _close_by_name(path, reference_path, atol=1e-5):
    """The tensors of two safetensors files have the same names and close values (float32
    sums in another order)."""
    from safetensors.torch import load_file
    got, want = load_file(path), load_file(reference_path)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=atol)


def _same_figures(run, reference_run, keys=("loss", "router_loss", "grad_norm", "val_loss",
                                              "margin", "accuracy", "kl")):
    one, other = (_records_without_timings(r) for r in (reference_run, run))
    assert len(one) == len(other)
    for index, (a, b) in enumerate(zip(other, one)):
        for key in keys:
            if key in b:  # float32 sums in another order; Adam magnifies it after step 1
                assert a[key] == pytest.approx(b[key], rel=1e-4 if index == 0 else 1e-2,
                                               abs=1e-6), key


def test_dpo_in_micro_batches_trains_the_one_forward_step(plain_base, one_process_runs,
                                                          tmp_path):
    config = TrainConfig(steps=2, batch_size=4, grad_accum=2, seq_len=64, lr=1e-3,
                         warmup_steps=0, eval_every=2, eval_batches=1, lb_scope="step")
    post_train(_stage("dpo"), PostTrainSettings(stage="dpo", init_from=str(plain_base),
                                 ema_decay=EMA_DECAY),
               config, tmp_path / "run", show_progress=False)
    _same_figures(tmp_path / "run", one_process_runs / "dpo")


def test_precomputed_reference_log_probabilities_train_as_the_reference_model(
        plain_base, one_process_runs, tmp_path):
    stage = _stage("dpo")
    stage.precompute_reference = True
    config = TrainConfig(steps=2, batch_size=4, seq_len=64, lr=1e-3, warmup_steps=0,
                         eval_every=2, eval_batches=1, lb_scope="step")
    post_train(stage, PostTrainSettings(stage="dpo", init_from=str(plain_base),
                                 ema_decay=EMA_DECAY), config,
               tmp_path / "run", show_progress=False)
    assert stage.reference is None  # freed once the pairs were scored
    assert stage.reference_of_pairs.shape == (len(stage.pairs), 2)
    _same_figures(tmp_path / "run", one_process_runs / "dpo",
                  ("loss", "router_loss", "grad_norm", "val_loss", "margin", "accuracy"))
    train = [r for r in _records_without_timings(tmp_path / "run") if r["kind"] == "train"]
    assert all("kl" not in r for r in train)


def shortest_reward(prompt: str, response: str) -> float:
    """A user reward for the test below: shorter is better."""
    return -float(len(response))


def test_online_pairs_from_a_data_file_ranked_by_a_user_reward(base, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"name {i}", "chosen": "a", "rejected": "bb"})
                            + "\n" for i in range(12)))
    assert _run("dpo", "--init-from", base, "--data", data, "--out", tmp_path / "run",
                "--steps", "1", "--online", "--online-prompts", "2", "--samples", "3",
                "--reward", "test_post_training:shortest_reward") == 0
    record = next(json.loads(line) for line in (tmp_path / "run/metrics.jsonl").open()
                  if json.loads(line)["kind"] == "train")
    assert record["online_pairs"] + record["skipped"] == 2 and record["online_pairs"] >= 1
