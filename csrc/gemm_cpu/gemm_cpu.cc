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
// B may also be bfloat16 (the same packed layout, 2 bytes an element): each element is widened to the
// float32 it stands for (its bits shifted up 16, exact) and the same FMAs run, so the result equals the
// float32 call on those values bit for bit.  The engine packs a weight so when every one of its float32
// values is a bfloat16 value (a checkpoint stored in bf16, run in float32): half the bytes to stream from
// memory at a decode step, for the same arithmetic.
//
// The AVX-512 / AVX2+FMA code is compiled with target attributes and picked at run time
// (__builtin_cpu_supports); a CPU with neither has no kernel here (Python runs XLA's dot instead).
#include <Python.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

#include "cpu_pool.h"
#include "xla/ffi/api/ffi.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define JAXSERVE_GEMM_X86 1
#include <immintrin.h>
#else
#define JAXSERVE_GEMM_X86 0
#endif

namespace ffi = xla::ffi;

namespace jaxserve_cpu_gemm {

enum Isa : int64_t { kIsaAuto = 0, kIsaAvx2 = 2, kIsaAvx512 = 3 };
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
template <int MR, typename T>
__attribute__((target("avx512f,fma"))) void micro_avx512(const float* A, int64_t lda, const T* B, int64_t ldb,
                                                         float* C, int64_t ldc, int64_t K, int w, bool accumulate) {
  const __mmask16 m0 = w >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << w) - 1);
  const __mmask16 m1 = w >= 32 ? 0xFFFF : (w > 16 ? static_cast<__mmask16>((1u << (w - 16)) - 1) : 0);
  __m512 c0[MR], c1[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = _mm512_setzero_ps();
  tile_avx512<MR>(A, lda, B, ldb, K, c0, c1);  // a partial panel's padding columns are zeros, not stored
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    if (accumulate) {
      c0[i] = _mm512_add_ps(c0[i], _mm512_maskz_loadu_ps(m0, C + i * ldc));
      c1[i] = _mm512_add_ps(c1[i], _mm512_maskz_loadu_ps(m1, C + i * ldc + 16));
    }
    _mm512_mask_storeu_ps(C + i * ldc, m0, c0[i]);
    _mm512_mask_storeu_ps(C + i * ldc + 16, m1, c1[i]);
  }
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
template <int MR, typename T>
__attribute__((target("avx2,fma"))) void micro_avx2(const float* A, int64_t lda, const T* B, int64_t ldb,
                                                    float* C, int64_t ldc, int64_t K, int w, bool accumulate) {
  const __m256i m0 = lane_mask(std::min(w, 8)), m1 = lane_mask(std::max(w - 8, 0));
  __m256 c0[MR], c1[MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = _mm256_setzero_ps();
  tile_avx2<MR>(A, lda, B, ldb, K, c0, c1);
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
#else
bool has_avx512() { return false; }
bool has_avx2() { return false; }
#endif

// The best instruction set this CPU runs (kIsaAuto: none, the call fails).
int64_t best_isa() { return has_avx512() ? kIsaAvx512 : (has_avx2() ? kIsaAvx2 : kIsaAuto); }

// One call: items of `chunk` adjacent panels, claimed from an atomic counter by the calling thread and the
// helpers it schedules on XLA's pool (jaxserve_cpu::run_on_pool, csrc/cpu_pool.h).
template <typename T>
struct Work {
  const float* A;
  const T* B;
  float* C;
  int64_t M, K, N, MR, NR, chunk, items;
  const Micro<T>* micro;
  std::atomic<int64_t> next{0}, done{0};

  void run() {
    const int64_t panels = (N + NR - 1) / NR;
    for (int64_t it; (it = next.fetch_add(1, std::memory_order_relaxed)) < items;) {
      const int64_t p0 = it * chunk, p1 = std::min(panels, p0 + chunk);
      for (int64_t k0 = 0; k0 < K; k0 += kKBlock) {
        const int64_t kn = std::min(kKBlock, K - k0);
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t n0 = p * NR;
          const int w = static_cast<int>(std::min(NR, N - n0));
          // the packed panel holding column n0, at row k0 (NR divides kPackNR)
          const T* b = B + (n0 / kPackNR) * K * kPackNR + k0 * kPackNR + n0 % kPackNR;
          for (int64_t m0 = 0; m0 < M; m0 += MR) {
            const int64_t rows = std::min(MR, M - m0);
            micro[rows](A + m0 * K + k0, K, b, kPackNR, C + m0 * N + n0, N, kn, w, k0 > 0);
          }
        }
      }
      done.fetch_add(1, std::memory_order_acq_rel);
    }
  }
};

template <typename T>
ffi::Error Run(ffi::ThreadPool& pool, const float* a, const T* b, int64_t M, int64_t K, int64_t N, float* c,
               int64_t num_threads, int64_t isa) {
  auto work = std::make_shared<Work<T>>();
#if JAXSERVE_GEMM_X86
  if (isa == kIsaAvx512 && has_avx512()) {
    work->micro = kAvx512<T>, work->MR = 12, work->NR = 32;
  } else if (isa == kIsaAvx2 && has_avx2()) {
    work->micro = kAvx2<T>, work->MR = 6, work->NR = 16;
  } else {
    return ffi::Error::InvalidArgument("gemm_cpu: this CPU has neither AVX-512 nor AVX2/FMA (or not the isa asked)");
  }
#else
  return ffi::Error::InvalidArgument("gemm_cpu: built without the x86 kernels");
#endif
  work->A = a, work->B = b, work->C = c, work->M = M, work->K = K, work->N = N;
  const int64_t threads = num_threads > 0 ? num_threads : jaxserve_cpu::cpu_count();
  const int64_t panels = (N + work->NR - 1) / work->NR;
  // About eight items per thread (at most 8 panels an item): a helper of the pool starts late, and items
  // claimed one by one even that out.  Two items per thread, as before, left 32-64 rows' matmuls 1.55-1.7x
  // faster on two cores than on one; with eight, a chain of a 56m step's 32 matmuls on 2 cores went
  // 4.1 -> 3.7 ms at 16 rows, 8.4 -> 6.6 at 32, 13.9 -> 13.2 at 64 (three interleaved rounds, medians).
  // `bench/gemm_cpu.py --num-threads 1` against the default shows how the kernel scales.
  work->chunk = std::clamp<int64_t>(panels / (8 * threads), 1, 8);
  work->items = (panels + work->chunk - 1) / work->chunk;
  jaxserve_cpu::run_on_pool(pool, work, work->items, threads);
  return ffi::Error::Success();
}

ffi::Error Gemm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::AnyBuffer b, ffi::Buffer<ffi::S32> rows,
                ffi::ResultBuffer<ffi::F32> c, int64_t num_threads, int64_t isa) {
  auto ad = a.dimensions(), bd = b.dimensions(), cd = c->dimensions();
  if (ad.size() != 2 || bd.size() != 3 || cd.size() != 2 || bd[2] != kPackNR || ad[1] != bd[1] ||
      cd[0] != ad[0] || bd[0] != (cd[1] + kPackNR - 1) / kPackNR) {
    return ffi::Error::InvalidArgument("gemm_cpu: A must be [M, K], B packed [ceil(N/32), K, 32] and C [M, N]");
  }
  const bool b16 = b.element_type() == ffi::DataType::BF16;
  if (!b16 && b.element_type() != ffi::DataType::F32) {
    return ffi::Error::InvalidArgument("gemm_cpu: B must be float32 or bfloat16");
  }
  if (rows.element_count() != 1) return ffi::Error::InvalidArgument("gemm_cpu: rows must be a scalar");
  if (isa == kIsaAuto) isa = best_isa();
  // rows [0, M): computed; the rest (a bucket's padding rows) zeros
  const int64_t M = std::clamp<int64_t>(rows.typed_data()[0], 0, ad[0]), K = ad[1], N = cd[1];
  float* C = c->typed_data();
  std::fill(C + M * N, C + ad[0] * N, 0.f);
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    std::fill(C, C + M * N, 0.f);
    return ffi::Error::Success();
  }
  if (b16) return Run(pool, a.typed_data(), static_cast<const bf16*>(b.untyped_data()), M, K, N, C, num_threads, isa);
  return Run(pool, a.typed_data(), static_cast<const float*>(b.untyped_data()), M, K, N, C, num_threads, isa);
}

}  // namespace jaxserve_cpu_gemm

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveGemmCpu, jaxserve_cpu_gemm::Gemm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // A [M, K]
                                  .Arg<ffi::AnyBuffer>()  // B packed [ceil(N/32), K, 32], float32 or bfloat16
                                  .Arg<ffi::Buffer<ffi::S32>>()  // rows: A's rows to compute
                                  .Ret<ffi::Buffer<ffi::F32>>()  // C [M, N]
                                  .Attr<int64_t>("num_threads")
                                  .Attr<int64_t>("isa"));

// -- the Python module: kernels_pallas._gemm_cpu ---------------------------------------------------------
static PyObject* registrations(PyObject*, PyObject*) {
  PyObject* dict = PyDict_New();
  if (dict == nullptr) return nullptr;
  PyObject* capsule = PyCapsule_New(reinterpret_cast<void*>(JaxserveGemmCpu), nullptr, nullptr);
  if (capsule == nullptr || PyDict_SetItemString(dict, "jaxserve_gemm_cpu", capsule) < 0) {
    Py_XDECREF(capsule);
    Py_DECREF(dict);
    return nullptr;
  }
  Py_DECREF(capsule);
  return dict;
}

static PyObject* isas(PyObject*, PyObject*) {
  // the instruction sets this CPU runs, best first
  PyObject* list = PyList_New(0);
  if (list == nullptr) return nullptr;
  const char* names[] = {jaxserve_cpu_gemm::has_avx512() ? "avx512" : nullptr,
                         jaxserve_cpu_gemm::has_avx2() ? "avx2" : nullptr};
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
    {"isas", isas, METH_NOARGS, "the instruction sets the kernel runs on this CPU, best first"},
    {nullptr, nullptr, 0, nullptr},
};
static struct PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_gemm_cpu",
                                     "The layers' float32 matmul on the CPU (XLA FFI handler).", -1, kMethods};
PyMODINIT_FUNC PyInit__gemm_cpu(void) { return PyModule_Create(&kModule); }
