"""The paged KV cache: a free-page allocator on the host and the page pools on the device.

Device side: per layer a K pool and a V pool of ``[num_pages, page_size,
num_kv_heads, head_dim]``.  Host side: ``PageAllocator`` hands out page ids;
each sequence keeps its list of pages (its page table), and the position ``p``
of a sequence lives in slot ``p % page_size`` of page ``page_ids[p // page_size]``.
"""

from __future__ import annotations

import collections
import logging
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxserve.config import ModelConfig

logger = logging.getLogger(__name__)


def pages_needed(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


PageKey = tuple  # (hash of the previous page's key or None, the page's token ids)


class PageAllocator:
    """Hands out page ids, counts references, and (optionally) caches full pages by content.

    Without prefix caching it is a stack of free pages: sequences grow page by
    page and give them all back when done.  With prefix caching every *full*
    page is also registered under a key made of its tokens and the key of the
    page before it (a hash chain, so equal keys mean equal prefixes); a new
    sequence whose prompt starts with cached pages shares them (reference
    counts) instead of recomputing them.  A cached page nobody uses is
    *evictable*: it still counts as free, and allocation takes the least
    recently used one only when no never-cached page is left.
    """

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = False):
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first
        self._refs = [0] * num_pages
        self._cached: dict[PageKey, int] = {}  # key -> page
        self._page_key: dict[int, PageKey] = {}  # page -> key, for cached pages
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU first

    @property
    def num_free(self) -> int:
        """Pages a sequence could get now (never-used plus evictable cached pages)."""
        return len(self._free) + len(self._evictable)

    def _take(self) -> int:
        if self._free:
            page = self._free.pop()
        else:
            page, _ = self._evictable.popitem(last=False)
            del self._cached[self._page_key.pop(page)]
        self._refs[page] = 1
        return page

    def grow(self, page_ids: list[int], num_tokens: int) -> bool:
        """Append pages to ``page_ids`` until they hold ``num_tokens``; False (and no change) if short."""
        extra = pages_needed(num_tokens, self.page_size) - len(page_ids)
        if extra > self.num_free:
            return False
        for _ in range(extra):
            page_ids.append(self._take())
        return True

    def release(self, page_ids: list[int]) -> None:
        """Drop one reference to each page; unused pages become free (or evictable, if cached)."""
        for page in reversed(page_ids):
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if page in self._page_key:
                    self._evictable[page] = None
                else:
                    self._free.append(page)
        page_ids.clear()

    # -- prefix caching ---------------------------------------------------------------------------

    def match_prefix(self, token_ids: list[int]) -> tuple[list[int], list[PageKey]]:
        """The longest run of cached full pages that starts ``token_ids`` (at least one token is left
        to compute, so the model still produces logits).  Takes a reference on each page."""
        if not self.enable_prefix_caching:
            return [], []
        ps = self.page_size
        pages: list[int] = []
        keys: list[PageKey] = []
        parent = None
        for i in range((len(token_ids) - 1) // ps):
            key = (parent, tuple(token_ids[i * ps:(i + 1) * ps]))
            page = self._cached.get(key)
            if page is None:
                break
            pages.append(page)
            keys.append(key)
            parent = hash(key)
        for page in pages:
            if self._refs[page] == 0:
                del self._evictable[page]
            self._refs[page] += 1
        return pages, keys

    def register_full_pages(self, page_ids: list[int], page_keys: list[PageKey], token_ids, num_computed: int) -> None:
        """Cache the pages of a sequence that became full (all their tokens computed)."""
        if not self.enable_prefix_caching:
            return
        ps = self.page_size
        full = min(num_computed // ps, len(page_ids))
        while len(page_keys) < full:
            i = len(page_keys)
            parent = hash(page_keys[-1]) if page_keys else None
            key = (parent, tuple(token_ids(i * ps, (i + 1) * ps)))
            page_keys.append(key)
            page = page_ids[i]
            if key not in self._cached and page not in self._page_key:
                self._cached[key] = page
                self._page_key[page] = key


def page_bytes(cfg: ModelConfig, page_size: int, dtype: Any) -> int:
    """Bytes one page takes over all layers, K and V."""
    return 2 * cfg.num_layers * page_size * cfg.num_kv_heads * cfg.head_dim * np.dtype(dtype).itemsize


def allocate_kv_cache(cfg: ModelConfig, num_pages: int, page_size: int, dtype: Any):
    """Zeroed per-layer (K, V) page pools on the default device."""
    shape = (num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers)]
