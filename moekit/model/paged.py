"""A paged KV cache: the keys and values of many sequences in fixed-size blocks of one pool.

Continuous batching decodes sequences that started at different times, so each row of a batch
sits at its own position. ``KVBlockPool`` holds every sequence's cache in blocks of
``block_size`` positions, handed out from one budget and given back when a sequence ends.
``PagedBatch`` is one forward's view of some sequences (their block tables and lengths); it is
passed to ``Transformer.forward`` as its ``cache``: new keys and values go into each row's next
free slots, and attention reads each row's blocks gathered in order, the positions past a row's
length masked out. There is no left padding inside a sequence's blocks, so a row's positions
are 0, 1, 2, ... as when it decodes alone.

The pool is stored slot-major, [N blocks * block_size, G, Dh] per CLA group (with multi-head
latent attention the latent and the shared RoPE key, ``ModelConfig.kv_cache_entry``), so that
both per-layer operations of a decoding step are one indexed copy each: the new positions go
in with one ``index_copy_`` at their slots, and a row's blocks come out with one
``index_select`` whose result is already [B, P, G, Dh] in memory; attention reads it as
[B, G, P, Dh] through a transpose, a view. The indices of both are made once per forward
(``PagedBatch.positions_and_mask``), for every layer.

Shapes: B rows, S new positions, N blocks per row (the longest row's), L = block_size, P = N * L
positions read, G key/value heads, Dh head dim.
"""
from __future__ import annotations

import torch

from moekit.config import ModelConfig


class KVBlockPool:
    """``num_blocks`` blocks of ``block_size`` positions each, for every CLA group:
    ``keys[group]`` and ``values[group]`` are [num_blocks * block_size, heads, width], a
    block's positions side by side."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int = 16,
                 device=None, dtype=torch.float32):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a KV block pool needs at least one block of at least one "
                             f"position (got {num_blocks} blocks of {block_size})")
        (key_heads, key_width), (value_heads, value_width) = config.kv_cache_entry
        slots = num_blocks * block_size
        self.keys = [torch.zeros(slots, key_heads, key_width, device=device, dtype=dtype)
                     for _ in range(config.kv_groups)]
        self.values = [torch.zeros(slots, value_heads, value_width, device=device, dtype=dtype)
                       for _ in range(config.kv_groups)]
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: pop() takes the lowest
        # Its sizes never change. Static for a step compiled with dynamic sizes
        # (``PagedDecodeStep``), they cannot be taken for the same size as a table width that
        # equals one of them while it traces (which would tie the graph to that width).
        for buffer in (*self.keys, *self.values):
            torch._dynamo.mark_static(buffer)

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

    def slots(self, table_BN: torch.Tensor, positions_BS: torch.Tensor) -> torch.Tensor:
        """Where positions ``positions_BS`` of rows with block tables ``table_BN`` lie in the
        pool's slots."""
        size = self.block_size
        return table_BN.gather(1, positions_BS // size) * size + positions_BS % size

    def write(self, blocks: list[int], keys_GSD: list[torch.Tensor],
              values_GSD: list[torch.Tensor]) -> None:
        """Store one sequence's first S positions (a prompt's keys and values, one [G, S, Dh]
        tensor per CLA group) in its blocks; the slots are found once for every group."""
        device = keys_GSD[0].device
        slots_S = self.slots(torch.tensor([blocks], device=device),
                             torch.arange(keys_GSD[0].shape[1], device=device)[None])[0]
        for group, (k_GSD, v_GSD) in enumerate(zip(keys_GSD, values_GSD)):
            self.keys[group].index_copy_(0, slots_S, k_GSD.transpose(0, 1))
            self.values[group].index_copy_(0, slots_S, v_GSD.transpose(0, 1))


class PagedBatch:
    """Rows of one forward over pooled blocks, each adding ``new_positions`` positions:
    ``tables[b]`` lists row b's blocks in order and ``lengths[b]`` the positions it has cached
    (a ValueError when the new positions do not fit a row's blocks). A cache for
    ``Transformer.forward``, which a compiled step traces as it is: what the forward reads is
    tensors (``table_BN``, ``length_B``) and the number of new positions, so that only tensor
    values and sizes change between steps."""

    def __init__(self, pool: KVBlockPool, tables: list[list[int]], lengths: list[int],
                 new_positions: int = 1):
        room = min(len(table) * pool.block_size - length
                   for table, length in zip(tables, lengths))
        if new_positions > room:
            raise ValueError(f"{new_positions} new positions do not fit a row's KV blocks "
                             f"(room for {room})")
        device = pool.keys[0].device
        # Short rows repeat their last block to the common width; those positions are masked.
        # At least two wide: torch.compile specialises a size of 1, and one graph then serves
        # every width.
        widest = max(2, *(len(table) for table in tables))
        self.table_BN = torch.tensor([table + table[-1:] * (widest - len(table))
                                      for table in tables], device=device)
        self.length_B = torch.tensor(lengths, device=device)
        self.pool, self.new_positions = pool, new_positions
        self._slots_BS = self._read_slots = None  # the indices of one forward, for every layer

    def check_room(self, seq: int) -> None:
        if seq != self.new_positions:
            raise ValueError(f"this paged batch was made with new_positions="
                             f"{self.new_positions}; the forward brings {seq} per row")

    def positions_and_mask(self, mask_BS, batch: int, seq: int, device, window=None):
        if mask_BS is not None:
            raise ValueError("a paged batch takes no padding mask: its rows are not padded")
        positions_BS = self.length_B[:, None] + torch.arange(seq, device=device)
        self._slots_BS = self.pool.slots(self.table_BN, positions_BS)
        size = self.pool.block_size
        offset_L = torch.arange(size, device=device)
        self._read_slots = (self.table_BN[:, :, None] * size + offset_L).flatten()
        key_P = torch.arange(self.table_BN.shape[1] * size, device=device)
        allowed_BSP = key_P <= positions_BS[:, :, None]
        if window is not None:  # a row's positions are its keys' indices
            allowed_BSP &= key_P > positions_BS[:, :, None] - window
        # As the additive mask that attention would make of the boolean one in every layer.
        dtype = self.pool.keys[0].dtype
        bias_BSP = torch.zeros(allowed_BSP.shape, dtype=dtype, device=device).masked_fill_(
            ~allowed_BSP, -torch.inf)
        return positions_BS, bias_BSP[:, None]

    def store(self, group: int, k_BGSD: torch.Tensor, v_BGSD: torch.Tensor):
        """Write the new positions of one group; return every row's keys and values
        [B, G, P, Dh]."""
        slots = self._slots_BS.flatten()
        keys, values = self.pool.keys[group], self.pool.values[group]
        keys.index_copy_(0, slots, k_BGSD.transpose(1, 2).flatten(0, 1))
        values.index_copy_(0, slots, v_BGSD.transpose(1, 2).flatten(0, 1))
        return self._gather(keys), self._gather(values)

    def _gather(self, pool_XGD: torch.Tensor) -> torch.Tensor:
        rows_BPGD = pool_XGD.index_select(0, self._read_slots).unflatten(
            0, (self.table_BN.shape[0], -1))
        return rows_BPGD.transpose(1, 2)

    def advance(self, seq: int) -> None:
        self.length_B = self.length_B + seq
