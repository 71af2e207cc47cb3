// Several query rows of one sequence (an item of a prefill chunk) with AVX-512, for a float32 cache.
// Included after decode_avx512.h (exp16) inside the avx512 namespace (attention_cpu.cc), and only called
// after the CPU said it has AVX-512.  Semantics: those of kernel.h's attend_rows, whose AVX2 code it
// replaces for these items.
//
// The item's Q = rows x G query vectors are the 16 lanes of a vector (in groups of 16), so that nothing is
// summed across lanes: with the queries transposed once per item (qt[d][lane]),
//   scores[j][lane] = sum_d k_j[d] * qt[d][lane]   (a key's element broadcast, eight keys at a time),
// the online softmax runs lane-wise (each lane its own row's causal bound and window, as a mask per key),
// and the output is kept transposed too, acct[d][lane] = alpha * acct[d][lane] + sum_j p[j][lane] * v_j[d]
// (16 elements of d at a time, a value broadcast per FMA).  Keys go eight at a time from a multiple of
// eight within the page (page_size a multiple of 8): keys outside a lane's range are masked, never read
// past the page.

// Whether rows_avx512 serves this item: more than one row, a float32 cache, head_dim a multiple of 16 and
// a page size a multiple of 8 (else kernel.h's attend_rows runs it).
inline bool rows_serve(const Problem& pb, const Item& item) {
  return item.row_end - item.row_begin > 1 && pb.cache_type == CacheType::kF32 && pb.D % 16 == 0 &&
         pb.S % 8 == 0;
}

// scores[u][lane] for the 8 keys from k (rows two_d apart) against the transposed queries qt[D][16].
inline void scores8(const float* k, int64_t two_d, const float* qt, int64_t D, float* out) {
  __m512 a[8];
  for (int u = 0; u < 8; ++u) a[u] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const __m512 q = _mm512_loadu_ps(qt + d * 16);
    for (int u = 0; u < 8; ++u) a[u] = _mm512_fmadd_ps(_mm512_set1_ps(k[u * two_d + d]), q, a[u]);
  }
  for (int u = 0; u < 8; ++u) _mm512_storeu_ps(out + u * 16, a[u]);
}

inline void rows_avx512(const Problem& pb, const Item& item, Scratch& sc) {
  const int64_t D = pb.D, S = pb.S, G = pb.G, two_d = 2 * D;
  const SeqView sv = seq_view(pb, item);
  const int64_t qh0 = item.head * G, Q = (item.row_end - item.row_begin) * G;
  const float* cache = static_cast<const float*>(pb.cache);
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  sc.reserve(16, D, S);
  float* qt = sc.q.data();     // [D][16] scaled queries, transposed
  float* acct = sc.acc.data();  // [D][16] the output, transposed
  float* pt = sc.scores.data();  // [S][16] a page's scores, then probabilities

  for (int64_t v0 = 0; v0 < Q; v0 += 16) {
    const int64_t nv = std::min<int64_t>(16, Q - v0);
    alignas(64) int32_t lo[16], hi[16];  // per lane: the keys [lo, hi) its row sees (none: 0, 0)
    int64_t lo_min = std::numeric_limits<int64_t>::max(), hi_max = 0;
    for (int64_t t = 0; t < 16; ++t) {
      lo[t] = hi[t] = 0;
      const int64_t v = v0 + t, pos = sv.ctx + (item.row_begin + v / G - sv.q_start);
      for (int64_t d = 0; d < D; ++d) qt[d * 16 + t] = 0.f;
      if (t >= nv || pos < 0) continue;  // an empty lane, or a padding sequence's row: stays zero
      const int64_t h = std::min<int64_t>(pos + 1, pb.max_pages * S), w = std::max<int64_t>(0, pos - pb.window + 1);
      if (w >= h) continue;
      lo[t] = static_cast<int32_t>(w), hi[t] = static_cast<int32_t>(h);
      lo_min = std::min(lo_min, w), hi_max = std::max(hi_max, h);
      const float* qr = pb.q + ((item.row_begin + v / G) * pb.Hq + qh0 + v % G) * D;
      for (int64_t d = 0; d < D; ++d) qt[d * 16 + t] = qr[d] * pb.sm_scale;
    }
    if (hi_max == 0) continue;
    const __m512i lov = _mm512_load_si512(lo), hiv = _mm512_load_si512(hi);
    std::fill(acct, acct + D * 16, 0.f);
    __m512 m = neg_inf, l = _mm512_setzero_ps();

    for (int64_t pi = lo_min / S; pi * S < hi_max; ++pi) {
      const int64_t base = (sv.head_base + page_at(pb, sv.pages, pi)) * S * two_d;
      const int64_t k0 = std::max<int64_t>(lo_min - pi * S, 0) / 8 * 8, k1 = std::min<int64_t>(hi_max - pi * S, S);
      for (int64_t k = k0; k < k1; k += 8) scores8(cache + base + k * two_d, two_d, qt, D, pt + k * 16);
      // per key: the lanes that see it; soft cap; masked lanes -inf; the page's max per lane
      __m512 mx = neg_inf;
      for (int64_t k = k0; k < k1; ++k) {
        const __m512i key = _mm512_set1_epi32(static_cast<int32_t>(pi * S + k));
        const __mmask16 sees = _mm512_cmple_epi32_mask(lov, key) & _mm512_cmplt_epi32_mask(key, hiv);
        float* s = pt + k * 16;
        if (pb.soft_cap > 0.f) {
          for (int t = 0; t < 16; ++t) s[t] = pb.soft_cap * std::tanh(s[t] / pb.soft_cap);
        }
        const __m512 x = _mm512_mask_loadu_ps(neg_inf, sees, s);
        _mm512_storeu_ps(s, x);
        mx = _mm512_max_ps(mx, x);
      }
      const __m512 m_new = _mm512_max_ps(m, mx);
      const __mmask16 live = _mm512_cmp_ps_mask(m_new, neg_inf, _CMP_NEQ_OQ);  // lanes that have seen a key
      const __m512 alpha = _mm512_mask_blend_ps(live, _mm512_set1_ps(1.f), exp16(_mm512_sub_ps(m, m_new)));
      __m512 sum = _mm512_setzero_ps();
      for (int64_t k = k0; k < k1; ++k) {
        const __m512 x = _mm512_loadu_ps(pt + k * 16);
        const __mmask16 seen = _mm512_cmp_ps_mask(x, neg_inf, _CMP_NEQ_OQ) & live;
        const __m512 p = _mm512_maskz_mov_ps(seen, exp16(_mm512_sub_ps(x, m_new)));
        _mm512_storeu_ps(pt + k * 16, p);
        sum = _mm512_add_ps(sum, p);
      }
      l = _mm512_fmadd_ps(alpha, l, sum);
      m = m_new;
      // acct[d] = alpha * acct[d] + sum_k p[k] * v_k[d], 16 elements of d at a time in registers
      for (int64_t d0 = 0; d0 < D; d0 += 16) {
        __m512 c[16];
        for (int e = 0; e < 16; ++e) c[e] = _mm512_mul_ps(_mm512_loadu_ps(acct + (d0 + e) * 16), alpha);
        for (int64_t k = k0; k < k1; ++k) {
          const __m512 p = _mm512_loadu_ps(pt + k * 16);
          const float* vr = cache + base + k * two_d + D + d0;
          for (int e = 0; e < 16; ++e) c[e] = _mm512_fmadd_ps(_mm512_set1_ps(vr[e]), p, c[e]);
        }
        for (int e = 0; e < 16; ++e) _mm512_storeu_ps(acct + (d0 + e) * 16, c[e]);
      }
    }
    alignas(64) float inv[16];
    _mm512_store_ps(inv, _mm512_maskz_div_ps(_mm512_cmp_ps_mask(l, _mm512_setzero_ps(), _CMP_GT_OQ),
                                             _mm512_set1_ps(1.f), l));
    for (int64_t t = 0; t < nv; ++t) {
      if (hi[t] == 0) continue;
      const int64_t v = v0 + t;
      float* o = pb.out + ((item.row_begin + v / G) * pb.Hq + qh0 + v % G) * D;
      for (int64_t d = 0; d < D; ++d) o[d] = acct[d * 16 + t] * inv[t];
    }
  }
}
