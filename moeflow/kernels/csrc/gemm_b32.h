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
// float work above is done for the 8 rows at once. With AVX-512, 16 rows at a time
// (b32_gemv16): two rows' blocks are decoded into one vector (b32_pair), and the next 16 rows
// are streamed into L2 while these run (next_rows).
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
// 10-22% ahead at 4 rows, the two are mixed at 5-6 and the GEMM is ahead from 7. AVX-512 (2
// threads, DeepSeek-V2-Lite's Q8_0 and Q5_0 down experts [2048, 1408] read from the mapped
// file, after b32_gemv16 and the vpermt2d decode): the two are even at 3 rows, the GEMM is
// 18-39% ahead at 4-6 (Q8_0 19.0 / 16.1 GB/s, Q5_0 16.3 / 13.4 at 4 rows).
#ifdef MOEFLOW_VNNI
constexpr int64_t kB32MinRows = 4;
#else
constexpr int64_t kB32MinRows = 5;
#endif

// Whether the type's blocks carry a min term (w = s * q + mn with mn != 0).
template <class T> constexpr bool kB32Min = !T::SIGNED;

// The g weight rows after the g at `rows` (one contiguous run, not past `end`), streamed into L2
// a share per block while these run (Prefetcher, gemm_i8.h): one pass over these rows' nb
// blocks has fetched the next ones.
inline Prefetcher next_rows(const uint8_t* rows, int64_t row_bytes, int64_t g,
                            const uint8_t* end, int64_t nb) {
  const uint8_t* begin = rows + g * row_bytes;
  return Prefetcher::over(begin, std::min(end, begin + g * row_bytes), nb);
}

// GEMV: y[m + r, n + i] for MR activation rows and the 8 weight rows n..n+7.
template <class T, int MR>
void b32_gemv8(const ActsView& a, int64_t m, const uint8_t* w, int64_t row_bytes, float* y,
               int64_t N, int64_t n, int64_t n1) {
  const int64_t K = a.K, nb = K / 32;
  __m256 acc[MR], macc[MR];
  for (int r = 0; r < MR; ++r) {
    acc[r] = _mm256_setzero_ps();
    macc[r] = _mm256_setzero_ps();
  }
  const uint8_t* rows = w + n * row_bytes;
  Prefetcher next = next_rows(rows, row_bytes, 8, w + n1 * row_bytes, nb);
  for (int64_t b = 0; b < nb; ++b) {
    next.step();
    __m256i x[MR];
    for (int r = 0; r < MR; ++r)
      x[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.xq + (m + r) * K + b * 32));
    alignas(32) float s[8], mn[8];
    __m256i lanes[MR][8];
    for (int i = 0; i < 8; ++i) {
      const uint8_t* blk = rows + i * row_bytes + b * T::BYTES;
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

#ifdef MOEFLOW_VNNI
// The GEMV with AVX-512, 16 weight rows at a time: rows 2p and 2p + 1 share a vector (lanes 0-7
// and 8-15) for one vpdpbusd against the activation block in both halves; the 8 vectors' lanes
// are summed to one vector of the 16 rows' block sums (b32_sum16, lanes in kB32Lane order: the
// scales are gathered in that order and the results put back in row order once at the end);
// then b32_gemv8's float work, lane by lane. Signed weights (Q8_0, IQ4_NL) are taken as w + 128
// and the sum corrected by -128 * sum(xq) (as b32_tile). The same values as b32_gemv8.
constexpr int kB32Lane[16] = {0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15};

// lane l = the sum of row kB32Lane[l]'s 8 lanes (row 2p: v[p]'s lanes 0-7, 2p + 1: 8-15)
inline __m512i b32_sum16(const __m512i* v) {
  __m512i u[4];
  for (int k = 0; k < 4; ++k)  // per 128 bits: v[2k] and v[2k+1]'s partial sums, interleaved
    u[k] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * k], v[2 * k + 1]),
                            _mm512_unpackhi_epi32(v[2 * k], v[2 * k + 1]));
  // per 128 bits c: the sums of that 128-bit part of v[0..3] (w0) and v[4..7] (w1)
  const __m512i w0 = _mm512_add_epi32(_mm512_unpacklo_epi64(u[0], u[1]),
                                      _mm512_unpackhi_epi64(u[0], u[1]));
  const __m512i w1 = _mm512_add_epi32(_mm512_unpacklo_epi64(u[2], u[3]),
                                      _mm512_unpackhi_epi64(u[2], u[3]));
  // parts 0 + 1 are the even rows', 2 + 3 the odd rows'
  return _mm512_add_epi32(_mm512_shuffle_i32x4(w0, w1, _MM_SHUFFLE(2, 0, 2, 0)),
                          _mm512_shuffle_i32x4(w0, w1, _MM_SHUFFLE(3, 1, 3, 1)));
}

// The 16 rows' block scales s (and mins mn) from the gathered first 4 bytes of each block, as
// T::scales gives them.
template <class T>
inline void b32_scales16(__m512i raw, __m512& s, __m512& mn) {
  s = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(raw));
  if constexpr (std::is_same_v<T, Q4_0>) {
    mn = _mm512_mul_ps(_mm512_set1_ps(-8.0f), s);
  } else if constexpr (std::is_same_v<T, Q5_0>) {
    mn = _mm512_mul_ps(_mm512_set1_ps(-16.0f), s);
  } else if constexpr (std::is_same_v<T, Q4_1> || std::is_same_v<T, Q5_1>) {
    mn = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(raw, 16)));
  } else {
    static_assert(!kB32Min<T>, "a min type without its b32_scales16 case");
    mn = _mm512_setzero_ps();
  }
}

// 16 bytes of nibbles of two blocks -> their 2 x 32 values as bytes (as nibbles32, side by side)
inline __m512i nibbles32x2(const uint8_t* qa, const uint8_t* qb) {
  __m512i z = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qa)));
  z = _mm512_mask_broadcast_i32x4(z, 0xFF00, _mm_loadu_si128(reinterpret_cast<const __m128i*>(qb)));
  z = _mm512_mask_srli_epi16(z, 0xFF00FF00, z, 4);  // parts 1 and 3: the high nibbles
  return _mm512_and_si512(z, _mm512_set1_epi8(0x0F));
}

// Two blocks' values as unsigned bytes (T::I(b0), then T::I(b1); signed types plus 128)
template <class T>
inline __m512i b32_pair(const uint8_t* b0, const uint8_t* b1) {
  const auto high = [](const uint8_t* ha, const uint8_t* hb) {  // q5_high_bits of both
    uint32_t a, b;
    std::memcpy(&a, ha, 4);
    std::memcpy(&b, hb, 4);
    return _mm512_maskz_mov_epi8(static_cast<uint64_t>(a) | (static_cast<uint64_t>(b) << 32),
                                 _mm512_set1_epi8(16));
  };
  if constexpr (std::is_same_v<T, Q4_0>) {
    return nibbles32x2(b0 + 2, b1 + 2);
  } else if constexpr (std::is_same_v<T, Q4_1>) {
    return nibbles32x2(b0 + 4, b1 + 4);
  } else if constexpr (std::is_same_v<T, Q5_0>) {
    return _mm512_or_si512(nibbles32x2(b0 + 6, b1 + 6), high(b0 + 2, b1 + 2));
  } else if constexpr (std::is_same_v<T, Q5_1>) {
    return _mm512_or_si512(nibbles32x2(b0 + 8, b1 + 8), high(b0 + 4, b1 + 4));
  } else if constexpr (std::is_same_v<T, IQ4_NL>) {  // the codebook plus 128
    const __m512i table =
        _mm512_broadcast_i32x4(_mm_xor_si128(iq4_codebook(), _mm_set1_epi8(-128)));
    return _mm512_shuffle_epi8(table, nibbles32x2(b0 + 2, b1 + 2));
  } else {
    const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(T::I(b0, 0)), T::I(b1, 0), 1);
    return T::SIGNED ? _mm512_xor_si512(v, _mm512_set1_epi8(-128)) : v;
  }
}

template <class T, int MR>
void b32_gemv16(const ActsView& a, int64_t m, const uint8_t* w, int64_t row_bytes, float* y,
                int64_t N, int64_t n, int64_t n1) {
  const int64_t K = a.K, nb = K / 32;
  alignas(64) int32_t off[16], back[16];
  for (int l = 0; l < 16; ++l) {
    off[l] = static_cast<int32_t>(kB32Lane[l] * row_bytes);
    back[kB32Lane[l]] = l;
  }
  const __m512i offv = _mm512_load_si512(off);
  __m512 acc[MR], macc[MR];
  for (int r = 0; r < MR; ++r) {
    acc[r] = _mm512_setzero_ps();
    macc[r] = _mm512_setzero_ps();
  }
  const uint8_t* rows = w + n * row_bytes;
  Prefetcher next = next_rows(rows, row_bytes, 16, w + n1 * row_bytes, nb);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* base = rows + b * T::BYTES;
    next.step();
    __m512i wv[8];
    for (int p = 0; p < 8; ++p) {
      const uint8_t* b0 = base + 2 * p * row_bytes;
      const uint8_t* b1 = b0 + row_bytes;
      wv[p] = b32_pair<T>(b0, b1);
    }
    __m512 s, mn;
    b32_scales16<T>(_mm512_i32gather_epi32(offv, base, 1), s, mn);
    for (int r = 0; r < MR; ++r) {
      const __m512i x = _mm512_broadcast_i64x4(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.xq + (m + r) * K + b * 32)));
      __m512i v[8];
      for (int p = 0; p < 8; ++p) v[p] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[p], x);
      __m512i sum = b32_sum16(v);
      if constexpr (T::SIGNED)
        sum = _mm512_sub_epi32(sum, _mm512_set1_epi32(128 * a.xs[(m + r) * nb + b]));
      acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(s, _mm512_set1_ps(a.dx[(m + r) * nb + b])),
                               _mm512_cvtepi32_ps(sum), acc[r]);
      if constexpr (kB32Min<T>)
        macc[r] = _mm512_add_ps(macc[r],
                                _mm512_mul_ps(mn, _mm512_set1_ps(a.sx[(m + r) * nb + b])));
    }
  }
  const __m512i backv = _mm512_load_si512(back);
  for (int r = 0; r < MR; ++r)
    _mm512_storeu_ps(y + (m + r) * N + n,
                     _mm512_permutexvar_ps(backv, kB32Min<T> ? _mm512_add_ps(acc[r], macc[r])
                                                             : acc[r]));
}
#endif

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

#ifdef MOEFLOW_VNNI
// The permutations (vpermt2d indices) that turn 8 vectors of two rows' 8 groups each (row 2p
// in lanes 0-7, 2p + 1 in 8-15: b32_pair) into 8 vectors of one group of the 16 rows
// (B32Block.q), in three steps: 4 rows x 4 groups per vector, then 8 x 2, then 16 x 1.
struct B32Transpose {
  __m512i idx[6];
  B32Transpose() {
    alignas(64) int32_t t[6][16];
    for (int l = 0; l < 16; ++l) {
      // step 1, lane = group * 4 + row (of 4): rows 0, 1 from a, 2, 3 from b (+16)
      t[0][l] = (l % 4 >> 1) * 16 + (l % 2) * 8 + l / 4;
      t[1][l] = t[0][l] + 4;  // groups 4-7
      // step 2, lane = group * 8 + row (of 8): rows 0-3 from a, 4-7 from b
      t[2][l] = (l % 8 < 4 ? 0 : 16) + (l / 8) * 4 + l % 4;
      t[3][l] = t[2][l] + 8;  // the next two groups
      // step 3, lane = row (of 16): rows 0-7 from a, 8-15 from b
      t[4][l] = (l < 8 ? 0 : 16) + l % 8;
      t[5][l] = t[4][l] + 8;  // the second group
    }
    for (int i = 0; i < 6; ++i) idx[i] = _mm512_load_si512(t[i]);
  }
};
#endif

// Decodes weight rows n..n+kB32NR-1 (all K) into nb B32Blocks; end: where the weight rows that
// may be read next end (with AVX-512 the next 16 rows up to it are streamed into L2 meanwhile:
// next_rows).
template <class T>
void b32_decode(const uint8_t* w, int64_t row_bytes, int64_t nb, B32Block* out,
                [[maybe_unused]] const uint8_t* end) {
#ifdef MOEFLOW_VNNI
  static_assert(kB32NR == 16);
  static const B32Transpose tr;
  alignas(64) int32_t off[16];
  for (int i = 0; i < 16; ++i) off[i] = static_cast<int32_t>(i * row_bytes);
  const __m512i offv = _mm512_load_si512(off);
  Prefetcher next = next_rows(w, row_bytes, 16, end, nb);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* base = w + b * T::BYTES;
    next.step();
    __m512i v[8], x[8], y[8];
    for (int p = 0; p < 8; ++p)
      v[p] = b32_pair<T>(base + 2 * p * row_bytes, base + (2 * p + 1) * row_bytes);
    for (int j = 0; j < 4; ++j) {  // rows 4j..4j+3: groups 0-3 (x[j]), 4-7 (x[4 + j])
      x[j] = _mm512_permutex2var_epi32(v[2 * j], tr.idx[0], v[2 * j + 1]);
      x[4 + j] = _mm512_permutex2var_epi32(v[2 * j], tr.idx[1], v[2 * j + 1]);
    }
    for (int h = 0; h < 2; ++h)      // groups 4h..4h+3
      for (int j = 0; j < 2; ++j) {  // rows 8j..8j+7: groups 4h, 4h + 1 (y[4h + j]); + 2, + 3
        const __m512i a = x[4 * h + 2 * j], c = x[4 * h + 2 * j + 1];
        y[4 * h + j] = _mm512_permutex2var_epi32(a, tr.idx[2], c);
        y[4 * h + 2 + j] = _mm512_permutex2var_epi32(a, tr.idx[3], c);
      }
    B32Block& o = out[b];
    for (int k = 0; k < 4; ++k) {  // groups 2k, 2k + 1 of the 16 rows
      _mm512_store_si512(o.q + 128 * k,
                         _mm512_permutex2var_epi32(y[2 * k], tr.idx[4], y[2 * k + 1]));
      _mm512_store_si512(o.q + 128 * k + 64,
                         _mm512_permutex2var_epi32(y[2 * k], tr.idx[5], y[2 * k + 1]));
    }
    __m512 sv, mv;
    b32_scales16<T>(_mm512_i32gather_epi32(offv, base, 1), sv, mv);
    _mm512_store_ps(o.s, sv);
    _mm512_store_ps(o.mn, mv);
  }
#else
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
#endif
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
      b32_decode<T>(w + n * row_bytes, row_bytes, nb, t, w + n1 * row_bytes);
      for (int64_t m0 = 0; m0 < a.M; m0 += kB32MB) {
        const int64_t m1 = std::min(a.M, m0 + kB32MB);
        int64_t m = m0;
        for (; m + kB32MR <= m1; m += kB32MR) b32_tile<T, kB32MR>(a, m, t, y, N, n);
        for (; m < m1; ++m) b32_tile<T, 1>(a, m, t, y, N, n);
      }
    }
  }
#ifdef MOEFLOW_VNNI
  for (; n + 16 <= n1; n += 16) {
    int64_t m = 0;
    for (; m + 3 <= a.M; m += 3) b32_gemv16<T, 3>(a, m, w, row_bytes, y, N, n, n1);
    if (a.M - m == 2) b32_gemv16<T, 2>(a, m, w, row_bytes, y, N, n, n1);
    if (a.M - m == 1) b32_gemv16<T, 1>(a, m, w, row_bytes, y, N, n, n1);
  }
#endif
  for (; n + 8 <= n1; n += 8) {
    int64_t m = 0;
    for (; m + 2 <= a.M; m += 2) b32_gemv8<T, 2>(a, m, w, row_bytes, y, N, n, n1);
    for (; m < a.M; ++m) b32_gemv8<T, 1>(a, m, w, row_bytes, y, N, n, n1);
  }
  for (; n < n1; ++n)
    for (int64_t m = 0; m < a.M; ++m) b32_gemv1<T>(a, m, w + n * row_bytes, y, N, n);
}

}  // namespace
