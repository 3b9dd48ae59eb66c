"""`moekit upcycle`, `import` and `export` end to end, against transformers' own models, and
their bad-input errors: one line naming the file, exit code 2, nothing written."""
import json

import pytest
import torch

from moekit.cli import main
from moekit.config import ModelConfig
from moekit.files import read_safetensors
from moekit.model import Transformer, load_model, save_model
from moekit.train.tokenizer import load_tokenizer, train_tokenizer

transformers = pytest.importorskip("transformers")

VOCAB = 300


def _llama_folder(folder):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    train_tokenizer(["some text to learn from"], vocab_size=VOCAB).save(folder)
    return model


def test_upcycle_a_hugging_face_dense_folder(tmp_path, capsys):
    hf_model = _llama_folder(tmp_path / "llama")
    code = main(["upcycle", "--from", str(tmp_path / "llama"), "--experts", "8", "--top-k", "2",
                 "--out", str(tmp_path / "moe"), "--dense-tokens", "1e9", "--moe-tokens", "1e9"])
    assert code == 0
    model = load_model(tmp_path / "moe")
    assert model.config.moe.num_experts == 8 and model.config.moe.top_k == 2
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf_model(ids).logits, rtol=1e-4, atol=1e-5)
    assert load_tokenizer(tmp_path / "moe").encode("text") == \
        load_tokenizer(tmp_path / "llama").encode("text")
    # The advice, by hand: 6 x (parameters but the embedding lookup) + the attention term
    # 12 L H Dh S at S = 64; the MoE adds two routers (8 x 32) and one more expert per token in
    # each of the 2 layers (3 x 32 x 48).
    dense_params = sum(p.numel() for p in hf_model.parameters()) - VOCAB * 32
    moe_params = dense_params + 2 * (8 * 32 + 3 * 32 * 48)
    attention = 12 * 2 * 4 * 8 * 64
    dense_flops, moe_flops = (1e9 * (6 * params + attention)
                              for params in (dense_params, moe_params))
    out = capsys.readouterr().out
    assert f"= {dense_flops:.3e} FLOPs" in out and f"= {moe_flops:.3e} FLOPs" in out
    assert f"is {moe_flops / dense_flops:.2f}x" in out and "advice: upcycle" in out


def test_both_commands_give_the_same_advice(tmp_path, capsys):
    """`moekit upcycle` and `moekit plan --upcycle` on the model it wrote: one ratio."""
    save_model(Transformer(ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2,
                                       num_heads=4, ffn_size=64, max_seq_len=64)), tmp_path / "d")
    tokens = ["--dense-tokens", "1e12", "--moe-tokens", "1.3e12"]
    assert main(["upcycle", "--from", str(tmp_path / "d"), "--experts", "8", "--top-k", "2",
                 "--out", str(tmp_path / "moe"), *tokens]) == 0
    upcycled = capsys.readouterr().out
    assert main(["plan", "--config", str(tmp_path / "moe"), "--upcycle", *tokens, "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)["upcycle"]
    assert f"is {planned['budget_ratio']:.2f}x" in upcycled
    assert f"advice: {planned['recommendation']}" in upcycled


def test_upcycle_a_moekit_checkpoint_and_advise_scratch(tmp_path, capsys):
    dense = Transformer(ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                                    ffn_size=64, max_seq_len=64)).eval()
    save_model(dense, tmp_path / "dense")
    assert main(["upcycle", "--from", str(tmp_path / "dense"), "--experts", "4", "--top-k", "1",
                 "--granularity", "2", "--shared-experts", "1", "--out", str(tmp_path / "moe"),
                 "--dense-tokens", "1e9", "--moe-tokens", "3e9"]) == 0
    model = load_model(tmp_path / "moe")
    assert (model.config.moe.num_experts, model.config.moe.top_k) == (8, 2)
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-5)
    assert "advice: scratch" in capsys.readouterr().out


def test_export_then_import_through_the_cli(tmp_path):
    _llama_folder(tmp_path / "llama")
    assert main(["upcycle", "--from", str(tmp_path / "llama"), "--experts", "4",
                 "--out", str(tmp_path / "moe")]) == 0
    assert main(["export", "--from", str(tmp_path / "moe"), "--layout", "mixtral",
                 "--out", str(tmp_path / "hf"), "--max-shard-size", "0.1MB"]) == 0
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((tmp_path / "hf" / shard).stat().st_size < 0.1e6 + 4096
                                   for shard in shards)  # + the header of each file
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert main(["import", "--from", str(tmp_path / "hf"), "--out", str(tmp_path / "back"),
                 "--dtype", "bfloat16"]) == 0
    stored = read_safetensors(tmp_path / "back" / "model.safetensors")["embed_tokens.weight"]
    original = load_model(tmp_path / "moe")
    assert torch.equal(stored, original.embed_tokens.weight.bfloat16())
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, original(ids).logits,
                                   rtol=1e-4, atol=1e-5)
    assert (tmp_path / "back" / "tokenizer.json").is_file()


def _fails(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = str(tmp_path / "out")
    upcycle = ["upcycle", "--experts", "4", "--out", out, "--from"]
    _fails(capsys, upcycle + [str(tmp_path / "nothing")], "nothing: not a folder")
    _llama_folder(tmp_path / "llama")
    capsys.readouterr()  # transformers' own progress bar
    config = tmp_path / "llama" / "config.json"
    values = json.loads(config.read_text())
    config.write_text(json.dumps({**values, "model_type": "gpt2"}))
    _fails(capsys, upcycle + [str(tmp_path / "llama")],
           "config.json: model_type='gpt2' is not supported")
    config.write_text(json.dumps({**values, "hidden_size": 64}))
    _fails(capsys, upcycle + [str(tmp_path / "llama")],
           "model.safetensors: weights do not fit the model of the config: ")
    config.write_text(json.dumps(values))
    weights = tmp_path / "llama" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000])
    _fails(capsys, upcycle + [str(tmp_path / "llama")],
           "model.safetensors: not a readable safetensors file")
    _fails(capsys, upcycle + [str(tmp_path / "llama"), "--dense-tokens", "1e9"],
           "--dense-tokens and --moe-tokens go together")
    with pytest.raises(SystemExit) as exit_info:  # argparse's own error: usage and exit 2
        main(["export", "--from", str(tmp_path / "llama"), "--layout", "mixtral", "--out", out,
              "--max-shard-size", "5 parsecs"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "'5 parsecs' is not a size: expected a positive number with a unit of B, KB" in err
    moe = Transformer(ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=4,
                                  ffn_size=64, cla_share=1, qk_norm=True))
    save_model(moe, tmp_path / "qk")
    _fails(capsys, ["export", "--from", str(tmp_path / "qk"), "--layout", "llama", "--out", out],
           "the llama layout cannot hold QK-norm per head before RoPE "
           "(qk_norm_placement='head'); layouts that can: qwen3_moe")
    _fails(capsys, ["import", "--from", str(tmp_path / "qk"), "--out", out],
           "qk: already a moekit model folder (config.json says \"format\": \"moekit\")")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama", "qk"]
