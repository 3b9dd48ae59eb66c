"""A paged KV cache: the keys and values of many sequences in fixed-size blocks of one pool.

Continuous batching decodes sequences that started at different times, so each row of a batch
sits at its own position. ``KVBlockPool`` holds every sequence's cache in blocks of
``block_size`` positions ([N blocks, G, block_size, Dh] per CLA group; with multi-head latent
attention the latent and the shared RoPE key instead, ``ModelConfig.kv_cache_entry``), handed
out from one budget and given back when a sequence ends. ``PagedBatch`` is one forward's view
of some sequences (their block tables and lengths); it is passed to ``Transformer.forward`` as its
``cache``: new keys and values go into each row's next free slots, and attention reads each
row's blocks gathered in order, the positions past a row's length masked out. There is no
left padding inside a sequence's blocks, so a row's positions are 0, 1, 2, ... as when it
decodes alone.

Shapes: B rows, S new positions, N blocks per row (the longest row's), P = N * block_size
positions read, G key/value heads, Dh head dim.
"""
from __future__ import annotations

import torch

from moekit.config import ModelConfig


class KVBlockPool:
    """``num_blocks`` blocks of ``block_size`` positions each, for every CLA group."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int = 16,
                 device=None, dtype=torch.float32):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a KV block pool needs at least one block of at least one "
                             f"position (got {num_blocks} blocks of {block_size})")
        (key_heads, key_width), (value_heads, value_width) = config.kv_cache_entry
        self.keys = [torch.zeros(num_blocks, key_heads, block_size, key_width, device=device,
                                 dtype=dtype) for _ in range(config.kv_groups)]
        self.values = [torch.zeros(num_blocks, value_heads, block_size, value_width,
                                   device=device, dtype=dtype) for _ in range(config.kv_groups)]
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: pop() takes the lowest

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        return config.kv_numbers_per_token * block_size * dtype.itemsize

    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.block_size)

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise ValueError(f"{count} KV blocks asked for, {len(self._free)} free")
        return [self._free.pop() for _ in range(count)]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))

    def write(self, group: int, blocks: list[int], k_GSD: torch.Tensor,
              v_GSD: torch.Tensor) -> None:
        """Store one sequence's first S positions (a prompt's keys and values) in its blocks."""
        positions_S = torch.arange(k_GSD.shape[1], device=k_GSD.device)
        table = torch.tensor(blocks, device=k_GSD.device)
        block_S, offset_S = table[positions_S // self.block_size], positions_S % self.block_size
        self.keys[group][block_S, :, offset_S] = k_GSD.transpose(0, 1)
        self.values[group][block_S, :, offset_S] = v_GSD.transpose(0, 1)


class PagedBatch:
    """Rows of a forward over pooled blocks: ``tables[b]`` lists row b's blocks in order and
    ``lengths[b]`` the positions it has cached. A cache for ``Transformer.forward``."""

    def __init__(self, pool: KVBlockPool, tables: list[list[int]], lengths: list[int]):
        self.pool, self.lengths = pool, list(lengths)
        device = pool.keys[0].device
        widest = max(len(table) for table in tables)
        # Short rows repeat their last block to the common width; those positions are masked.
        self.table_BN = torch.tensor([table + table[-1:] * (widest - len(table))
                                      for table in tables], device=device)
        self.length_B = torch.tensor(self.lengths, device=device)
        self._room = [len(table) * pool.block_size - length
                      for table, length in zip(tables, lengths)]
        self._slots = None  # (block, offset) of the new positions, set per forward

    def check_room(self, seq: int) -> None:
        if seq > min(self._room):
            raise ValueError(f"{seq} new positions do not fit a row's KV blocks "
                             f"(room for {min(self._room)})")

    def positions_and_mask(self, mask_BS, batch: int, seq: int, device, window=None):
        if mask_BS is not None:
            raise ValueError("a paged batch takes no padding mask: its rows are not padded")
        positions_BS = self.length_B[:, None] + torch.arange(seq, device=device)
        size = self.pool.block_size
        self._slots = (self.table_BN.gather(1, positions_BS // size), positions_BS % size)
        key_P = torch.arange(self.table_BN.shape[1] * size, device=device)
        allowed_BSP = key_P[None, None, :] <= positions_BS[:, :, None]
        if window is not None:  # a row's positions are its keys' indices
            allowed_BSP &= key_P[None, None, :] > positions_BS[:, :, None] - window
        return positions_BS, allowed_BSP[:, None]

    def store(self, group: int, k_BGSD: torch.Tensor, v_BGSD: torch.Tensor):
        block_BS, offset_BS = self._slots
        keys, values = self.pool.keys[group], self.pool.values[group]
        keys[block_BS, :, offset_BS] = k_BGSD.transpose(1, 2)
        values[block_BS, :, offset_BS] = v_BGSD.transpose(1, 2)
        return self._gather(keys), self._gather(values)

    def _gather(self, pool_NGLD: torch.Tensor) -> torch.Tensor:
        rows_BNGLD = pool_NGLD[self.table_BN]
        batch, blocks, heads, size, dim = rows_BNGLD.shape
        return rows_BNGLD.transpose(1, 2).reshape(batch, heads, blocks * size, dim)

    def advance(self, seq: int) -> None:
        self.lengths = [length + seq for length in self.lengths]
        self.length_B = self.length_B + seq
        self._room = [room - seq for room in self._room]
