"""The registry of Hugging Face families moekit reads and writes: one ``Family`` per
``model_type``, each in the module of its family. A new family is a new module and one line
in ``FAMILIES``; the conversion code (``moekit.convert.hf``) reads nothing else."""
from moekit.convert.families.deepseek import DEEPSEEK_V2, DEEPSEEK_V3, GLM4_MOE_LITE
from moekit.convert.families.dense import LLAMA, MISTRAL, QWEN2
from moekit.convert.families.family import Family, PerExpertFiles
from moekit.convert.families.glm import GLM4_MOE
from moekit.convert.families.granite import GRANITE_SCALINGS, GRANITEMOE, GRANITEMOESHARED
from moekit.convert.families.hunyuan import HUNYUAN, HUNYUAN_V1_MOE
from moekit.convert.families.mixtral import MIXTRAL
from moekit.convert.families.olmoe import OLMOE
from moekit.convert.families.qwen import QWEN2_MOE, QWEN3_MOE

# In the order error messages list them: the MoE families, then the dense ones.
FAMILIES = {family.model_type: family for family in (
    MIXTRAL, QWEN2_MOE, QWEN3_MOE, OLMOE, HUNYUAN_V1_MOE, HUNYUAN, GRANITEMOE, GRANITEMOESHARED,
    DEEPSEEK_V2, DEEPSEEK_V3, GLM4_MOE, GLM4_MOE_LITE, LLAMA, MISTRAL, QWEN2)}
LAYOUTS = tuple(FAMILIES)
MOE_LAYOUTS = tuple(name for name, family in FAMILIES.items() if family.moe is not None)
DENSE_LAYOUTS = tuple(name for name, family in FAMILIES.items() if family.moe is None)


# Families moekit's layer cannot hold exactly, each with the first piece it lacks (the others
# are in docs/convert.md).
REFUSED = {
    "phimoe": "PhiMoE's sparse-mixer routing (its second expert chosen and weighted by a "
              "masked softmax) is not a moekit gate",
    "gpt_oss": "gpt-oss's attention sinks (a learned logit per head in every softmax) are not "
               "in moekit's attention",
}


def family_of(model_type) -> Family:
    """The family of ``model_type``; a ValueError names what a refused family lacks, or lists
    the supported ones."""
    if model_type in REFUSED:
        raise ValueError(f"model_type={model_type!r} is not supported: {REFUSED[model_type]}")
    if model_type not in FAMILIES:
        raise ValueError(f"model_type={model_type!r} is not supported: expected one of "
                         f"{', '.join(LAYOUTS)}")
    return FAMILIES[model_type]


__all__ = ["DENSE_LAYOUTS", "FAMILIES", "Family", "GRANITE_SCALINGS", "LAYOUTS", "MOE_LAYOUTS",
           "PerExpertFiles", "REFUSED", "family_of"]
