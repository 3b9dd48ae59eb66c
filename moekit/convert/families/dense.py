"""The dense families, sources of upcycling: Llama, Mistral (a sliding window by default) and
Qwen2 (QKV bias)."""
from moekit.convert.families.family import PLAIN_ATTENTION, Family

DENSE = PLAIN_ATTENTION | {"dense"}

LLAMA = Family(model_type="llama", architecture="LlamaForCausalLM", holds=DENSE)
MISTRAL = Family(model_type="mistral", architecture="MistralForCausalLM", holds=DENSE,
                 window_by_default=True)
QWEN2 = Family(model_type="qwen2", architecture="Qwen2ForCausalLM",
               holds=frozenset({"dense", "head_dim", "no_qk_norm", "qkv_bias"}),
               options=lambda values: dict(qkv_bias=True))
