"""The dense families, sources of upcycling: Llama, Mistral (a sliding window by default) and
Qwen2 (QKV bias)."""
from moekit.convert.families.family import MOST_FAMILIES, Family

DENSE = MOST_FAMILIES | {"dense"}

LLAMA = Family(model_type="llama", architecture="LlamaForCausalLM",
               holds=DENSE | {"attention_bias"})
MISTRAL = Family(model_type="mistral", architecture="MistralForCausalLM",
                 holds=DENSE | {"sliding_window"}, window_by_default=True)
QWEN2 = Family(model_type="qwen2", architecture="Qwen2ForCausalLM",
               holds=frozenset({"dense", "head_dim", "no_qk_norm", "qkv_bias", "rope_scaling",
                                "sliding_window", "full_attention_layers", "gqa"}),
               options=lambda values: dict(qkv_bias=True),
               config_values=lambda config: dict(layer_types=[
                   "sliding_attention" if config.uses_window(index) else "full_attention"
                   for index in range(config.num_layers)]))
