// The AVX2/FMA 8-lane float vector (one __m256).  Same interface as vec_portable.h.  Included inside a
// namespace compiled with the avx2,fma,f16c target (attention_cpu.cc), and only called after the CPU
// said it has them.

struct FP32Vec8 {
  __m256 v;

  static FP32Vec8 zero() { return {_mm256_setzero_ps()}; }
  static FP32Vec8 broadcast(float x) { return {_mm256_set1_ps(x)}; }
  static FP32Vec8 load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static FP32Vec8 load_bf16(const uint16_t* p) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(wide, 16))};
  }
  static FP32Vec8 load_f16(const uint16_t* p) {
    return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
  }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  FP32Vec8 fma(const FP32Vec8& a, const FP32Vec8& b) const { return {_mm256_fmadd_ps(a.v, b.v, v)}; }
  FP32Vec8 mul(const FP32Vec8& a) const { return {_mm256_mul_ps(v, a.v)}; }
  FP32Vec8 sub(const FP32Vec8& a) const { return {_mm256_sub_ps(v, a.v)}; }
  // e^v: the Cephes expf reduction and polynomial (relative error about 1e-7 over the range), inputs
  // clamped to [-87.3, 88.4] (below: the smallest normal float instead of 0).  The softmax's argument is
  // a score minus the running max, <= 0.
  FP32Vec8 exp() const {
    __m256 x = _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(-87.3365447504f)), _mm256_set1_ps(88.3762626647949f));
    const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
    return {_mm256_mul_ps(y, _mm256_castsi256_ps(e))};
  }
  // {sum(a[0]), ..., sum(a[7])}: eight horizontal sums in one vector
  static FP32Vec8 reduce_sum8(const FP32Vec8* a) {
    const __m256 h01 = _mm256_hadd_ps(a[0].v, a[1].v), h23 = _mm256_hadd_ps(a[2].v, a[3].v);
    const __m256 h45 = _mm256_hadd_ps(a[4].v, a[5].v), h67 = _mm256_hadd_ps(a[6].v, a[7].v);
    const __m256 h0123 = _mm256_hadd_ps(h01, h23), h4567 = _mm256_hadd_ps(h45, h67);
    return {_mm256_add_ps(_mm256_permute2f128_ps(h0123, h4567, 0x20), _mm256_permute2f128_ps(h0123, h4567, 0x31))};
  }
  float reduce_sum() const {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};
