// The decode row (one query row of a sequence, every query head of its KV head's group) with AVX-512, for
// a float32 cache: the hot loop of a decode step.  Included once, inside a namespace compiled with the
// avx512f target (attention_cpu.cc), and only called after the CPU said it has it.  Semantics: those of
// kernel.h's attend_item, whose AVX2 code it replaces for these rows; the work per key is about half
// AVX2's: 16 lanes per vector, and the G x D accumulators of p . v live in registers for the whole row
// (G * D / 16 <= 16 zmm), so a key's V row is read once per chunk and a probability broadcast once per head.
// Online softmax per page as in attend_item.  The pages come from memory (each is read once a step), so the
// next page is fetched into L2 while this one is computed, spread over this page's keys (kernel.h's
// prefetch_part), and an item's first page at its start: the demand loads then hit L2.  One layer of a decode
// step at 32 rows x 384 keys, the old and new kernel alternating (`python bench/attention_cpu.py --seqs 32
// --context 384 --layers 8 [--adjacent-pages] [--isa avx2]`, 2-core EPYC Zen 4, two runs each): each
// sequence's pages adjacent 1.09 / 1.43 -> 0.93 / 1.04 ms, shuffled 1.87 / 1.78 -> 1.09 / 1.10 ms; kernel.h's
// AVX2 code (it fetched each next page whole at the start of the page before, into L1) 2.04 / 1.74 -> 1.07 /
// 1.06 and 2.17 / 2.24 -> 1.23 / 1.14 ms.  Into L1 (T0) the same spread was slower than none with adjacent
// pages (1.22 -> 1.44-1.50 ms, a local variant).

// e^x, 16 lanes: vec_avx2.h's Cephes reduction and polynomial.
inline __m512 exp16(__m512 v) {
  __m512 x = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-87.3365447504f)), _mm512_set1_ps(88.3762626647949f));
  const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}

inline __mmask16 first_lanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

// G query heads (the whole group), D = 16 * CH.
template <int G, int CH>
void decode_row(const Problem& pb, const Item& item, Scratch& sc) {
  const int64_t D = 16 * CH, S = pb.S, two_d = 2 * D;
  const int64_t s = item.seq, q_start = pb.cu_q_lens[s];
  const int64_t ctx = static_cast<int64_t>(pb.kv_lens[s]) - (pb.cu_q_lens[s + 1] - q_start);
  const int64_t pos = ctx + (item.row_begin - q_start);
  if (pos < 0) return;  // a padding sequence's row: stays zero
  const int64_t hi = std::min<int64_t>(pos + 1, pb.max_pages * S);
  const int64_t lo = std::max<int64_t>(0, pos - pb.window + 1);
  if (lo >= hi) return;
  const int32_t* pages = pb.page_indices + s * pb.max_pages;
  const int64_t head_base = (pb.layer * pb.Hkv + item.head) * pb.P;
  const int64_t qh0 = item.head * pb.G;
  const float* cache = static_cast<const float*>(pb.cache);
  sc.reserve(G, D, S);
  float* qb = sc.q.data();           // [G, D] scaled queries
  float* scores = sc.scores.data();  // [G, S] one page's scores, then probabilities
  for (int g = 0; g < G; ++g) {
    const float* qr = pb.q + (item.row_begin * pb.Hq + qh0 + g) * D;
    for (int64_t d = 0; d < D; ++d) qb[g * D + d] = qr[d] * pb.sm_scale;
  }
  __m512 acc[G][CH];
  float m[G], l[G];
  for (int g = 0; g < G; ++g) {
    m[g] = -std::numeric_limits<float>::infinity(), l[g] = 0.f;
    for (int c = 0; c < CH; ++c) acc[g][c] = _mm512_setzero_ps();
  }
  constexpr int64_t elem = sizeof(float);
  {
    const int64_t p0 = lo / S;
    const KeyBytes first =
        page_keys(pb, pages, head_base, p0, lo - p0 * S, std::min<int64_t>(hi - p0 * S, S), elem);
    prefetch_part(first.p, first.bytes, 0, (first.bytes + 63) / 64);
  }
  for (int64_t pi = lo / S; pi * S < hi; ++pi) {
    const int64_t base = (head_base + page_at(pb, pages, pi)) * S * two_d;
    const int64_t j0 = std::max<int64_t>(lo - pi * S, 0), j1 = std::min<int64_t>(hi - pi * S, S);
    const int64_t n = j1 - j0;
    const bool more = (pi + 1) * S < hi;
    const KeyBytes next =
        more ? page_keys(pb, pages, head_base, pi + 1, 0, std::min<int64_t>(hi - (pi + 1) * S, S), elem)
             : KeyBytes{nullptr, 0};
    const int64_t per = ((next.bytes + 63) / 64 + n - 1) / n;
    // scores[g, j] = q_g . k_j
    for (int64_t j = 0; j < n; ++j) {
      if (more) prefetch_part(next.p, next.bytes, j, per);
      const float* kr = cache + base + (j0 + j) * two_d;
      __m512 k[CH];
      for (int c = 0; c < CH; ++c) k[c] = _mm512_loadu_ps(kr + 16 * c);
      for (int g = 0; g < G; ++g) {
        __m512 a = _mm512_mul_ps(_mm512_loadu_ps(qb + g * D), k[0]);
        for (int c = 1; c < CH; ++c) a = _mm512_fmadd_ps(_mm512_loadu_ps(qb + g * D + 16 * c), k[c], a);
        scores[g * S + j] = _mm512_reduce_add_ps(a);
      }
    }
    // online softmax update of each head; the accumulators scaled by alpha
    for (int g = 0; g < G; ++g) {
      float* sg = scores + g * S;
      if (pb.soft_cap > 0.f) {
        for (int64_t j = 0; j < n; ++j) sg[j] = pb.soft_cap * std::tanh(sg[j] / pb.soft_cap);
      }
      __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      for (int64_t j = 0; j < n; j += 16) {
        mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(mx, first_lanes(n - j), sg + j));
      }
      const float m_new = std::max(m[g], _mm512_reduce_max_ps(mx));
      const float alpha = std::exp(m[g] - m_new);
      const __m512 mv = _mm512_set1_ps(m_new);
      __m512 sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 mk = first_lanes(n - j);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, sg + j), mv));
        _mm512_mask_storeu_ps(sg + j, mk, e);
        sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(mk, e));
      }
      l[g] = alpha * l[g] + _mm512_reduce_add_ps(sum);
      m[g] = m_new;
      const __m512 av = _mm512_set1_ps(alpha);
      for (int c = 0; c < CH; ++c) acc[g][c] = _mm512_mul_ps(acc[g][c], av);
    }
    // acc_g += sum_j p[g, j] v_j
    for (int64_t j = 0; j < n; ++j) {
      const float* vr = cache + base + (j0 + j) * two_d + D;
      __m512 v[CH];
      for (int c = 0; c < CH; ++c) v[c] = _mm512_loadu_ps(vr + 16 * c);
      for (int g = 0; g < G; ++g) {
        const __m512 p = _mm512_set1_ps(scores[g * S + j]);
        for (int c = 0; c < CH; ++c) acc[g][c] = _mm512_fmadd_ps(p, v[c], acc[g][c]);
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    float* o = pb.out + (item.row_begin * pb.Hq + qh0 + g) * D;
    const __m512 inv = _mm512_set1_ps(l[g] > 0.f ? 1.f / l[g] : 0.f);
    for (int c = 0; c < CH; ++c) _mm512_storeu_ps(o + 16 * c, _mm512_mul_ps(acc[g][c], inv));
  }
}

// Whether decode_row serves this item: one row, a float32 cache, head_dim a multiple of 16 and the group's
// accumulators within 16 registers (else kernel.h's code runs it).
inline bool decode_row_serves(const Problem& pb, const Item& item) {
  const int64_t ch = pb.D / 16;
  return item.row_end - item.row_begin == 1 && pb.cache_type == CacheType::kF32 && pb.D % 16 == 0 &&
         (ch == 2 || ch == 4 || ch == 8) && pb.G * ch <= 16;
}

inline void attend_decode(const Problem& pb, const Item& item, Scratch& sc) {
  switch (pb.D / 16 * 100 + pb.G) {
    case 201: return decode_row<1, 2>(pb, item, sc);
    case 202: return decode_row<2, 2>(pb, item, sc);
    case 203: return decode_row<3, 2>(pb, item, sc);
    case 204: return decode_row<4, 2>(pb, item, sc);
    case 205: return decode_row<5, 2>(pb, item, sc);
    case 206: return decode_row<6, 2>(pb, item, sc);
    case 207: return decode_row<7, 2>(pb, item, sc);
    case 208: return decode_row<8, 2>(pb, item, sc);
    case 401: return decode_row<1, 4>(pb, item, sc);
    case 402: return decode_row<2, 4>(pb, item, sc);
    case 403: return decode_row<3, 4>(pb, item, sc);
    case 404: return decode_row<4, 4>(pb, item, sc);
    case 801: return decode_row<1, 8>(pb, item, sc);
    case 802: return decode_row<2, 8>(pb, item, sc);
    default: return;  // not served (decode_row_serves)
  }
}
