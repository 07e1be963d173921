// moeflow CPU kernels (x86-64 AVX2 + FMA + F16C), built on first use by kernels/cpu_ext.py.
//
// GEMV/GEMM over GGUF-quantised weights kept in their file layout ([N, row_bytes] uint8, one
// row of blocks per output feature), and the small fused ops of a decode step: RMSNorm with the
// residual add, SiLU-and-mul, NeoX rotary embedding, and paged decode attention that also
// writes the step's K/V into the cache; and DecodeStack, which runs a dense decoder's whole
// decode step with them in one call. Everything computes in fp32; threads come from ATen's
// OpenMP pool (at::parallel_for, or one `omp parallel` region in DecodeStack: the same
// libgomp as torch's), so these kernels share torch's workers.
//
// Quantised dot products: every supported type is read as chunks of 32 weights with value
//   w = scale * q + min      (q: small integers held as floats)
// so for an activation row x:  sum(w * x) = scale * sum(q * x) + min * sum(x)
// where sum(x) over each 32-chunk is computed once per call. Block layouts follow ggml's
// (ggml-common.h): Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 are 32-weight blocks, Q4_K Q5_K Q6_K 256-weight
// super-blocks of 8 chunks.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>
#include <omp.h>

namespace {

inline float fp16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 16 bytes of uint8 -> two __m256 (elements 0..7, 8..15) as float
inline void u8x16_to_f32(__m128i v, __m256* out) {
  out[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
  out[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(v, 8)));
}

inline void i8x16_to_f32(__m128i v, __m256* out) {
  out[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
  out[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)));
}

// 32 bytes -> four __m256 of 8 floats each
inline void u8x32_to_f32(__m256i v, __m256* q) {
  u8x16_to_f32(_mm256_castsi256_si128(v), q);
  u8x16_to_f32(_mm256_extracti128_si256(v, 1), q + 2);
}

inline void i8x32_to_f32(__m256i v, __m256* q) {
  i8x16_to_f32(_mm256_castsi256_si128(v), q);
  i8x16_to_f32(_mm256_extracti128_si256(v, 1), q + 2);
}

// The 5th bits of a Q5_0/Q5_1 block (uint32, bit j = element j) as 32 bytes of 0 or 16.
inline __m256i q5_high_bits(const uint8_t* qh) {
  uint32_t bits;
  std::memcpy(&bits, qh, 4);
  // Byte i of the result takes byte i/8 of `bits`, then tests bit i%8 of it.
  const __m256i shuf = _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL,
                                         0x0101010101010101LL, 0x0000000000000000LL);
  __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)), shuf);
  const __m256i sel = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ULL));
  v = _mm256_cmpeq_epi8(_mm256_and_si256(v, sel), sel);
  return _mm256_and_si256(v, _mm256_set1_epi8(16));
}

// Nibbles of a 32-weight block (16 bytes): low nibbles are elements 0..15, high 16..31.
inline __m256i nibbles32(const uint8_t* qs) {
  __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i m4 = _mm_set1_epi8(0x0F);
  __m128i lo = _mm_and_si128(raw, m4);
  __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), m4);
  return _mm256_set_m128i(hi, lo);
}

// The 32 nibbles of a 16-byte block straight to floats: bytes widen to 32-bit lanes from memory,
// then the low nibble (elements 0..15) is a mask and the high one (16..31) a shift away.
inline void nibble_block_to_f32(const uint8_t* qs, __m256* q) {
  const __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs)));
  const __m256i b1 =
      _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + 8)));
  const __m256i m4 = _mm256_set1_epi32(0x0F);
  q[0] = _mm256_cvtepi32_ps(_mm256_and_si256(b0, m4));
  q[1] = _mm256_cvtepi32_ps(_mm256_and_si256(b1, m4));
  q[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4));
  q[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4));
}

// K-quant 6-bit (scale, min) of sub-block j from the 12-byte field (ggml get_scale_min_k4).
inline void k_scale_min(int j, const uint8_t* s, int* sc, int* mn) {
  if (j < 4) {
    *sc = s[j] & 63;
    *mn = s[j + 4] & 63;
  } else {
    *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
    *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// Each type: QK weights per block of BYTES bytes, NC = QK / 32 chunks; scales() fills the
// per-chunk scale and min of a block, chunk() the chunk's q values as 4 x 8 floats.
struct Q4_0 {
  static constexpr int QK = 32, BYTES = 18, NC = 1;
  static constexpr bool SIGNED = false;
  static constexpr int SUB = 1;
  static __m256i I(const uint8_t* b, int) { return nibbles32(b + 2); }
  static void scales(const uint8_t* b, float* sc, float* mn) {
    sc[0] = fp16(b);
    mn[0] = -8.0f * sc[0];
  }
  static void chunk(const uint8_t* b, int, __m256* q) { nibble_block_to_f32(b + 2, q); }
};

struct Q4_1 {
  static constexpr int QK = 32, BYTES = 20, NC = 1;
  static constexpr bool SIGNED = false;
  static constexpr int SUB = 1;
  static __m256i I(const uint8_t* b, int) { return nibbles32(b + 4); }
  static void scales(const uint8_t* b, float* sc, float* mn) {
    sc[0] = fp16(b);
    mn[0] = fp16(b + 2);
  }
  static void chunk(const uint8_t* b, int, __m256* q) { nibble_block_to_f32(b + 4, q); }
};

struct Q5_0 {
  static constexpr int QK = 32, BYTES = 22, NC = 1;
  static constexpr bool SIGNED = false;
  static constexpr int SUB = 1;
  static __m256i I(const uint8_t* b, int) {
    return _mm256_or_si256(nibbles32(b + 6), q5_high_bits(b + 2));
  }
  static void scales(const uint8_t* b, float* sc, float* mn) {
    sc[0] = fp16(b);
    mn[0] = -16.0f * sc[0];
  }
  static void chunk(const uint8_t* b, int, __m256* q) {
    u8x32_to_f32(_mm256_or_si256(nibbles32(b + 6), q5_high_bits(b + 2)), q);
  }
};

struct Q5_1 {
  static constexpr int QK = 32, BYTES = 24, NC = 1;
  static constexpr bool SIGNED = false;
  static constexpr int SUB = 1;
  static __m256i I(const uint8_t* b, int) {
    return _mm256_or_si256(nibbles32(b + 8), q5_high_bits(b + 4));
  }
  static void scales(const uint8_t* b, float* sc, float* mn) {
    sc[0] = fp16(b);
    mn[0] = fp16(b + 2);
  }
  static void chunk(const uint8_t* b, int, __m256* q) {
    u8x32_to_f32(_mm256_or_si256(nibbles32(b + 8), q5_high_bits(b + 4)), q);
  }
};

struct Q8_0 {
  static constexpr int QK = 32, BYTES = 34, NC = 1;
  static constexpr bool SIGNED = true;
  static constexpr int SUB = 1;
  static __m256i I(const uint8_t* b, int) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2));
  }
  static void scales(const uint8_t* b, float* sc, float* mn) {
    sc[0] = fp16(b);
    mn[0] = 0.0f;
  }
  static void chunk(const uint8_t* b, int, __m256* q) {
    for (int i = 0; i < 4; ++i)
      q[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 2 + 8 * i))));
  }
};

inline void k4_scales(const uint8_t* b, float* sc, float* mn) {
  const float d = fp16(b), dmin = fp16(b + 2);
  for (int j = 0; j < 8; ++j) {
    int s, m;
    k_scale_min(j, b + 4, &s, &m);
    sc[j] = d * static_cast<float>(s);
    mn[j] = -dmin * static_cast<float>(m);
  }
}

// Chunk c of a Q4_K/Q5_K super-block: the low (c even) or high (c odd) nibbles of 32 bytes.
inline __m256i k_nibbles(const uint8_t* qs, int c) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * (c / 2)));
  if (c & 1) raw = _mm256_srli_epi16(raw, 4);
  return _mm256_and_si256(raw, _mm256_set1_epi8(0x0F));
}

struct Q4_K {
  static constexpr int QK = 256, BYTES = 144, NC = 8;
  static constexpr bool SIGNED = false;
  static constexpr int SUB = 1;
  static __m256i I(const uint8_t* b, int c) { return k_nibbles(b + 16, c); }
  static void scales(const uint8_t* b, float* sc, float* mn) { k4_scales(b, sc, mn); }
  static void chunk(const uint8_t* b, int c, __m256* q) { u8x32_to_f32(k_nibbles(b + 16, c), q); }
};

struct Q5_K {
  static constexpr int QK = 256, BYTES = 176, NC = 8;
  static constexpr bool SIGNED = false;
  static constexpr int SUB = 1;
  static void scales(const uint8_t* b, float* sc, float* mn) { k4_scales(b, sc, mn); }
  static __m256i I(const uint8_t* b, int c) {
    // bit c of qh[l] is the 5th bit of element l of chunk c
    __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16));
    __m256i hi = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(c)), _mm256_set1_epi8(1));
    hi = _mm256_slli_epi16(hi, 4);  // bytes are 0 or 1 before the shift, so no spill across bytes
    return _mm256_or_si256(k_nibbles(b + 48, c), hi);
  }
  static void chunk(const uint8_t* b, int c, __m256* q) { u8x32_to_f32(I(b, c), q); }
};

struct Q6_K {
  // ql[128] qh[64] scales[16] (int8) d (fp16); each chunk has two 16-weight sub-scales, folded
  // into q by chunk() (float path) or applied per lane by the int8 path (SUB = 2).
  static constexpr int QK = 256, BYTES = 210, NC = 8;
  static constexpr bool SIGNED = true;
  static constexpr int SUB = 2;
  static void scales(const uint8_t* b, float* sc, float* mn) {
    const float d = fp16(b + 208);
    for (int c = 0; c < 8; ++c) {
      sc[c] = d;
      mn[c] = 0.0f;
    }
  }
  // chunk c's q - 32 as signed bytes; g: 0 low nibbles of ql[0:32], 1 of ql[32:64], 2/3 high
  static __m256i I(const uint8_t* b, int c) {
    const int half = c / 4, g = c % 4;
    const uint8_t* ql = b + 64 * half + 32 * (g & 1);
    const uint8_t* qh = b + 128 + 32 * half;
    __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql));
    if (g >= 2) lo = _mm256_srli_epi16(lo, 4);
    lo = _mm256_and_si256(lo, _mm256_set1_epi8(0x0F));
    __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh));
    hi = _mm256_and_si256(_mm256_srl_epi16(hi, _mm_cvtsi32_si128(2 * g)), _mm256_set1_epi8(3));
    return _mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)), _mm256_set1_epi8(32));
  }
  static const int8_t* sub(const uint8_t* b, int c) {
    return reinterpret_cast<const int8_t*>(b + 192) + 8 * (c / 4) + 2 * (c % 4);
  }
  static void chunk(const uint8_t* b, int c, __m256* q) {
    i8x32_to_f32(I(b, c), q);
    const int8_t* s = sub(b, c);
    const __m256 s0 = _mm256_set1_ps(static_cast<float>(s[0]));
    const __m256 s1 = _mm256_set1_ps(static_cast<float>(s[1]));
    q[0] = _mm256_mul_ps(q[0], s0);
    q[1] = _mm256_mul_ps(q[1], s0);
    q[2] = _mm256_mul_ps(q[2], s1);
    q[3] = _mm256_mul_ps(q[3], s1);
  }
  // the two sub-scales of chunk c times d
  static void sub_scales(const uint8_t* b, int c, float* s2) {
    const float d = fp16(b + 208);
    const int8_t* s = sub(b, c);
    s2[0] = d * static_cast<float>(s[0]);
    s2[1] = d * static_cast<float>(s[1]);
  }
};

// ---------------------------------------------------------------------------------------------
// GEMV / small GEMM: y[M, N] = x[M, K] W^T for up to MR activation rows at a time per weight row.

// A row's result: its accumulator's lanes plus the min term sum(min_c * sum(x)_c) over chunks.
inline float finish_row(__m256 acc, const float* mins, const float* sx, int64_t nchunks) {
  __m256 m = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= nchunks; i += 8)
    m = _mm256_fmadd_ps(_mm256_loadu_ps(mins + i), _mm256_loadu_ps(sx + i), m);
  float tail = 0.0f;
  for (; i < nchunks; ++i) tail += mins[i] * sx[i];
  return hsum(acc) + hsum(m) + tail;
}

template <class T, int MR>
inline void dot_rows(const uint8_t* wrow, int64_t K, const float* x, const float* sx,
                     float* mins, float* out) {
  // mins: scratch of K / 32 floats, each chunk's min; sum(min * sum(x)) is done after the loop
  const int64_t nb = K / T::QK, nchunks = K / 32;
  __m256 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm256_setzero_ps();
  float sc[T::NC];
  __m256 q[4];
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = wrow + b * T::BYTES;
    T::scales(blk, sc, mins + b * T::NC);
    for (int c = 0; c < T::NC; ++c) {
      T::chunk(blk, c, q);
      const int64_t ci = b * T::NC + c;
      const __m256 s = _mm256_set1_ps(sc[c]);
      for (int r = 0; r < MR; ++r) {
        const float* xr = x + r * K + ci * 32;
        __m256 t = _mm256_mul_ps(q[0], _mm256_loadu_ps(xr));
        t = _mm256_fmadd_ps(q[1], _mm256_loadu_ps(xr + 8), t);
        t = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(xr + 16), t);
        t = _mm256_fmadd_ps(q[3], _mm256_loadu_ps(xr + 24), t);
        acc[r] = _mm256_fmadd_ps(s, t, acc[r]);
      }
    }
  }
  for (int r = 0; r < MR; ++r) out[r] = finish_row(acc[r], mins, sx + r * nchunks, nchunks);
}

// Calls dot(wrow, m, std::integral_constant<int, R>{}, scratch, out) for weight rows n0..n1-1 and
// every tile of R <= 4 activation rows m..m+R-1 (scratch: K / 32 floats), and stores out[r]
// into y[m + r, n].
template <class Dot>
void tile_range(int64_t M, int64_t N, int64_t row_bytes, int64_t n0, int64_t n1,
                const uint8_t* w, float* y, float* scratch, Dot&& dot) {
  constexpr int MR = 4;
  float out[MR];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wrow = w + n * row_bytes;
    int64_t m = 0;
    for (; m + MR <= M; m += MR) {
      dot(wrow, m, std::integral_constant<int, MR>{}, scratch, out);
      for (int r = 0; r < MR; ++r) y[(m + r) * N + n] = out[r];
    }
    for (; m < M; ++m) {
      dot(wrow, m, std::integral_constant<int, 1>{}, scratch, out);
      y[m * N + n] = out[0];
    }
  }
}

// Per-thread scratch of the exact GEMV: each chunk's min for up to kNR weight rows, and the
// accumulators of an (activation row, weight row) tile.
constexpr int kNR = 4;

struct GemvScratch {
  std::vector<float> mins;
  std::vector<__m256> acc;
  void reserve(int64_t M, int64_t K) {
    if (static_cast<int64_t>(mins.size()) < kNR * (K / 32))
      mins.resize(static_cast<size_t>(kNR * (K / 32)));
    if (static_cast<int64_t>(acc.size()) < M * kNR) acc.resize(static_cast<size_t>(M * kNR));
  }
};

// The exact GEMV takes weight rows kNR at a time (tile_nr) once the activation rows outgrow L1
// (32 KB on the Zen 3 this was tuned on: measured better from 8 rows x 1536 or 16 x 576 floats
// on, worse at 8 or 12 x 576); otherwise activation rows MR at a time (tile_range + dot_rows).
inline bool use_tile_nr(int64_t M, int64_t K) { return M >= 8 && M * K >= 8192; }

// y[m, n0 + n] for every activation row m < M and weight rows n0..n0+NR-1. Each weight chunk is
// decoded once into a small buffer and each activation chunk loaded once for the NR rows, so
// many activation rows (which no longer fit L1) are read NR times less often than by dot_rows.
// Every (m, n) accumulates exactly as dot_rows does (same operations, same order): the result
// is dot_rows' bit for bit.
template <class T, int NR>
void tile_nr(const uint8_t* w, int64_t row_bytes, int64_t K, int64_t M, const float* x,
             const float* sx, GemvScratch& scratch, float* y, int64_t N, int64_t n0) {
  const int64_t nb = K / T::QK, nchunks = K / 32;
  float* mins = scratch.mins.data();
  __m256* acc = scratch.acc.data();
  for (int64_t i = 0; i < M * NR; ++i) acc[i] = _mm256_setzero_ps();
  alignas(32) float qbuf[NR][32];
  float sc[NR][T::NC];
  for (int64_t b = 0; b < nb; ++b) {
    for (int n = 0; n < NR; ++n)
      T::scales(w + n * row_bytes + b * T::BYTES, sc[n], mins + n * nchunks + b * T::NC);
    for (int c = 0; c < T::NC; ++c) {
      const int64_t ci = b * T::NC + c;
      __m256 s[NR];
      for (int n = 0; n < NR; ++n) {
        __m256 q[4];
        T::chunk(w + n * row_bytes + b * T::BYTES, c, q);
        for (int i = 0; i < 4; ++i) _mm256_store_ps(qbuf[n] + 8 * i, q[i]);
        s[n] = _mm256_set1_ps(sc[n][c]);
      }
      for (int64_t m = 0; m < M; ++m) {
        const float* xr = x + m * K + ci * 32;
        const __m256 x0 = _mm256_loadu_ps(xr), x1 = _mm256_loadu_ps(xr + 8);
        const __m256 x2 = _mm256_loadu_ps(xr + 16), x3 = _mm256_loadu_ps(xr + 24);
#pragma GCC unroll 4
        for (int n = 0; n < NR; ++n) {
          __m256 t = _mm256_mul_ps(_mm256_load_ps(qbuf[n]), x0);
          t = _mm256_fmadd_ps(_mm256_load_ps(qbuf[n] + 8), x1, t);
          t = _mm256_fmadd_ps(_mm256_load_ps(qbuf[n] + 16), x2, t);
          t = _mm256_fmadd_ps(_mm256_load_ps(qbuf[n] + 24), x3, t);
          acc[m * NR + n] = _mm256_fmadd_ps(s[n], t, acc[m * NR + n]);
        }
      }
    }
  }
  for (int64_t m = 0; m < M; ++m)
    for (int n = 0; n < NR; ++n)
      y[m * N + n0 + n] = finish_row(acc[m * NR + n], mins + n * nchunks, sx + m * nchunks,
                                     nchunks);
}

// Weight rows per task: ~16 KB of weights keeps both cores busy on the small projections.
inline int64_t row_grain(int64_t row_bytes) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(row_bytes, 1));
}

// One GEMV input, prepared once and read by every weight row: each 32-chunk's sum (the min
// term, both paths) and, for the int8 path, the int8 copy and its per-chunk scales.
struct Acts {
  const float* x = nullptr;
  int64_t M = 0, K = 0;
  bool int8 = false;
  std::vector<float> sx, dx;
  std::vector<int8_t> xq;
  void prepare(const float* x_, int64_t M_, int64_t K_, bool int8_);
};

void quantize_row_q8(const float* x, int64_t K, int8_t* q, float* d, float* s);

void Acts::prepare(const float* x_, int64_t M_, int64_t K_, bool int8_) {
  x = x_;
  M = M_;
  K = K_;
  int8 = int8_;
  const int64_t nchunks = K / 32;
  sx.resize(static_cast<size_t>(M * nchunks));
  if (int8) {
    xq.resize(static_cast<size_t>(M * K));
    dx.resize(static_cast<size_t>(M * nchunks));
    for (int64_t m = 0; m < M; ++m)
      quantize_row_q8(x + m * K, K, xq.data() + m * K, dx.data() + m * nchunks,
                      sx.data() + m * nchunks);
    return;
  }
  for (int64_t i = 0; i < M * nchunks; ++i) {
    const float* p = x + i * 32;
    __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)),
                             _mm256_add_ps(_mm256_loadu_ps(p + 16), _mm256_loadu_ps(p + 24)));
    sx[static_cast<size_t>(i)] = hsum(s);
  }
}

template <class T, int MR>
void dot_rows_i8(const uint8_t* wrow, int64_t K, const int8_t* xq, const float* dx,
                 const float* sx, float* out);

// y[:, n0:n1] = x W[n0:n1]^T for the prepared activations (y is [M, N]).
template <class T>
void gemv_rows(const Acts& a, const uint8_t* w, int64_t N, int64_t n0, int64_t n1, float* y,
               GemvScratch& scratch) {
  const int64_t K = a.K, nchunks = K / 32, row_bytes = K / T::QK * T::BYTES;
  scratch.reserve(a.M, K);
  if (a.int8) {
    tile_range(a.M, N, row_bytes, n0, n1, w, y, scratch.mins.data(),
               [&](const uint8_t* wrow, int64_t m, auto mr, float*, float* out) {
                 dot_rows_i8<T, decltype(mr)::value>(wrow, K, a.xq.data() + m * K,
                                                     a.dx.data() + m * nchunks,
                                                     a.sx.data() + m * nchunks, out);
               });
    return;
  }
  if (use_tile_nr(a.M, K)) {
    for (; n0 + kNR <= n1; n0 += kNR)
      tile_nr<T, kNR>(w + n0 * row_bytes, row_bytes, K, a.M, a.x, a.sx.data(), scratch, y, N, n0);
  }
  tile_range(a.M, N, row_bytes, n0, n1, w, y, scratch.mins.data(),
             [&](const uint8_t* wrow, int64_t m, auto mr, float* mins, float* out) {
               dot_rows<T, decltype(mr)::value>(wrow, K, a.x + m * K, a.sx.data() + m * nchunks,
                                                mins, out);
             });
}

template <class T>
void dequant_impl(const uint8_t* w, int64_t K, const int64_t* rows, int64_t R, float* y) {
  const int64_t row_bytes = K / T::QK * T::BYTES, nb = K / T::QK;
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    float sc[T::NC], mn[T::NC];
    __m256 q[4];
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* wrow = w + (rows ? rows[r] : r) * row_bytes;
      float* out = y + r * K;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = wrow + b * T::BYTES;
        T::scales(blk, sc, mn);
        for (int c = 0; c < T::NC; ++c) {
          T::chunk(blk, c, q);
          const __m256 s = _mm256_set1_ps(sc[c]), m = _mm256_set1_ps(mn[c]);
          float* o = out + (b * T::NC + c) * 32;
          for (int i = 0; i < 4; ++i) _mm256_storeu_ps(o + 8 * i, _mm256_fmadd_ps(q[i], s, m));
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// The same products with the activations quantised to int8 per 32-chunk (xq = round(x / dx),
// dx = max|x| / 127, as llama.cpp's Q8 activations): sum(q * xq) in int16/int32 lanes through
// maddubs (u8 x s8 pairs) and madd, one int->float conversion per chunk. The min term keeps the
// exact float sum(x). I(...) gives a chunk's weights as 32 unsigned bytes (or signed, SIGNED),
// SUB = 2 when a chunk has two 16-weight sub-scales (Q6_K).

void quantize_row_q8(const float* x, int64_t K, int8_t* q, float* d, float* s) {
  for (int64_t c = 0; c < K / 32; ++c) {
    const float* p = x + c * 32;
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(p + 8 * i);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
      sum = _mm256_add_ps(sum, v[i]);
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    const float mx = _mm_cvtss_f32(m);
    const float dx = mx / 127.0f;
    d[c] = dx;
    s[c] = hsum(sum);
    const __m256 inv = _mm256_set1_ps(dx > 0.0f ? 1.0f / dx : 0.0f);
    __m256i i32[4];
    for (int i = 0; i < 4; ++i)
      i32[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], inv),
                                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    // pack 32 x int32 -> 32 x int8 in element order
    __m256i p16a = _mm256_packs_epi32(i32[0], i32[1]);
    __m256i p16b = _mm256_packs_epi32(i32[2], i32[3]);
    __m256i p8 = _mm256_packs_epi16(p16a, p16b);
    p8 = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + c * 32), p8);
  }
}

// 32 weight bytes . 32 int8 activations -> 8 int32 lanes (lane i sums elements 4i..4i+3)
template <bool SIGNED>
inline __m256i dot_i8(__m256i w, __m256i xq) {
  __m256i p;
  if (SIGNED) {  // maddubs wants unsigned x signed: move w's sign onto x
    p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xq, w));
  } else {
    p = _mm256_maddubs_epi16(w, xq);
  }
  return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

template <class T, int MR>
void dot_rows_i8(const uint8_t* wrow, int64_t K, const int8_t* xq, const float* dx,
                 const float* sx, float* out) {
  const int64_t nb = K / T::QK, nchunks = K / 32;
  __m256 acc[MR];
  float macc[MR];
  for (int r = 0; r < MR; ++r) {
    acc[r] = _mm256_setzero_ps();
    macc[r] = 0.0f;
  }
  float sc[T::NC], mn[T::NC];
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = wrow + b * T::BYTES;
    T::scales(blk, sc, mn);
    for (int c = 0; c < T::NC; ++c) {
      const __m256i w = T::I(blk, c);
      const int64_t ci = b * T::NC + c;
      __m256 s;
      if constexpr (T::SUB == 2) {
        float s2[2];
        T::sub_scales(blk, c, s2);
        s = _mm256_set_m128(_mm_set1_ps(s2[1]), _mm_set1_ps(s2[0]));
      } else {
        s = _mm256_set1_ps(sc[c]);
      }
      for (int r = 0; r < MR; ++r) {
        const __m256i x = _mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(xq + r * K + ci * 32));
        const __m256 v = _mm256_cvtepi32_ps(dot_i8<T::SIGNED>(w, x));
        acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(s, _mm256_set1_ps(dx[r * nchunks + ci])), v,
                                 acc[r]);
        if constexpr (T::SUB == 1) macc[r] += mn[c] * sx[r * nchunks + ci];
      }
    }
  }
  for (int r = 0; r < MR; ++r) out[r] = hsum(acc[r]) + macc[r];
}

// ggml type ids (gguf.py GGMLType)
enum : int64_t { kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ4_K = 12,
                 kQ5_K = 13, kQ6_K = 14 };

template <class F>
void dispatch_type(int64_t qtype, F&& f) {
  switch (qtype) {
    case kQ4_0: f(Q4_0{}); break;
    case kQ4_1: f(Q4_1{}); break;
    case kQ5_0: f(Q5_0{}); break;
    case kQ5_1: f(Q5_1{}); break;
    case kQ8_0: f(Q8_0{}); break;
    case kQ4_K: f(Q4_K{}); break;
    case kQ5_K: f(Q5_K{}); break;
    case kQ6_K: f(Q6_K{}); break;
    default: TORCH_CHECK(false, "moeflow cpu_ops: unsupported ggml type ", qtype);
  }
}

template <class T>
void check_weight(const at::Tensor& w, int64_t K) {
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous(),
              "quantised weight must be a contiguous 2-D uint8 tensor");
  TORCH_CHECK(K % T::QK == 0, "in_features ", K, " is not a multiple of the block size ", T::QK);
  TORCH_CHECK(w.size(1) == K / T::QK * T::BYTES, "weight rows hold ", w.size(1),
              " bytes, expected ", K / T::QK * T::BYTES);
}

void check_f32(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.device().is_cpu(), what,
              " must be a contiguous float32 CPU tensor");
}

}  // namespace

// x [M, K] float32, w [N, row_bytes] uint8 -> [M, N] float32; int8: quantise x to int8 per
// 32-chunk for the products (llama.cpp's scheme) instead of using it as is.
at::Tensor qgemm_any(const at::Tensor& x, const at::Tensor& w, int64_t qtype, bool int8) {
  check_f32(x, "x");
  TORCH_CHECK(x.dim() == 2, "x must be 2-D");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  dispatch_type(qtype, [&](auto t) {
    using T = decltype(t);
    check_weight<T>(w, K);
    Acts a;
    a.prepare(x.data_ptr<float>(), M, K, int8);
    const uint8_t* wp = w.data_ptr<uint8_t>();
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, N, row_grain(w.size(1)), [&](int64_t n0, int64_t n1) {
      GemvScratch scratch;
      gemv_rows<T>(a, wp, N, n0, n1, yp, scratch);
    });
  });
  return y;
}

at::Tensor qgemm(const at::Tensor& x, const at::Tensor& w, int64_t qtype) {
  return qgemm_any(x, w, qtype, false);
}

at::Tensor qgemm_i8(const at::Tensor& x, const at::Tensor& w, int64_t qtype) {
  return qgemm_any(x, w, qtype, true);
}

// rows: optional int64 row indices (an embedding lookup); none -> every row. -> [R, K] float32
at::Tensor dequantize(const at::Tensor& w, int64_t qtype, int64_t K,
                      const c10::optional<at::Tensor>& rows) {
  const int64_t* idx = nullptr;
  int64_t R = w.size(0);
  if (rows.has_value()) {
    TORCH_CHECK(rows->scalar_type() == at::kLong && rows->dim() == 1 && rows->is_contiguous(),
                "rows must be a contiguous 1-D int64 tensor");
    idx = rows->data_ptr<int64_t>();
    R = rows->size(0);
    for (int64_t i = 0; i < R; ++i)
      TORCH_CHECK(idx[i] >= 0 && idx[i] < w.size(0), "row index ", idx[i], " out of range");
  }
  at::Tensor y = at::empty({R, K}, at::TensorOptions().dtype(at::kFloat));
  dispatch_type(qtype, [&](auto t) {
    using T = decltype(t);
    check_weight<T>(w, K);
    dequant_impl<T>(w.data_ptr<uint8_t>(), K, idx, R, y.data_ptr<float>());
  });
  return y;
}

// ---------------------------------------------------------------------------------------------
// The other ops of a decode step as row functions, shared by the single ops and the fused
// decode stack below: RMSNorm with the residual add, SiLU-and-mul, NeoX rotary embedding, and
// paged decode attention.

namespace {

// exp(x) for 8 floats: Cody-Waite range reduction and a degree-5 polynomial on [-ln2/2, ln2/2]
// (the Cephes expf scheme); relative error ~2e-7, underflows to 0 below -87.3.
inline __m256 exp256(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-87.3365447504f);
  x = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
  const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
  __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT |
                                                         _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)),
                                23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

void check_rows(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu() && t.dim() == 3 &&
                  t.stride(2) == 1 && t.stride(1) == t.size(2),
              what, " must be a float32 CPU [T, heads, D] view with contiguous heads");
}

// out = w * v / rms(v) over E values, v = x, or (add) v = residual + x stored into residual
// first. out may alias x when !add.
inline void rms_row(const float* x, float* residual, bool add, const float* w, int64_t E,
                    float eps, float* out) {
  const float* v = x;
  double ss = 0.0;
  if (add) {
    for (int64_t i = 0; i < E; ++i) {
      const float t = residual[i] + x[i];
      residual[i] = t;
      ss += static_cast<double>(t) * t;
    }
    v = residual;
  } else {
    for (int64_t i = 0; i < E; ++i) ss += static_cast<double>(x[i]) * x[i];
  }
  const float inv = 1.0f / std::sqrt(static_cast<float>(ss / E) + eps);
  for (int64_t i = 0; i < E; ++i) out[i] = w[i] * (v[i] * inv);
}

// o = silu(g) * u over I values
inline void silu_row(const float* g, const float* u, float* o, int64_t I) {
  const __m256 one = _mm256_set1_ps(1.0f);
  int64_t i = 0;
  for (; i + 8 <= I; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    const __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), gv));
    const __m256 s = _mm256_div_ps(gv, _mm256_add_ps(one, e));
    _mm256_storeu_ps(o + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
  }
  for (; i < I; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

// NeoX rotation of one head's first R dims in place; c, s: the position's cos/sin rows [R].
inline void rope_head(float* x, const float* c, const float* s, int64_t R) {
  const int64_t half = R / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = x[i], x2 = x[i + half];
    x[i] = x1 * c[i] - x2 * s[i];
    x[i + half] = x2 * c[i + half] + x1 * s[i + half];
  }
}

// Paged decode attention of one sequence's new token over its cached context (which already
// holds that token's K/V). Cache [N, S, Hkv, D] float32; tables [B, maxb]; lens include the new
// token; window > 0 keeps the last `window` keys.
struct PagedCtx {
  const float* kc;
  const float* vc;
  int64_t S, Hkv, D;
  const int64_t* tables;
  int64_t maxb;
  const int64_t* lens;
  int64_t window;
  float scale;
};

// Attention of one (sequence, KV head) is split into tasks of up to kKeySplit keys each (split
// by context length only, so a sequence's result never depends on its batch or the thread
// count); each task leaves a partial result that attend_merge combines (flash-decoding).
constexpr int64_t kKeySplit = 128;

inline int64_t first_key(const PagedCtx& c, int64_t b) {
  return c.window > 0 ? std::max<int64_t>(0, c.lens[b] - c.window) : 0;
}

inline int64_t key_splits(const PagedCtx& c, int64_t b) {
  return (c.lens[b] - first_key(c, b) + kKeySplit - 1) / kKeySplit;
}

// Floats per query head of a partial result: D of sum(p_j v_j), then the max score, then
// sum(p_j) with p_j = exp(score_j - max).
inline int64_t part_size(int64_t D) { return D + 2; }

// Query heads 0..ng-1 of KV head hk of sequence b (q: their rows, D floats apart) over the keys
// of split `split` -> part[ng][part_size(D)]. p: scratch of ng * kKeySplit floats. Keys are
// visited block by block (no division per key); the heads share every K/V row read.
void attend_part(const PagedCtx& c, int64_t b, int64_t hk, int64_t ng, const float* q,
                 int64_t split, float* part, float* p) {
  const int64_t S = c.S, D = c.D, tok = c.Hkv * D, PS = part_size(D);
  const int64_t k0 = first_key(c, b) + split * kKeySplit;
  const int64_t k1 = std::min(c.lens[b], k0 + kKeySplit), n = k1 - k0;
  const int64_t* table = c.tables + b * c.maxb;
  // offsets of the split's keys (head hk) in the cache, visited block by block (no division
  // per key)
  int64_t rows[kKeySplit];
  for (int64_t blk = k0 / S, j = 0; blk * S < k1; ++blk) {
    const int64_t j0 = std::max(blk * S, k0), j1 = std::min(blk * S + S, k1);
    const int64_t base = table[blk] * S - blk * S;  // slot of key j = base + j
    for (int64_t jj = j0; jj < j1; ++jj) rows[j++] = (base + jj) * tok + hk * D;
  }
  // scores: 4 keys x 2 query heads at a time (each K row loaded once for both heads), one FMA
  // chain per (key, head) over D
  for (int64_t g0 = 0; g0 < ng; g0 += 2) {
    const bool two = g0 + 1 < ng;
    const float* qa = q + g0 * D;
    const float* qb = two ? qa + D : qa;
    float* pa = p + g0 * kKeySplit;
    float* pb = two ? pa + kKeySplit : pa;
    for (int64_t j0 = 0; j0 < n; j0 += 4) {
      const float* kr[4];
      for (int64_t u = 0; u < 4; ++u) kr[u] = c.kc + rows[std::min(j0 + u, n - 1)];
      __m256 aa[4], ab[4];
      for (int u = 0; u < 4; ++u) aa[u] = ab[u] = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; d += 8) {
        const __m256 qva = _mm256_loadu_ps(qa + d), qvb = _mm256_loadu_ps(qb + d);
        for (int u = 0; u < 4; ++u) {
          const __m256 kv = _mm256_loadu_ps(kr[u] + d);
          aa[u] = _mm256_fmadd_ps(qva, kv, aa[u]);
          ab[u] = _mm256_fmadd_ps(qvb, kv, ab[u]);
        }
      }
      const int64_t cnt = std::min<int64_t>(4, n - j0);  // the padding lanes are dropped
      auto reduce = [&](const __m256* acc4, float* pg) {
        const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(acc4[0], acc4[1]),
                                        _mm256_hadd_ps(acc4[2], acc4[3]));
        const __m128 r = _mm_mul_ps(_mm_add_ps(_mm256_castps256_ps128(t),
                                               _mm256_extractf128_ps(t, 1)),
                                    _mm_set1_ps(c.scale));
        alignas(16) float rs[4];
        _mm_store_ps(rs, r);
        for (int64_t u = 0; u < cnt; ++u) pg[j0 + u] = rs[u];
      };
      reduce(aa, pa);
      if (two) reduce(ab, pb);
    }
  }
  for (int64_t g = 0; g < ng; ++g) {
    float* pg = p + g * kKeySplit;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < n; ++j) mx = std::max(mx, pg[j]);
    float denom = 0.0f;
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(pg + j), _mm256_set1_ps(mx)));
      _mm256_storeu_ps(pg + j, e);
      denom += hsum(e);
    }
    for (; j < n; ++j) {
      pg[j] = std::exp(pg[j] - mx);
      denom += pg[j];
    }
    part[g * PS + D] = mx;
    part[g * PS + D + 1] = denom;
  }
  // sum p_j v_j: 2 query heads x 32-wide slices of D at a time (each V row loaded once for both
  // heads), the accumulators in registers
  for (int64_t g0 = 0; g0 < ng; g0 += 2) {
    const bool two = g0 + 1 < ng;
    const float* pa = p + g0 * kKeySplit;
    const float* pb = two ? pa + kKeySplit : pa;
    for (int64_t d0 = 0; d0 < D; d0 += 32) {
      const int64_t nch = std::min<int64_t>(4, (D - d0) / 8);
      __m256 aa[4], ab[4];
      for (int u = 0; u < 4; ++u) aa[u] = ab[u] = _mm256_setzero_ps();
      for (int64_t j = 0; j < n; ++j) {
        const float* vv = c.vc + rows[j] + d0;
        const __m256 wa = _mm256_set1_ps(pa[j]), wb = _mm256_set1_ps(pb[j]);
        if (nch == 4) {
#pragma GCC unroll 4
          for (int u = 0; u < 4; ++u) {
            const __m256 v = _mm256_loadu_ps(vv + 8 * u);
            aa[u] = _mm256_fmadd_ps(wa, v, aa[u]);
            ab[u] = _mm256_fmadd_ps(wb, v, ab[u]);
          }
        } else {
          for (int u = 0; u < nch; ++u) {
            const __m256 v = _mm256_loadu_ps(vv + 8 * u);
            aa[u] = _mm256_fmadd_ps(wa, v, aa[u]);
            ab[u] = _mm256_fmadd_ps(wb, v, ab[u]);
          }
        }
      }
      for (int u = 0; u < nch; ++u) {
        _mm256_storeu_ps(part + g0 * PS + d0 + 8 * u, aa[u]);
        if (two) _mm256_storeu_ps(part + (g0 + 1) * PS + d0 + 8 * u, ab[u]);
      }
    }
  }
}

// The nsplit partial results of ng query heads (parts[nsplit][ng][part_size(D)]) -> out [ng, D]
void attend_merge(int64_t ng, int64_t D, const float* parts, int64_t nsplit, float* out) {
  const int64_t PS = part_size(D);
  for (int64_t g = 0; g < ng; ++g) {
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t s = 0; s < nsplit; ++s) mx = std::max(mx, parts[(s * ng + g) * PS + D]);
    float denom = 0.0f;
    float* o = out + g * D;
    for (int64_t d = 0; d < D; ++d) o[d] = 0.0f;
    for (int64_t s = 0; s < nsplit; ++s) {
      const float* pt = parts + (s * ng + g) * PS;
      const float w = std::exp(pt[D] - mx);  // exactly 1 for the split holding the max
      denom += pt[D + 1] * w;
      for (int64_t d = 0; d < D; ++d) o[d] += pt[d] * w;
    }
    const float inv = 1.0f / denom;
    for (int64_t d = 0; d < D; ++d) o[d] *= inv;
  }
}

// The attention tasks of a batch: (sequence, KV head, key split), ordered so that the splits of
// one (sequence, KV head) are adjacent; first[b] is sequence b's first task.
struct AttnTasks {
  std::vector<int64_t> first, splits;
  int64_t total = 0;
  AttnTasks(const PagedCtx& c, int64_t B) : first(B + 1), splits(B) {
    for (int64_t b = 0; b < B; ++b) {
      splits[b] = key_splits(c, b);
      first[b] = total;
      total += c.Hkv * splits[b];
    }
    first[B] = total;
  }
  // task t -> (b, hk, split)
  void decode(int64_t t, int64_t* b, int64_t* hk, int64_t* split) const {
    const int64_t bb = std::upper_bound(first.begin(), first.end() - 1, t) - first.begin() - 1;
    const int64_t r = t - first[bb];
    *b = bb;
    *hk = r / splits[bb];
    *split = r % splits[bb];
  }
};

// Checks the paged-cache arguments of B new tokens (one per sequence); returns the longest
// context. Caches [N, S, Hkv, D] float32.
int64_t check_paged(const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                    const at::Tensor& context_lens, int64_t B, int64_t Hkv, int64_t D) {
  check_f32(k_cache, "k_cache");
  check_f32(v_cache, "v_cache");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.size(2) == Hkv && k_cache.size(3) == D, "cache shape");
  TORCH_CHECK(D % 8 == 0, "head_dim must be a multiple of 8");
  for (const at::Tensor* t : {&slot_mapping, &block_tables, &context_lens})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), "index tensors: int64");
  TORCH_CHECK(slot_mapping.numel() == B && context_lens.numel() == B &&
                  block_tables.dim() == 2 && block_tables.size(0) == B, "batch sizes differ");
  const int64_t S = k_cache.size(1), nblocks = k_cache.size(0), maxb = block_tables.size(1);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  int64_t max_len = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(slots[b] >= 0 && slots[b] < nblocks * S, "slot out of range");
    TORCH_CHECK(lens[b] >= 1 && lens[b] <= maxb * S, "context length out of range");
    for (int64_t i = 0; i < (lens[b] + S - 1) / S; ++i)
      TORCH_CHECK(tables[b * maxb + i] >= 0 && tables[b * maxb + i] < nblocks, "bad block id");
    max_len = std::max(max_len, lens[b]);
  }
  return max_len;
}

PagedCtx paged_ctx(const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t window,
                   double scale) {
  return PagedCtx{k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), k_cache.size(1),
                  k_cache.size(2), k_cache.size(3), block_tables.data_ptr<int64_t>(),
                  block_tables.size(1), context_lens.data_ptr<int64_t>(), window,
                  static_cast<float>(scale)};
}

// k/v rows (Hkv * D floats each) into cache slot `slot`
inline void store_kv_row(float* kc, float* vc, int64_t slot, int64_t tok, const float* k,
                         const float* v) {
  std::memcpy(kc + slot * tok, k, tok * sizeof(float));
  std::memcpy(vc + slot * tok, v, tok * sizeof(float));
}

void check_positions(const at::Tensor& positions, int64_t T, int64_t P) {
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() &&
                  positions.numel() == T, "positions must be contiguous int64, one per token");
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(pos[t] >= 0 && pos[t] < P, "position out of range");
}

}  // namespace

// residual (when given) += x, in place; returns (rmsnorm(residual or x) * weight, residual or x)
std::vector<at::Tensor> rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                 const at::Tensor& weight, double eps) {
  check_f32(x, "x");
  check_f32(weight, "weight");
  const int64_t E = weight.numel(), M = x.numel() / E;
  TORCH_CHECK(x.size(-1) == E, "x's last dim ", x.size(-1), " != weight size ", E);
  at::Tensor res = x;
  if (residual.has_value()) {
    res = *residual;
    check_f32(res, "residual");
    TORCH_CHECK(res.sizes() == x.sizes(), "residual and x differ in shape");
  }
  at::Tensor out = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* rp = res.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const bool add = residual.has_value();
  at::parallel_for(0, M, 64, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      rms_row(xp + m * E, rp + m * E, add, wp, E, static_cast<float>(eps), op + m * E);
  });
  return {out, res};
}

// x [M, 2I] (gate | up) -> silu(gate) * up, [M, I]
at::Tensor silu_mul(const at::Tensor& x) {
  check_f32(x, "x");
  const int64_t I = x.size(-1) / 2, M = x.numel() / (2 * I);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = I;
  at::Tensor out = at::empty(shape, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) silu_row(xp + m * 2 * I, xp + m * 2 * I + I, op + m * I, I);
  });
  return out;
}

// NeoX rotary embedding in place on the first R dims of each head of q [T, H, D] and k
// [T, Hkv, D] (views into the fused qkv output are fine); cos/sin [P, R] float32.
void rotary_neox_(at::Tensor& q, at::Tensor& k, const at::Tensor& positions,
                  const at::Tensor& cos, const at::Tensor& sin) {
  check_rows(q, "q");
  check_rows(k, "k");
  check_f32(cos, "cos");
  check_f32(sin, "sin");
  const int64_t T = q.size(0), R = cos.size(1);
  TORCH_CHECK(R % 2 == 0 && R <= q.size(2) && k.size(2) == q.size(2), "bad rotary dims");
  check_positions(positions, T, cos.size(0));
  const int64_t* pos = positions.data_ptr<int64_t>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  auto rotate = [&](float* base, int64_t stride_t, int64_t heads, int64_t D) {
    at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t h = 0; h < heads; ++h)
          rope_head(base + t * stride_t + h * D, cp + pos[t] * R, sp + pos[t] * R, R);
    });
  };
  rotate(q.data_ptr<float>(), q.stride(0), q.size(1), q.size(2));
  rotate(k.data_ptr<float>(), k.stride(0), k.size(1), k.size(2));
}

// Decode attention, one new token per sequence: writes k/v [B, Hkv, D] into their cache slots,
// then attends q [B, H, D] over each sequence's paged context (context_lens include the new
// token; the last `window` keys only when window > 0). Caches [N, S, Hkv, D] float32.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            at::Tensor& k_cache, at::Tensor& v_cache,
                            const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                            const at::Tensor& context_lens, double scale, int64_t window) {
  check_rows(q, "q");
  check_rows(k, "k");
  check_rows(v, "v");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k.size(1);
  TORCH_CHECK(H % Hkv == 0 && H / Hkv <= 64 && v.size(1) == Hkv && k.size(2) == D &&
                  v.size(2) == D && k.size(0) == B && v.size(0) == B, "q/k/v shapes");
  check_paged(k_cache, v_cache, slot_mapping, block_tables, context_lens, B, Hkv, D);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t tok = Hkv * D;
  std::vector<float> kv(static_cast<size_t>(2 * tok));
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < Hkv; ++h) {
      std::memcpy(kv.data() + h * D, k.data_ptr<float>() + b * k.stride(0) + h * D,
                  D * sizeof(float));
      std::memcpy(kv.data() + tok + h * D, v.data_ptr<float>() + b * v.stride(0) + h * D,
                  D * sizeof(float));
    }
    store_kv_row(k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), slots[b], tok, kv.data(),
                 kv.data() + tok);
  }
  at::Tensor out = at::empty({B, H, D}, q.options());
  const PagedCtx c = paged_ctx(k_cache, v_cache, block_tables, context_lens, window, scale);
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t G = H / Hkv, q_stride = q.stride(0), PS = G * part_size(D);
  const AttnTasks tasks(c, B);
  std::vector<float> parts(static_cast<size_t>(tasks.total * PS));
  at::parallel_for(0, tasks.total, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> p(static_cast<size_t>(G * kKeySplit));
    for (int64_t t = t0; t < t1; ++t) {
      int64_t b, hk, split;
      tasks.decode(t, &b, &hk, &split);
      attend_part(c, b, hk, G, qp + b * q_stride + hk * G * D, split, parts.data() + t * PS,
                  p.data());
    }
  });
  for (int64_t b = 0; b < B; ++b)
    for (int64_t hk = 0; hk < Hkv; ++hk)
      attend_merge(G, D, parts.data() + (tasks.first[b] + hk * tasks.splits[b]) * PS,
                   tasks.splits[b], op + (b * H + hk * G) * D);
  return out;
}

// ---------------------------------------------------------------------------------------------
// The fused decode stack: every decoder layer of a dense Llama-family model (RMSNorm, q/k/v
// projection with optional bias and per-head q/k norm, NeoX rotary, paged attention, o
// projection, RMSNorm, gate/up projection, SiLU-and-mul, down projection) and the final norm,
// for a batch of one new token per sequence, in one call and one OpenMP parallel region: the
// phases are separated by the region's barriers instead of a Python dispatch and a thread
// fork/join per op. Every phase runs the same row functions as the single ops, so the result is
// theirs bit for bit.

namespace {

struct Proj {  // a quantised projection [N, K] and its optional bias
  at::Tensor w, bias;
  int64_t qtype = 0, N = 0, K = 0;
  const uint8_t* wp = nullptr;
  const float* bp = nullptr;
};

Proj make_proj(const at::Tensor& w, int64_t qtype, int64_t K,
               const c10::optional<at::Tensor>& bias) {
  Proj p;
  p.w = w;
  p.qtype = qtype;
  p.N = w.size(0);
  p.K = K;
  dispatch_type(qtype, [&](auto t) { check_weight<decltype(t)>(w, K); });
  p.wp = w.data_ptr<uint8_t>();
  if (bias.has_value()) {
    check_f32(*bias, "bias");
    TORCH_CHECK(bias->numel() == p.N, "bias has ", bias->numel(), " values, expected ", p.N);
    p.bias = *bias;
    p.bp = p.bias.data_ptr<float>();
  }
  return p;
}

// y [M, N] = x W^T (+ bias), the weight rows shared out among the region's threads in one
// contiguous range each (long sequential streams for the hardware prefetcher, as
// at::parallel_for splits them; small interleaved tasks measured ~20% slower).
// Called by every thread of the parallel region; ends with the worksharing loop's barrier.
void gemv_team(const Acts& a, const Proj& p, float* y, GemvScratch& scratch) {
  const int64_t N = p.N, nt = omp_get_num_threads();
  dispatch_type(p.qtype, [&](auto t) {
    using T = decltype(t);
#pragma omp for schedule(static, 1)
    for (int64_t i = 0; i < nt; ++i) {
      const int64_t n0 = N * i / nt, n1 = N * (i + 1) / nt;
      gemv_rows<T>(a, p.wp, N, n0, n1, y, scratch);
      if (p.bp != nullptr)
        for (int64_t m = 0; m < a.M; ++m)
          for (int64_t n = n0; n < n1; ++n) y[m * N + n] += p.bp[n];
    }
  });
}

struct StackLayer {
  at::Tensor ln1, ln2, q_norm, k_norm, k_cache, v_cache;
  Proj qkv, o, gate_up, down;
  int64_t window = 0;
};

}  // namespace

class DecodeStack {
 public:
  // H, Hkv query / KV heads of D dims; rotary tables cos/sin [P, R] (NeoX, R <= D); eps of
  // every RMSNorm; final_norm [E].
  DecodeStack(int64_t H, int64_t Hkv, int64_t D, double eps, double scale, at::Tensor cos,
              at::Tensor sin, at::Tensor final_norm)
      : H_(H), Hkv_(Hkv), D_(D), eps_(static_cast<float>(eps)), scale_(scale),
        cos_(std::move(cos)), sin_(std::move(sin)), final_norm_(std::move(final_norm)) {
    check_f32(cos_, "cos");
    check_f32(sin_, "sin");
    check_f32(final_norm_, "final_norm");
    TORCH_CHECK(H > 0 && Hkv > 0 && H % Hkv == 0 && H / Hkv <= 64, "bad head counts");
    TORCH_CHECK(D % 8 == 0, "head_dim must be a multiple of 8");
    TORCH_CHECK(cos_.dim() == 2 && cos_.sizes() == sin_.sizes() && cos_.size(1) % 2 == 0 &&
                    cos_.size(1) <= D, "bad rotary tables");
    E_ = final_norm_.numel();
  }

  void add_layer(const at::Tensor& ln1, const at::Tensor& qkv_w, int64_t qkv_type,
                 const c10::optional<at::Tensor>& qkv_bias,
                 const c10::optional<at::Tensor>& q_norm,
                 const c10::optional<at::Tensor>& k_norm, const at::Tensor& o_w,
                 int64_t o_type, const c10::optional<at::Tensor>& o_bias,
                 const at::Tensor& ln2, const at::Tensor& gate_up_w, int64_t gate_up_type,
                 const at::Tensor& down_w, int64_t down_type, const at::Tensor& k_cache,
                 const at::Tensor& v_cache, int64_t window) {
    StackLayer l;
    for (const at::Tensor* t : {&ln1, &ln2}) {
      check_f32(*t, "norm weight");
      TORCH_CHECK(t->numel() == E_, "norm weight size");
    }
    l.ln1 = ln1;
    l.ln2 = ln2;
    TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), "q_norm and k_norm go together");
    if (q_norm.has_value()) {
      check_f32(*q_norm, "q_norm");
      check_f32(*k_norm, "k_norm");
      TORCH_CHECK(q_norm->numel() == D_ && k_norm->numel() == D_, "q/k norm: one head's dims");
      l.q_norm = *q_norm;
      l.k_norm = *k_norm;
    }
    l.qkv = make_proj(qkv_w, qkv_type, E_, qkv_bias);
    TORCH_CHECK(l.qkv.N == (H_ + 2 * Hkv_) * D_, "qkv rows");
    l.o = make_proj(o_w, o_type, H_ * D_, o_bias);
    TORCH_CHECK(l.o.N == E_, "o rows");
    l.gate_up = make_proj(gate_up_w, gate_up_type, E_, c10::nullopt);
    TORCH_CHECK(l.gate_up.N % 2 == 0, "gate_up rows");
    l.down = make_proj(down_w, down_type, l.gate_up.N / 2, c10::nullopt);
    TORCH_CHECK(l.down.N == E_, "down rows");
    check_f32(k_cache, "k_cache");
    check_f32(v_cache, "v_cache");
    TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() &&
                    k_cache.size(2) == Hkv_ && k_cache.size(3) == D_, "cache shape");
    if (!layers_.empty())
      TORCH_CHECK(k_cache.sizes() == layers_[0].k_cache.sizes(), "caches differ in shape");
    l.k_cache = k_cache;
    l.v_cache = v_cache;
    l.window = window;
    layers_.push_back(std::move(l));
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  // hidden [B, E] (the embedded new tokens, one per sequence) -> final-normed hidden [B, E];
  // the step's K/V are written into every layer's cache.
  at::Tensor forward(const at::Tensor& hidden, const at::Tensor& positions,
                     const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                     const at::Tensor& context_lens, bool int8) {
    TORCH_CHECK(!layers_.empty(), "no layers");
    check_f32(hidden, "hidden");
    TORCH_CHECK(hidden.dim() == 2 && hidden.size(1) == E_, "hidden must be [B, ", E_, "]");
    const int64_t B = hidden.size(0), H = H_, Hkv = Hkv_, D = D_, E = E_, G = H / Hkv;
    const int64_t R = cos_.size(1), I = layers_[0].gate_up.N / 2, NQ = (H + 2 * Hkv) * D;
    check_paged(layers_[0].k_cache, layers_[0].v_cache, slot_mapping, block_tables,
                context_lens, B, Hkv, D);
    check_positions(positions, B, cos_.size(0));
    const int64_t* pos = positions.data_ptr<int64_t>();
    const int64_t* slots = slot_mapping.data_ptr<int64_t>();
    const float* cp = cos_.data_ptr<float>();
    const float* sp = sin_.data_ptr<float>();
    int64_t max_i = I;
    for (const StackLayer& l : layers_) max_i = std::max(max_i, l.gate_up.N / 2);
    const int64_t max_k = std::max({E, H * D, max_i});

    at::Tensor out = at::empty({B, E}, hidden.options());
    std::vector<float> res(hidden.data_ptr<float>(), hidden.data_ptr<float>() + B * E);
    std::vector<float> xn(B * E), qkv(B * NQ), att(B * H * D), h(B * E), gu(B * 2 * max_i),
        act(B * max_i);
    Acts acts;
    // Partial attention results: at most as many tasks as without a sliding window.
    const PagedCtx whole = paged_ctx(layers_[0].k_cache, layers_[0].v_cache, block_tables,
                                     context_lens, 0, scale_);
    const int64_t PS = G * part_size(D);
    std::vector<float> parts(static_cast<size_t>(AttnTasks(whole, B).total * PS));
    const int nt = at::get_num_threads();
    float* op = out.data_ptr<float>();

#pragma omp parallel num_threads(nt)
    {
      GemvScratch scratch;
      scratch.reserve(B, max_k);
      std::vector<float> p(static_cast<size_t>(G * kKeySplit));
      for (size_t li = 0; li < layers_.size(); ++li) {
        const StackLayer& l = layers_[li];
        const int64_t Il = l.gate_up.N / 2;
#pragma omp single
        {
          for (int64_t b = 0; b < B; ++b)
            rms_row(li == 0 ? res.data() + b * E : h.data() + b * E, res.data() + b * E, li > 0,
                    l.ln1.data_ptr<float>(), E, eps_, xn.data() + b * E);
          acts.prepare(xn.data(), B, E, int8);
        }
        gemv_team(acts, l.qkv, qkv.data(), scratch);
#pragma omp single
        {  // q and k: norm, rotary; k and v into the cache
          float* kc = l.k_cache.data_ptr<float>();
          float* vc = l.v_cache.data_ptr<float>();
          for (int64_t b = 0; b < B; ++b) {
            float* q = qkv.data() + b * NQ;
            float* k = q + H * D;
            for (int64_t hd = 0; hd < H + Hkv; ++hd) {
              float* x = q + hd * D;  // q heads, then k heads
              const at::Tensor& norm = hd < H ? l.q_norm : l.k_norm;
              if (norm.defined()) rms_row(x, nullptr, false, norm.data_ptr<float>(), D, eps_, x);
              rope_head(x, cp + pos[b] * R, sp + pos[b] * R, R);
            }
            store_kv_row(kc, vc, slots[b], Hkv * D, k, k + Hkv * D);
          }
        }
        const PagedCtx c =
            paged_ctx(l.k_cache, l.v_cache, block_tables, context_lens, l.window, scale_);
        const AttnTasks tasks(c, B);
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < tasks.total; ++t) {
          int64_t b, hk, split;
          tasks.decode(t, &b, &hk, &split);
          attend_part(c, b, hk, G, qkv.data() + b * NQ + hk * G * D, split,
                      parts.data() + t * PS, p.data());
        }
#pragma omp single
        {
          for (int64_t b = 0; b < B; ++b)
            for (int64_t hk = 0; hk < Hkv; ++hk)
              attend_merge(G, D, parts.data() + (tasks.first[b] + hk * tasks.splits[b]) * PS,
                           tasks.splits[b], att.data() + (b * H + hk * G) * D);
          acts.prepare(att.data(), B, H * D, int8);
        }
        gemv_team(acts, l.o, h.data(), scratch);
#pragma omp single
        {
          for (int64_t b = 0; b < B; ++b)
            rms_row(h.data() + b * E, res.data() + b * E, true, l.ln2.data_ptr<float>(), E, eps_,
                    xn.data() + b * E);
          acts.prepare(xn.data(), B, E, int8);
        }
        gemv_team(acts, l.gate_up, gu.data(), scratch);
#pragma omp single
        {
          for (int64_t b = 0; b < B; ++b)
            silu_row(gu.data() + b * 2 * Il, gu.data() + b * 2 * Il + Il, act.data() + b * Il, Il);
          acts.prepare(act.data(), B, Il, int8);
        }
        gemv_team(acts, l.down, h.data(), scratch);
      }
#pragma omp single
      for (int64_t b = 0; b < B; ++b)
        rms_row(h.data() + b * E, res.data() + b * E, true, final_norm_.data_ptr<float>(), E,
                eps_, op + b * E);
    }
    return out;
  }

 private:
  int64_t H_, Hkv_, D_, E_ = 0;
  float eps_;
  double scale_;
  at::Tensor cos_, sin_, final_norm_;
  std::vector<StackLayer> layers_;
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qgemm", &qgemm, "x [M, K] f32 @ quantised W [N, row_bytes]^T -> [M, N] f32");
  m.def("qgemm_i8", &qgemm_i8, "qgemm with int8-quantised activations");
  m.def("dequantize", &dequantize, "quantised rows -> float32 [R, K]", py::arg("w"),
        py::arg("qtype"), py::arg("K"), py::arg("rows") = py::none());
  m.def("rms_norm", &rms_norm, "residual += x (in place); rmsnorm * weight");
  m.def("silu_mul", &silu_mul, "silu(gate) * up over [M, 2I]");
  m.def("rotary_neox_", &rotary_neox_, "NeoX rotary embedding in place");
  m.def("decode_attention", &decode_attention, "store K/V and attend, one token per sequence");
  py::class_<DecodeStack>(m, "DecodeStack")
      .def(py::init<int64_t, int64_t, int64_t, double, double, at::Tensor, at::Tensor,
                    at::Tensor>(),
           py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("eps"),
           py::arg("scale"), py::arg("cos"), py::arg("sin"), py::arg("final_norm"))
      .def("add_layer", &DecodeStack::add_layer)
      .def("num_layers", &DecodeStack::num_layers)
      .def("forward", &DecodeStack::forward, "one decode step of the whole stack",
           py::call_guard<py::gil_scoped_release>());
}
