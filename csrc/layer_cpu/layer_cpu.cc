// One decoder layer of a Llama-shaped model on the CPU in one XLA FFI call (kernels_pallas/layer_cpu.py):
// RMSNorm, the fused QKV matmul, RoPE and the K/V write into the paged cache (in place: the cache is the
// call's aliased output), the ragged paged attention, the output projection and its residual add, RMSNorm,
// the gate/up matmul, SwiGLU, the down projection and its residual add.
//
// Why one call: between jaxserve's per-op calls (four gemm_cpu calls and one attention call a layer, XLA's
// loops for the norms, RoPE, the cache write, SwiGLU and the residual adds) the second core sits idle: a
// call's helper is scheduled on XLA's pool at its start and a halted core is slow to start, and XLA runs the
// small loops on one thread.  Here the calling thread and its helpers run the layer's ten phases one after
// the other, each phase's items claimed from an atomic counter, with a spin wait at each phase's end; a
// helper that starts late joins at whatever phase is running (the phases before have no items left for it),
// so no thread waits for another to start.  The matmuls are gemm_cpu.cc's micro-kernels and panel loop
// (gemm_panels: the same sums as gemm_cpu's AVX-512 / AVX2 path, bit for bit) and the attention is
// attention_cpu.cc's (attend_one, make_items): this file includes both.

#define JAXSERVE_EMBEDDED 1
#include "gemm_cpu/gemm_cpu.cc"
#include "attention_cpu/attention_cpu.cc"

namespace jaxserve_cpu_layer {

namespace portable {
#include "layer_cpu/rows.h"
}  // namespace portable
#if JAXSERVE_HAVE_AVX2_PATH
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,avx512f"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f")
#endif
namespace avx512 {
#include "layer_cpu/rows.h"
}  // namespace avx512
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

namespace gm = jaxserve_cpu_gemm;
namespace at = jaxserve_cpu_attention;

// A packed weight (kernels_pallas/gemm_cpu.py pack): float32 [ceil(N/32), K, 32] or bfloat16 pairs.
struct Mat {
  const void* b = nullptr;
  bool bf16 = false;
  int64_t K = 0, N = 0;
};

enum Phase : int { kNorm1, kQkv, kRope, kAttn, kOut, kNorm2, kGateUp, kSwiglu, kDown, kResidual, kPhases };

constexpr int64_t kRowsPerItem = 4;  // the elementwise phases' items

struct LayerWork {
  int64_t T = 0, R = 0, H = 0, Hq = 0, Hkv = 0, G = 0, D = 0, I = 0, Nqkv = 0, cache_slots = 0;
  float eps = 0.f;
  const float *x = nullptr, *ln1 = nullptr, *ln2 = nullptr, *cos = nullptr, *sin = nullptr;
  const int32_t* slots = nullptr;
  float* cache = nullptr;  // [L, Hkv, P, S, 2D]
  Mat wqkv, wo, wgu, wdown;
  float* out = nullptr;  // [T, H]
  float *h = nullptr, *qkv = nullptr, *q = nullptr, *attn = nullptr, *tmp = nullptr, *gu = nullptr, *act = nullptr;
  at::Problem pb;
  int64_t attn_isa = 0;
  std::vector<at::Item> items;
  bool avx512 = false;
  int64_t MR = 0, NR = 0;
  gm::Split split[kPhases] = {};
  int64_t nitems[kPhases] = {};
  std::atomic<int64_t> next[kPhases] = {}, done[kPhases] = {};

  // item `it` (of split `sp`) of C [R, m.N] = A [R, m.K] . m
  void gemm(const Mat& m, const gm::Split& sp, const float* A, float* C, int64_t it) const {
    const int64_t Kp = (m.K + 31) / 32 * 32;
    int64_t p0, p1, r0, r1;
    sp.bounds(it, p0, p1, r0, r1);
#if JAXSERVE_GEMM_X86
    if (m.bf16) {
      gm::gemm_panels(avx512 ? gm::kAvx512<gm::bf16> : gm::kAvx2<gm::bf16>, A, static_cast<const gm::bf16*>(m.b),
                      C, r0, r1, m.K, Kp, m.N, MR, NR, p0, p1);
    } else {
      gm::gemm_panels(avx512 ? gm::kAvx512<float> : gm::kAvx2<float>, A, static_cast<const float*>(m.b), C, r0,
                      r1, m.K, Kp, m.N, MR, NR, p0, p1);
    }
#endif
  }

  void rows_item(int phase, int64_t it) {
#if JAXSERVE_HAVE_AVX2_PATH
    if (avx512) return rows_item_avx512(phase, it);
#endif
    rows_item_in<Portable>(phase, it);
  }

  struct Portable {
    static void rms_norm(const float* x, const float* w, float* y, int64_t n, float eps) {
      portable::rms_norm(x, w, y, n, eps);
    }
    static void rope(const float* x, const float* c, const float* s, float* y, int64_t d) { portable::rope(x, c, s, y, d); }
    static void add(const float* a, const float* b, float* y, int64_t n) { portable::add(a, b, y, n); }
  };
#if JAXSERVE_HAVE_AVX2_PATH
  struct Avx512 {
    static void rms_norm(const float* x, const float* w, float* y, int64_t n, float eps) {
      avx512::rms_norm(x, w, y, n, eps);
    }
    static void rope(const float* x, const float* c, const float* s, float* y, int64_t d) { avx512::rope(x, c, s, y, d); }
    static void add(const float* a, const float* b, float* y, int64_t n) { avx512::add(a, b, y, n); }
  };
  void rows_item_avx512(int phase, int64_t it) { rows_item_in<Avx512>(phase, it); }
#endif

  template <class V>
  void rows_item_in(int phase, int64_t it) {
    const int64_t r0 = it * kRowsPerItem, r1 = std::min(R, r0 + kRowsPerItem);
    for (int64_t r = r0; r < r1; ++r) {
      switch (phase) {
        case kNorm1:
          V::rms_norm(x + r * H, ln1, h + r * H, H, eps);
          break;
        case kRope: {
          const float *row = qkv + r * Nqkv, *c = cos + r * D, *s = sin + r * D;
          const int64_t slot = slots[r];
          const bool write = slot >= 0 && slot < cache_slots;
          for (int64_t kh = 0; kh < Hkv; ++kh) {
            const float* base = row + kh * (G + 2) * D;
            for (int64_t g = 0; g < G; ++g) V::rope(base + g * D, c, s, q + (r * Hq + kh * G + g) * D, D);
            if (write) {
              float* dst = cache + ((pb.layer * Hkv + kh) * cache_slots + slot) * 2 * D;
              V::rope(base + G * D, c, s, dst, D);
              std::memcpy(dst + D, base + (G + 1) * D, sizeof(float) * D);
            }
          }
          std::memset(attn + r * Hq * D, 0, sizeof(float) * Hq * D);  // rows of no sequence stay zero
          break;
        }
        case kNorm2: {
          V::add(x + r * H, tmp + r * H, out + r * H, H);
          V::rms_norm(out + r * H, ln2, h + r * H, H, eps);
          break;
        }
        case kSwiglu:
          swiglu(gu + r * 2 * I, act + r * I);
          break;
        case kResidual: {
          V::add(out + r * H, tmp + r * H, out + r * H, H);
          break;
        }
        default:
          break;
      }
    }
  }

  // act = silu(gate) * up for one row of gu [2, I]
  void swiglu(const float* g, float* a) const {
    int64_t i = 0;
#if JAXSERVE_HAVE_AVX2_PATH
    if (avx512) i = swiglu16(g, g + I, a, I);
#endif
    for (; i < I; ++i) a[i] = g[i] / (1.f + std::exp(-g[i])) * g[I + i];
  }

#if JAXSERVE_HAVE_AVX2_PATH
  __attribute__((target("avx2,fma,f16c,avx512f"))) static int64_t swiglu16(const float* g, const float* u, float* a,
                                                                             int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      const __m512 x = _mm512_loadu_ps(g + i);
      const __m512 e = at::avx512::exp16(_mm512_sub_ps(_mm512_setzero_ps(), x));
      const __m512 s = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), e));
      _mm512_storeu_ps(a + i, _mm512_mul_ps(s, _mm512_loadu_ps(u + i)));
    }
    return i;
  }
#endif

  void item(int phase, int64_t it, at::Scratch& sc) {
    const gm::Split& sp = split[phase];
    switch (phase) {
      case kQkv:
        gemm(wqkv, sp, h, qkv, it);
        break;
      case kAttn:
        at::attend_one(attn_isa, pb, items[it], sc);
        break;
      case kOut:
        gemm(wo, sp, attn, tmp, it);
        break;
      case kGateUp:
        gemm(wgu, sp, h, gu, it);
        break;
      case kDown:
        gemm(wdown, sp, act, tmp, it);
        break;
      default:
        rows_item(phase, it);
    }
  }

  void run() {
    thread_local at::Scratch sc;
    for (int p = 0; p < kPhases; ++p) {
      for (int64_t it; (it = next[p].fetch_add(1, std::memory_order_relaxed)) < nitems[p];) {
        item(p, it, sc);
        done[p].fetch_add(1, std::memory_order_acq_rel);
      }
      while (done[p].load(std::memory_order_acquire) < nitems[p]) std::this_thread::yield();
    }
  }
};

bool packed_ok(const ffi::AnyBuffer& b, int64_t K, int64_t N, Mat& m) {
  auto d = b.dimensions();
  m.b = b.untyped_data(), m.K = K, m.N = N;
  m.bf16 = b.element_type() == ffi::DataType::BF16;
  if (!m.bf16 && b.element_type() != ffi::DataType::F32) return false;
  if (d.size() != 3 || d[0] != (N + gm::kPackNR - 1) / gm::kPackNR) return false;
  return m.bf16 ? d[1] == (K + 31) / 32 * 16 && d[2] == 2 * gm::kPackNR : d[1] == K && d[2] == gm::kPackNR;
}

// Scratch of the calling thread, grown once (the helpers write into it only while the call runs).
float* scratch(std::vector<float>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.assign(n, 0.f);
  return v.data();
}

ffi::Error Layer(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> ln1, ffi::AnyBuffer wqkv,
                 ffi::AnyBuffer wo, ffi::Buffer<ffi::F32> ln2, ffi::AnyBuffer wgu, ffi::AnyBuffer wdown,
                 ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin, ffi::Buffer<ffi::F32> cache,
                 ffi::Buffer<ffi::S32> slot_mapping, ffi::Buffer<ffi::S32> kv_lens,
                 ffi::Buffer<ffi::S32> page_indices, ffi::Buffer<ffi::S32> cu_q_lens,
                 ffi::Buffer<ffi::S32> num_seqs, ffi::Buffer<ffi::S32> rows, ffi::ResultBuffer<ffi::F32> out,
                 ffi::ResultBuffer<ffi::F32> cache_out, int64_t layer, int64_t num_heads, int64_t intermediate_size, float eps,
                 float sm_scale, int64_t window, int64_t num_threads) {
  if (!gm::has_avx512() && !gm::has_avx2()) {
    return ffi::Error::InvalidArgument("layer_cpu: this CPU has neither AVX-512 nor AVX2/FMA");
  }
  auto xd = x.dimensions(), cd = cache.dimensions(), pd = page_indices.dimensions();
  if (xd.size() != 2 || cd.size() != 5 || pd.size() != 2 || cos.dimensions().size() != 2 ||
      sin.dimensions().size() != 2 || kv_lens.dimensions().size() != 1 || cu_q_lens.dimensions().size() != 1 ||
      slot_mapping.dimensions().size() != 1) {
    return ffi::Error::InvalidArgument("layer_cpu: x must be [T, H], the cache [L, Hkv, pages, page_size, 2D], "
                                       "cos/sin [T, D], page_indices [N, pages_per_seq]");
  }
  if (cache.untyped_data() != cache_out->untyped_data()) {
    return ffi::Error::InvalidArgument("layer_cpu: the cache must be aliased to the second output");
  }
  auto work = std::make_shared<LayerWork>();
  LayerWork& w = *work;
  w.T = xd[0], w.H = xd[1], w.Hkv = cd[1], w.D = cd[4] / 2, w.Hq = num_heads;
  const int64_t L = cd[0], P = cd[2], S = cd[3], N = kv_lens.dimensions()[0];
  if (w.Hkv <= 0 || w.Hq % w.Hkv != 0 || w.D % 8 != 0 || cos.dimensions()[0] != w.T || cos.dimensions()[1] != w.D ||
      sin.dimensions()[0] != w.T || sin.dimensions()[1] != w.D || slot_mapping.dimensions()[0] != w.T ||
      pd[0] != N || cu_q_lens.dimensions()[0] != N + 1 || layer < 0 || layer >= L || static_cast<int64_t>(ln1.element_count()) != w.H ||
      static_cast<int64_t>(ln2.element_count()) != w.H) {
    return ffi::Error::InvalidArgument("layer_cpu: inconsistent shapes (head_dim a multiple of 8, Hq a multiple "
                                       "of Hkv, cos/sin [T, head_dim], 0 <= layer < L)");
  }
  w.G = w.Hq / w.Hkv, w.Nqkv = w.Hkv * (w.G + 2) * w.D;
  w.I = intermediate_size;
  if (!packed_ok(wqkv, w.H, w.Nqkv, w.wqkv) || !packed_ok(wo, w.Hq * w.D, w.H, w.wo) ||
      !packed_ok(wgu, w.H, 2 * w.I, w.wgu) || !packed_ok(wdown, w.I, w.H, w.wdown)) {
    return ffi::Error::InvalidArgument("layer_cpu: the weights must be packed (gemm_cpu.pack): qkv [H, Hkv (G+2) D], "
                                       "o [Hq D, H], gate_up [H, 2I], down [I, H]");
  }
  w.R = std::clamp<int64_t>(rows.typed_data()[0], 0, w.T);
  w.eps = eps;
  w.x = x.typed_data(), w.ln1 = ln1.typed_data(), w.ln2 = ln2.typed_data();
  w.cos = cos.typed_data(), w.sin = sin.typed_data(), w.slots = slot_mapping.typed_data();
  w.cache = cache_out->typed_data(), w.cache_slots = P * S;
  w.out = out->typed_data();
  // rows past R (a bucket's padding): the layer adds nothing to them, as gemm_cpu's zero rows add nothing
  std::memcpy(w.out + w.R * w.H, w.x + w.R * w.H, sizeof(float) * (w.T - w.R) * w.H);
  if (w.R == 0) return ffi::Error::Success();

  thread_local std::vector<float> s_h, s_qkv, s_q, s_attn, s_tmp, s_gu, s_act;
  w.h = scratch(s_h, w.R * w.H), w.qkv = scratch(s_qkv, w.R * w.Nqkv), w.q = scratch(s_q, w.T * w.Hq * w.D);
  w.attn = scratch(s_attn, w.T * w.Hq * w.D), w.tmp = scratch(s_tmp, w.R * w.H);
  w.gu = scratch(s_gu, w.R * 2 * w.I), w.act = scratch(s_act, w.R * w.I);

  at::Problem& pb = w.pb;
  pb.q = w.q, pb.out = w.attn, pb.cache = w.cache;
  pb.kv_lens = kv_lens.typed_data(), pb.page_indices = page_indices.typed_data(), pb.cu_q_lens = cu_q_lens.typed_data();
  pb.cache_type = at::CacheType::kF32;
  pb.T = w.T, pb.Hq = w.Hq, pb.Hkv = w.Hkv, pb.G = w.G, pb.D = w.D, pb.P = P, pb.S = S, pb.max_pages = pd[1];
  pb.layer = layer, pb.window = window, pb.sm_scale = sm_scale, pb.soft_cap = 0.f;
  w.attn_isa = at::best_isa();
  at::make_items(pb, std::clamp<int64_t>(num_seqs.typed_data()[0], 0, N), w.items);

  w.avx512 = gm::has_avx512();
  w.MR = w.avx512 ? 12 : 6, w.NR = w.avx512 ? 32 : 16;
  const int64_t threads = num_threads > 0 ? num_threads : jaxserve_cpu::cpu_count();
  const int64_t row_items = (w.R + kRowsPerItem - 1) / kRowsPerItem;
  auto gemm_phase = [&](int phase, const Mat& m) {
    w.split[phase] = gm::Split(w.R, (m.N + w.NR - 1) / w.NR, w.MR, threads);  // as gemm_cpu's Run
    w.nitems[phase] = w.split[phase].items;
  };
  for (int p : {kNorm1, kRope, kNorm2, kSwiglu, kResidual}) w.nitems[p] = row_items;
  gemm_phase(kQkv, w.wqkv), gemm_phase(kOut, w.wo), gemm_phase(kGateUp, w.wgu), gemm_phase(kDown, w.wdown);
  w.nitems[kAttn] = static_cast<int64_t>(w.items.size());

  int64_t helpers = std::min<int64_t>(threads - 1, std::max<int64_t>(pool.num_threads(), 0));
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->run(); });
  work->run();
  return ffi::Error::Success();
}

}  // namespace jaxserve_cpu_layer

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveDecoderLayerCpu, jaxserve_cpu_layer::Layer,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [T, H]: the layer's input
                                  .Arg<ffi::Buffer<ffi::F32>>()  // input norm weight [H]
                                  .Arg<ffi::AnyBuffer>()         // qkv_proj packed, N = Hkv (G + 2) D
                                  .Arg<ffi::AnyBuffer>()         // o_proj packed
                                  .Arg<ffi::Buffer<ffi::F32>>()  // post-attention norm weight [H]
                                  .Arg<ffi::AnyBuffer>()         // gate_up_proj packed, N = 2I (gate, then up)
                                  .Arg<ffi::AnyBuffer>()         // down_proj packed
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cos [T, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // sin [T, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cache [L, Hkv, P, S, 2D] (aliased: output 1)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // slot_mapping [T]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv_lens [N]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // page_indices [N, pages_per_seq]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // cu_q_lens [N + 1]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // num_seqs
                                  .Arg<ffi::Buffer<ffi::S32>>()  // rows: x's rows to compute (the rest: x)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [T, H]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // the cache, written in place
                                  .Attr<int64_t>("layer")
                                  .Attr<int64_t>("num_heads")
                                  .Attr<int64_t>("intermediate_size")
                                  .Attr<float>("eps")
                                  .Attr<float>("sm_scale")
                                  .Attr<int64_t>("window")
                                  .Attr<int64_t>("num_threads"));

// -- the Python module: kernels_pallas._layer_cpu -------------------------------------------------------

static PyObject* registrations(PyObject*, PyObject*) {
  return jaxserve_cpu::ffi_registrations(
      {{"jaxserve_decoder_layer_cpu", reinterpret_cast<void*>(JaxserveDecoderLayerCpu)}});
}

static PyObject* serves(PyObject*, PyObject*) {
  // whether this CPU runs the kernel (AVX-512 or AVX2/FMA)
  return PyBool_FromLong(jaxserve_cpu_gemm::has_avx512() || jaxserve_cpu_gemm::has_avx2());
}

static PyMethodDef kMethods[] = {
    {"registrations", registrations, METH_NOARGS, "{FFI target name: handler capsule}"},
    {"serves", serves, METH_NOARGS, "whether this CPU runs the kernel (AVX-512 or AVX2/FMA)"},
    {nullptr, nullptr, 0, nullptr},
};
static struct PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_layer_cpu",
                                     "A whole Llama-shaped decoder layer on the CPU (XLA FFI handler).", -1,
                                     kMethods};
PyMODINIT_FUNC PyInit__layer_cpu(void) { return PyModule_Create(&kModule); }
