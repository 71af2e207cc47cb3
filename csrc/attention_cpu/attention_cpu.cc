// Ragged paged attention on the CPU, an XLA FFI custom call (jax.ffi): the semantics of
// kernels_pallas/ragged_paged_attention.py::ragged_paged_attention_ref, reading the engine's paged cache
// (jaxserve/kv_cache.py: [layers, kv_heads, pages, page_size, 2 * head_dim], K lanes then V lanes) in
// place.  Python side: kernels_pallas/ragged_paged_attention_cpu.py.
//
// Organisation (after vLLM's CPU attention: a vector type per instruction set, the kernel written once
// against it, work items over (sequence, KV head) spread over the cores):
//   vec_portable.h / vec_avx2.h  FP32Vec8, the 8-lane float vector of each instruction set;
//   kernel.h                     the attention of one work item, included once per instruction set;
//   decode_avx512.h              AVX-512's decode row (float32 cache), where the CPU has it;
//   prefill_avx512.h             AVX-512's rows of a prefill chunk (float32 cache), likewise;
//   this file                    work items, the threads, the FFI handler and the Python module.
// The AVX2/FMA/F16C code is compiled with a target pragma and picked at run time when the CPU has
// those instructions (__builtin_cpu_supports), so the same build runs on any x86-64 CPU; on other
// architectures only the portable code is compiled.

#include <Python.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "cpu_pool.h"
#include "ffi_module.h"
#include "xla/ffi/api/ffi.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define JAXSERVE_HAVE_AVX2_PATH 1
#include <immintrin.h>
#else
#define JAXSERVE_HAVE_AVX2_PATH 0
#endif

namespace ffi = xla::ffi;

namespace jaxserve_cpu_attention {

// The cache's value type (a 16-bit cache may be stored as its uint16 bits: jaxserve/kv_cache.py).
enum class CacheType : int64_t { kF32 = 0, kBF16 = 1, kF16 = 2 };

inline float bf16_to_f32(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);  // normal: rebias 15 -> 127
  } else if (mant == 0) {
    bits = sign;  // zero
  } else {  // subnormal: normalise
    int e = -1;
    do {
      ++e;
      mant <<= 1;
    } while ((mant & 0x400) == 0);
    bits = sign | (static_cast<uint32_t>(112 - e) << 23) | ((mant & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// One call's operands and shapes.
struct Problem {
  const float* q;            // [T, Hq, D] float32
  float* out;                // [T, Hq, D] float32
  const void* cache;         // [L, Hkv, P, S, 2D] of cache_type
  const int32_t* kv_lens;    // [N]
  const int32_t* page_indices;  // [N, max_pages]
  const int32_t* cu_q_lens;  // [N + 1]
  CacheType cache_type;
  int64_t T, Hq, Hkv, G, D, P, S, max_pages;
  int64_t layer;
  int64_t window;   // keys after pos - window only; a huge value (NO_WINDOW) for none
  float sm_scale;
  float soft_cap;   // <= 0: none
};

// Rows [row_begin, row_end) of sequence seq, with KV head `head` and its query heads.
struct Item {
  int32_t seq, head;
  int64_t row_begin, row_end;
  int64_t cost;  // keys read, for the largest-first order
};

// Per-thread buffers of the kernel, grown once.
struct Scratch {
  std::vector<float> q, acc, scores;
  std::vector<float> m, l, alpha;  // per query vector (the several-row path)
  std::vector<int64_t> lo, hi;     // per row: the keys it sees
  void reserve(int64_t g, int64_t d, int64_t s) {
    if (static_cast<int64_t>(q.size()) < g * d) q.resize(g * d), acc.resize(g * d);
    if (static_cast<int64_t>(scores.size()) < g * s) scores.resize(g * s);
  }
  void reserve_rows(int64_t vectors, int64_t rows) {
    if (static_cast<int64_t>(m.size()) < vectors) m.resize(vectors), l.resize(vectors), alpha.resize(vectors);
    if (static_cast<int64_t>(lo.size()) < rows) lo.resize(rows), hi.resize(rows);
  }
};

namespace portable {
#include "vec_portable.h"
#include "kernel.h"
}  // namespace portable

#if JAXSERVE_HAVE_AVX2_PATH
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
namespace avx2 {
#include "vec_avx2.h"
#include "kernel.h"
}  // namespace avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
// AVX-512: decode rows and prefill rows of a float32 cache (decode_avx512.h, prefill_avx512.h), on the AVX2
// namespace's page lookup.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,avx512f"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f")
#endif
namespace avx512 {
using avx2::KeyBytes;
using avx2::page_at;
using avx2::page_keys;
using avx2::prefetch_part;
using avx2::seq_view;
using avx2::SeqView;
#include "decode_avx512.h"
#include "prefill_avx512.h"
}  // namespace avx512
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

// Which instruction set runs: 1 portable, 2 AVX2, 3 AVX2 and AVX-512's rows (0 asks for the best
// this CPU has).
enum Isa : int64_t { kIsaAuto = 0, kIsaPortable = 1, kIsaAvx2 = 2, kIsaAvx512 = 3 };

bool cpu_has_avx2() {
#if JAXSERVE_HAVE_AVX2_PATH
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if JAXSERVE_HAVE_AVX2_PATH
  static const bool has = cpu_has_avx2() && __builtin_cpu_supports("avx512f");
  return has;
#else
  return false;
#endif
}

int64_t best_isa() { return cpu_has_avx512() ? kIsaAvx512 : cpu_has_avx2() ? kIsaAvx2 : kIsaPortable; }

// One work item on the instruction set `isa` (kIsaAvx512, kIsaAvx2 or kIsaPortable).
inline void attend_one(int64_t isa, const Problem& pb, const Item& item, Scratch& sc) {
#if JAXSERVE_HAVE_AVX2_PATH
  if (isa == kIsaAvx512 && avx512::decode_row_serves(pb, item)) {
    avx512::attend_decode(pb, item, sc);
  } else if (isa == kIsaAvx512 && avx512::rows_serve(pb, item)) {
    avx512::rows_avx512(pb, item, sc);
  } else if (isa == kIsaAvx2 || isa == kIsaAvx512) {
    avx2::attend(pb, item, sc);
  } else {
    portable::attend(pb, item, sc);
  }
#else
  portable::attend(pb, item, sc);
#endif
}

// The work of one call, shared by the calling thread and the helpers it schedules on XLA's thread pool
// (jaxserve_cpu::run_on_pool, csrc/cpu_pool.h): items claimed from an atomic counter, each counted in
// `done` when finished.
struct Work {
  Problem pb;
  int64_t isa;
  std::vector<Item> items;
  std::atomic<int64_t> next{0}, done{0};

  void run() {
    thread_local Scratch sc;
    const int64_t n = static_cast<int64_t>(items.size());
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) {
      attend_one(isa, pb, items[i], sc);
      done.fetch_add(1, std::memory_order_acq_rel);
    }
  }
};

// Prefill rows are cut into items of this many rows (a decode row is an item of its own).
constexpr int64_t kRowsPerItem = 8;

// The work items of a call with `ns` sequences: (rows of a sequence, KV head), largest first.
inline void make_items(const Problem& pb, int64_t ns, std::vector<Item>& items) {
  const int64_t T = pb.T, S = pb.S, Hkv = pb.Hkv;
  const int64_t key_cap = pb.max_pages * S;
  int64_t prev_end = 0;
  for (int64_t s = 0; s < ns; ++s) {
    const int64_t rb = std::clamp<int64_t>(std::max<int64_t>(pb.cu_q_lens[s], prev_end), 0, T);
    const int64_t re = std::clamp<int64_t>(pb.cu_q_lens[s + 1], rb, T);
    prev_end = std::max(prev_end, re);
    const int64_t kv = pb.kv_lens[s];
    if (re <= rb || kv <= 0) continue;
    for (int64_t r0 = rb; r0 < re; r0 += kRowsPerItem) {
      const int64_t r1 = std::min(re, r0 + kRowsPerItem);
      // keys this chunk's rows read (its last row sees the most): an estimate for the order
      const int64_t last_pos = kv - (pb.cu_q_lens[s + 1] - pb.cu_q_lens[s]) + (r1 - 1 - pb.cu_q_lens[s]);
      const int64_t keys = std::min(std::min(last_pos + 1, key_cap), std::max<int64_t>(pb.window, 1));
      if (last_pos < 0) continue;
      for (int64_t h = 0; h < Hkv; ++h) {
        items.push_back(Item{static_cast<int32_t>(s), static_cast<int32_t>(h), r0, r1, keys * (r1 - r0)});
      }
    }
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });
}

ffi::Error Attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer cache,
                     ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> kv_lens,
                     ffi::Buffer<ffi::S32> page_indices, ffi::Buffer<ffi::S32> cu_q_lens,
                     ffi::Buffer<ffi::S32> num_seqs, ffi::Buffer<ffi::S32> window,
                     ffi::ResultBuffer<ffi::F32> out, float sm_scale, float soft_cap, int64_t cache_type,
                     int64_t num_threads, int64_t isa) {
  auto qd = q.dimensions(), cd = cache.dimensions(), pd = page_indices.dimensions();
  if (qd.size() != 3 || cd.size() != 5 || pd.size() != 2 || kv_lens.dimensions().size() != 1 ||
      cu_q_lens.dimensions().size() != 1) {
    return ffi::Error::InvalidArgument("ragged_paged_attention_cpu: q must be [T, Hq, D], the cache "
                                       "[L, Hkv, pages, page_size, 2D], page_indices [N, pages_per_seq]");
  }
  const int64_t T = qd[0], Hq = qd[1], D = qd[2];
  const int64_t L = cd[0], Hkv = cd[1], P = cd[2], S = cd[3];
  const int64_t N = kv_lens.dimensions()[0];
  if (cd[4] != 2 * D || D % 8 != 0 || Hkv <= 0 || Hq % Hkv != 0 || pd[0] != N ||
      cu_q_lens.dimensions()[0] != N + 1 || L <= 0 || P <= 0 || S <= 0) {
    return ffi::Error::InvalidArgument("ragged_paged_attention_cpu: inconsistent shapes (head_dim a multiple "
                                       "of 8, cache lanes 2 * head_dim, Hq a multiple of Hkv)");
  }
  const size_t width = cache_type == static_cast<int64_t>(CacheType::kF32) ? 4 : 2;
  if (cache_type < 0 || cache_type > 2 || ffi::ByteWidth(cache.element_type()) != width) {
    return ffi::Error::InvalidArgument("ragged_paged_attention_cpu: cache dtype does not match cache_type");
  }
  if (isa == kIsaAvx2 && !cpu_has_avx2()) {
    return ffi::Error::InvalidArgument("ragged_paged_attention_cpu: this CPU has no AVX2/FMA/F16C");
  }
  if (isa == kIsaAvx512 && !cpu_has_avx512()) {
    return ffi::Error::InvalidArgument("ragged_paged_attention_cpu: this CPU has no AVX-512");
  }
  auto work = std::make_shared<Work>();
  Problem& pb = work->pb;
  pb.q = q.typed_data();
  pb.out = out->typed_data();
  pb.cache = cache.untyped_data();
  pb.kv_lens = kv_lens.typed_data();
  pb.page_indices = page_indices.typed_data();
  pb.cu_q_lens = cu_q_lens.typed_data();
  pb.cache_type = static_cast<CacheType>(cache_type);
  pb.T = T, pb.Hq = Hq, pb.Hkv = Hkv, pb.G = Hq / Hkv, pb.D = D, pb.P = P, pb.S = S, pb.max_pages = pd[1];
  pb.layer = std::clamp<int64_t>(layer.typed_data()[0], 0, L - 1);
  pb.window = window.typed_data()[0];
  pb.sm_scale = sm_scale;
  pb.soft_cap = soft_cap;
  work->isa = isa == kIsaAuto ? best_isa() : isa;
  std::memset(pb.out, 0, sizeof(float) * T * Hq * D);  // rows of no sequence (and empty ones) are zero

  make_items(pb, std::clamp<int64_t>(num_seqs.typed_data()[0], 0, N), work->items);
  if (work->items.empty()) return ffi::Error::Success();
  jaxserve_cpu::run_on_pool(pool, work, static_cast<int64_t>(work->items.size()), num_threads);
  return ffi::Error::Success();
}

}  // namespace jaxserve_cpu_attention

#ifndef JAXSERVE_EMBEDDED  // csrc/layer_cpu/ includes this file for its kernels
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveRaggedPagedAttentionCpu, jaxserve_cpu_attention::Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::AnyBuffer>()         // kv cache (all layers)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv_lens
                                  .Arg<ffi::Buffer<ffi::S32>>()  // page_indices
                                  .Arg<ffi::Buffer<ffi::S32>>()  // cu_q_lens
                                  .Arg<ffi::Buffer<ffi::S32>>()  // num_seqs
                                  .Arg<ffi::Buffer<ffi::S32>>()  // sliding window
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Attr<float>("sm_scale")
                                  .Attr<float>("soft_cap")
                                  .Attr<int64_t>("cache_type")
                                  .Attr<int64_t>("num_threads")
                                  .Attr<int64_t>("isa"));

// -- the Python module: kernels_pallas._attention_cpu ---------------------------------------------------

static PyObject* registrations(PyObject*, PyObject*) {
  return jaxserve_cpu::ffi_registrations(
      {{"jaxserve_ragged_paged_attention_cpu", reinterpret_cast<void*>(JaxserveRaggedPagedAttentionCpu)}});
}

static PyObject* best_isa(PyObject*, PyObject*) {
  using namespace jaxserve_cpu_attention;
  return PyUnicode_FromString(cpu_has_avx512() ? "avx512" : cpu_has_avx2() ? "avx2" : "portable");
}

static PyMethodDef kMethods[] = {
    {"registrations", registrations, METH_NOARGS, "{FFI target name: handler capsule}"},
    {"best_isa", best_isa, METH_NOARGS, "the instruction set isa=0 picks on this CPU: 'avx512', 'avx2' or 'portable'"},
    {nullptr, nullptr, 0, nullptr},
};

static struct PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_attention_cpu",
                                     "Ragged paged attention on the CPU (XLA FFI handler).", -1, kMethods};

PyMODINIT_FUNC PyInit__attention_cpu(void) { return PyModule_Create(&kModule); }
#endif  // JAXSERVE_EMBEDDED
