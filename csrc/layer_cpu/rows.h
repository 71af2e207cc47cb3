// The layer's elementwise row work (layer_cpu.cc), included twice: in a namespace compiled for AVX-512
// (GCC/clang vectorise these loops) and in a portable one.  The sum of squares runs in 16 independent
// partial sums, so that it vectorises without reassociation flags; its result (and the norm's last bit)
// is the same on both paths.

// y = w * (x / sqrt(mean(x^2) + eps)): jaxserve.model.RMSNorm in float32
inline void rms_norm(const float* x, const float* w, float* y, int64_t n, float eps) {
  float part[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int j = 0; j < 16; ++j) part[j] += x[i + j] * x[i + j];
  }
  for (; i < n; ++i) part[i % 16] += x[i] * x[i];
  float ss = 0.f;
  for (int j = 0; j < 16; ++j) ss += part[j];
  const float r = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (i = 0; i < n; ++i) y[i] = w[i] * (x[i] * r);
}

// The HF rotate-half RoPE of one head vector: y = x * cos + rotate_half(x) * sin (jaxserve.model.apply_rope).
inline void rope(const float* x, const float* c, const float* s, float* y, int64_t d) {
  const int64_t half = d / 2;
  for (int64_t j = 0; j < half; ++j) y[j] = x[j] * c[j] + (-x[j + half]) * s[j];
  for (int64_t j = half; j < d; ++j) y[j] = x[j] * c[j] + x[j - half] * s[j];
}

// y = a + b
inline void add(const float* a, const float* b, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = a[i] + b[i];
}
