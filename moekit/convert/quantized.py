"""Quantized Hugging Face checkpoints on import: DeepSeek-V3's block-wise FP8 is dequantized
tensor by tensor; every other ``quantization_config`` (gpt-oss's MXFP4, GPTQ, AWQ, ...) is
refused naming it, before anything is read.

DeepSeek-V3 stores a quantized weight W [out, in] as float8 (e4m3) beside ``weight_scale_inv``
S [ceil(out / b0), ceil(in / b1)], ``weight_block_size`` = [b0, b1] (128 x 128): the number it
stands for is W[i, j] * S[i // b0, j // b1] (transformers' ``FP8Linear`` multiplies so too).
"""
from __future__ import annotations

import torch

from moekit.files import CheckpointError

SCALE_SUFFIX = "_scale_inv"


def block_fp8_size(quantization: dict | None) -> tuple[int, int] | None:
    """The block size of a block-wise FP8 ``quantization_config``; None for a checkpoint that
    is not quantized; a ValueError naming the key for any other quantization."""
    if quantization is None:
        return None
    method = quantization.get("quant_method")
    block = quantization.get("weight_block_size")
    if method != "fp8" or not (isinstance(block, list) and len(block) == 2):
        raise ValueError(f"quantization_config.quant_method={method!r} (weight_block_size="
                         f"{block!r}) is not supported: moekit dequantizes block-wise 'fp8' "
                         "(DeepSeek-V3's weight_scale_inv) on import; dequantize other formats "
                         "with their own tools first")
    return block[0], block[1]


def dequantize_block_fp8(weight: torch.Tensor, scale_inv: torch.Tensor,
                         block: tuple[int, int]) -> torch.Tensor:
    """W * S, each scale covering a block of ``block`` rows and columns, in float32."""
    rows, columns = weight.shape
    scale = (scale_inv.float().repeat_interleave(block[0], 0)[:rows]
             .repeat_interleave(block[1], 1)[:, :columns])
    return weight.float() * scale


class DequantizedFP8:
    """The tensors of a block-wise FP8 checkpoint (a ``CheckpointFiles``) as the float32
    numbers they stand for; the scales themselves are not listed."""

    def __init__(self, checkpoint, block: tuple[int, int]):
        self.checkpoint, self.block = checkpoint, block
        self.files = {name: path for name, path in checkpoint.files.items()
                      if not name.endswith(SCALE_SUFFIX)}

    def _scale(self, name: str) -> str | None:
        scale = name + SCALE_SUFFIX
        return scale if scale in self.checkpoint.files else None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.checkpoint.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return torch.float32 if self._scale(name) else self.checkpoint.dtype(name)

    def get(self, name: str) -> torch.Tensor:
        scale = self._scale(name)
        if scale is None:
            return self.checkpoint.get(name)
        shape = self.shape(name)
        expected = tuple(-(-size // block) for size, block in zip(shape, self.block))
        if len(shape) != 2 or self.checkpoint.shape(scale) != expected:
            raise CheckpointError(f"{self.checkpoint.files[scale]}: {scale} has shape "
                                  f"{list(self.checkpoint.shape(scale))}; a weight of shape "
                                  f"{list(shape)} in blocks of {list(self.block)} needs "
                                  f"{list(expected)}")
        return dequantize_block_fp8(self.checkpoint.get(name), self.checkpoint.get(scale),
                                    self.block)
