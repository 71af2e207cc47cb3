"""The paged KV cache: a free-page allocator on the host and the page pools on the device.

Device side: per layer a K pool and a V pool of ``[num_pages, page_size,
num_kv_heads, head_dim]``.  Host side: ``PageAllocator`` hands out page ids;
each sequence keeps its list of pages (its page table), and the position ``p``
of a sequence lives in slot ``p % page_size`` of page ``page_ids[p // page_size]``.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import ModelConfig

logger = logging.getLogger(__name__)


def pages_needed(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


class PageAllocator:
    """A stack of free page ids.  Sequences grow page by page and give all back when done."""

    def __init__(self, num_pages: int, page_size: int):
        self.num_pages = num_pages
        self.page_size = page_size
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_hold(self, page_ids: list[int], num_tokens: int) -> bool:
        return pages_needed(num_tokens, self.page_size) - len(page_ids) <= len(self._free)

    def grow(self, page_ids: list[int], num_tokens: int) -> bool:
        """Append pages to ``page_ids`` until they hold ``num_tokens``; False (and no change) if short."""
        extra = pages_needed(num_tokens, self.page_size) - len(page_ids)
        if extra > len(self._free):
            return False
        for _ in range(extra):
            page_ids.append(self._free.pop())
        return True

    def release(self, page_ids: list[int]) -> None:
        self._free.extend(reversed(page_ids))
        page_ids.clear()


def page_bytes(cfg: ModelConfig, page_size: int, dtype: Any) -> int:
    """Bytes one page takes over all layers, K and V."""
    return 2 * cfg.num_layers * page_size * cfg.num_kv_heads * cfg.head_dim * np.dtype(dtype).itemsize


def allocate_kv_cache(cfg: ModelConfig, num_pages: int, page_size: int, dtype: Any):
    """Zeroed per-layer (K, V) page pools on the default device."""
    shape = (num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers)]


def cache_nbytes(cache) -> int:
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(cache))
