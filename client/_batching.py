"""Dynamic batching settings for a model, as load_pickle takes them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Batching:
    """Join a model's concurrent calls into one model call along dim 0 (the daemon splits the
    result back by rows). See the README's "Dynamic batching"."""

    max_batch_size: int  # rows of one batch
    max_queue_delay_ms: float = 2.0  # how long the first call of a batch may wait for company
    preferred_batch_sizes: tuple[int, ...] = ()  # rows at which a batch goes at once
