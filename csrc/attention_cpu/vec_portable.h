// The portable 8-lane float vector: plain loops the compiler may vectorise for whatever the build
// targets.  Same interface as vec_avx2.h; kernel.h is written against it.  Included inside a namespace.

struct FP32Vec8 {
  float v[8];

  static FP32Vec8 zero() {
    FP32Vec8 r;
    for (int i = 0; i < 8; ++i) r.v[i] = 0.f;
    return r;
  }
  static FP32Vec8 broadcast(float x) {
    FP32Vec8 r;
    for (int i = 0; i < 8; ++i) r.v[i] = x;
    return r;
  }
  static FP32Vec8 load(const float* p) {
    FP32Vec8 r;
    for (int i = 0; i < 8; ++i) r.v[i] = p[i];
    return r;
  }
  // bfloat16 bits: the high half of a float32.
  static FP32Vec8 load_bf16(const uint16_t* p) {
    FP32Vec8 r;
    for (int i = 0; i < 8; ++i) r.v[i] = bf16_to_f32(p[i]);
    return r;
  }
  static FP32Vec8 load_f16(const uint16_t* p) {
    FP32Vec8 r;
    for (int i = 0; i < 8; ++i) r.v[i] = f16_to_f32(p[i]);
    return r;
  }
  void store(float* p) const {
    for (int i = 0; i < 8; ++i) p[i] = v[i];
  }
  // this + a * b
  FP32Vec8 fma(const FP32Vec8& a, const FP32Vec8& b) const {
    FP32Vec8 r;
    for (int i = 0; i < 8; ++i) r.v[i] = v[i] + a.v[i] * b.v[i];
    return r;
  }
  FP32Vec8 mul(const FP32Vec8& a) const {
    FP32Vec8 r;
    for (int i = 0; i < 8; ++i) r.v[i] = v[i] * a.v[i];
    return r;
  }
  FP32Vec8 sub(const FP32Vec8& a) const {
    FP32Vec8 r;
    for (int i = 0; i < 8; ++i) r.v[i] = v[i] - a.v[i];
    return r;
  }
  FP32Vec8 exp() const {
    FP32Vec8 r;
    for (int i = 0; i < 8; ++i) r.v[i] = std::exp(v[i]);
    return r;
  }
  // {sum(a[0]), ..., sum(a[7])}
  static FP32Vec8 reduce_sum8(const FP32Vec8* a) {
    FP32Vec8 r;
    for (int i = 0; i < 8; ++i) r.v[i] = a[i].reduce_sum();
    return r;
  }
  float reduce_sum() const {
    float s = 0.f;
    for (int i = 0; i < 8; ++i) s += v[i];
    return s;
  }
};
