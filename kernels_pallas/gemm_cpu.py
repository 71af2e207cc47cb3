"""The linear layers' float32 matmul on the CPU: a C++ kernel behind ``jax.ffi`` (``csrc/gemm_cpu/``).

XLA CPU's dot repacks its right operand on every call: in a decode step that is every weight matrix,
every step (``ynn::transpose`` was 13% of a longtail-256 run's CPU time, ``perf record``), and at a
decode step's few rows it runs far below the machine's rate.  The engine instead packs the weights once
at load into the kernel's layout (``pack``: panels of 32 columns, each one contiguous run; the model's
``PackedDense`` holds them, ``jaxserve.model.pack_linears`` converts a checkpoint's), and the kernel
holds a tile of the output in registers (12 x 32 with AVX-512, 6 x 16 with AVX2), blocks K by 256 so that
a panel's block stays in L1 while every row block runs over it, and prefetches the weights 32 rows
ahead.  It computes only a step's real rows (``rows``): a prefill bucket's padding is left out.

``python bench/gemm_cpu.py --model /work/models/56m --rows 4,8,16,32,64,128,512 [--isa avx2]`` (the
56m model's eight layers of four matmuls without attention, weights streamed from memory, then its LM
head [rows, 512] x [512, 32000]; 2-core Xeon, Sapphire Rapids, 2026-12-03), ms:

    rows                    4     8     16     32     64    128    512
    layers, XLA dot       5.18  7.00  9.08  12.92  14.33  22.73  76.40
    layers, kernel        3.17  3.36  4.32   7.68  12.46  21.74  80.91
    LM head, XLA dot      2.12  2.78  3.34   5.44   8.88  13.02  63.64
    LM head, kernel       1.72  1.80  2.34   3.56   6.41  12.26  72.26
    layers, kernel AVX2   3.40  4.42  6.20  11.23  18.83  34.03 124.29

The kernel's layers reach 299 GFLOP/s at 512 rows.  At prompt-chunk sizes XLA's dot (AVX-512 here) is
as fast or up to 6% faster (14% on the LM head, which in a step only sees the sampled rows); the kernel
serves every row count so that the weights exist once, packed.  Its AVX2 path beats XLA's AVX-512 dot
on this machine up to 32 rows, and at 512 rows runs 194 GFLOP/s, about this machine's two-core AVX2 FMA
peak (2 x 2 x 8 x 2 FLOP per cycle at ~3 GHz), which bounds any AVX2 dot, XLA's included: so ``auto``
picks the kernel on AVX2-only CPUs too (not measured on one: no such machine here).  Float32 sums in
another order than XLA's: results differ from XLA's dot by rounding, as XLA's differs from torch's; on
one path, each row's sum is the same whatever the other rows and the thread count (tested bit for bit).

**AMX** (Sapphire Rapids and later, AMX-BF16; ``isa="amx"``, and ``auto`` from ``AMX_MIN_ROWS`` rows):
the same float32 product from the tile unit.  Each float32 of A is the exact sum of three bfloat16 pieces;
a product of two bf16 values is exact in float32 and TDPBF16PS sums them with float32 FMAs, so
``sum_i a_i . b`` (bf16 weights: three products) or ``sum_{i+j<=2} a_i . b_j`` (float32 weights cut into
three pieces per call: six products, the three left out are below 2^-24 of the product) is a float32-
accurate dot, its error like the AVX-512 path's against float64 (tested on ragged shapes).  Weights held
in bfloat16 (``bf16_exact``) are packed with rows in pairs (``pack``), the order the tiles read, so AMX
reads them in place.  Same command, ``--isa {avx512,amx} --weights bfloat16`` (2026-12-03, this Xeon,
one run each, after the tile buffers were aligned to 64 bytes), layers / LM head in ms:

    rows                  1          8          16         32          64         128         512
    avx512, bf16     1.30/0.66  1.72/1.08  3.30/1.80  6.33/3.28  12.19/7.54  22.79/14.73  85.53/56.98
    amx, bf16        2.90/1.43  3.25/1.44  3.90/1.51  3.94/1.52   6.06/3.00  10.57/ 4.99  45.00/21.24

and with float32 weights (cut into pieces per call, panel by panel) ``--isa amx`` against ``--isa avx512``,
layers in ms: 12.18 / 11.98 at 64 rows, 16.70 / 17.01 at 96, 19.50 / 23.98 at 128, 32.63 / 46.08 at 256,
60.75 / 93.87 at 512 (398 against 257 GFLOP/s).  Hence ``AMX_MIN_ROWS``.  The cut is not what costs: a
timing-only local build that cut one panel and reused its pieces for every panel ran the layers in 15.95 /
19.05 / 21.79 / 31.98 / 69.44 ms at 64 / 128 / 160 / 256 / 512 rows against the kernel's 16.10 / 20.93 /
23.37 / 32.73 / 68.75 (same command, ``--isa amx``, two alternated runs each, means; 2026-12-06, this
Xeon), so weights held pre-cut (2.5x their bytes) would save at most 2 ms of a prompt step.  Keeping a
block of the panel's B tiles in L1 across the 32-row blocks (K cut into blocks of 12-48 KB of tiles, the
partial sums stored and reloaded) was slower at every size (128 rows: 22.0-24.2 ms against 20.1).
Where it switches paths a row's bits change (another summation order, both float32-accurate): a
sequence's logits can differ in the last bits between a step of 15 and one of 16 rows, as
they do between XLA's dot and torch's.

**The greedy LM head** (``argmax_head``, below): a step whose rows are all greedy needs only each row's
argmax.  A bf16 copy of a float32 head (three AMX products, where the float32 head takes the AVX-512
kernel) and a per-column bound on the difference narrow it down to one to a few columns, which are then
computed as the full head computes them: the same token, bit for bit (tested with near-ties and
duplicate columns).  The runner takes it where the CPU has AMX, AVX512_BF16 or AVX-512
(``ModelRunner.greedy_head``).  Without AMX, on AVX512_BF16 (Zen 4), the approximate product is
``bf16(a) . bf16(B)`` by VDPBF16PS (``isa="dpbf16"``: twice an FMA's products per instruction), and
``greedy_slack`` bounds a's rounding too: head + argmax 7.0 -> 3.8 ms at 32 rows, 13.6 -> 6.9 at 64 on a
2-core EPYC (2026-12-04, same command).
``python bench/gemm_cpu.py --model /work/models/56m --rows 1,4,16,32,64`` (2026-12-03, this Xeon), the
kernel's head and its argmax against ``argmax_head``: 1.51 -> 0.70 ms at 1 row, 1.59 -> 0.78 at 4, 6.33 ->
1.77 at 32, 10.33 -> 3.91 at 64.

The kernel is the extension module ``kernels_pallas._gemm_cpu``, built by ``pip install -e .``
(``setup.py``); without it, or on a CPU without AVX2/FMA, ``cpu_gemm_unavailable_reason()`` says why and
the model keeps XLA's dot (``matmul_impl="auto"``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.ffi_extension import load_extension

TARGET = "jaxserve_gemm_cpu"
ISAS = {"auto": 0, "avx2": 2, "avx512": 3, "amx": 4, "dpbf16": 5}  # the kernel's ``isa`` attribute
# ``auto`` runs the AMX path from this many rows (by the weights' dtype), the AVX-512 kernel below: where
# ``bench/gemm_cpu.py --isa amx`` against ``--isa avx512`` measured AMX faster (see the module docstring).
AMX_MIN_ROWS = {"float32": 112, "bfloat16": 16}
MATMUL_IMPLS = ("auto", "xla", "cpu")


@functools.lru_cache(maxsize=None)
def _load() -> tuple[object | None, str | None]:
    """(the extension module, None) once its handler is registered with XLA, or (None, why not)."""
    return load_extension("_gemm_cpu", lambda m: None if m.isas() else "this CPU has neither AVX-512 nor AVX2/FMA")


def cpu_gemm_unavailable_reason() -> str | None:
    """Why the CPU matmul kernel cannot run in this process, or None."""
    return _load()[1]


def available_isas() -> list[str]:
    """The instruction sets the kernel runs on this CPU, best first (``"amx"``, ``"avx512"``, ``"avx2"``), then
    ``"dpbf16"`` where the CPU has AVX512_BF16 (only the greedy head's approximate product: ``argmax_head``)."""
    module, reason = _load()
    if module is None:
        raise RuntimeError(reason)
    return list(module.isas())


def resolve_matmul(matmul_impl: str, platform: str, *, mesh=None, dtype=jnp.float32,
                   quantization: str | None = None) -> str:
    """``"cpu"`` (this kernel for the linear layers) or ``"xla"``.  ``auto``: the kernel on one CPU device
    (not on a mesh: XLA cannot partition a custom call) for float32 unquantized weights when it is built and
    the CPU has AVX2/FMA or AVX-512; ``cpu`` asks for it and raises when it cannot serve."""
    if matmul_impl not in MATMUL_IMPLS:
        raise ValueError(f"matmul_impl: must be one of {', '.join(MATMUL_IMPLS)}, got {matmul_impl!r}")
    if matmul_impl == "xla":
        return "xla"
    why = None
    if platform != "cpu":
        why = f"the platform is {platform}"
    elif mesh is not None:
        why = "the step runs on a device mesh"
    elif jnp.dtype(dtype) != jnp.float32:
        why = f"the weights are {jnp.dtype(dtype).name}"
    elif quantization:
        why = f"the weights are quantized ({quantization})"
    else:
        why = cpu_gemm_unavailable_reason()
    if why is None:
        return "cpu"
    if matmul_impl == "cpu":
        raise ValueError(f"matmul_impl: the CPU matmul kernel cannot serve: {why}")
    return "xla"


PACK_NR = 32  # the packed layout's panel width (csrc/gemm_cpu: kPackNR)


PAIR_K = 32  # bfloat16 layout: K padded to a multiple of this (csrc/gemm_cpu: a tile's 32 rows of K)


def packed_shape(k: int, n: int, dtype=jnp.float32) -> tuple[int, int, int]:
    """The packed layout of a ``[K, N]`` weight held in ``dtype``: float32 ``[ceil(N / 32), K, 32]``;
    bfloat16 ``[ceil(N / 32), Kp / 2, 64]`` with ``Kp`` = K rounded up to 32 (rows in pairs: ``pack``)."""
    panels = -(-n // PACK_NR)
    if jnp.dtype(dtype) == jnp.bfloat16:
        return (panels, -(-k // PAIR_K) * PAIR_K // 2, 2 * PACK_NR)
    return (panels, k, PACK_NR)


def pack(b, dtype=jnp.float32):
    """``b [K, N]`` (numpy or jax) -> the kernel's packed layout (``packed_shape``): panels of 32 columns, each
    one contiguous run, the last one zero-padded.  float32: a panel is ``[K, 32]``, row by row.  bfloat16
    (for values that are bfloat16 values, ``bf16_exact``): a panel is ``[Kp / 2, 32, 2]``, rows 2i and 2i+1
    interleaved column by column, K zero-padded to a multiple of 32: the order AMX's tiles read B in, which
    the AVX-512 / AVX2 paths split back into two rows with a shift and a mask."""
    k, n = b.shape
    panels, rows, width = packed_shape(k, n, dtype)
    xp = np if isinstance(b, np.ndarray) else jnp
    if jnp.dtype(dtype) != jnp.bfloat16:
        b = xp.pad(b, ((0, 0), (0, panels * PACK_NR - n)))
        return b.reshape(k, panels, PACK_NR).transpose(1, 0, 2)
    b = xp.pad(b, ((0, 2 * rows - k), (0, panels * PACK_NR - n))).astype(jnp.bfloat16)
    return b.reshape(rows, 2, panels, PACK_NR).transpose(2, 0, 3, 1).reshape(panels, rows, width)


def bf16_exact(b: np.ndarray) -> bool:
    """Whether every value of the float32 array ``b`` is a bfloat16 value (its low 16 bits zero): then
    ``pack(b, bfloat16)`` holds the same values in half the bytes, and ``gemm_cpu`` gives the same result
    from it as from ``pack(b)`` bit for bit (a checkpoint stored in bf16 and run in float32)."""
    b = np.ascontiguousarray(b, np.float32)
    return bool(b.size) and not np.any(b.view(np.uint32) & 0xFFFF)


def unpack(b_packed, k: int, n: int):
    """The inverse of ``pack``: the packed layout (float32 or bfloat16) -> ``[K, N]``."""
    panels, rows, width = b_packed.shape
    if width == PACK_NR:
        return b_packed.transpose(1, 0, 2).reshape(rows, panels * PACK_NR)[:k, :n]
    b = b_packed.reshape(panels, rows, PACK_NR, 2).transpose(1, 3, 0, 2)
    return b.reshape(2 * rows, panels * PACK_NR)[:k, :n]


def gemm_cpu(a: jax.Array, b_packed: jax.Array, n: int, *, rows=None, num_threads: int = 0,
             isa: str = "auto") -> jax.Array:
    """``a [M, K] @ B [K, n]`` in float32 by the kernel, B given packed (``pack``; float32, or bfloat16 when
    its values are: see ``bf16_exact``).  ``rows`` (an int32 scalar,
    may be traced; None: all ``M``): only the first ``rows`` rows are computed, the rest are zeros (a step's
    bucket padding).  ``num_threads`` 0: every core; ``isa``: ``"auto"`` (AMX from ``AMX_MIN_ROWS`` rows where
    the CPU has it, else the best of the others), ``"amx"``, ``"avx512"`` or ``"avx2"`` (the tests check each);
    ``"dpbf16"`` (bfloat16 B only) computes ``bf16(a) @ B`` instead, not float32-accurate: ``argmax_head``'s
    approximate product."""
    _, reason = _load()
    if reason is not None:
        raise RuntimeError(f"matmul_impl: the CPU matmul kernel is unavailable: {reason}")
    if a.dtype != jnp.float32 or b_packed.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"gemm_cpu: a must be float32 and b_packed float32 or bfloat16 (its values widened "
                         f"exactly), got {a.dtype} and {b_packed.dtype}")
    want = packed_shape(a.shape[1] if a.ndim == 2 else -1, n, b_packed.dtype)
    if a.ndim != 2 or b_packed.ndim != 3 or b_packed.shape != want:
        raise ValueError(f"gemm_cpu: a must be [M, K] and b_packed {want} (pack, {jnp.dtype(b_packed.dtype).name}),"
                         f" got {a.shape} and {b_packed.shape}")
    rows = jnp.asarray(a.shape[0] if rows is None else rows, jnp.int32)
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((a.shape[0], n), jnp.float32), vmap_method="sequential")
    return call(a, b_packed, rows, num_threads=np.int64(num_threads), isa=np.int64(ISAS[isa]),
                amx_min_rows=np.int64(AMX_MIN_ROWS[jnp.dtype(b_packed.dtype).name]))


# -- the greedy LM head --------------------------------------------------------------------------------
# A greedy row needs only the argmax of its logits.  ``argmax_head`` finds the argmax of ``a . B`` for a
# float32 B exactly as ``gemm_cpu``'s logits give it (the same bits: AVX-512 and AVX2 alike), but reads
# the float32 B only for the few columns that can win.  ``a . bf16(B)`` first (``greedy_hi``: B rounded to
# bfloat16, packed in pairs, which AMX multiplies at a third of float32's cost); then per column n a bound,
# |a . B_n - approx_n| <= ||a||_2 * slack_n (``greedy_slack``); every column whose approx + bound reaches the
# largest approx - bound is computed as the kernel computes it, and the first of their maxima wins (as
# ``jnp.argmax``).  A row with a non-finite norm or approx computes every column.  Exact: a column left out
# is below a column's exact logit.
ARGMAX_TARGET = "jaxserve_argmax_cpu"
_U = 2.0 ** -24  # float32's unit roundoff


def _gamma(n: int) -> float:
    """The classic bound on a float32 sum of n products' rounding, relative to the sum of their magnitudes."""
    return n * _U / (1 - n * _U)


def greedy_hi(b) -> np.ndarray:
    """``b [K, N]`` float32 rounded to bfloat16 in ``pack``'s bfloat16 layout (the approximate head)."""
    return pack(np.asarray(b, np.float32), jnp.bfloat16)


def greedy_slack(b) -> np.ndarray | None:
    """Per column n of ``b [K, N]`` (float32): ``slack_n`` with |a . b_n - approx_n| <= ||a||_2 * slack_n, where
    approx_n is ``gemm_cpu(a, greedy_hi(b))`` on any path, or ``bf16(a) . bf16(b_n)`` (``isa="dpbf16"``), and
    a . b_n the kernel's float32 logit.  Cauchy-Schwarz on each part: the bf16 rounding's ||b_n - bf16(b_n)||_2
    (a subnormal bf16 value counted as 0, as the bf16 instructions read it); a's rounding to bf16 on the
    dpbf16 path, ||a - bf16(a)|| <= (2^-8 + 2^-20) ||a|| (2^-8: round to nearest; 2^-20 covers the subnormals
    it flushes, at most sqrt(K) 2^-126, for ||a|| >= sqrt(K) 2^-106: argmax_head computes every column of a
    smaller row), times ||bf16(b_n)|| <= (1 + 2^-8) ||b_n||; plus twice the float32 summation bounds of both
    products (gamma(K) of the exact logit; gamma(3K + 3) of AMX's three products of a's pieces, which also
    covers the dpbf16 path's at most 2K roundings) times ||b_n||_2 (1 + 2^-8)^2, plus 8u ||b_n||_2 for the
    float32 arithmetic of the filter itself (approx -/+ bound, |approx| <= ~||a|| ||b_n||).  One slack for
    every path (on AMX the a term is not needed: a few more columns computed).  None when ``b`` holds a
    non-finite value."""
    b = np.asarray(b, np.float64)
    if not np.all(np.isfinite(b)):
        return None
    k = b.shape[0]
    hi = np.asarray(b, np.float32).astype(jnp.bfloat16).astype(np.float64)
    hi[np.abs(hi) < 2.0 ** -126] = 0.0
    lo = b - hi
    grow = (1 + 2.0 ** -8) ** 2
    slack = (np.sqrt(np.sum(lo * lo, axis=0))
             + ((2.0 ** -8 + 2.0 ** -20) * (1 + 2.0 ** -8) + 2 * (_gamma(k) + _gamma(3 * k + 3) * grow) + 8 * _U)
             * np.sqrt(np.sum(b * b, axis=0)))
    return np.nextafter((slack * (1 + 1e-6)).astype(np.float32), np.float32(np.inf))


def argmax_head(a: jax.Array, b_packed: jax.Array, hi_packed: jax.Array, slack: jax.Array, n: int, *,
                rows=None, isa: str = "auto") -> tuple[jax.Array, jax.Array]:
    """``(argmax(a @ B, axis=-1), columns computed exactly per row)`` for ``a [R, K]`` and float32 ``B [K, n]``
    given as ``b_packed = pack(B)``, ``hi_packed = greedy_hi(B)`` and ``slack = greedy_slack(B)``: the argmax of
    ``gemm_cpu(a, b_packed, n)`` (on a non-AMX path: ``auto`` below ``AMX_MIN_ROWS["float32"]`` rows), with the
    float32 B read only for the columns that can win.  ``isa``: the approximate product's (``auto``: AMX where
    the CPU has it, else ``dpbf16`` where it has AVX512_BF16, else the float32 kernel on bf16 B).  ``rows`` (an
    int32 scalar, may be traced; None: all ``R``): only the first ``rows`` rows are computed, the rest give
    token 0 and 0 columns (a bucket's padding slots, as ``gemm_cpu``'s ``rows``)."""
    if b_packed.dtype != jnp.float32 or hi_packed.dtype != jnp.bfloat16:
        raise ValueError("argmax_head: b_packed must be float32 and hi_packed bfloat16 (greedy_hi)")
    if isa == "auto":
        isas = available_isas()
        isa = "dpbf16" if "dpbf16" in isas and "amx" not in isas else "auto"
    rows = jnp.asarray(a.shape[0] if rows is None else rows, jnp.int32)
    approx = gemm_cpu(a, hi_packed, n, rows=rows, isa=isa)
    r = a.shape[0]
    call = jax.ffi.ffi_call(ARGMAX_TARGET, (jax.ShapeDtypeStruct((r,), jnp.int32),
                                            jax.ShapeDtypeStruct((r,), jnp.int32)), vmap_method="sequential")
    return call(a, approx, b_packed, slack, rows)
