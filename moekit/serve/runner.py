"""The scheduler's forwards over its model and KV block pool: a decoding step over the paged
cache, the same step with prompt chunks folded in (``mixed``: how new requests are prefilled),
and a prefill forward of its own (``prefill``, for ``Engine(separate_prefill=True)``) that
writes the prompts' keys and values into their blocks.

They are one narrow interface so that a model split over several processes runs them on every
process alike (``moekit/serve/split.py``: rank 0 says which call, with its arguments, and all
ranks make it): their arguments are plain lists, the same on every rank.
"""
from __future__ import annotations

import torch

from moekit.model.decode_step import PagedDecodeStep
from moekit.model.generate import prefill
from moekit.model.paged import KVBlockPool, PagedBatch


class ModelRunner:
    """``step``: the decoding step and the mixed one (eager unless a compiled
    ``PagedDecodeStep`` is given);
    ``idle_call_s``: how long the scheduler may stay idle before it calls ``idle()`` (None:
    forever)."""

    idle_call_s: float | None = None

    def __init__(self, model, pool: KVBlockPool, step: PagedDecodeStep | None = None):
        self.model, self.pool = model, pool
        self.step = step or PagedDecodeStep(model)

    def prefill(self, prompts: list[list[int]], row_blocks: list[list[int]]) -> torch.Tensor:
        """The prompts left-padded into one forward (as ``generate`` runs them alone), each
        row's keys and values then copied into its blocks; the last position's logits
        [B, 1, V]."""
        longest = max(len(ids) for ids in prompts)
        logits_B1V, cache = prefill(self.model, prompts, longest)
        for index, (ids, blocks) in enumerate(zip(prompts, row_blocks)):
            start = longest - len(ids)  # the row's left padding
            self.pool.write(blocks, [keys[index, :, start:] for keys in cache.keys],
                            [values[index, :, start:] for values in cache.values])
        return logits_B1V

    def decode(self, tokens: list[int], tables: list[list[int]],
               lengths: list[int]) -> torch.Tensor:
        """One step: each row's token at its own position over its blocks; logits [B, V]."""
        return self.step(self._ids([[token] for token in tokens]),
                         PagedBatch(self.pool, tables, lengths))

    def mixed(self, tokens: list[int], tables: list[list[int]], lengths: list[int],
              chunk: list[int], chunk_table: list[int], chunk_cached: int) -> torch.Tensor:
        """One forward of the decoding rows (as ``decode``; none when ``tokens`` is empty)
        and of a prompt chunk: a sequence's next prompt tokens ``chunk`` after the
        ``chunk_cached`` positions it has in its blocks ``chunk_table``, their keys and values
        written straight into those blocks. Both parts read the feed-forward weights
        together, once (``Transformer.run_parts``). Logits [B + 1, V]: the decoding rows',
        then the chunk's last position's."""
        parts = [(self._ids([chunk]), PagedBatch(self.pool, [chunk_table], [chunk_cached],
                                                 new_positions=len(chunk)))]
        if tokens:
            parts.insert(0, (self._ids([[token] for token in tokens]),
                             PagedBatch(self.pool, tables, lengths)))
        return self.step.mixed(parts)

    def _ids(self, ids: list[list[int]]) -> torch.Tensor:
        return torch.tensor(ids, device=self.pool.keys[0].device)

    def idle(self) -> None:
        """Called after ``idle_call_s`` without work: a split runner's keep-alive."""

    def close(self) -> None:
        """Nothing to release here; a split runner tells the other processes to stop."""
