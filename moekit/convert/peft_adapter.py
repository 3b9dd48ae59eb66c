"""moekit's LoRA adapters (``moekit.train.lora``) as a PEFT adapter folder for an exported
Hugging Face model: ``adapter_config.json`` + ``adapter_model.safetensors``, which
``peft.PeftModel.from_pretrained(model, folder)`` loads (PEFT >= 0.17, the version with
``target_parameters``).

Attention and shared-expert adapters are PEFT ``target_modules`` (one nn.Linear each, A [R, in]
and B [out, R] as moekit holds them). Routed experts are fused 3-D parameters in transformers 5
(``mlp.experts.gate_up_proj`` [E, 2F, D], ``down_proj`` [E, D, F]), which PEFT reaches through
``target_parameters``: its factors of one parameter are A [E * R, in] (expert-major, as
moekit's [E, R, in] flattened) and B [out, R * E] (rank-major: B[o, r * E + e]); the gate and up
factors go out as one block, as moekit trains them. PEFT wraps the experts module once per
targeted parameter, the first target innermost (``experts.base_layer.lora_*``: gate_up_proj)
and the second around it (``experts.lora_*``: down_proj). Router adapters have no PEFT form
here: such a run exports with ``--merge-lora``.

Legend: E experts, R rank, F expert FFN dim, D model dim.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from moekit.convert.families import family_of
from moekit.convert.hf import moekit_to_hf_state
from moekit.files import atomic_directory, write_json

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
_EXPERT_FACTOR = re.compile(r"(.*\.experts)\.(in|down)_lora_(A|B)")
# The order of target_parameters PEFT reads, innermost first (module docstring).
EXPERT_TARGETS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def _expert_factor(factor: str, tensor_EXY: torch.Tensor) -> torch.Tensor:
    experts, rows, columns = tensor_EXY.shape
    if factor == "A":  # [E, R, in] -> [E * R, in]
        return tensor_EXY.reshape(experts * rows, columns)
    return tensor_EXY.permute(1, 2, 0).reshape(rows, columns * experts)  # -> [out, R * E]


def _unheld(layout: str, why: str) -> ValueError:
    return ValueError(f"a PEFT adapter of the {layout} export cannot hold these LoRA adapters "
                      f"({why}): export with --merge-lora")


def peft_tensors(adapters: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """moekit's adapter tensors (``adapter_weights``) under PEFT's names for ``layout``."""
    if any("router" in name for name in adapters):
        raise _unheld(layout, "they include the router's")
    fused = {part for _, parts in family_of(layout).fused for part in parts}
    tensors = {}
    for name, tensor in adapters.items():
        expert = _EXPERT_FACTOR.fullmatch(name)
        if expert is None:  # layers.N.attn.q_proj.lora_A -> ...self_attn.q_proj.lora_A.weight
            module, factor = name.rsplit(".lora_", 1)
            if module.split(".", 2)[2] + ".weight" in fused:
                raise _unheld(layout, f"{module} is one part of a matrix that {layout} "
                              "holds fused with another")
            hf = next(iter(moekit_to_hf_state({f"{module}.weight": tensor}, layout)))
            tensors[f"base_model.model.{hf[:-len('.weight')]}.lora_{factor}.weight"] = tensor
            continue
        module, projection, factor = expert.groups()
        hf = next(iter(moekit_to_hf_state({f"{module}.down_proj": tensor}, layout)))
        if not hf.endswith(EXPERT_TARGETS[1]):
            raise _unheld(layout, f"its experts are not the fused {', '.join(EXPERT_TARGETS)} "
                          "parameters that the adapter's target_parameters name")
        wrapper = ".base_layer" if projection == "in" else ""
        tensors[f"base_model.model.{hf[:-len('.down_proj')]}{wrapper}.lora_{factor}.weight"] = \
            _expert_factor(factor, tensor)
    return {name: t.contiguous() for name, t in tensors.items()}


def write_peft_adapter(adapters: dict[str, torch.Tensor], rank: int, alpha: float, layout: str,
                       folder: str | os.PathLike, base_model: str | None = None) -> None:
    """Write ``folder`` (atomically) as a PEFT LoRA adapter of the exported ``layout`` model."""
    from safetensors.torch import save_file
    tensors = peft_tensors(adapters, layout)
    modules = sorted({name.split(".")[-3] for name in tensors if ".experts." not in name})
    experts = any(".experts." in name for name in tensors)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
              "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
              "target_modules": modules,
              "target_parameters": list(EXPERT_TARGETS) if experts else None,
              "base_model_name_or_path": base_model, "task_type": "CAUSAL_LM",
              "inference_mode": True}
    with atomic_directory(Path(folder)) as staging:
        save_file(tensors, str(staging / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
        write_json(staging / ADAPTER_CONFIG_FILE, config)
