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
  float reduce_sum() const {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};
