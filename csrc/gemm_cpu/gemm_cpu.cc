// The float32 matmul of the layers' weights on the CPU, an XLA FFI custom call (jax.ffi):
// C[M, N] = A[M, K] . B[K, N] for the first `rows` rows (a step's real ones: the rest, a bucket's padding,
// are zeros), A and C row-major, B the weights in the packed layout the engine gives them
// once at load (kernels_pallas/gemm_cpu.py ``pack``): [ceil(N / 32), K, 32], each panel of 32 columns one
// contiguous run (the last one zero-padded), so that the micro-kernel streams its block of B in order.
// XLA CPU's dot repacks B on every call (a transpose of the weights per matmul per step); here the weights
// are packed once.  Python side: kernels_pallas/gemm_cpu.py.
//
// Blocking: the columns are cut into panels of NR (32 with AVX-512, 16 with AVX2: half a packed panel), a
// work item is a few adjacent panels, and the K axis is cut into blocks of kKBlock rows, so that an item's
// block of B (kKBlock x its columns) stays in L2 and one panel's block in L1 while every MR-row block of A
// runs over it.  The micro-kernel holds an MR x NR tile of C in registers: per k, NR/lanes vector loads of
// B's row and MR broadcasts of A.  Summation order is k ascending with FMAs, the same for every row, call,
// row count and thread count.  Items are spread over XLA's CPU thread pool (csrc/cpu_pool.h).
//
// B may also be bfloat16, 2 bytes an element, packed with rows in pairs: [ceil(N / 32), Kp / 2, 32, 2]
// (Kp: K rounded up to 32, zero rows), the order AMX's tiles read (below).  A 32-bit lane then holds one
// column's values at rows k and k + 1; a shift and a mask widen them to the float32s they stand for
// (exact), and the same FMAs run in the same order, so the result equals the float32 call on those
// values bit for bit.  The engine packs a weight so when every one of its float32 values is a bfloat16
// value (a checkpoint stored in bf16, run in float32): half the bytes to stream at a decode step.
//
// The AVX-512 / AVX2+FMA code is compiled with target attributes and picked at run time
// (__builtin_cpu_supports); a CPU with neither has no kernel here (Python runs XLA's dot instead).
#include <Python.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "cpu_pool.h"
#include "ffi_module.h"
#include "xla/ffi/api/ffi.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define JAXSERVE_GEMM_X86 1
#include <cpuid.h>
#include <immintrin.h>
// The AMX path needs a compiler that knows the tile intrinsics (GCC 11, Clang 12); an older one builds
// the rest of the kernel without it.
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11)
#define JAXSERVE_GEMM_AMX 1
#else
#define JAXSERVE_GEMM_AMX 0
#endif
#define JAXSERVE_GEMM_DPBF16 JAXSERVE_GEMM_AMX  // the AVX512_BF16 intrinsics: the same compilers
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#else
#define JAXSERVE_GEMM_X86 0
#define JAXSERVE_GEMM_AMX 0
#define JAXSERVE_GEMM_DPBF16 0
#endif

namespace ffi = xla::ffi;

namespace jaxserve_cpu_gemm {

// kIsaDpbf16: bf16(A) . B, the greedy head's approximate product only (micro_dpbf16), never `auto`.
enum Isa : int64_t { kIsaAuto = 0, kIsaAvx2 = 2, kIsaAvx512 = 3, kIsaAmx = 4, kIsaDpbf16 = 5 };
constexpr int64_t kKBlock = 256;
constexpr int64_t kPackNR = 32;  // the packed layout's panel width (kernels_pallas/gemm_cpu.py PACK_NR)
constexpr int64_t kPrefetchRows = 32;

// A micro-kernel: C[rows, w] (=|+=) A[rows, K] . B[K, w], rows <= MR, w <= NR; B float32 or bfloat16 bits.
template <typename T>
using Micro = void (*)(const float* A, int64_t lda, const T* B, int64_t ldb, float* C, int64_t ldc,
                       int64_t K, int w, bool accumulate);
using bf16 = uint16_t;

#if JAXSERVE_GEMM_X86
bool has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}
bool has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

// 16 of B's values from b as float32 (a packed panel's row always holds 32: no mask needed).
__attribute__((target("avx512f"))) inline __m512 load16(const float* b) { return _mm512_loadu_ps(b); }
__attribute__((target("avx512f"))) inline __m512 load16(const bf16* b) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// AVX-512: MR rows x 32 columns (two zmm per row: 24 accumulators at MR = 12).
template <int MR, typename T>
__attribute__((target("avx512f,fma"))) inline void tile_avx512(const float* A, int64_t lda, const T* B,
                                                              int64_t ldb, int64_t K, __m512* c0, __m512* c1) {
  constexpr int kLine = 64 / sizeof(T);  // B's elements per cache line
  for (int64_t k = 0; k < K; ++k) {
    const T* b = B + k * ldb;
    // fetch a few of B's rows ahead
    _mm_prefetch(reinterpret_cast<const char*>(b + kPrefetchRows * ldb), _MM_HINT_T0);
    if (kLine < kPackNR) _mm_prefetch(reinterpret_cast<const char*>(b + kPrefetchRows * ldb + kLine), _MM_HINT_T0);
    const __m512 b0 = load16(b);
    const __m512 b1 = load16(b + 16);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m512 a = _mm512_set1_ps(A[i * lda + k]);
      c0[i] = _mm512_fmadd_ps(a, b0, c0[i]);
      c1[i] = _mm512_fmadd_ps(a, b1, c1[i]);
    }
  }
}
// bfloat16 B in row pairs (kernels_pallas/gemm_cpu.py ``pack``: each 32-bit lane holds a column's values
// at rows k (low half) and k + 1 (high half)): a shift and a mask give the two rows as float32, and the
// FMAs run in the same order as above (row k, then k + 1, for every accumulator): the same bits.
template <int MR>
__attribute__((target("avx512f,fma"))) inline void tile_avx512_pairs(const float* A, int64_t lda, const bf16* B,
                                                                    int64_t K, __m512* c0, __m512* c1) {
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t k = 0; k < K; k += 2) {
    const bf16* b = B + k * kPackNR;  // pair k / 2: 64 values
    _mm_prefetch(reinterpret_cast<const char*>(b + kPrefetchRows * kPackNR), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(b + kPrefetchRows * kPackNR + 32), _MM_HINT_T0);
    const __m512i v0 = _mm512_loadu_si512(b), v1 = _mm512_loadu_si512(b + 32);
    const __m512 b00 = _mm512_castsi512_ps(_mm512_slli_epi32(v0, 16));
    const __m512 b01 = _mm512_castsi512_ps(_mm512_slli_epi32(v1, 16));
    const __m512 b10 = _mm512_castsi512_ps(_mm512_and_si512(v0, high));
    const __m512 b11 = _mm512_castsi512_ps(_mm512_and_si512(v1, high));
    const bool second = k + 1 < K;
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m512 a = _mm512_set1_ps(A[i * lda + k]);
      c0[i] = _mm512_fmadd_ps(a, b00, c0[i]);
      c1[i] = _mm512_fmadd_ps(a, b01, c1[i]);
      if (second) {
        const __m512 a1 = _mm512_set1_ps(A[i * lda + k + 1]);
        c0[i] = _mm512_fmadd_ps(a1, b10, c0[i]);
        c1[i] = _mm512_fmadd_ps(a1, b11, c1[i]);
      }
    }
  }
}
// An MR x 32 tile of C from its accumulators: the first w columns stored, or added to C's (accumulate).
template <int MR>
__attribute__((target("avx512f"))) inline void store_tile_avx512(const __m512* c0, const __m512* c1, float* C,
                                                                 int64_t ldc, int w, bool accumulate) {
  const __mmask16 m0 = w >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << w) - 1);
  const __mmask16 m1 = w >= 32 ? 0xFFFF : (w > 16 ? static_cast<__mmask16>((1u << (w - 16)) - 1) : 0);
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    __m512 lo = c0[i], hi = c1[i];
    if (accumulate) {
      lo = _mm512_add_ps(lo, _mm512_maskz_loadu_ps(m0, C + i * ldc));
      hi = _mm512_add_ps(hi, _mm512_maskz_loadu_ps(m1, C + i * ldc + 16));
    }
    _mm512_mask_storeu_ps(C + i * ldc, m0, lo);
    _mm512_mask_storeu_ps(C + i * ldc + 16, m1, hi);
  }
}
template <int MR, typename T>
__attribute__((target("avx512f,fma"))) void micro_avx512(const float* A, int64_t lda, const T* B, int64_t ldb,
                                                         float* C, int64_t ldc, int64_t K, int w, bool accumulate) {
  __m512 c0[MR], c1[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = _mm512_setzero_ps();
  if constexpr (sizeof(T) == 2) {  // a partial panel's padding columns are zeros, not stored
    tile_avx512_pairs<MR>(A, lda, B, K, c0, c1);
  } else {
    tile_avx512<MR>(A, lda, B, ldb, K, c0, c1);
  }
  store_tile_avx512<MR>(c0, c1, C, ldc, w, accumulate);
}

// AVX2: MR rows x 16 columns (two ymm per row: 12 accumulators at MR = 6, of the 16 registers).
__attribute__((target("avx2,fma"))) inline __m256i lane_mask(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
__attribute__((target("avx2"))) inline __m256 load8(const float* b) { return _mm256_loadu_ps(b); }
__attribute__((target("avx2"))) inline __m256 load8(const bf16* b) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
template <int MR, typename T>
__attribute__((target("avx2,fma"))) inline void tile_avx2(const float* A, int64_t lda, const T* B, int64_t ldb,
                                                         int64_t K, __m256* c0, __m256* c1) {
  for (int64_t k = 0; k < K; ++k) {
    const T* b = B + k * ldb;
    _mm_prefetch(reinterpret_cast<const char*>(b + kPrefetchRows * ldb), _MM_HINT_T0);
    const __m256 b0 = load8(b);  // NR = 16 is half a packed row: in bounds
    const __m256 b1 = load8(b + 8);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m256 a = _mm256_broadcast_ss(A + i * lda + k);
      c0[i] = _mm256_fmadd_ps(a, b0, c0[i]);
      c1[i] = _mm256_fmadd_ps(a, b1, c1[i]);
    }
  }
}
template <int MR>
__attribute__((target("avx2,fma"))) inline void tile_avx2_pairs(const float* A, int64_t lda, const bf16* B, int64_t K,
                                                               __m256* c0, __m256* c1) {
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t k = 0; k < K; k += 2) {
    const bf16* b = B + k * kPackNR;  // this item's 16 columns of pair k / 2
    _mm_prefetch(reinterpret_cast<const char*>(b + kPrefetchRows * kPackNR), _MM_HINT_T0);
    const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b));
    const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16));
    const __m256 b00 = _mm256_castsi256_ps(_mm256_slli_epi32(v0, 16));
    const __m256 b01 = _mm256_castsi256_ps(_mm256_slli_epi32(v1, 16));
    const __m256 b10 = _mm256_castsi256_ps(_mm256_and_si256(v0, high));
    const __m256 b11 = _mm256_castsi256_ps(_mm256_and_si256(v1, high));
    const bool second = k + 1 < K;
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m256 a = _mm256_broadcast_ss(A + i * lda + k);
      c0[i] = _mm256_fmadd_ps(a, b00, c0[i]);
      c1[i] = _mm256_fmadd_ps(a, b01, c1[i]);
      if (second) {
        const __m256 a1 = _mm256_broadcast_ss(A + i * lda + k + 1);
        c0[i] = _mm256_fmadd_ps(a1, b10, c0[i]);
        c1[i] = _mm256_fmadd_ps(a1, b11, c1[i]);
      }
    }
  }
}
template <int MR, typename T>
__attribute__((target("avx2,fma"))) void micro_avx2(const float* A, int64_t lda, const T* B, int64_t ldb,
                                                    float* C, int64_t ldc, int64_t K, int w, bool accumulate) {
  const __m256i m0 = lane_mask(std::min(w, 8)), m1 = lane_mask(std::max(w - 8, 0));
  __m256 c0[MR], c1[MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = _mm256_setzero_ps();
  if constexpr (sizeof(T) == 2) {
    tile_avx2_pairs<MR>(A, lda, B, K, c0, c1);
  } else {
    tile_avx2<MR>(A, lda, B, ldb, K, c0, c1);
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    if (accumulate) {
      c0[i] = _mm256_add_ps(c0[i], _mm256_maskload_ps(C + i * ldc, m0));
      c1[i] = _mm256_add_ps(c1[i], _mm256_maskload_ps(C + i * ldc + 8, m1));
    }
    _mm256_maskstore_ps(C + i * ldc, m0, c0[i]);
    _mm256_maskstore_ps(C + i * ldc + 8, m1, c1[i]);
  }
}

template <typename T>
const Micro<T> kAvx512[] = {nullptr,           micro_avx512<1, T>,  micro_avx512<2, T>, micro_avx512<3, T>,
                            micro_avx512<4, T>, micro_avx512<5, T>,  micro_avx512<6, T>, micro_avx512<7, T>,
                            micro_avx512<8, T>, micro_avx512<9, T>,  micro_avx512<10, T>, micro_avx512<11, T>,
                            micro_avx512<12, T>};
template <typename T>
const Micro<T> kAvx2[] = {nullptr,         micro_avx2<1, T>, micro_avx2<2, T>, micro_avx2<3, T>,
                          micro_avx2<4, T>, micro_avx2<5, T>, micro_avx2<6, T>};

// -- AMX (Sapphire Rapids and later): the same float32 product from bfloat16 pieces, for many rows -----------
// A float32 value x is the exact sum of three bfloat16 values, x = x0 + x1 + x2 (x0 = bf16(x) to nearest,
// x1 = bf16(x - x0), x2 = x - x0 - x1: 8 + 8 + 8 of its 24 significant bits).  A product of two bfloat16
// values is exact in float32, and AMX's TDPBF16PS adds such products into float32 accumulators with
// float32 FMAs (round to nearest).  So A . B = sum over the pieces' products: for float32 B the six
// a_i . b_j with i + j <= 2 (the three left out are below 2^-24 of the product, under float32's rounding:
// the "bf16x6" emulation of a float32 dot), for bfloat16 B (exact in one piece) the three a_i . b.  That
// is float32 accuracy from the tile unit, which on a Sapphire Rapids core runs 16x16x32 multiply-adds per
// instruction.  Row-for-row it is not the AVX-512 path's bits (another summation order), so `auto` takes
// it from the row count Python gives (`amx_min_rows`, kernels_pallas/gemm_cpu.py AMX_MIN_ROWS: where it is
// faster); the tests check it against the float64 product like the other paths.
//
// Blocking: A is split once per call into tiles of 16 rows x 32 (AmxSplitA).  An item is a few 32-column
// panels, as above; per panel, every 32-row block of A runs over all of K into four 16x16 float32 tiles
// (tmm0-3), A's tiles in tmm4-5 and B's in tmm6-7.  bfloat16 B is read in place (its packed layout is the
// tiles'); float32 B is split per panel into three bf16 pieces in tile order (split_b), which costs a pass
// over the weights per call: worth it only for many rows.  The next panel is prefetched into L2 meanwhile.
// A K step of 32 loads B once and A once per piece: 8 tile loads for 12 products (bf16 B), 18 for 24
// (float32 B); every tile buffer starts on a 64-byte line (TileBuffer).

#if JAXSERVE_GEMM_AMX
bool has_amx() {
  static const bool has = [] {
#if defined(__linux__)
    unsigned a, b, c, d;
    if (!has_avx512() || !__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!(b >> 30 & 1) || !(d >> 22 & 1) || !(d >> 24 & 1)) return false;  // AVX512BW, AMX-BF16, AMX-TILE
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d) || !(a >> 5 & 1)) return false;  // AVX512_BF16
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;  // Linux hands out the tile state on request
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
#else
    return false;
#endif
  }();
  return has;
}

#define JAXSERVE_AMX __attribute__((target("avx512f,avx512bw,avx512bf16,amx-tile,amx-bf16")))

// The first `n` bf16 pieces of 32 float32 values (lo: the first 16), 32 to an __m512i.
JAXSERVE_AMX inline void split32(__m512 lo, __m512 hi, int n, __m512i* out) {
  for (int i = 0; i < n; ++i) {
    out[i] = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
    if (i + 1 == n) break;
    const __m512i w0 = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(out[i])), 16);
    const __m512i w1 = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(out[i], 1)), 16);
    lo = _mm512_sub_ps(lo, _mm512_castsi512_ps(w0));  // exact: what bf16 rounding left
    hi = _mm512_sub_ps(hi, _mm512_castsi512_ps(w1));
  }
}

// One row k of a packed panel (32 values; zeros past K) as `n` pieces.
JAXSERVE_AMX inline void row_pieces(const float* panel, int64_t k, int64_t K, int n, __m512i* out) {
  if (k >= K) {
    for (int i = 0; i < n; ++i) out[i] = _mm512_setzero_si512();
    return;
  }
  split32(_mm512_loadu_ps(panel + k * kPackNR), _mm512_loadu_ps(panel + k * kPackNR + 16), n, out);
}

// A tile row is 64 bytes: a tile load from an address off a 64-byte line runs about 3x slower (every row
// spans two lines; four loads + four TDPBF16PS went from 5.2 to 17.3 ns per product, measured on this
// Xeon), and malloc gives large blocks 16-byte aligned.  So the buffers the tiles read are allocated here.
struct TileBuffer {
  std::unique_ptr<bf16[]> store;
  bf16* data = nullptr;
  int64_t size = 0;
  bf16* reserve(int64_t n) {  // room for n values from a 64-byte boundary (not initialised)
    if (n > size) {
      store.reset(new bf16[n + 32]);
      const uintptr_t p = reinterpret_cast<uintptr_t>(store.get());
      data = reinterpret_cast<bf16*>((p + 63) / 64 * 64);
      size = n;
    }
    return data;
  }
};

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};  // every tile 16 rows of 64 bytes
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

// A's pieces, split once per call: tiles of 16 rows x 32 bf16 (one contiguous KB each),
// [Mp / 32][Kp / 32][3 pieces][2 halves of the 32 rows].  Items: 32-row blocks.
struct AmxSplitA {
  const float* A;
  bf16* ap;
  int64_t M, K, Kp, items;
  std::atomic<int64_t> next{0}, done{0};
  JAXSERVE_AMX void run() {
    const int64_t kc_n = Kp / 32;
    for (int64_t mb; (mb = next.fetch_add(1, std::memory_order_relaxed)) < items;) {
      for (int64_t r = 0; r < 32; ++r) {
        const int64_t m = mb * 32 + r;
        for (int64_t kc = 0; kc < kc_n; ++kc) {
          const int64_t k = kc * 32, left = m < M ? K - k : 0;
          const __mmask16 m0 = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << std::max<int64_t>(left, 0)) - 1);
          const __mmask16 m1 = left >= 32 ? 0xFFFF : (left > 16 ? static_cast<__mmask16>((1u << (left - 16)) - 1) : 0);
          const float* a = A + std::min(m, M - 1) * K + k;
          __m512i p[3];
          split32(_mm512_maskz_loadu_ps(m0, a), _mm512_maskz_loadu_ps(m1, a + 16), 3, p);
          for (int i = 0; i < 3; ++i) {
            _mm512_storeu_si512(ap + (((mb * kc_n + kc) * 3 + i) * 2 + r / 16) * 512 + (r % 16) * 32, p[i]);
          }
        }
      }
      done.fetch_add(1, std::memory_order_acq_rel);
    }
  }
};

template <typename T>
struct AmxWork {
  static constexpr int kBPieces = sizeof(T) == 2 ? 1 : 3;
  const bf16* ap;  // AmxSplitA's tiles
  const T* B;
  float* C;
  int64_t M, Mp, K, Kp, N, chunk, items;
  std::atomic<int64_t> next{0}, done{0};

  // A packed panel's B as pieces in tiles: [Kp / 32][kBPieces][2 halves: columns 0-15, 16-31], each tile 16
  // pairs of rows x 16 columns x 2 (the pair interleaved, as TDPBF16PS reads B), one contiguous KB.
  JAXSERVE_AMX void split_b(const T* panel, bf16* out) const {
    alignas(64) static const uint16_t kLo[32] = {0, 32, 1, 33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                                  8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
    const __m512i lo = _mm512_load_si512(kLo), hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    for (int64_t kp = 0; kp < Kp / 2; ++kp) {
      __m512i r0[3], r1[3];
      row_pieces(panel, 2 * kp, K, kBPieces, r0);
      row_pieces(panel, 2 * kp + 1, K, kBPieces, r1);
      for (int j = 0; j < kBPieces; ++j) {
        bf16* o = out + ((kp / 16 * kBPieces + j) * 2) * 512 + (kp % 16) * 32;
        _mm512_storeu_si512(o, _mm512_permutex2var_epi16(r0[j], lo, r1[j]));
        _mm512_storeu_si512(o + 512, _mm512_permutex2var_epi16(r0[j], hi, r1[j]));
      }
    }
  }

  // C's rows [32 mb, +32) x the panel's 32 columns, from all of K, in tmm0-3 (A's tiles in tmm4-5, B's in 6-7).
  // `pf`: `pf_lines` cache lines to fetch into L2 per 32 rows of K (the next panel's B, spread over this
  // panel's blocks: its split then reads from L2, not memory, while the tiles run).
  JAXSERVE_AMX void block(int64_t mb, const bf16* bv, float* out, int64_t ldo, const char*& pf,
                          const char* pf_end, int64_t pf_lines) const {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    const int64_t kc_n = Kp / 32;
    const bf16* a = ap + mb * kc_n * 3 * 1024;
    for (int64_t kc = 0; kc < kc_n; ++kc, a += 3 * 1024) {
      for (int64_t l = 0; l < pf_lines && pf < pf_end; ++l, pf += 64) _mm_prefetch(pf, _MM_HINT_T1);
      const bf16* b = bv + kc * kBPieces * 1024;
      if (kBPieces == 1) {  // bfloat16 B, the packed panel itself (pairs of rows): a_i . b, B loaded once
        _tile_loadd(6, b, 128);
        _tile_loadd(7, b + 32, 128);
      }
      for (int i = 0; i < 3; ++i) {
        _tile_loadd(4, a + i * 1024, 64);
        _tile_loadd(5, a + i * 1024 + 512, 64);
        const int terms = kBPieces == 1 ? 1 : 3 - i;  // float32 B: a_i . b_j for i + j <= 2
        for (int j = 0; j < terms; ++j) {
          if (kBPieces != 1) {
            _tile_loadd(6, b + j * 1024, 64);
            _tile_loadd(7, b + j * 1024 + 512, 64);
          }
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
    }
    const int64_t ld = ldo * sizeof(float);
    _tile_stored(0, out, ld);
    _tile_stored(1, out + 16, ld);
    _tile_stored(2, out + 16 * ldo, ld);
    _tile_stored(3, out + 16 * ldo + 16, ld);
  }

  JAXSERVE_AMX void run() {
    thread_local TileBuffer bv_store;
    alignas(64) float edge[32 * 32];
    const int64_t panels = (N + kPackNR - 1) / kPackNR;
    const bf16* bv = nullptr;
    bool configured = false;
    for (int64_t it; (it = next.fetch_add(1, std::memory_order_relaxed)) < items;) {
      if (!configured) {
        static const TileConfig config;
        _tile_loadconfig(&config);
        if (kBPieces != 1) bv_store.reserve(Kp / 32 * kBPieces * 1024);
        configured = true;
      }
      const int64_t p0 = it * chunk, p1 = std::min(panels, p0 + chunk);
      for (int64_t p = p0; p < p1; ++p) {
        if constexpr (kBPieces == 1) {
          bv = reinterpret_cast<const bf16*>(B) + p * Kp * kPackNR;  // already in tile order
        } else {
          split_b(B + p * K * kPackNR, bv_store.data);
          bv = bv_store.data;
        }
        const int64_t n0 = p * kPackNR, w = std::min(kPackNR, N - n0);
        const int64_t panel_elems = (kBPieces == 1 ? Kp : K) * kPackNR;
        const int64_t panel_bytes = panel_elems * static_cast<int64_t>(sizeof(T));
        const char* pf = p + 1 < panels ? reinterpret_cast<const char*>(B + (p + 1) * panel_elems) : nullptr;
        const char* pf_end = pf == nullptr ? nullptr : pf + panel_bytes;
        const int64_t pf_lines = (panel_bytes / 64 + Mp / 32 * (Kp / 32) - 1) / (Mp / 32 * (Kp / 32));
        for (int64_t mb = 0; mb < Mp / 32; ++mb) {
          const int64_t m0 = mb * 32, rows = std::min<int64_t>(32, M - m0);
          if (rows == 32 && w == kPackNR) {
            block(mb, bv, C + m0 * N + n0, N, pf, pf_end, pf_lines);  // straight into C
          } else {
            block(mb, bv, edge, 32, pf, pf_end, pf_lines);
            for (int64_t r = 0; r < rows; ++r) std::memcpy(C + (m0 + r) * N + n0, edge + r * 32, w * sizeof(float));
          }
        }
      }
      done.fetch_add(1, std::memory_order_acq_rel);
    }
    if (configured) _tile_release();
  }
};

template <typename T>
void RunAmx(ffi::ThreadPool& pool, const float* a, const T* b, int64_t M, int64_t K, int64_t N, float* c,
            int64_t num_threads) {
  const int64_t threads = num_threads > 0 ? num_threads : jaxserve_cpu::cpu_count();
  const int64_t Mp = (M + 31) / 32 * 32, Kp = (K + 31) / 32 * 32;
  TileBuffer ap;
  ap.reserve(3 * Mp * Kp);
  auto split = std::make_shared<AmxSplitA>();
  split->A = a, split->ap = ap.data, split->M = M, split->K = K, split->Kp = Kp, split->items = Mp / 32;
  jaxserve_cpu::run_on_pool(pool, split, split->items, threads);
  auto work = std::make_shared<AmxWork<T>>();
  work->ap = ap.data, work->B = b, work->C = c, work->M = M, work->Mp = Mp, work->K = K, work->Kp = Kp, work->N = N;
  const int64_t panels = (N + kPackNR - 1) / kPackNR;
  work->chunk = std::clamp<int64_t>(panels / (8 * threads), 1, 8);
  work->items = (panels + work->chunk - 1) / work->chunk;
  jaxserve_cpu::run_on_pool(pool, work, work->items, threads);
}
#else
bool has_amx() { return false; }
#endif  // JAXSERVE_GEMM_AMX
// -- the greedy head's approximate product on AVX512_BF16 (Zen 4, Cooper Lake and later) -----------------
// bf16(A) . B for bfloat16 B (packed in row pairs, as above): each row of A rounded to bfloat16 (to nearest
// even; a subnormal becomes 0, as the instruction would read it), then VDPBF16PS, which multiplies 32 pairs
// of bfloat16 values exactly and adds them into 16 float32 accumulators: twice the products of an FMA per
// instruction, and B read in place.  NOT a float32-accurate product (A loses 16 of its 24 bits): only the
// greedy LM head uses it, as its approximate logits, whose bound (kernels_pallas/gemm_cpu.py greedy_slack)
// covers A's rounding.  Work<bf16> runs it (kDpbf16, MR = 12 rows x 32 columns) on A as pair_rows gives it.
#if JAXSERVE_GEMM_DPBF16
bool has_dpbf16() {
  static const bool has = [] {
    unsigned a, b, c, d;
    if (!has_avx512() || !__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(b >> 30 & 1)) return false;  // AVX512BW
    return __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a >> 5 & 1);  // AVX512_BF16
  }();
  return has;
}

#define JAXSERVE_DPBF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))

// x rounded to bfloat16, to nearest even (a NaN stays a NaN; a subnormal becomes a signed 0).
inline uint32_t to_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (u >> 16) | 0x40u;
  if ((u & 0x7F800000u) == 0) return (u >> 16) & 0x8000u;
  return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}

// A [M, K] as the dpbf16 micro-kernel reads it, in a buffer of A's shape: at each even k the 32 bits of the
// pair (bf16(A[m, k]), bf16(A[m, k + 1])) (low half first, as B's pairs; 0 past K), so that Work's indexing
// of A (row m0 from A + m0 * K + k0) serves it unchanged.
std::vector<float> pair_rows(const float* a, int64_t M, int64_t K) {
  std::vector<float> out(M * K, 0.f);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; k += 2) {
      const uint32_t pair = to_bf16(a[m * K + k]) | (k + 1 < K ? to_bf16(a[m * K + k + 1]) << 16 : 0u);
      std::memcpy(&out[m * K + k], &pair, 4);
    }
  }
  return out;
}

// C[rows, w] (=|+=) bf16(A)[rows, K] . B[K, w], A as pair_rows gives it, B one packed panel from row k0.
template <int MR>
JAXSERVE_DPBF16 void micro_dpbf16(const float* A, int64_t lda, const bf16* B, int64_t, float* C, int64_t ldc,
                                  int64_t K, int w, bool accumulate) {
  __m512 c0[MR], c1[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 2) {
    const bf16* b = B + k * kPackNR;  // pair k / 2: 64 values
    _mm_prefetch(reinterpret_cast<const char*>(b + kPrefetchRows * kPackNR), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(b + kPrefetchRows * kPackNR + 32), _MM_HINT_T0);
    const __m512bh b0 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(b));
    const __m512bh b1 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(b + 32));
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m512bh a = reinterpret_cast<__m512bh>(_mm512_set1_ps(A[i * lda + k]));  // the pair's bits
      c0[i] = _mm512_dpbf16_ps(c0[i], a, b0);
      c1[i] = _mm512_dpbf16_ps(c1[i], a, b1);
    }
  }
  store_tile_avx512<MR>(c0, c1, C, ldc, w, accumulate);
}
const Micro<bf16> kDpbf16[] = {nullptr,           micro_dpbf16<1>,  micro_dpbf16<2>,  micro_dpbf16<3>,
                               micro_dpbf16<4>,  micro_dpbf16<5>,  micro_dpbf16<6>,  micro_dpbf16<7>,
                               micro_dpbf16<8>,  micro_dpbf16<9>,  micro_dpbf16<10>, micro_dpbf16<11>,
                               micro_dpbf16<12>};
#else
bool has_dpbf16() { return false; }
#endif  // JAXSERVE_GEMM_DPBF16
#else
bool has_avx512() { return false; }
bool has_avx2() { return false; }
bool has_amx() { return false; }
bool has_dpbf16() { return false; }
#endif

// The best instruction set this CPU runs (kIsaAuto: none, the call fails).
int64_t best_isa() { return has_avx512() ? kIsaAvx512 : (has_avx2() ? kIsaAvx2 : kIsaAuto); }

// C[r0:r1, panels p0..p1 of NR columns] = A [r0:r1, K] . B (packed), K in blocks of kKBlock rows so that a
// panel's block stays in L1 while every tile of MR rows runs over it.  One work item of Run (and of
// csrc/layer_cpu/).  Each element of C is the same sum, in the same order, whatever the item's bounds.
template <typename T>
void gemm_panels(const Micro<T>* micro, const float* A, const T* B, float* C, int64_t r0, int64_t r1, int64_t K,
                 int64_t Kp, int64_t N, int64_t MR, int64_t NR, int64_t p0, int64_t p1) {
  p1 = std::min(p1, (N + NR - 1) / NR);
  for (int64_t k0 = 0; k0 < K; k0 += kKBlock) {
    const int64_t kn = std::min(kKBlock, K - k0);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * NR;
      const int w = static_cast<int>(std::min(NR, N - n0));
      // the packed panel holding column n0, at row k0 (NR divides kPackNR; k0 is even)
      const T* b = sizeof(T) == 2 ? B + (n0 / kPackNR) * Kp * kPackNR + k0 * kPackNR + 2 * (n0 % kPackNR)
                                  : B + (n0 / kPackNR) * K * kPackNR + k0 * kPackNR + n0 % kPackNR;
      for (int64_t m0 = r0; m0 < r1; m0 += MR) {
        const int64_t rows = std::min(MR, r1 - m0);
        micro[rows](A + m0 * K + k0, K, b, kPackNR, C + m0 * N + n0, N, kn, w, k0 > 0);
      }
    }
  }
}

// How a matmul of M rows and `panels` panels of columns is cut into work items: groups of `chunk` adjacent
// panels, each over `mblocks` blocks of `mrows` rows (a multiple of MR, at least 4 MR).  About eight groups
// per thread (at most 8 panels a group): a helper of the pool starts late, and items claimed one by one even
// that out.  Two items per thread, as before, left 32-64 rows' matmuls 1.55-1.7x faster on two cores than on
// one; with eight, a chain of a 56m step's 32 matmuls on 2 cores went 4.1 -> 3.7 ms at 16 rows, 8.4 -> 6.6
// at 32, 13.9 -> 13.2 at 64 (three interleaved rounds, medians).  A prompt chunk's many rows are cut too,
// into up to kItemsPerThread items a thread, so that the last items, which one thread finishes while the
// other waits, are small: the same chain at 128 / 256 / 512 rows went 31.8 -> 30.5, 62.0 -> 60.0 and
// 123.3 -> 120.4 ms (2-core EPYC, eight interleaved rounds each, medians), a 4 x 128-token prompt step
// 118.7 -> 117.3 ms.  An item's bounds do not change any element's sum.  `bench/gemm_cpu.py --num-threads 1`
// against the default shows how the kernel scales.
constexpr int64_t kItemsPerThread = 64;
struct Split {
  int64_t M = 0, chunk = 1, mblocks = 1, mrows = 0, items = 0;
  Split() = default;
  Split(int64_t M_, int64_t panels, int64_t MR, int64_t threads) : M(M_) {
    chunk = std::clamp<int64_t>(panels / (8 * threads), 1, 8);
    const int64_t groups = (panels + chunk - 1) / chunk;
    mblocks = std::clamp<int64_t>((kItemsPerThread * threads + groups - 1) / groups, 1,
                                  std::max<int64_t>(1, M / (4 * MR)));
    mrows = std::max<int64_t>(MR, ((M + mblocks - 1) / mblocks + MR - 1) / MR * MR);
    mblocks = std::max<int64_t>(1, (M + mrows - 1) / mrows);
    items = groups * mblocks;
  }
  // item `it`'s panels [p0, p1) and rows [r0, r1)
  void bounds(int64_t it, int64_t& p0, int64_t& p1, int64_t& r0, int64_t& r1) const {
    const int64_t g = it / mblocks, j = it % mblocks;
    p0 = g * chunk, p1 = p0 + chunk, r0 = j * mrows, r1 = std::min(M, r0 + mrows);
  }
};

// One call: the items of a Split, claimed from an atomic counter by the calling thread and the
// helpers it schedules on XLA's pool (jaxserve_cpu::run_on_pool, csrc/cpu_pool.h).
template <typename T>
struct Work {
  const float* A;
  const T* B;
  float* C;
  int64_t K, Kp, N, MR, NR;  // Kp: K rounded up to 32 (a bf16 panel's rows)
  Split split;  // of the call's M rows
  const Micro<T>* micro = nullptr;
  std::atomic<int64_t> next{0}, done{0};

  void run() {
    for (int64_t it; (it = next.fetch_add(1, std::memory_order_relaxed)) < split.items;) {
      int64_t p0, p1, r0, r1;
      split.bounds(it, p0, p1, r0, r1);
      gemm_panels(micro, A, B, C, r0, r1, K, Kp, N, MR, NR, p0, p1);
      done.fetch_add(1, std::memory_order_acq_rel);
    }
  }
};

template <typename T>
ffi::Error Run(ffi::ThreadPool& pool, const float* a, const T* b, int64_t M, int64_t K, int64_t N, float* c,
               int64_t num_threads, int64_t isa) {
  auto work = std::make_shared<Work<T>>();
#if JAXSERVE_GEMM_X86
  if (isa == kIsaDpbf16) {  // `a` as pair_rows gives it
#if JAXSERVE_GEMM_DPBF16
    if constexpr (std::is_same_v<T, bf16>) work->micro = kDpbf16, work->MR = 12, work->NR = 32;
#endif
    if (work->micro == nullptr) return ffi::Error::InvalidArgument("gemm_cpu: isa dpbf16 needs bfloat16 B");
  } else if (isa == kIsaAvx512 && has_avx512()) {
    work->micro = kAvx512<T>, work->MR = 12, work->NR = 32;
  } else if (isa == kIsaAvx2 && has_avx2()) {
    work->micro = kAvx2<T>, work->MR = 6, work->NR = 16;
  } else {
    return ffi::Error::InvalidArgument("gemm_cpu: this CPU has neither AVX-512 nor AVX2/FMA (or not the isa asked)");
  }
#else
  return ffi::Error::InvalidArgument("gemm_cpu: built without the x86 kernels");
#endif
  work->A = a, work->B = b, work->C = c, work->K = K, work->Kp = (K + 31) / 32 * 32, work->N = N;
  const int64_t threads = num_threads > 0 ? num_threads : jaxserve_cpu::cpu_count();
  const int64_t panels = (N + work->NR - 1) / work->NR;
  work->split = Split(M, panels, work->MR, threads);
  jaxserve_cpu::run_on_pool(pool, work, work->split.items, threads);
  return ffi::Error::Success();
}

ffi::Error Gemm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::AnyBuffer b, ffi::Buffer<ffi::S32> rows,
                ffi::ResultBuffer<ffi::F32> c, int64_t num_threads, int64_t isa, int64_t amx_min_rows) {
  auto ad = a.dimensions(), bd = b.dimensions(), cd = c->dimensions();
  const bool b16 = b.element_type() == ffi::DataType::BF16;
  if (ad.size() != 2 || bd.size() != 3 || cd.size() != 2 || cd[0] != ad[0] ||
      bd[0] != (cd[1] + kPackNR - 1) / kPackNR ||
      (b16 ? bd[1] != (ad[1] + 31) / 32 * 16 || bd[2] != 2 * kPackNR : bd[1] != ad[1] || bd[2] != kPackNR)) {
    return ffi::Error::InvalidArgument(
        "gemm_cpu: A must be [M, K], C [M, N] and B packed: [ceil(N/32), K, 32] float32 or "
        "[ceil(N/32), ceil(K/32) * 16, 64] bfloat16");
  }
  if (!b16 && b.element_type() != ffi::DataType::F32) {
    return ffi::Error::InvalidArgument("gemm_cpu: B must be float32 or bfloat16");
  }
  if (rows.element_count() != 1) return ffi::Error::InvalidArgument("gemm_cpu: rows must be a scalar");
  // rows [0, M): computed; the rest (a bucket's padding rows) zeros
  const int64_t M = std::clamp<int64_t>(rows.typed_data()[0], 0, ad[0]), K = ad[1], N = cd[1];
  if (isa == kIsaAuto) isa = M >= amx_min_rows && has_amx() ? kIsaAmx : best_isa();
  if (isa == kIsaAmx && !has_amx()) {
    return ffi::Error::InvalidArgument("gemm_cpu: this CPU (or its OS) does not run AMX-BF16 tiles");
  }
  if (isa == kIsaDpbf16 && !(b16 && has_dpbf16())) {
    return ffi::Error::InvalidArgument("gemm_cpu: isa dpbf16 needs bfloat16 B and a CPU with AVX512_BF16");
  }
  float* C = c->typed_data();
  std::fill(C + M * N, C + ad[0] * N, 0.f);
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    std::fill(C, C + M * N, 0.f);
    return ffi::Error::Success();
  }
#if JAXSERVE_GEMM_DPBF16
  if (isa == kIsaDpbf16) {
    const std::vector<float> pairs = pair_rows(a.typed_data(), M, K);
    return Run(pool, pairs.data(), static_cast<const bf16*>(b.untyped_data()), M, K, N, C, num_threads, isa);
  }
#endif
#if JAXSERVE_GEMM_AMX
  if (isa == kIsaAmx) {
    if (b16) {
      RunAmx(pool, a.typed_data(), static_cast<const bf16*>(b.untyped_data()), M, K, N, C, num_threads);
    } else {
      RunAmx(pool, a.typed_data(), static_cast<const float*>(b.untyped_data()), M, K, N, C, num_threads);
    }
    return ffi::Error::Success();
  }
#endif
  if (b16) return Run(pool, a.typed_data(), static_cast<const bf16*>(b.untyped_data()), M, K, N, C, num_threads, isa);
  return Run(pool, a.typed_data(), static_cast<const float*>(b.untyped_data()), M, K, N, C, num_threads, isa);
}

// -- the greedy LM head (kernels_pallas/gemm_cpu.py argmax_head) ---------------------------------------
// The argmax of each row of A . B (float32 B, packed), exactly as Run's logits give it, from the logits
// of B's bfloat16 rounding (`approx`, computed before: a third of the cost on AMX; on AVX512_BF16 from bf16(A),
// micro_dpbf16) and per column a
// bound on the difference (`slack`: |exact - approx| <= ||a||_2 * slack[n], gemm_cpu.greedy_slack).  A
// column whose approx + bound is below the largest approx - bound cannot be the argmax; the others (one
// to a few) are computed as Run computes them (column_dot) and the first of their maxima wins, as
// jnp.argmax.  A row with a non-finite (or tiny) norm or logit computes every column.
#if JAXSERVE_GEMM_X86
// Column n of a . B as Run computes it on AVX-512 and AVX2 alike: per K block of kKBlock rows a float32
// FMA chain from zero in row order, the blocks' sums added in order (the micro-kernels' accumulate).
__attribute__((target("avx2,fma"))) float column_dot(const float* a, const float* B, int64_t K, int64_t n) {
  const float* b = B + (n / kPackNR) * K * kPackNR + n % kPackNR;
  float c = 0.f;
  for (int64_t k0 = 0; k0 < K; k0 += kKBlock) {
    const int64_t k1 = std::min(K, k0 + kKBlock);
    float acc = 0.f;
    for (int64_t k = k0; k < k1; ++k) acc = std::fma(a[k], b[k * kPackNR], acc);
    c = k0 == 0 ? acc : acc + c;
  }
  return c;
}

struct ArgmaxWork {
  const float *a, *approx, *B, *slack;
  int32_t* tokens;
  int32_t* computed;  // per row: the columns computed exactly
  int64_t K, N, items;
  std::atomic<int64_t> next{0}, done{0};

  // Row r's token: the first maximum of the exact logits of columns `cols` (ascending; the first NaN, if
  // any), and how many were computed.
  void best(int64_t r, const std::vector<int64_t>& cols) {
    const float* ar = a + r * K;
    int64_t arg = -1;
    float top = 0.f;
    for (const int64_t n : cols) {
      const float v = column_dot(ar, B, K, n);
      if (std::isnan(v)) {  // the first NaN
        arg = n;
        break;
      }
      if (arg < 0 || v > top) arg = n, top = v;
    }
    tokens[r] = static_cast<int32_t>(std::max<int64_t>(arg, 0));
    computed[r] = static_cast<int32_t>(cols.size());
  }
  void every_column(int64_t r, std::vector<int64_t>& cols) {
    cols.resize(N);
    for (int64_t n = 0; n < N; ++n) cols[n] = n;
    best(r, cols);
  }

  // Two passes over the row's approx logits, 8 at a time: the largest approx - bound (and whether every
  // approx is finite), then the columns whose approx + bound reach it.  In float32: greedy_slack's slack
  // holds a term (8u ||B_n||) that covers these passes' own rounding.
  __attribute__((target("avx2,fma"))) void row(int64_t r) {
    const float* ar = a + r * K;
    const float* xr = approx + r * N;
    double sq = 0.0;
    for (int64_t k = 0; k < K; ++k) sq += static_cast<double>(ar[k]) * ar[k];
    const float norm = static_cast<float>(std::sqrt(sq) * (1.0 + 1e-6));
    // AMX flushes subnormal bfloat16 pieces and products: at most 3K terms below 2^-126 each, per logit
    const float tiny = static_cast<float>(6.0 * static_cast<double>(K) * std::ldexp(1.0, -126));
    thread_local std::vector<int64_t> cols;
    cols.clear();
    // (a smaller row: greedy_slack's bound on bf16(a)'s rounding assumes ||a|| >= sqrt(K) 2^-106)
    if (!std::isfinite(norm) || norm < std::sqrt(static_cast<float>(K)) * std::ldexp(1.f, -105)) {
      return every_column(r, cols);
    }
    const __m256 nv = _mm256_set1_ps(norm), tv = _mm256_set1_ps(tiny), zero = _mm256_setzero_ps();
    __m256 mx = _mm256_set1_ps(-std::numeric_limits<float>::infinity()), chk = zero;
    int64_t n = 0;
    for (; n + 8 <= N; n += 8) {
      const __m256 x = _mm256_loadu_ps(xr + n), b = _mm256_fmadd_ps(nv, _mm256_loadu_ps(slack + n), tv);
      mx = _mm256_max_ps(mx, _mm256_sub_ps(x, b));
      chk = _mm256_add_ps(chk, _mm256_mul_ps(x, zero));  // NaN once an approx is NaN or infinite
    }
    float lanes[8], checks[8];
    _mm256_storeu_ps(lanes, mx);
    _mm256_storeu_ps(checks, chk);
    float floor_ = -std::numeric_limits<float>::infinity();
    bool finite = true;
    for (int i = 0; i < 8; ++i) floor_ = std::max(floor_, lanes[i]), finite = finite && checks[i] == 0.f;
    for (int64_t m = n; m < N; ++m) {
      finite = finite && std::isfinite(xr[m]);
      floor_ = std::max(floor_, xr[m] - (norm * slack[m] + tiny));
    }
    if (!finite || !std::isfinite(floor_)) return every_column(r, cols);
    const __m256 fv = _mm256_set1_ps(floor_);
    for (n = 0; n + 8 <= N; n += 8) {
      const __m256 x = _mm256_loadu_ps(xr + n), b = _mm256_fmadd_ps(nv, _mm256_loadu_ps(slack + n), tv);
      for (int m = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_add_ps(x, b), fv, _CMP_GE_OQ)); m; m &= m - 1) {
        cols.push_back(n + __builtin_ctz(m));
      }
    }
    for (int64_t m = n; m < N; ++m) {
      if (xr[m] + (norm * slack[m] + tiny) >= floor_) cols.push_back(m);
    }
    best(r, cols);
  }

  void run() {
    for (int64_t r; (r = next.fetch_add(1, std::memory_order_relaxed)) < items;) {
      row(r);
      done.fetch_add(1, std::memory_order_acq_rel);
    }
  }
};
#endif

ffi::Error Argmax(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> approx,
                  ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> slack, ffi::Buffer<ffi::S32> rows,
                  ffi::ResultBuffer<ffi::S32> tokens, ffi::ResultBuffer<ffi::S32> computed) {
  auto ad = a.dimensions(), xd = approx.dimensions(), bd = b.dimensions();
  if (ad.size() != 2 || xd.size() != 2 || bd.size() != 3 || xd[0] != ad[0] || bd[1] != ad[1] ||
      bd[2] != kPackNR || bd[0] != (xd[1] + kPackNR - 1) / kPackNR ||
      static_cast<int64_t>(slack.element_count()) != xd[1] || static_cast<int64_t>(tokens->element_count()) != ad[0] ||
      static_cast<int64_t>(computed->element_count()) != ad[0]) {
    return ffi::Error::InvalidArgument("gemm_cpu argmax_head: a [R, K], approx [R, N], b packed float32 "
                                       "[ceil(N/32), K, 32], slack [N], tokens and computed [R]");
  }
  if (rows.element_count() != 1) return ffi::Error::InvalidArgument("gemm_cpu argmax_head: rows must be a scalar");
  // rows [0, R): their argmax; the rest (a bucket's padding slots) token 0, no column computed
  const int64_t R = std::clamp<int64_t>(rows.typed_data()[0], 0, ad[0]);
  std::fill(tokens->typed_data() + R, tokens->typed_data() + ad[0], 0);
  std::fill(computed->typed_data() + R, computed->typed_data() + ad[0], 0);
#if JAXSERVE_GEMM_X86
  if (!has_avx2()) return ffi::Error::InvalidArgument("gemm_cpu argmax_head: needs AVX2/FMA");
  auto work = std::make_shared<ArgmaxWork>();
  work->a = a.typed_data(), work->approx = approx.typed_data(), work->B = b.typed_data();
  work->slack = slack.typed_data(), work->tokens = tokens->typed_data(), work->computed = computed->typed_data();
  work->K = ad[1], work->N = xd[1], work->items = R;
  if (work->items == 0) return ffi::Error::Success();
  if (work->N == 0) return ffi::Error::InvalidArgument("gemm_cpu argmax_head: no columns");
  jaxserve_cpu::run_on_pool(pool, work, work->items, 0);
  return ffi::Error::Success();
#else
  return ffi::Error::InvalidArgument("gemm_cpu: built without the x86 kernels");
#endif
}

}  // namespace jaxserve_cpu_gemm

#ifndef JAXSERVE_EMBEDDED  // csrc/layer_cpu/ includes this file for its kernels
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveArgmaxCpu, jaxserve_cpu_gemm::Argmax,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // a [R, K]: the LM head's input rows
                                  .Arg<ffi::Buffer<ffi::F32>>()  // approx [R, N]: a . bf16(B)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // B packed float32 [ceil(N/32), K, 32]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // slack [N]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // rows: a's rows to compute
                                  .Ret<ffi::Buffer<ffi::S32>>()  // tokens [R]
                                  .Ret<ffi::Buffer<ffi::S32>>());  // computed [R]: columns computed exactly

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveGemmCpu, jaxserve_cpu_gemm::Gemm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // A [M, K]
                                  .Arg<ffi::AnyBuffer>()  // B packed [ceil(N/32), K, 32], float32 or bfloat16
                                  .Arg<ffi::Buffer<ffi::S32>>()  // rows: A's rows to compute
                                  .Ret<ffi::Buffer<ffi::F32>>()  // C [M, N]
                                  .Attr<int64_t>("num_threads")
                                  .Attr<int64_t>("isa")
                                  .Attr<int64_t>("amx_min_rows"));  // `auto`: AMX from this many rows

// -- the Python module: kernels_pallas._gemm_cpu ---------------------------------------------------------
static PyObject* registrations(PyObject*, PyObject*) {
  return jaxserve_cpu::ffi_registrations({{"jaxserve_gemm_cpu", reinterpret_cast<void*>(JaxserveGemmCpu)},
                                          {"jaxserve_argmax_cpu", reinterpret_cast<void*>(JaxserveArgmaxCpu)}});
}

static PyObject* isas(PyObject*, PyObject*) {
  // the instruction sets this CPU runs, best first
  PyObject* list = PyList_New(0);
  if (list == nullptr) return nullptr;
  const char* names[] = {jaxserve_cpu_gemm::has_amx() ? "amx" : nullptr,
                         jaxserve_cpu_gemm::has_avx512() ? "avx512" : nullptr,
                         jaxserve_cpu_gemm::has_avx2() ? "avx2" : nullptr,
                         jaxserve_cpu_gemm::has_dpbf16() ? "dpbf16" : nullptr};
  for (const char* n : names) {
    if (n == nullptr) continue;
    PyObject* s = PyUnicode_FromString(n);
    if (s == nullptr || PyList_Append(list, s) < 0) {
      Py_XDECREF(s);
      Py_DECREF(list);
      return nullptr;
    }
    Py_DECREF(s);
  }
  return list;
}

static PyMethodDef kMethods[] = {
    {"registrations", registrations, METH_NOARGS, "{FFI target name: handler capsule}"},
    {"isas", isas, METH_NOARGS, "the instruction sets the kernel runs on this CPU, best first (then dpbf16)"},
    {nullptr, nullptr, 0, nullptr},
};
static struct PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_gemm_cpu",
                                     "The layers' float32 matmul on the CPU (XLA FFI handler).", -1, kMethods};
PyMODINIT_FUNC PyInit__gemm_cpu(void) { return PyModule_Create(&kModule); }
#endif  // JAXSERVE_EMBEDDED
