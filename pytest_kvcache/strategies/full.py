"""Full cache: every token's K/V stays resident until its request finishes; the reference for quality."""

from __future__ import annotations

from dataclasses import dataclass

from pytest_kvcache.strategies.base import KVStrategy, SlotCache


@dataclass(frozen=True)
class Full(KVStrategy):
    """No eviction: each request reserves prompt + max_new_tokens slots, like a static cache."""

    name = "full"
    cache_class = SlotCache
