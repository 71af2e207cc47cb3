// The attention of one work item: some query rows of one sequence against one KV head, with the query
// heads of that head's GQA group (or G of them) together, so every K/V row read from a page serves all
// of them.  Written against FP32Vec8 (vec_portable.h or vec_avx2.h) and included once per instruction
// set, inside that set's namespace (attention_cpu.cc).  Semantics: those of
// kernels_pallas/ragged_paged_attention.py::ragged_paged_attention_ref.
//
// Per row: an online softmax over the pages the row sees, one page (a block of page_size keys, contiguous
// [page_size, 2D] in the cache, K lanes then V lanes) at a time:
//   scores = (q * sm_scale) . k  (f32, G accumulators held in registers over D/8 chunks),
//   soft cap, running max m / sum l, acc = alpha * acc + p . v  (G x D/8 accumulators per chunk).
// The pages are read in place: no gather, no copy of K or V.

template <CacheType C>
inline FP32Vec8 load_kv(const void* cache, int64_t offset) {
  if constexpr (C == CacheType::kF32) {
    return FP32Vec8::load(static_cast<const float*>(cache) + offset);
  } else if constexpr (C == CacheType::kBF16) {
    return FP32Vec8::load_bf16(static_cast<const uint16_t*>(cache) + offset);
  } else {
    return FP32Vec8::load_f16(static_cast<const uint16_t*>(cache) + offset);
  }
}

template <CacheType C>
constexpr int64_t kElemBytes = C == CacheType::kF32 ? 4 : 2;

inline void prefetch_page(const char* p, int64_t bytes) {
#if defined(__GNUC__) || defined(__clang__)
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 3);
#endif
}

// Lines [j * per, (j + 1) * per) of [p, p + bytes) into L2 (per: the lines of key j of the page computed
// before it, which spreads one page's fetch over the keys computed before it: decode_avx512.h measures it).
inline void prefetch_part(const char* p, int64_t bytes, int64_t j, int64_t per) {
#if defined(__GNUC__) || defined(__clang__)
  for (int64_t t = j * per * 64, e = std::min(t + per * 64, bytes); t < e; t += 64) __builtin_prefetch(p + t, 0, 2);
#endif
}

// An item's sequence: its first row, the positions before this step's tokens, the first page of its KV
// head in the cache (in pages) and its page table.
struct SeqView {
  int64_t q_start, ctx, head_base;
  const int32_t* pages;
};
inline SeqView seq_view(const Problem& pb, const Item& item) {
  const int64_t s = item.seq, q_start = pb.cu_q_lens[s];
  return {q_start, static_cast<int64_t>(pb.kv_lens[s]) - (pb.cu_q_lens[s + 1] - q_start),
          (pb.layer * pb.Hkv + item.head) * pb.P, pb.page_indices + s * pb.max_pages};
}

// Entry pi of a sequence's page table, clamped as XLA's gather clamps: never out of bounds.
inline int64_t page_at(const Problem& pb, const int32_t* pages, int64_t pi) {
  const int64_t page = pages[pi];
  return page < 0 ? 0 : (page >= pb.P ? pb.P - 1 : page);
}

// Keys [a, b) of page pi of a sequence's KV head (head_base: its first page in the cache) as bytes of a
// cache of elem-byte elements: where they start and how many bytes they are, for the prefetches.
struct KeyBytes {
  const char* p;
  int64_t bytes;
};
inline KeyBytes page_keys(const Problem& pb, const int32_t* pages, int64_t head_base, int64_t pi, int64_t a,
                          int64_t b, int64_t elem) {
  return {static_cast<const char*>(pb.cache) + ((head_base + page_at(pb, pages, pi)) * pb.S + a) * 2 * pb.D * elem,
          (b - a) * 2 * pb.D * elem};
}

// The page after pi, when keys below `hi` are on it, is elsewhere in memory (pages are scattered): fetch
// it while page pi is computed.
template <CacheType C>
inline void prefetch_next_page(const Problem& pb, const int32_t* pages, int64_t head_base, int64_t pi,
                               int64_t hi) {
  if ((pi + 1) * pb.S >= hi) return;
  const int64_t bytes = pb.S * 2 * pb.D * kElemBytes<C>;
  prefetch_page(static_cast<const char*>(pb.cache) + (head_base + page_at(pb, pages, pi + 1)) * bytes, bytes);
}

// One query vector's online-softmax step over a page's scores sg[a0, a1) (a0 < a1): soft cap, running max
// m and sum l updated, the scores turned into probabilities; returns alpha = e^(m_old - m_new), the factor
// of the accumulator.  The exps run 8 at a time: the kernel's compute on cache-resident pages went from
// 0.84-0.93 to 0.62-0.64 ms (bench/attention_cpu.py --seqs 64 --context 256 --shared-pages); from memory a
// decode is bound by reading the pages (1.47 -> 1.37-1.44 ms).
inline float softmax_step(const Problem& pb, float* sg, int64_t a0, int64_t a1, float& m, float& l) {
  if (pb.soft_cap > 0.f) {
    for (int64_t j = a0; j < a1; ++j) sg[j] = pb.soft_cap * std::tanh(sg[j] / pb.soft_cap);
  }
  float mx = sg[a0];
  for (int64_t j = a0 + 1; j < a1; ++j) mx = std::max(mx, sg[j]);
  const float m_new = std::max(m, mx);
  const float alpha = std::exp(m - m_new);
  float sum = 0.f;
  int64_t j = a0;
  const FP32Vec8 mv = FP32Vec8::broadcast(m_new);
  for (; j + 8 <= a1; j += 8) {
    const FP32Vec8 e = FP32Vec8::load(sg + j).sub(mv).exp();
    e.store(sg + j);
    sum += e.reduce_sum();
  }
  for (; j < a1; ++j) {
    sg[j] = std::exp(sg[j] - m_new);
    sum += sg[j];
  }
  l = alpha * l + sum;
  m = m_new;
  return alpha;
}

// Query heads [g0, g0 + G) of KV head item.head's group, rows [item.row_begin, item.row_end).
// (It keeps its own copies of the page lookup and softmax step rather than the helpers above:
// built on them, longtail-256 at 64 slots ran 3-5% slower, `bench/throughput.py`, interleaved pairs.)
template <int G, CacheType C>
void attend_item(const Problem& pb, const Item& item, int64_t g0, Scratch& sc) {
  const int64_t D = pb.D, S = pb.S, chunks = D / 8, two_d = 2 * D;
  const int64_t s = item.seq;
  const int64_t q_start = pb.cu_q_lens[s];
  const int64_t q_len = pb.cu_q_lens[s + 1] - q_start;
  const int64_t ctx = static_cast<int64_t>(pb.kv_lens[s]) - q_len;  // positions before this step's tokens
  const int32_t* pages = pb.page_indices + s * pb.max_pages;
  const int64_t head_base = (pb.layer * pb.Hkv + item.head) * pb.P;  // in pages
  const int64_t qh0 = item.head * pb.G + g0;  // first query head of this item
  sc.reserve(G, D, S);
  float* qb = sc.q.data();       // [G, D] scaled queries
  float* acc = sc.acc.data();    // [G, D]
  float* scores = sc.scores.data();  // [G, S] one page's scores, then probabilities

  for (int64_t r = item.row_begin; r < item.row_end; ++r) {
    const int64_t pos = ctx + (r - q_start);
    if (pos < 0) continue;  // a padding sequence's row: stays zero
    const int64_t hi = std::min<int64_t>(pos + 1, pb.max_pages * S);
    const int64_t lo = std::max<int64_t>(0, pos - pb.window + 1);
    if (lo >= hi) continue;
    for (int g = 0; g < G; ++g) {
      const float* qr = pb.q + (r * pb.Hq + qh0 + g) * D;
      for (int64_t d = 0; d < D; ++d) qb[g * D + d] = qr[d] * pb.sm_scale;
    }
    std::fill(acc, acc + G * D, 0.f);
    float m[G], l[G];
    for (int g = 0; g < G; ++g) {
      m[g] = -std::numeric_limits<float>::infinity();
      l[g] = 0.f;
    }
    for (int64_t pi = lo / S; pi * S < hi; ++pi) {
      int64_t page = pages[pi];
      page = page < 0 ? 0 : (page >= pb.P ? pb.P - 1 : page);  // XLA's gather clamps; never out of bounds
      const int64_t base = (head_base + page) * S * two_d;
      const int64_t j0 = std::max<int64_t>(lo - pi * S, 0), j1 = std::min<int64_t>(hi - pi * S, S);
      const int64_t n = j1 - j0;
      // The next page into L2 while this one is computed, spread over its keys (prefetch_part); the first
      // page at the start.
      const int64_t elem = kElemBytes<C>;
      if (pi == lo / S) {
        const KeyBytes first = page_keys(pb, pages, head_base, pi, j0, j1, elem);
        prefetch_part(first.p, first.bytes, 0, (first.bytes + 63) / 64);
      }
      const bool more = (pi + 1) * S < hi;
      const KeyBytes next =
          more ? page_keys(pb, pages, head_base, pi + 1, 0, std::min<int64_t>(hi - (pi + 1) * S, S), elem)
               : KeyBytes{nullptr, 0};
      const int64_t per = ((next.bytes + 63) / 64 + n - 1) / n;
      // scores[g, j] = q_g . k_j
      for (int64_t j = 0; j < n; ++j) {
        if (more) prefetch_part(next.p, next.bytes, j, per);
        const int64_t row = base + (j0 + j) * two_d;
        FP32Vec8 a[G];
        for (int g = 0; g < G; ++g) a[g] = FP32Vec8::zero();
        for (int64_t c = 0; c < chunks; ++c) {
          const FP32Vec8 k = load_kv<C>(pb.cache, row + 8 * c);
          for (int g = 0; g < G; ++g) a[g] = a[g].fma(FP32Vec8::load(qb + g * D + 8 * c), k);
        }
        for (int g = 0; g < G; ++g) scores[g * S + j] = a[g].reduce_sum();
      }
      // online softmax update of each head
      float alpha[G];
      for (int g = 0; g < G; ++g) {
        float* sg = scores + g * S;
        if (pb.soft_cap > 0.f) {
          for (int64_t j = 0; j < n; ++j) sg[j] = pb.soft_cap * std::tanh(sg[j] / pb.soft_cap);
        }
        float mx = sg[0];
        for (int64_t j = 1; j < n; ++j) mx = std::max(mx, sg[j]);
        const float m_new = std::max(m[g], mx);
        alpha[g] = std::exp(m[g] - m_new);
        float sum = 0.f;
        int64_t j = 0;
        const FP32Vec8 mv = FP32Vec8::broadcast(m_new);
        // The exps 8 at a time: the kernel's compute on cache-resident pages went from 0.84-0.93 to
        // 0.62-0.64 ms (bench/attention_cpu.py --seqs 64 --context 256 --shared-pages); from memory a
        // decode is bound by reading the pages (1.47 -> 1.37-1.44 ms).
        for (; j + 8 <= n; j += 8) {
          const FP32Vec8 e = FP32Vec8::load(sg + j).sub(mv).exp();
          e.store(sg + j);
          sum += e.reduce_sum();
        }
        for (; j < n; ++j) {
          sg[j] = std::exp(sg[j] - m_new);
          sum += sg[j];
        }
        l[g] = alpha[g] * l[g] + sum;
        m[g] = m_new;
      }
      // acc_g = alpha_g * acc_g + sum_j p[g, j] v_j, one 8-lane chunk of D at a time (G accumulators live)
      for (int64_t c = 0; c < chunks; ++c) {
        FP32Vec8 a[G];
        for (int g = 0; g < G; ++g) a[g] = FP32Vec8::load(acc + g * D + 8 * c).mul(FP32Vec8::broadcast(alpha[g]));
        for (int64_t j = 0; j < n; ++j) {
          const FP32Vec8 v = load_kv<C>(pb.cache, base + (j0 + j) * two_d + D + 8 * c);
          for (int g = 0; g < G; ++g) a[g] = a[g].fma(FP32Vec8::broadcast(scores[g * S + j]), v);
        }
        for (int g = 0; g < G; ++g) a[g].store(acc + g * D + 8 * c);
      }
    }
    for (int g = 0; g < G; ++g) {
      float* o = pb.out + (r * pb.Hq + qh0 + g) * D;
      const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
      for (int64_t d = 0; d < D; ++d) o[d] = acc[g * D + d] * inv;
    }
  }
}

// Several rows of one sequence (an item of a prefill chunk) against one KV head, with every query head of
// its group: the Q = rows x G query vectors go over each page together, eight at a time, so that a K or V
// row read serves eight of them (attend_item reads every page once per row).  Per page: scores[Q, n], each
// as eight dot products summed across lanes at once (reduce_sum8); each vector's online softmax over the
// keys its own row sees (causal bound and window per row: the page range is the rows' union, the keys
// outside a row's range get probability 0); then acc = alpha * acc + p . v, one 8-lane chunk of D at a time.
template <CacheType C>
void attend_rows(const Problem& pb, const Item& item, Scratch& sc) {
  const int64_t D = pb.D, S = pb.S, G = pb.G, chunks = D / 8, two_d = 2 * D;
  const auto [q_start, ctx, head_base, pages] = seq_view(pb, item);
  const int64_t qh0 = item.head * G;
  const int64_t R = item.row_end - item.row_begin, Q = R * G, Q8 = (Q + 7) / 8 * 8;
  sc.reserve(Q8, D, S);
  sc.reserve_rows(Q8, R);
  float* qb = sc.q.data();           // [Q8, D] scaled queries, vector i * G + g for row i, head g
  float* acc = sc.acc.data();        // [Q8, D]
  float* scores = sc.scores.data();  // [Q8, S]
  float *m = sc.m.data(), *l = sc.l.data(), *alpha = sc.alpha.data();
  int64_t *lo = sc.lo.data(), *hi = sc.hi.data();

  int64_t lo_min = std::numeric_limits<int64_t>::max(), hi_max = 0;
  for (int64_t i = 0; i < R; ++i) {
    const int64_t pos = ctx + (item.row_begin + i - q_start);
    lo[i] = hi[i] = 0;  // a padding sequence's row, or one that sees no key: stays zero
    if (pos < 0) continue;
    const int64_t h = std::min<int64_t>(pos + 1, pb.max_pages * S), w = std::max<int64_t>(0, pos - pb.window + 1);
    if (w >= h) continue;
    lo[i] = w, hi[i] = h;
    lo_min = std::min(lo_min, w), hi_max = std::max(hi_max, h);
  }
  if (hi_max == 0) return;
  for (int64_t v = 0; v < Q8; ++v) {
    float* qv = qb + v * D;
    if (v < Q) {
      const float* qr = pb.q + ((item.row_begin + v / G) * pb.Hq + qh0 + v % G) * D;
      for (int64_t d = 0; d < D; ++d) qv[d] = qr[d] * pb.sm_scale;
    } else {
      std::fill(qv, qv + D, 0.f);  // padding vectors: zero scores, zero output, never written out
    }
    m[v] = -std::numeric_limits<float>::infinity(), l[v] = 0.f, alpha[v] = 1.f;
  }
  std::fill(acc, acc + Q8 * D, 0.f);

  for (int64_t pi = lo_min / S; pi * S < hi_max; ++pi) {
    const int64_t base = (head_base + page_at(pb, pages, pi)) * S * two_d;
    const int64_t j0 = std::max<int64_t>(lo_min - pi * S, 0), j1 = std::min<int64_t>(hi_max - pi * S, S);
    const int64_t n = j1 - j0;
    prefetch_next_page<C>(pb, pages, head_base, pi, hi_max);
    // scores[v, j] = q_v . k_j, eight vectors at a time
    for (int64_t v0 = 0; v0 < Q8; v0 += 8) {
      for (int64_t j = 0; j < n; ++j) {
        const int64_t row = base + (j0 + j) * two_d;
        FP32Vec8 a[8];
        for (int t = 0; t < 8; ++t) a[t] = FP32Vec8::zero();
        for (int64_t c = 0; c < chunks; ++c) {
          const FP32Vec8 k = load_kv<C>(pb.cache, row + 8 * c);
          for (int t = 0; t < 8; ++t) a[t] = a[t].fma(FP32Vec8::load(qb + (v0 + t) * D + 8 * c), k);
        }
        float sums[8];
        FP32Vec8::reduce_sum8(a).store(sums);
        for (int t = 0; t < 8; ++t) scores[(v0 + t) * S + j] = sums[t];
      }
    }
    // each vector's online softmax over the keys of this page its row sees
    for (int64_t v = 0; v < Q; ++v) {
      const int64_t i = v / G;
      float* sg = scores + v * S;
      const int64_t a0 = std::max(lo[i] - pi * S, j0) - j0, a1 = std::min(hi[i] - pi * S, j1) - j0;
      if (a1 <= a0) {
        alpha[v] = 1.f;
        std::fill(sg, sg + n, 0.f);
        continue;
      }
      alpha[v] = softmax_step(pb, sg, a0, a1, m[v], l[v]);
      std::fill(sg, sg + a0, 0.f);
      std::fill(sg + a1, sg + n, 0.f);
    }
    // acc_v = alpha_v * acc_v + sum_j p[v, j] v_j: per 8-lane chunk of D, eight vectors' accumulators live
    for (int64_t c = 0; c < chunks; ++c) {
      for (int64_t v0 = 0; v0 < Q8; v0 += 8) {
        FP32Vec8 a[8];
        for (int t = 0; t < 8; ++t) {
          a[t] = FP32Vec8::load(acc + (v0 + t) * D + 8 * c).mul(FP32Vec8::broadcast(alpha[v0 + t]));
        }
        for (int64_t j = 0; j < n; ++j) {
          const FP32Vec8 vv = load_kv<C>(pb.cache, base + (j0 + j) * two_d + D + 8 * c);
          for (int t = 0; t < 8; ++t) a[t] = a[t].fma(FP32Vec8::broadcast(scores[(v0 + t) * S + j]), vv);
        }
        for (int t = 0; t < 8; ++t) a[t].store(acc + (v0 + t) * D + 8 * c);
      }
    }
  }
  for (int64_t v = 0; v < Q; ++v) {
    if (hi[v / G] == 0) continue;
    float* o = pb.out + ((item.row_begin + v / G) * pb.Hq + qh0 + v % G) * D;
    const float inv = l[v] > 0.f ? 1.f / l[v] : 0.f;
    for (int64_t d = 0; d < D; ++d) o[d] = acc[v * D + d] * inv;
  }
}

// The item with every query head of its group: several rows together (attend_rows), or one row with its
// heads in chunks of up to 8, each chunk one instantiation.
template <CacheType C>
void attend_group(const Problem& pb, const Item& item, Scratch& sc) {
  if (item.row_end - item.row_begin > 1) return attend_rows<C>(pb, item, sc);
  for (int64_t g0 = 0; g0 < pb.G; g0 += 8) {
    switch (std::min<int64_t>(pb.G - g0, 8)) {
      case 1: attend_item<1, C>(pb, item, g0, sc); break;
      case 2: attend_item<2, C>(pb, item, g0, sc); break;
      case 3: attend_item<3, C>(pb, item, g0, sc); break;
      case 4: attend_item<4, C>(pb, item, g0, sc); break;
      case 5: attend_item<5, C>(pb, item, g0, sc); break;
      case 6: attend_item<6, C>(pb, item, g0, sc); break;
      case 7: attend_item<7, C>(pb, item, g0, sc); break;
      default: attend_item<8, C>(pb, item, g0, sc); break;
    }
  }
}

inline void attend(const Problem& pb, const Item& item, Scratch& sc) {
  switch (pb.cache_type) {
    case CacheType::kF32: attend_group<CacheType::kF32>(pb, item, sc); break;
    case CacheType::kBF16: attend_group<CacheType::kBF16>(pb, item, sc); break;
    case CacheType::kF16: attend_group<CacheType::kF16>(pb, item, sc); break;
  }
}
