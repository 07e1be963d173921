// The int8 path of the 32-weight block types (Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 IQ4_NL) against
// activations quantised per 32 values (xq, dx: llama.cpp's Q8_0 / Q8_1), as a GEMV for a few
// activation rows and a register-blocked GEMM for many (prefill projections, an expert's
// gathered tokens).
//
// The arithmetic, the same on both paths and in both builds: for activation row r, weight row n
// and block b, the block's integer product sum(q * xq) is taken whole (exact in int32, exact as
// a float: |sum| < 2^24), then
//   acc  = fma(s[n,b] * dx[r,b], float(sum), acc)        block by block, in order
//   macc = macc + mn[n,b] * sx[r,b]                       (the types with a min: Q4_x, Q5_x)
//   y    = acc + macc
// with sx = dx * sum(xq) (llama.cpp's Q8_1 s). The products are floats rounded once each (the
// build has no FP contraction), so a row's result never depends on how many rows it was
// multiplied with, on the kernel that ran it, nor on the build.
//
// GEMV (few activation rows): 8 weight rows at a time; each row's block product is 8 int32
// lanes (dot_i8), the 8 rows' lanes are summed into one vector of 8 block sums (hadd), and the
// float work above is done for the 8 rows at once.
// GEMM (kB32MinRows rows and more): kB32NR weight rows (16 with AVX-512, 8 with AVX2) are
// decoded once over all of K into a tile where bytes 4g..4g+3 of the rows lie side by side
// (B32Block.q: group g of the rows' 32 bytes is one vector), so one vpdpbusd (AVX2: maddubs +
// madd) of a group against an activation row's 4 bytes g (broadcast) adds to every weight
// row's sum at once: no horizontal sums, kB32MR activation rows per step. Signed weights
// (Q8_0, IQ4_NL): with VNNI stored as w + 128 (unsigned), the sum corrected by
// -128 * sum(xq) of the block (xs); with AVX2 (maddubs would saturate on w + 128) the weights'
// sign moves onto the activations as in dot_i8.
// Included by cpu_common.h after the block types and gemm_i8.h, whose integer vector (KVec,
// kload, ...) it uses; gemv_rows calls gemv_b32_rows.
#pragma once

namespace {

#ifdef MOEFLOW_VNNI
using BFVec = __m512;
inline BFVec bfload(const float* p) { return _mm512_load_ps(p); }
inline BFVec bfset1(float v) { return _mm512_set1_ps(v); }
inline BFVec bfzero() { return _mm512_setzero_ps(); }
inline BFVec bfcvt(KVec v) { return _mm512_cvtepi32_ps(v); }
inline BFVec bfmul(BFVec a, BFVec b) { return _mm512_mul_ps(a, b); }
inline BFVec bfadd(BFVec a, BFVec b) { return _mm512_add_ps(a, b); }
inline BFVec bfmadd(BFVec a, BFVec b, BFVec c) { return _mm512_fmadd_ps(a, b, c); }
inline void bfstoreu(float* p, BFVec v) { _mm512_storeu_ps(p, v); }
#else
using BFVec = __m256;
inline BFVec bfload(const float* p) { return _mm256_load_ps(p); }
inline BFVec bfset1(float v) { return _mm256_set1_ps(v); }
inline BFVec bfzero() { return _mm256_setzero_ps(); }
inline BFVec bfcvt(KVec v) { return _mm256_cvtepi32_ps(v); }
inline BFVec bfmul(BFVec a, BFVec b) { return _mm256_mul_ps(a, b); }
inline BFVec bfadd(BFVec a, BFVec b) { return _mm256_add_ps(a, b); }
inline BFVec bfmadd(BFVec a, BFVec b, BFVec c) { return _mm256_fmadd_ps(a, b, c); }
inline void bfstoreu(float* p, BFVec v) { _mm256_storeu_ps(p, v); }
#endif

// The GEMM from this many activation rows on (below it the GEMV: decoding a tile costs more
// than it saves). AVX2 (2 threads, Q4_1 and Q8_0 [1536, 576] and [576, 1536]): the GEMV is
// 10-22% ahead at 4 rows, the two are mixed at 5-6 and the GEMM is ahead from 7.
#ifdef MOEFLOW_VNNI
constexpr int64_t kB32MinRows = 4;
#else
constexpr int64_t kB32MinRows = 5;
#endif

// Whether the type's blocks carry a min term (w = s * q + mn with mn != 0).
template <class T> constexpr bool kB32Min = !T::SIGNED;

// The 8 vectors' lane sums as one vector: lane i = sum of v[i]'s 8 lanes (exact: int32).
inline __m256i sum_lanes8(const __m256i* v) {
  const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]),
                                      _mm256_hadd_epi32(v[2], v[3]));
  const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]),
                                      _mm256_hadd_epi32(v[6], v[7]));
  // a: rows 0..3 of lanes 0-3 | rows 0..3 of lanes 4-7; b: the same for rows 4..7
  return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20),
                          _mm256_permute2x128_si256(a, b, 0x31));
}

// GEMV: y[m + r, n + i] for MR activation rows and the 8 weight rows n..n+7.
template <class T, int MR>
void b32_gemv8(const ActsView& a, int64_t m, const uint8_t* w, int64_t row_bytes, float* y,
               int64_t N, int64_t n) {
  const int64_t K = a.K, nb = K / 32;
  __m256 acc[MR], macc[MR];
  for (int r = 0; r < MR; ++r) {
    acc[r] = _mm256_setzero_ps();
    macc[r] = _mm256_setzero_ps();
  }
  const uint8_t* rows = w + n * row_bytes;
  for (int64_t b = 0; b < nb; ++b) {
    __m256i x[MR];
    for (int r = 0; r < MR; ++r)
      x[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.xq + (m + r) * K + b * 32));
    alignas(32) float s[8], mn[8];
    __m256i lanes[MR][8];
    for (int i = 0; i < 8; ++i) {
      const uint8_t* blk = rows + i * row_bytes + b * T::BYTES;
      prefetch_ahead(blk, T::BYTES);
      T::scales(blk, s + i, mn + i);
      const __m256i wv = T::I(blk, 0);
      for (int r = 0; r < MR; ++r) lanes[r][i] = dot_i8<T::SIGNED>(wv, x[r]);
    }
    const __m256 sv = _mm256_load_ps(s);
    for (int r = 0; r < MR; ++r) {
      const __m256 sum = _mm256_cvtepi32_ps(sum_lanes8(lanes[r]));
      acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(sv, _mm256_set1_ps(a.dx[(m + r) * nb + b])), sum,
                               acc[r]);
      if constexpr (kB32Min<T>)
        macc[r] = _mm256_add_ps(
            macc[r], _mm256_mul_ps(_mm256_load_ps(mn), _mm256_set1_ps(a.sx[(m + r) * nb + b])));
    }
  }
  for (int r = 0; r < MR; ++r)
    _mm256_storeu_ps(y + (m + r) * N + n, kB32Min<T> ? _mm256_add_ps(acc[r], macc[r]) : acc[r]);
}

// GEMV of one weight row n (the rows a group of 8 leaves over): the same arithmetic, one lane.
template <class T>
void b32_gemv1(const ActsView& a, int64_t m, const uint8_t* wrow, float* y, int64_t N,
               int64_t n) {
  const int64_t K = a.K, nb = K / 32;
  __m128 acc = _mm_setzero_ps(), macc = _mm_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = wrow + b * T::BYTES;
    prefetch_ahead(blk, T::BYTES);
    float s, mn;
    T::scales(blk, &s, &mn);
    const __m256i x =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.xq + m * K + b * 32));
    const auto sum = static_cast<float>(hsum_i32(dot_i8<T::SIGNED>(T::I(blk, 0), x)));
    acc = _mm_fmadd_ss(_mm_mul_ss(_mm_set_ss(s), _mm_set_ss(a.dx[m * nb + b])),
                       _mm_set_ss(sum), acc);
    if constexpr (kB32Min<T>)
      macc = _mm_add_ss(macc, _mm_mul_ss(_mm_set_ss(mn), _mm_set_ss(a.sx[m * nb + b])));
  }
  y[m * N + n] = _mm_cvtss_f32(kB32Min<T> ? _mm_add_ss(acc, macc) : acc);
}

// Decodes weight rows n..n+kB32NR-1 (all K) into nb B32Blocks.
template <class T>
void b32_decode(const uint8_t* w, int64_t row_bytes, int64_t nb, B32Block* out) {
  for (int64_t b = 0; b < nb; ++b) {
    B32Block& o = out[b];
    alignas(32) uint32_t rows[kB32NR][8];
    for (int i = 0; i < kB32NR; ++i) {
      const uint8_t* blk = w + i * row_bytes + b * T::BYTES;
      prefetch_ahead(blk, T::BYTES);
      T::scales(blk, o.s + i, o.mn + i);
      __m256i q = T::I(blk, 0);
#ifdef MOEFLOW_VNNI
      if constexpr (T::SIGNED) q = _mm256_xor_si256(q, _mm256_set1_epi8(-128));  // w + 128
#endif
      _mm256_store_si256(reinterpret_cast<__m256i*>(rows[i]), q);
    }
    auto* q32 = reinterpret_cast<uint32_t*>(o.q);
    for (int g = 0; g < 8; ++g)
      for (int i = 0; i < kB32NR; ++i) q32[g * kB32NR + i] = rows[i][g];
  }
}

// GEMM microkernel: y[m + r, n + i] for MR activation rows and the kB32NR decoded rows at t.
template <class T, int MR>
void b32_tile(const ActsView& a, int64_t m, const B32Block* t, float* y, int64_t N, int64_t n) {
  const int64_t K = a.K, nb = K / 32;
  BFVec acc[MR], macc[MR];
  for (int r = 0; r < MR; ++r) {
    acc[r] = bfzero();
    macc[r] = bfzero();
  }
  const int8_t* xr[MR];
  for (int r = 0; r < MR; ++r) xr[r] = a.xq + (m + r) * K;
  for (int64_t b = 0; b < nb; ++b) {
    KVec sum[MR];
    for (int r = 0; r < MR; ++r) sum[r] = kzero();
    for (int g = 0; g < 8; ++g) {
      const KVec wv = kload(t[b].q + g * 4 * kB32NR);
#ifndef MOEFLOW_VNNI
      [[maybe_unused]] const KVec wu = kabs(wv);
#endif
      for (int r = 0; r < MR; ++r) {
        int32_t x4;
        std::memcpy(&x4, xr[r] + b * 32 + g * 4, 4);
        const KVec xb = kset1(x4);
#ifdef MOEFLOW_VNNI
        sum[r] = _mm512_dpbusd_epi32(sum[r], wv, xb);
#else
        const KVec p = T::SIGNED ? kmaddubs(wu, ksign(xb, wv)) : kmaddubs(wv, xb);
        sum[r] = _mm256_add_epi32(sum[r], _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
#endif
      }
    }
#ifdef MOEFLOW_VNNI
    if constexpr (T::SIGNED)
      for (int r = 0; r < MR; ++r)
        sum[r] = _mm512_sub_epi32(sum[r], kset1(128 * a.xs[(m + r) * nb + b]));
#endif
    const BFVec sv = bfload(t[b].s);
    for (int r = 0; r < MR; ++r) {
      acc[r] = bfmadd(bfmul(sv, bfset1(a.dx[(m + r) * nb + b])), bfcvt(sum[r]), acc[r]);
      if constexpr (kB32Min<T>)
        macc[r] = bfadd(macc[r], bfmul(bfload(t[b].mn), bfset1(a.sx[(m + r) * nb + b])));
    }
  }
  for (int r = 0; r < MR; ++r)
    bfstoreu(y + (m + r) * N + n, kB32Min<T> ? bfadd(acc[r], macc[r]) : acc[r]);
}

// Activation rows per pass over the weight rows (as gemm_q8k_rows' kGemmMB).
constexpr int64_t kB32MB = 256;

template <class T>
void gemv_b32_rows(const ActsView& a, const uint8_t* w, int64_t N, int64_t n0, int64_t n1,
                   float* y, GemvScratch& scratch) {
  const int64_t nb = a.K / 32, row_bytes = nb * T::BYTES;
  int64_t n = n0;
  if (a.M >= kB32MinRows && n + kB32NR <= n1) {
    if (static_cast<int64_t>(scratch.b32.size()) < nb) scratch.b32.resize(static_cast<size_t>(nb));
    B32Block* t = scratch.b32.data();
    for (; n + kB32NR <= n1; n += kB32NR) {
      b32_decode<T>(w + n * row_bytes, row_bytes, nb, t);
      for (int64_t m0 = 0; m0 < a.M; m0 += kB32MB) {
        const int64_t m1 = std::min(a.M, m0 + kB32MB);
        int64_t m = m0;
        for (; m + kB32MR <= m1; m += kB32MR) b32_tile<T, kB32MR>(a, m, t, y, N, n);
        for (; m < m1; ++m) b32_tile<T, 1>(a, m, t, y, N, n);
      }
    }
  }
  for (; n + 8 <= n1; n += 8) {
    int64_t m = 0;
    for (; m + 2 <= a.M; m += 2) b32_gemv8<T, 2>(a, m, w, row_bytes, y, N, n);
    for (; m < a.M; ++m) b32_gemv8<T, 1>(a, m, w, row_bytes, y, N, n);
  }
  for (; n < n1; ++n)
    for (int64_t m = 0; m < a.M; ++m) b32_gemv1<T>(a, m, w + n * row_bytes, y, N, n);
}

}  // namespace
