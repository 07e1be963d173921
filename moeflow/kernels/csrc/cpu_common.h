// Shared by the CPU kernels' translation units (cpu_ops.cpp, moe.cpp): ggml's quantised block
// types, their exact (fp32) and int8 dot products, the GEMV drivers over weight rows, and small
// vector helpers. Everything is in an anonymous namespace: each unit gets its own copy.
//
// Quantised dot products: every supported type is read as chunks of 32 weights with value
//   w = scale * q + min      (q: small integers held as floats)
// so for an activation row x:  sum(w * x) = scale * sum(q * x) + min * sum(x)
// where sum(x) over each 32-chunk is computed once per call. Block layouts follow ggml's
// (ggml-common.h): Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 are 32-weight blocks, Q4_K Q5_K Q6_K 256-weight
// super-blocks of 8 chunks; IQ4_NL (32) and IQ4_XS (256) are in iq4.h.
#pragma once

// Not <torch/extension.h>: parsing all of ATen's operators and torch's Python API was two thirds
// of the build. An ATen function a kernel calls needs its <ATen/ops/NAME.h> here.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>
#include <omp.h>

// With AVX-512 VNNI (the "avx512" build) the int8 products fuse into vpdpbusd / vpdpwssd; the
// integer results are the same as AVX2's maddubs + madd (no int16 step saturates here). AVX-512VL
// also gives 32 vector registers instead of 16, room for 8 activation rows per weight row.
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define MOEFLOW_VNNI 1
constexpr int kMRi8 = 8;
#else
constexpr int kMRi8 = 4;
#endif

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

inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// The weight bytes kPrefetchBlocks blocks of `bytes` ahead of blk (the rows a GEMV reads lie one
// after another, so this runs on into the next row) fetched into L1 now, and those kPrefetchFar
// blocks ahead into L2: the hardware prefetcher alone left the one-row GEMVs waiting on memory
// at each block's first load, and the near prefetch alone kept too few lines in flight (and
// met each 4 KB page of a mapped file late). One-row Q4_K GEMVs over 12 layers' gate experts of
// the 48-layer Qwen3 file, 2 threads: 8.8-10.8 GB/s near only, 13.3-13.9 with the far one
// 16-64 blocks ahead (2 rows: 13.1-13.3 -> 14.6-15.5).
constexpr int64_t kPrefetchBlocks = 8, kPrefetchFar = 32;
inline void prefetch_ahead(const uint8_t* blk, int64_t bytes) {
  const char* p = reinterpret_cast<const char*>(blk + kPrefetchBlocks * bytes);
  for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(p + o, _MM_HINT_T0);
  const char* f = reinterpret_cast<const char*>(blk + kPrefetchFar * bytes);
  for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(f + o, _MM_HINT_T1);
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
#ifdef MOEFLOW_VNNI
  return _mm256_maskz_mov_epi8(bits, _mm256_set1_epi8(16));  // byte i: 16 where bit i is set
#else
  // Byte i of the result takes byte i/8 of `bits`, then tests bit i%8 of it.
  const __m256i shuf = _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL,
                                         0x0101010101010101LL, 0x0000000000000000LL);
  __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)), shuf);
  const __m256i sel = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ULL));
  v = _mm256_cmpeq_epi8(_mm256_and_si256(v, sel), sel);
  return _mm256_and_si256(v, _mm256_set1_epi8(16));
#endif
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
  static __m256i I(const uint8_t* b, int) {
    return _mm256_or_si256(nibbles32(b + 6), q5_high_bits(b + 2));
  }
  static void scales(const uint8_t* b, float* sc, float* mn) {
    sc[0] = fp16(b);
    mn[0] = -16.0f * sc[0];
  }
  static void chunk(const uint8_t* b, int c, __m256* q) { u8x32_to_f32(I(b, c), q); }
};

struct Q5_1 {
  static constexpr int QK = 32, BYTES = 24, NC = 1;
  static constexpr bool SIGNED = false;
  static __m256i I(const uint8_t* b, int) {
    return _mm256_or_si256(nibbles32(b + 8), q5_high_bits(b + 4));
  }
  static void scales(const uint8_t* b, float* sc, float* mn) {
    sc[0] = fp16(b);
    mn[0] = fp16(b + 2);
  }
  static void chunk(const uint8_t* b, int c, __m256* q) { u8x32_to_f32(I(b, c), q); }
};

struct Q8_0 {
  static constexpr int QK = 32, BYTES = 34, NC = 1;
  static constexpr bool SIGNED = true;
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
  static __m256i I(const uint8_t* b, int c) { return k_nibbles(b + 16, c); }
  static void scales(const uint8_t* b, float* sc, float* mn) { k4_scales(b, sc, mn); }
  static void chunk(const uint8_t* b, int c, __m256* q) { u8x32_to_f32(k_nibbles(b + 16, c), q); }
};

struct Q5_K {
  static constexpr int QK = 256, BYTES = 176, NC = 8;
  static constexpr bool SIGNED = false;
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

// The 2-bit values of chunk c of a Q2_K/Q3_K super-block: bits 2 (c % 4) of the 32 bytes of
// qs that hold values 128 (c / 4) .. + 127, as 32 bytes 0..3.
inline __m256i k_crumbs(const uint8_t* qs, int c) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * (c / 4)));
  return _mm256_and_si256(_mm256_srl_epi16(raw, _mm_cvtsi32_si128(2 * (c % 4))),
                          _mm256_set1_epi8(3));
}

// The K-quants whose chunk() applies the per-16 scales and mins itself: scales() gives 1 and 0.
struct ScalesInChunk {
  static void scales(const uint8_t*, float* sc, float* mn) {
    for (int c = 0; c < 8; ++c) {
      sc[c] = 1.0f;
      mn[c] = 0.0f;
    }
  }
};

// Q2_K: scales[16] (per 16 values: scale in the low nibble, min in the high one), qs[64], d and
// dmin (fp16): w = d * sc * q - dmin * m. The float path folds the per-16 scales and mins into
// chunk() (scales() gives 1 and 0); the int8 path is dot_q8k.
struct Q2_K : ScalesInChunk {
  static constexpr int QK = 256, BYTES = 84, NC = 8;
  static constexpr bool SIGNED = false;
  static __m256i I(const uint8_t* b, int c) { return k_crumbs(b + 16, c); }
  static void chunk(const uint8_t* b, int c, __m256* q) {
    const float d = fp16(b + 80), dmin = fp16(b + 82);
    u8x32_to_f32(I(b, c), q);
    for (int h = 0; h < 2; ++h) {  // sub-blocks 2c (values 0..15) and 2c + 1 (16..31)
      const uint8_t s = b[2 * c + h];
      const __m256 dl = _mm256_set1_ps(d * static_cast<float>(s & 0xF));
      const __m256 ml = _mm256_set1_ps(-dmin * static_cast<float>(s >> 4));
      q[2 * h] = _mm256_fmadd_ps(q[2 * h], dl, ml);
      q[2 * h + 1] = _mm256_fmadd_ps(q[2 * h + 1], dl, ml);
    }
  }
};

// The 16 6-bit scales of a Q3_K super-block's 12-byte field, minus 32: the low 4 bits of scale j
// in byte j % 8 (low nibble for j < 8), the high 2 bits at bit 2 (j / 4) of byte 8 + j % 4.
inline void q3k_scales(const uint8_t* s, int8_t* out) {
  for (int j = 0; j < 16; ++j) {
    const int low = j < 8 ? s[j] & 0xF : s[j - 8] >> 4;
    const int high = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
    out[j] = static_cast<int8_t>((low | (high << 4)) - 32);
  }
}

// Q3_K: hmask[32] (bit c of byte l: the third bit of value l of chunk c), qs[64], scales[12],
// d (fp16): w = d * sc * (q - 4) with q = low 2 bits | third bit << 2 in 0..7.
struct Q3_K : ScalesInChunk {
  static constexpr int QK = 256, BYTES = 110, NC = 8;
  static constexpr bool SIGNED = false;
  static __m256i I(const uint8_t* b, int c) {  // q in 0..7
    const __m256i hm = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b));
    const __m256i hb = _mm256_and_si256(_mm256_srl_epi16(hm, _mm_cvtsi32_si128(c)),
                                        _mm256_set1_epi8(1));
    return _mm256_or_si256(k_crumbs(b + 32, c), _mm256_slli_epi16(hb, 2));
  }
  static void chunk(const uint8_t* b, int c, __m256* q) {
    const float d = fp16(b + 108);
    int8_t sc[16];
    q3k_scales(b + 96, sc);
    u8x32_to_f32(I(b, c), q);
    const __m256 four = _mm256_set1_ps(4.0f);
    for (int h = 0; h < 2; ++h) {
      const __m256 dl = _mm256_set1_ps(d * static_cast<float>(sc[2 * c + h]));
      q[2 * h] = _mm256_mul_ps(_mm256_sub_ps(q[2 * h], four), dl);
      q[2 * h + 1] = _mm256_mul_ps(_mm256_sub_ps(q[2 * h + 1], four), dl);
    }
  }
};

struct Q6_K {
  // ql[128] qh[64] scales[16] (int8) d (fp16); each chunk has two 16-weight sub-scales, folded
  // into q by chunk() (float path); the int8 path is dot_q8k.
  static constexpr int QK = 256, BYTES = 210, NC = 8;
  static constexpr bool SIGNED = true;
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
    prefetch_ahead(blk, T::BYTES);
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
// every tile of R activation rows m..m+R-1 (R = MR, then 4 and 3 where MR is 8, then 2, 1;
// scratch: K / 32 floats), and stores out[r] into y[m + r, n]. A row's result does not depend on
// its tile.
template <int MR = 4, class Dot>
void tile_range(int64_t M, int64_t N, int64_t row_bytes, int64_t n0, int64_t n1,
                const uint8_t* w, float* y, float* scratch, Dot&& dot) {
  float out[MR];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wrow = w + n * row_bytes;
    int64_t m = 0;
    for (; m + MR <= M; m += MR) {
      dot(wrow, m, std::integral_constant<int, MR>{}, scratch, out);
      for (int r = 0; r < MR; ++r) y[(m + r) * N + n] = out[r];
    }
    if constexpr (MR == 8) {
      for (; m + 4 <= M; m += 4) {
        dot(wrow, m, std::integral_constant<int, 4>{}, scratch, out);
        for (int r = 0; r < 4; ++r) y[(m + r) * N + n] = out[r];
      }
      for (; m + 3 <= M; m += 3) {
        dot(wrow, m, std::integral_constant<int, 3>{}, scratch, out);
        for (int r = 0; r < 3; ++r) y[(m + r) * N + n] = out[r];
      }
    }
    if constexpr (MR >= 4) {  // 2 rows (an expert's tokens at 4-16 streams) decode the row once
      for (; m + 2 <= M; m += 2) {
        dot(wrow, m, std::integral_constant<int, 2>{}, scratch, out);
        for (int r = 0; r < 2; ++r) y[(m + r) * N + n] = out[r];
      }
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

// One weight row's 256-weight super-block decoded for the int8 GEMM (gemm_i8.h): the weights as
// bytes and their int16 scales per 16 values, both in the order the Q8_K activations are stored
// (kq8k_slot); the per-16 coefficients of the activation-sum term; the float scales.
struct alignas(64) KBlock {
  uint8_t q[256];
  int16_t s[128];
  int16_t c16[16];
  float d, dmin;
};

// The int8 GEMM's register tile: activation rows x weight rows per microkernel step (32 vector
// registers with AVX-512VL, 16 with AVX2), and the rows from which it replaces dot_q8k's tiles.
#ifdef MOEFLOW_VNNI
constexpr int kGemmMR = 4, kGemmNR = 4;
#else
constexpr int kGemmMR = 2, kGemmNR = 4;
#endif
constexpr int64_t kGemmMinRows = 6;
// With AVX-512 the GEMM is ahead from 4 rows but for Q2_K, whose GEMV is the cheapest to decode
// (2 threads, [768, 2048], [2048, 768] and [4096, 2048], GEMV against GEMM: Q4_K 5 rows
// 0.151/0.133/0.655 against 0.122/0.089/0.462 ms; Q6_K, Q5_K, Q3_K, IQ4_XS alike; Q2_K 3 rows
// 0.084/0.083/0.407 against 0.106/0.104/0.526). At 3 rows the GEMV runs one 3-row tile (not 2 +
// 1): even with the GEMM where the rows are in cache (0.055-0.059 against 0.058, 0.26-0.27
// against 0.28-0.29 ms), and ahead where they stream from memory (Qwen3-30B-A3B's Q6_K LM head [151936, 2048]
// 9.1-9.5 against 11.5-12.2 ms; a layer's Q4_K gate experts as one [98304, 2048] matrix 5.9
// against 6.4-6.7). At 4 rows the GEMM stays ahead for Q4_K (7.2 against 6.3-6.7 ms streaming).
// Q4_K's GEMM with 16 weight rows a vector (gemm_q4k_rows) is ahead from 3 rows (GEMV against
// GEMM at 3 rows: [4096, 2048] 0.327 / 0.254 ms, [768, 2048] 0.068 / 0.051, [2048, 768] 0.064 /
// 0.045, [98304, 2048] streaming 7.26 / 6.35), not at 2 (0.223 / 0.241, 4.98 / 5.84 streaming).
// Q6_K's (gemm_q6k_rows, 2026-12-04, 2 threads, rows streaming from memory, G multiply-adds/s,
// GEMV / GEMM): [32768, 2048] 76 / 32-54 at 2 rows, 95-99 / 69-70 at 3, even at 4 (94-97);
// [65536, 2048] 64-67 / 40-41, 86-91 / 56-57.
// AVX2 (the AVX2 build on that machine): the GEMV is ahead or even up to 5 rows.
template <class T>
constexpr int64_t gemm_min_rows() {
#ifdef MOEFLOW_VNNI
  if constexpr (std::is_same_v<T, Q4_K>) return 3;
  if constexpr (std::is_same_v<T, Q6_K>) return 5;
  if constexpr (!std::is_same_v<T, Q2_K>) return 4;
#endif
  return kGemmMinRows;
}

// The int8 GEMM of the 32-weight types (gemm_b32.h): weight rows per tile (one vector of their
// int32 sums: 16 with AVX-512, 8 with AVX2) and activation rows per microkernel step.
#ifdef MOEFLOW_VNNI
constexpr int kB32NR = 16, kB32MR = 4;
#else
constexpr int kB32NR = 8, kB32MR = 2;
#endif

// One 32-weight block of kB32NR weight rows decoded for that GEMM: group g (bytes 4g..4g+3 of
// each row's 32 weight bytes) of all the rows side by side, then the rows' scales and mins.
struct alignas(64) B32Block {
  uint8_t q[8 * 4 * kB32NR];
  float s[kB32NR];
  float mn[kB32NR];
};

// One Q4_K super-block of 16 weight rows side by side, for the AVX-512 GEMM (gemm_i8.h,
// gemm_q4k_rows): vector (j * 2 + h) * 4 + i of q holds values 16h + 4i..16h + 4i + 3 of sub-block
// j of every row (lane l: row l), as bytes 0..15; sc[j][l] row l's scale of sub-block j (int32,
// so the int16 low half is the scale and the high half 0); d[l] its d.
struct alignas(64) Q4KRows16 {
  uint8_t q[64][64];
  int32_t sc[8][16];
  float d[16];
};

// One Q6_K super-block of 16 weight rows side by side, for the AVX-512 GEMM (gemm_i8.h,
// gemm_q6k_rows): vector 4s + i of q holds values 16s + 4i..16s + 4i + 3 (sub-block s) of every
// row as 0..63 (lane l: row l); sc[s][l] row l's scale of sub-block s (int32); off[k][l] the
// -32 offset's coefficients of sub-blocks 2k and 2k + 1, -32 * scale, as an int16 pair; d[l].
struct alignas(64) Q6KRows16 {
  uint8_t q[64][64];
  int32_t sc[16][16];
  int32_t off[8][16];
  float d[16];
};

struct GemvScratch {
  std::vector<float> mins;
  std::vector<__m256> acc;
  std::vector<KBlock> kblocks;  // kGemmNB weight rows decoded over K
  std::vector<Q4KRows16> q4k16;  // 16 Q4_K weight rows decoded over K (AVX-512)
  std::vector<Q6KRows16> q6k16;  // 16 Q6_K weight rows decoded over K (AVX-512)
  std::vector<int32_t> kmin_c;  // their min coefficients, transposed (gemm_i8.h's KMinTiles)
  std::vector<float> kmin_d;
  std::vector<B32Block> b32;    // kB32NR weight rows decoded over K
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

// What the GEMV drivers read of M prepared activation rows (not owned): the floats (exact
// path), the per-32-chunk sums (both paths), and for the int8 path the rows quantised twice:
// per 32-chunk (xq, dx: what the 32-weight block types read) and per 256-block as llama.cpp's
// Q8_K (kq, kd and the int16 sums of each 16 values kbs: what the K-quants read; only when K is
// a multiple of 256).
struct ActsView {
  const float* x = nullptr;
  const int8_t* xq = nullptr;
  const float* dx = nullptr;
  const float* sx = nullptr;
  const int8_t* kq = nullptr;
  const float* kd = nullptr;
  const int16_t* kbs = nullptr;
  const int32_t* ks2 = nullptr;  // per super-block, 4 x (sum of sub-block 2k, of 2k + 1) as int16
  const int32_t* xs = nullptr;  // int8 path: each 32-chunk's sum(xq)
  int64_t M = 0, K = 0;
  bool int8 = false;
  // rows m0..m0+n-1 of these rows
  ActsView rows(int64_t m0, int64_t n) const {
    ActsView v = *this;
    v.x = x ? x + m0 * K : nullptr;
    v.xq = xq ? xq + m0 * K : nullptr;
    v.dx = dx ? dx + m0 * (K / 32) : nullptr;
    v.sx = sx + m0 * (K / 32);
    v.kq = kq ? kq + m0 * K : nullptr;
    v.kd = kd ? kd + m0 * (K / 256) : nullptr;
    v.kbs = kbs ? kbs + m0 * (K / 16) : nullptr;
    v.ks2 = ks2 ? ks2 + m0 * (K / 64) : nullptr;
    v.xs = xs ? xs + m0 * (K / 32) : nullptr;
    v.M = n;
    return v;
  }
};

void quantize_row_q8(const float* x, int64_t K, int8_t* q, float* d, float* s,
                     int32_t* qs = nullptr);
void quantize_row_q8k(const float* x, int64_t K, int8_t* q, float* d, int16_t* bsums);

// Owned buffers of prepared activation rows (see ActsView). prepare() reads M rows of x in
// place; resize() + prepare_row() fill the rows one by one (any thread, distinct rows), keeping
// a copy of the floats for the exact path (gathered rows, e.g. a MoE layer's rows in expert
// order).
struct Acts {
  const float* x = nullptr;
  int64_t M = 0, K = 0;
  bool int8 = false;
  std::vector<float> xf, sx, dx, kd;
  std::vector<int32_t> xs, ks2;
  std::vector<int8_t> xq, kq;
  std::vector<int16_t> kbs;

  // Rows are shared out between ATen's threads from kPrepareGrain rows on (a prefill's
  // projections quantised on one thread while the other waited); inside a parallel region
  // (DecodeStack's single sections) at::parallel_for runs them on the calling thread.
  static constexpr int64_t kPrepareGrain = 8;
  void prepare(const float* x_, int64_t M_, int64_t K_, bool int8_) {
    resize(M_, K_, int8_, false);
    x = x_;
    at::parallel_for(0, M, kPrepareGrain, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) prepare_row(m, x_ + m * K);
    });
  }

  void resize(int64_t M_, int64_t K_, bool int8_, bool copy_floats) {
    M = M_;
    K = K_;
    int8 = int8_;
    const auto z = [](int64_t n) { return static_cast<size_t>(n); };
    sx.resize(z(M * (K / 32)));
    if (copy_floats && !int8) {
      xf.resize(z(M * K));
      x = xf.data();
    }
    if (!int8) return;
    xq.resize(z(M * K));
    dx.resize(z(M * (K / 32)));
    xs.resize(z(M * (K / 32)));
    if (K % 256 == 0) {
      kq.resize(z(M * K));
      kd.resize(z(M * (K / 256)));
      kbs.resize(z(M * (K / 16)));
      ks2.resize(z(M * (K / 64)));
    }
  }

  void prepare_row(int64_t m, const float* row) {
    if (!int8) {
      if (!xf.empty() && x == xf.data() && row != xf.data() + m * K)
        std::memcpy(xf.data() + m * K, row, static_cast<size_t>(K) * sizeof(float));
      prepare_sums(row, K, sx.data() + m * (K / 32));
      return;
    }
    quantize_row_q8(row, K, xq.data() + m * K, dx.data() + m * (K / 32),
                    sx.data() + m * (K / 32), xs.data() + m * (K / 32));
    if (K % 256 == 0) {
      int16_t* bs = kbs.data() + m * (K / 16);
      quantize_row_q8k(row, K, kq.data() + m * K, kd.data() + m * (K / 256), bs);
      pair_sums32(bs, K / 256, ks2.data() + m * (K / 64));
    }
  }

  // Each super-block's 32-value sums (sub-block j: bsums 2j and 2j + 1), two to an int32:
  // sub-block 2k in the low half, 2k + 1 in the high, for one vpdpwssd against the (min 2k,
  // min 2k + 1) pairs of Q4_K rows (|sum| <= 32 * 127 fits int16).
  static void pair_sums32(const int16_t* bs, int64_t nb, int32_t* out) {
    for (int64_t i = 0; i < nb * 4; ++i) {
      const int32_t lo = bs[4 * i] + bs[4 * i + 1], hi = bs[4 * i + 2] + bs[4 * i + 3];
      out[i] = static_cast<int32_t>(static_cast<uint32_t>(static_cast<uint16_t>(lo)) |
                                    (static_cast<uint32_t>(static_cast<uint16_t>(hi)) << 16));
    }
  }

  operator ActsView() const {
    const bool k_blocks = int8 && K % 256 == 0;
    return ActsView{x,
                    int8 ? xq.data() : nullptr,
                    int8 ? dx.data() : nullptr,
                    sx.data(),
                    k_blocks ? kq.data() : nullptr,
                    k_blocks ? kd.data() : nullptr,
                    k_blocks ? kbs.data() : nullptr,
                    k_blocks ? ks2.data() : nullptr,
                    int8 ? xs.data() : nullptr,
                    M,
                    K,
                    int8};
  }

  // each 32-chunk's sum of one row of K floats
  static void prepare_sums(const float* x, int64_t K, float* s) {
    for (int64_t c = 0; c < K / 32; ++c) {
      const float* p = x + c * 32;
      __m256 v = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)),
                               _mm256_add_ps(_mm256_loadu_ps(p + 16), _mm256_loadu_ps(p + 24)));
      s[c] = hsum(v);
    }
  }
};

// The K-quants against Q8_K activations: one overload per weight type (defined below).
struct Q8KRows {  // MR consecutive activation rows of the Q8_K format
  const int8_t* q;
  const float* d;
  const int16_t* bsums;
  int64_t K;
};
template <int MR> void dot_q8k(Q4_K, const uint8_t* wrow, const Q8KRows& a, float* out);
template <int MR> void dot_q8k(Q5_K, const uint8_t* wrow, const Q8KRows& a, float* out);
template <int MR> void dot_q8k(Q6_K, const uint8_t* wrow, const Q8KRows& a, float* out);
template <int MR> void dot_q8k(Q2_K, const uint8_t* wrow, const Q8KRows& a, float* out);
template <int MR> void dot_q8k(Q3_K, const uint8_t* wrow, const Q8KRows& a, float* out);

// y[:, n0:n1] for the 256-weight types through the int8 GEMM (gemm_i8.h): dot_q8k's results.
template <class T>
void gemm_q8k_rows(const ActsView& a, const uint8_t* w, int64_t N, int64_t n0, int64_t n1,
                   float* y, GemvScratch& scratch);

// y[:, n0:n1] for the 32-weight types under int8 activations (gemm_b32.h).
template <class T>
void gemv_b32_rows(const ActsView& a, const uint8_t* w, int64_t N, int64_t n0, int64_t n1,
                   float* y, GemvScratch& scratch);

// y[:, n0:n1] = x W[n0:n1]^T for the prepared activations (y is [M, N]).
template <class T>
void gemv_rows(const ActsView& a, const uint8_t* w, int64_t N, int64_t n0, int64_t n1, float* y,
               GemvScratch& scratch) {
  const int64_t K = a.K, nchunks = K / 32, row_bytes = K / T::QK * T::BYTES;
  scratch.reserve(a.M, K);
  if (a.int8) {
    if constexpr (T::QK == 256) {
      if (a.M >= gemm_min_rows<T>()) {
        gemm_q8k_rows<T>(a, w, N, n0, n1, y, scratch);
        return;
      }
      tile_range<kMRi8>(a.M, N, row_bytes, n0, n1, w, y, scratch.mins.data(),
                 [&](const uint8_t* wrow, int64_t m, auto mr, float*, float* out) {
                   const Q8KRows r{a.kq + m * K, a.kd + m * (K / 256), a.kbs + m * (K / 16), K};
                   dot_q8k<decltype(mr)::value>(T{}, wrow, r, out);
                 });
    } else {
      gemv_b32_rows<T>(a, w, N, n0, n1, y, scratch);
    }
    return;
  }
  if (use_tile_nr(a.M, K)) {
    for (; n0 + kNR <= n1; n0 += kNR)
      tile_nr<T, kNR>(w + n0 * row_bytes, row_bytes, K, a.M, a.x, a.sx, scratch, y, N, n0);
  }
  tile_range(a.M, N, row_bytes, n0, n1, w, y, scratch.mins.data(),
             [&](const uint8_t* wrow, int64_t m, auto mr, float* mins, float* out) {
               dot_rows<T, decltype(mr)::value>(wrow, K, a.x + m * K, a.sx + m * nchunks, mins,
                                                out);
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
// dx = max|x| / 127, as llama.cpp's Q8 activations): the integer sums sum(q * xq) through maddubs
// (u8 x s8 pairs) and madd, or vpdpbusd (gemm_b32.h for the 32-weight types, dot_q8k below for
// the K-quants). The min term takes the sum of the quantised activations, dx * sum(xq)
// (llama.cpp's Q8_1 s; qs: sum(xq) itself), so a row's result is sum(w * xq * dx) over the
// dequantised weights w: the quantisation error meets the weights as they are, centred on 0 in
// real blocks (m ~ -8d). The exact float sum(x) instead meets it with the unsigned d * q (0..15d):
// measured 3.5x the KL on SmolLM2 Q4_1 (docs/BENCHMARKS.md). I(...) gives a chunk's weights as
// 32 unsigned bytes (or signed, SIGNED).

void quantize_row_q8(const float* x, int64_t K, int8_t* q, float* d, float* s, int32_t* qs) {
  for (int64_t c = 0; c < K / 32; ++c) {
    const float* p = x + c * 32;
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(p + 8 * i);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    const float mx = _mm_cvtss_f32(m);
    const float dx = mx / 127.0f;
    d[c] = dx;
    const __m256 inv = _mm256_set1_ps(dx > 0.0f ? 1.0f / dx : 0.0f);
    __m256i i32[4];
    for (int i = 0; i < 4; ++i) {
      const __m256 r = _mm256_round_ps(_mm256_mul_ps(v[i], inv),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      sum = _mm256_add_ps(sum, r);  // integers |r| <= 127: exact
      i32[i] = _mm256_cvtps_epi32(r);
    }
    const float qsum = hsum(sum);  // an integer, exact
    s[c] = dx * qsum;
    if (qs) qs[c] = static_cast<int32_t>(qsum);
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
  __m256i wu = w, xs = xq;
  if (SIGNED) {  // the unsigned x signed products want w >= 0: move w's sign onto x
    wu = _mm256_sign_epi8(w, w);
    xs = _mm256_sign_epi8(xq, w);
  }
#ifdef MOEFLOW_VNNI
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), wu, xs);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(wu, xs), _mm256_set1_epi16(1));
#endif
}

// acc + (int16 pairs of a times those of b, summed per pair) in int32 lanes
inline __m256i madd_acc(__m256i acc, __m256i a, __m256i b) {
#ifdef MOEFLOW_VNNI
  return _mm256_dpwssd_epi32(acc, a, b);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}

// ---------------------------------------------------------------------------------------------
// The K-quants against activations quantised per 256-block (llama.cpp's Q8_K: one float scale
// d = max|x| / 127 per block, int8 values, int16 sums of each 16 values). A super-block's
// products and sub-block scales are summed in int32 lanes (maddubs, then madd by the int16
// sub-block scales) and converted to float once per super-block; the min (Q4_K, Q5_K) or -32
// offset (Q6_K) term comes from the 16-value sums.

// The avx512 build's K-quant products read two 32-value chunks per 512-bit register: a Q4_K/Q5_K
// register of 64 weight bytes holds chunks (c, c + 2) in its low nibbles and (c + 1, c + 3) in
// its high ones, so each super-block's activations are stored in that order, chunks
// 0 2 1 3 4 6 5 7 (kq8k_slot(c): where chunk c lies). The AVX2 build keeps the natural order.
inline int kq8k_slot(int c) {
#ifdef MOEFLOW_VNNI
  return (c & 4) | ((c & 1) << 1) | ((c >> 1) & 1);
#else
  return c;
#endif
}

void quantize_row_q8k(const float* x, int64_t K, int8_t* q, float* d, int16_t* bsums) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t b = 0; b < K / 256; ++b) {
    const float* p = x + b * 256;
    __m256 amax = _mm256_setzero_ps();
    for (int i = 0; i < 32; ++i) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, _mm256_loadu_ps(p + 8 * i)));
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    const float db = _mm_cvtss_f32(m) / 127.0f;
    d[b] = db;
    const __m256 inv = _mm256_set1_ps(db > 0.0f ? 1.0f / db : 0.0f);
    int8_t* qb = q + b * 256;
    for (int c = 0; c < 8; ++c) {
      __m256i i32[4];
      for (int i = 0; i < 4; ++i)
        i32[i] = _mm256_cvtps_epi32(_mm256_round_ps(
            _mm256_mul_ps(_mm256_loadu_ps(p + 32 * c + 8 * i), inv),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      __m256i p8 = _mm256_packs_epi16(_mm256_packs_epi32(i32[0], i32[1]),
                                      _mm256_packs_epi32(i32[2], i32[3]));
      p8 = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb + 32 * kq8k_slot(c)), p8);
    }
    for (int j = 0; j < 16; ++j) {  // values 16j..16j+15: half j % 2 of chunk j / 2
      const int8_t* v = qb + 32 * kq8k_slot(j / 2) + 16 * (j % 2);
      int s = 0;
      for (int i = 0; i < 16; ++i) s += v[i];
      bsums[b * 16 + j] = static_cast<int16_t>(s);
    }
  }
}

// The 8 6-bit scales and 8 6-bit mins of a Q4_K/Q5_K super-block's 12-byte field, as bytes:
// out[0..7] scales, out[8..15] mins (the layout of ggml's get_scale_min_k4, 4 bytes at a time).
inline void k4_scale_bytes(const uint8_t* s, uint8_t* out) {
  uint32_t w[3];
  std::memcpy(w, s, 12);
  const uint32_t low6 = 0x3f3f3f3f, low4 = 0x0f0f0f0f, top2 = 0x03030303;
  const uint32_t v[4] = {
      w[0] & low6,  // scales 0..3
      (w[2] & low4) | (((w[0] >> 6) & top2) << 4),  // scales 4..7
      w[1] & low6,  // mins 0..3
      ((w[2] >> 4) & low4) | (((w[1] >> 6) & top2) << 4),  // mins 4..7
  };
  std::memcpy(out, v, 16);
}

// The 8 mins of k4_scale_bytes' output (out[8..15]), each twice, as 16 int16: the coefficient of
// each of the 16 sums of 16 activations (Q8_K bsums) in the Q4_K/Q5_K min term.
inline __m256i k4_mins_twice(const uint8_t* scale_bytes) {
  const __m128i m8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(scale_bytes + 8));
  return _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m8, m8));
}

#ifdef MOEFLOW_VNNI
// Values 128k..128k+127 (k = 0, 1) of a Q4_K (HIGH = Q5_K: qh is its 32 high-bit bytes,
// broadcast to both halves) super-block as dot_q8k reads them, 64 bytes of nibbles at once:
// lo holds chunks (4k, 4k + 2) in its 256-bit halves (the low nibbles), hi (4k + 1, 4k + 3) (the
// high ones), beside activations stored in that order (kq8k_slot); s_lo, s_hi their scale
// vectors (one int16 per pair of products) from scz, the 8 scales as int16 lanes 0-7.
template <bool HIGH>
inline void k45_half(const uint8_t* qs, __m512i qh, __m512i scz, int k, __m512i& lo,
                     __m512i& hi, __m512i& s_lo, __m512i& s_hi) {
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  const __m512i bits = _mm512_loadu_si512(qs + 64 * k);
  lo = _mm512_and_si512(bits, m4);
  hi = _mm512_and_si512(_mm512_srli_epi16(bits, 4), m4);
  const __m512i c_lo = _mm512_inserti64x4(_mm512_set1_epi16(static_cast<int16_t>(4 * k)),
                                          _mm256_set1_epi16(static_cast<int16_t>(4 * k + 2)), 1);
  const __m512i c_hi = _mm512_add_epi16(c_lo, _mm512_set1_epi16(1));
  if constexpr (HIGH) {  // the 5th bit of chunk c is bit c of qh's bytes
    const __m512i one = _mm512_set1_epi8(1);
    lo = _mm512_or_si512(
        lo, _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(qh, c_lo), one), 4));
    hi = _mm512_or_si512(
        hi, _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(qh, c_hi), one), 4));
  }
  s_lo = _mm512_permutexvar_epi16(c_lo, scz);
  s_hi = _mm512_permutexvar_epi16(c_hi, scz);
}
#endif

// Four super-blocks' integer lanes p[0..n-1] (n <= 4) of one row, summed whole (exact), then
// taken in order: acc = fma(float(sum_q), dd[q], acc), q = 0..n-1 (lane 0 of acc). One
// reduction for the four (two rounds of hadd), not a horizontal sum each.
inline __m128 whole_blocks4(const __m256i* p, const float* dd, int n, __m128 acc) {
  const __m256i z = _mm256_setzero_si256();
  const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], n > 1 ? p[1] : z),
                                      _mm256_hadd_epi32(n > 2 ? p[2] : z, n > 3 ? p[3] : z));
  const __m128 f = _mm_cvtepi32_ps(
      _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));  // sum_q in q
  const __m128 lanes[4] = {f, _mm_movehdup_ps(f), _mm_movehl_ps(f, f),
                           _mm_shuffle_ps(f, f, 3)};
  for (int q = 0; q < n; ++q) acc = _mm_fmadd_ss(lanes[q], _mm_set_ss(dd[q]), acc);
  return acc;
}

// Q4_K and Q5_K share everything but the weights' 5th bit: HIGH = Q5_K. Q4_K's float work
// (gemm_i8.h, "Q4_K"): a super-block's integer lanes are summed whole (exact) and taken into
// one float per row, acc = fma(float(sum), d * d8, acc), so that its GEMM can sum 16 weight rows
// side by side (gemm_q4k_rows); here four super-blocks at a time (whole_blocks4). Q5_K keeps
// dot_q8k's 8 float lanes.
template <bool HIGH, int MR>
inline void dot_q8k_k45(const uint8_t* wrow, const Q8KRows& a, int64_t bytes, float* out) {
  const int64_t nb = a.K / 256;
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  __m128 whole[MR];  // Q4_K: lane 0
  for (int r = 0; r < MR; ++r) whole[r] = _mm_setzero_ps();
  __m256i pend[MR][4];  // Q4_K: the last super-blocks' lanes and d * d8, not yet taken
  alignas(16) float pend_dd[MR][4];
  int npend = 0;
  __m256 acc[MR];
  __m128 macc[(MR + 1) / 2];  // the min term: rows 2p and 2p + 1 in lanes 0 and 1 of macc[p]
  for (int r = 0; r < MR; ++r) acc[r] = _mm256_setzero_ps();
  for (int p = 0; 2 * p < MR; ++p) macc[p] = _mm_setzero_ps();
  alignas(16) uint8_t sm[16];
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = wrow + b * bytes;
    prefetch_ahead(blk, bytes);
    const float d = fp16(blk), dmin = fp16(blk + 2);
    k4_scale_bytes(blk + 4, sm);
    const uint8_t* qs = blk + (HIGH ? 48 : 16);
    __m256i qh = HIGH ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16))
                      : _mm256_setzero_si256();
    __m256i sumi[MR];
#ifdef MOEFLOW_VNNI
    // 64 weight bytes at a time (k45_half); each 512-bit sum folds to the AVX2 lanes' (lane i:
    // bytes 4i..4i+3 of every chunk), so the result is AVX2's.
    {
      __m512i sumz[MR];
      for (int r = 0; r < MR; ++r) sumz[r] = _mm512_setzero_si512();
      const __m512i qh = HIGH ? _mm512_broadcast_i64x4(_mm256_loadu_si256(
                                    reinterpret_cast<const __m256i*>(blk + 16)))
                              : _mm512_setzero_si512();
      const __m512i scz = _mm512_castsi256_si512(
          _mm256_cvtepu8_epi16(_mm_load_si128(reinterpret_cast<const __m128i*>(sm))));
      for (int k = 0; k < 2; ++k) {
        __m512i lo, hi, s_lo, s_hi;
        k45_half<HIGH>(qs, qh, scz, k, lo, hi, s_lo, s_hi);
        for (int r = 0; r < MR; ++r) {
          const int8_t* q = a.q + r * a.K + b * 256 + 128 * k;
          const __m512i x_lo = _mm512_loadu_si512(q), x_hi = _mm512_loadu_si512(q + 64);
          sumz[r] = _mm512_dpwssd_epi32(sumz[r], _mm512_maddubs_epi16(lo, x_lo), s_lo);
          sumz[r] = _mm512_dpwssd_epi32(sumz[r], _mm512_maddubs_epi16(hi, x_hi), s_hi);
        }
      }
      for (int r = 0; r < MR; ++r)
        sumi[r] = _mm256_add_epi32(_mm512_castsi512_si256(sumz[r]),
                                   _mm512_extracti64x4_epi64(sumz[r], 1));
    }
#else
    for (int r = 0; r < MR; ++r) sumi[r] = _mm256_setzero_si256();
    for (int j = 0; j < 4; ++j) {  // chunks 2j (low nibbles) and 2j + 1 (high) of 32 bytes
      const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * j));
      __m256i lo = _mm256_and_si256(bits, m4);
      __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
      if constexpr (HIGH) {  // bit c of qh[l] is the 5th bit of element l of chunk c
        const __m256i one = _mm256_set1_epi8(1);
        lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(qh, one), 4));
        hi = _mm256_or_si256(
            hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 1), one), 4));
        qh = _mm256_srli_epi16(qh, 2);
      }
      const __m256i s_lo = _mm256_set1_epi16(sm[2 * j]);
      const __m256i s_hi = _mm256_set1_epi16(sm[2 * j + 1]);
      for (int r = 0; r < MR; ++r) {
        const int8_t* q = a.q + r * a.K + b * 256 + 64 * j;
        const __m256i x_lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
        const __m256i x_hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32));
        sumi[r] = madd_acc(sumi[r], _mm256_maddubs_epi16(lo, x_lo), s_lo);
        sumi[r] = madd_acc(sumi[r], _mm256_maddubs_epi16(hi, x_hi), s_hi);
      }
    }
#endif
    for (int r = 0; r < MR; ++r) {
      const float d8 = a.d[r * nb + b];
      if constexpr (HIGH) {
        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * d8), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
      } else {
        pend[r][npend] = sumi[r];
        pend_dd[r][npend] = d * d8;
      }
    }
    if constexpr (!HIGH) {
      if (++npend == 4 || b == nb - 1) {
        for (int r = 0; r < MR; ++r)
          whole[r] = whole_blocks4(pend[r], pend_dd[r], npend, whole[r]);
        npend = 0;
      }
    }
    // the min term, rows two by two (lanes 0 and 1 of macc[r / 2]): the 8 mins, each twice,
    // against the 16 sums of 16 activations (sum over c of mins[c] * the sum of chunk c), the two
    // rows' 8 int32 lanes summed side by side; then macc -= (dmin * d8) * float(that), lane by
    // lane (the integer is the whole sum, so the result is that of a sum in any order)
    const __m256i mins2 = k4_mins_twice(sm);
    const auto min_lanes = [&](int r) {
      return r < MR ? _mm256_madd_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                                            a.bsums + r * (a.K / 16) + b * 16)),
                                        mins2)
                    : _mm256_setzero_si256();
    };
    for (int p = 0; 2 * p < MR; ++p) {
      const __m256i p0 = min_lanes(2 * p), p1 = min_lanes(2 * p + 1);
      __m256i u = _mm256_add_epi32(_mm256_unpacklo_epi32(p0, p1), _mm256_unpackhi_epi32(p0, p1));
      u = _mm256_add_epi32(u, _mm256_shuffle_epi32(u, 0x4e));
      const __m128i ms = _mm_add_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
      const float d8_odd = 2 * p + 1 < MR ? a.d[(2 * p + 1) * nb + b] : 0.0f;
      const __m128 d8 = _mm_setr_ps(a.d[2 * p * nb + b], d8_odd, 0.0f, 0.0f);
      macc[p] = _mm_sub_ps(macc[p],
                           _mm_mul_ps(_mm_mul_ps(_mm_set1_ps(dmin), d8), _mm_cvtepi32_ps(ms)));
    }
  }
  alignas(16) float mv[(MR + 1) / 2][4];
  for (int p = 0; 2 * p < MR; ++p) _mm_store_ps(mv[p], macc[p]);
  for (int r = 0; r < MR; ++r)
    out[r] = (HIGH ? hsum(acc[r]) : _mm_cvtss_f32(whole[r])) + mv[r / 2][r % 2];
}

template <int MR>
void dot_q8k(Q4_K, const uint8_t* wrow, const Q8KRows& a, float* out) {
  dot_q8k_k45<false, MR>(wrow, a, Q4_K::BYTES, out);
}

template <int MR>
void dot_q8k(Q5_K, const uint8_t* wrow, const Q8KRows& a, float* out) {
  dot_q8k_k45<true, MR>(wrow, a, Q5_K::BYTES, out);
}

#ifdef MOEFLOW_VNNI
// 64 values of a Q6_K super-block as dot_q8k reads them: for half (0, 1) and u (0, 1), q holds
// groups u | u + 2 of that half (the low | high nibbles of ql's 32 bytes u, with their 2 high
// bits), as 0..63, beside activations stored in that order (kq8k_slot); s2 their scale vector
// (one int16 per pair of products) from sc16z, the 16 scales as int16 lanes 0-15.
inline void q6k_quarter(const uint8_t* blk, __m512i sc16z, int half, int u, __m512i& q,
                        __m512i& s2) {
  const __m512i m4 = _mm512_set1_epi8(0x0F), m2 = _mm512_set1_epi8(3);
  // shifts of 0 (low 256-bit half) and 4 (high half)
  const __m512i sh = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
  const __m512i qh = _mm512_broadcast_i64x4(
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 128 + 32 * half)));
  const __m512i l = _mm512_broadcast_i64x4(
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 64 * half + 32 * u)));
  const __m512i lo = _mm512_and_si512(_mm512_srlv_epi16(l, sh), m4);
  // high bits of group g: (qh >> 2g) & 3, g = u (low half) or u + 2 (high half)
  const __m512i hsh = _mm512_add_epi16(sh, _mm512_set1_epi16(static_cast<int16_t>(2 * u)));
  const __m512i hb = _mm512_and_si512(_mm512_srlv_epi16(qh, hsh), m2);
  q = _mm512_or_si512(lo, _mm512_slli_epi16(hb, 4));  // 0..63
  // sub-scales: 16 values each; g's pair is 8 * half + 2g, + 1
  const auto s0 = static_cast<int16_t>(8 * half + 2 * u), s1 = static_cast<int16_t>(s0 + 4);
  const __m512i idx = _mm512_inserti64x4(
      _mm512_castsi256_si512(
          _mm256_set_m128i(_mm_set1_epi16(static_cast<int16_t>(s0 + 1)), _mm_set1_epi16(s0))),
      _mm256_set_m128i(_mm_set1_epi16(static_cast<int16_t>(s1 + 1)), _mm_set1_epi16(s1)), 1);
  s2 = _mm512_permutexvar_epi16(idx, sc16z);
}
#endif

// Q6_K: values q in 0..63 (stored minus 32) with an int8 scale per 16 values:
// sum = d * d8 * (sum_s sc_s * sum(q x) - 32 * sum_s sc_s * bsum_s). Super-block b's integer
// lanes of the MR rows into sumi.
template <int MR>
inline void q6k_block_lanes(const uint8_t* blk, const Q8KRows& a, int64_t b,
                            __m256i (&sumi)[MR]) {
  [[maybe_unused]] const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(3);
  const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
  const __m256i sc16 =
      _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc)));
  for (int r = 0; r < MR; ++r) {  // the -32 offset: -32 * sum_s sc_s * bsum_s
    const __m256i bs =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.bsums + r * (a.K / 16) + b * 16));
    sumi[r] = _mm256_slli_epi32(_mm256_madd_epi16(bs, sc16), 5);
    sumi[r] = _mm256_sub_epi32(_mm256_setzero_si256(), sumi[r]);
  }
#ifdef MOEFLOW_VNNI
  // Per half: register A holds values g0 | g2 (l0's low | high nibbles), B g1 | g3, beside
  // activations stored in that order (kq8k_slot); folded to the AVX2 lanes as for Q4_K.
  {
    const __m512i sc16z = _mm512_castsi256_si512(sc16);
    __m512i sumz[MR];
    for (int r = 0; r < MR; ++r) sumz[r] = _mm512_setzero_si512();
    for (int half = 0; half < 2; ++half) {
      for (int u = 0; u < 2; ++u) {  // u = 0: g0 | g2 (l0), u = 1: g1 | g3 (l1)
        __m512i q, s2;
        q6k_quarter(blk, sc16z, half, u, q, s2);
        for (int r = 0; r < MR; ++r) {
          const __m512i x = _mm512_loadu_si512(a.q + r * a.K + b * 256 + 128 * half + 64 * u);
          sumz[r] = _mm512_dpwssd_epi32(sumz[r], _mm512_maddubs_epi16(q, x), s2);
        }
      }
    }
    for (int r = 0; r < MR; ++r)
      sumi[r] = _mm256_add_epi32(sumi[r], _mm256_add_epi32(_mm512_castsi512_si256(sumz[r]),
                                                           _mm512_extracti64x4_epi64(sumz[r], 1)));
  }
#else
  for (int half = 0; half < 2; ++half) {
    const uint8_t* ql = blk + 64 * half;
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 128 + 32 * half));
    const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql));
    const __m256i l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 32));
    for (int g = 0; g < 4; ++g) {  // 32 values each: low or high nibbles of l0 / l1
      __m256i lo = g & 1 ? l1 : l0;
      if (g >= 2) lo = _mm256_srli_epi16(lo, 4);
      lo = _mm256_and_si256(lo, m4);
      const __m256i hb = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * g), m2);
      const __m256i q = _mm256_or_si256(lo, _mm256_slli_epi16(hb, 4));  // 0..63
      const int s = 8 * half + 2 * g;  // the sub-scales of values 0..15 and 16..31
      const __m256i s2 = _mm256_set_m128i(_mm_set1_epi16(sc[s + 1]), _mm_set1_epi16(sc[s]));
      for (int r = 0; r < MR; ++r) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
            a.q + r * a.K + b * 256 + 128 * half + 32 * g));
        sumi[r] = madd_acc(sumi[r], _mm256_maddubs_epi16(q, x), s2);
      }
    }
  }
#endif
}

// As Q4_K's, the float work takes a super-block's integer lanes summed whole (exact), four
// super-blocks at a time from registers (whole_blocks4): acc = fma(float(sum), d * d8, acc), as
// the GEMMs (gemm_i8.h) do.
template <int MR>
void dot_q8k(Q6_K, const uint8_t* wrow, const Q8KRows& a, float* out) {
  const int64_t nb = a.K / 256;
  __m128 whole[MR];  // lane 0
  for (int r = 0; r < MR; ++r) whole[r] = _mm_setzero_ps();
  for (int64_t b0 = 0; b0 < nb; b0 += 4) {
    const int n = static_cast<int>(std::min<int64_t>(4, nb - b0));
    __m256i lanes[MR][4];
    alignas(16) float dd[MR][4];
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      __m256i sumi[MR];
      float d = 0.0f;
      if (q < n) {
        const uint8_t* blk = wrow + (b0 + q) * Q6_K::BYTES;
        prefetch_ahead(blk, Q6_K::BYTES);
        q6k_block_lanes<MR>(blk, a, b0 + q, sumi);
        d = fp16(blk + 208);
      } else {
        for (int r = 0; r < MR; ++r) sumi[r] = _mm256_setzero_si256();
      }
      for (int r = 0; r < MR; ++r) {
        lanes[r][q] = sumi[r];
        dd[r][q] = q < n ? d * a.d[r * nb + b0 + q] : 0.0f;
      }
    }
    for (int r = 0; r < MR; ++r) whole[r] = whole_blocks4(lanes[r], dd[r], n, whole[r]);
  }
  for (int r = 0; r < MR; ++r) out[r] = _mm_cvtss_f32(whole[r]);
}

// Q2_K and Q3_K: 2-bit values (plus Q3_K's third bit) of chunk c against the activations'
// chunk c (wherever kq8k_slot stores it), each 16 values times its sub-block scale in int32
// lanes; Q2_K's mins and Q3_K's -4 offset come from the 16-value sums.
template <int MR>
void dot_q8k(Q2_K, const uint8_t* wrow, const Q8KRows& a, float* out) {
  const int64_t nb = a.K / 256;
  __m256 acc[MR];
  float macc[MR];
  for (int r = 0; r < MR; ++r) {
    acc[r] = _mm256_setzero_ps();
    macc[r] = 0.0f;
  }
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = wrow + b * Q2_K::BYTES;
    prefetch_ahead(blk, Q2_K::BYTES);
    const float d = fp16(blk + 80), dmin = fp16(blk + 82);
    const __m128i sb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk));
    const __m256i sc16 = _mm256_cvtepu8_epi16(_mm_and_si128(sb, _mm_set1_epi8(0x0F)));
    const __m256i mn16 =
        _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(sb, 4), _mm_set1_epi8(0x0F)));
    alignas(32) int16_t sc[16];
    _mm256_store_si256(reinterpret_cast<__m256i*>(sc), sc16);
    __m256i sumi[MR];
    for (int r = 0; r < MR; ++r) sumi[r] = _mm256_setzero_si256();
    for (int c = 0; c < 8; ++c) {
      const __m256i q = Q2_K::I(blk, c);
      const __m256i s2 = _mm256_set_m128i(_mm_set1_epi16(sc[2 * c + 1]), _mm_set1_epi16(sc[2 * c]));
      for (int r = 0; r < MR; ++r) {
        const __m256i x = _mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(a.q + r * a.K + b * 256 + 32 * kq8k_slot(c)));
        sumi[r] = madd_acc(sumi[r], _mm256_maddubs_epi16(q, x), s2);
      }
    }
    for (int r = 0; r < MR; ++r) {
      const float d8 = a.d[r * nb + b];
      const __m256i bs =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.bsums + r * (a.K / 16) + b * 16));
      acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * d8), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
      macc[r] -= dmin * d8 * static_cast<float>(hsum_i32(_mm256_madd_epi16(bs, mn16)));
    }
  }
  for (int r = 0; r < MR; ++r) out[r] = hsum(acc[r]) + macc[r];
}

template <int MR>
void dot_q8k(Q3_K, const uint8_t* wrow, const Q8KRows& a, float* out) {
  const int64_t nb = a.K / 256;
  __m256 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm256_setzero_ps();
  alignas(16) int8_t sc[16];
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = wrow + b * Q3_K::BYTES;
    prefetch_ahead(blk, Q3_K::BYTES);
    const float d = fp16(blk + 108);
    q3k_scales(blk + 96, sc);
    const __m256i sc16 =
        _mm256_cvtepi8_epi16(_mm_load_si128(reinterpret_cast<const __m128i*>(sc)));
    __m256i sumi[MR];
    for (int r = 0; r < MR; ++r) {  // the -4 offset: -4 * sum_s sc_s * bsum_s
      const __m256i bs =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.bsums + r * (a.K / 16) + b * 16));
      sumi[r] = _mm256_sub_epi32(_mm256_setzero_si256(),
                                 _mm256_slli_epi32(_mm256_madd_epi16(bs, sc16), 2));
    }
    for (int c = 0; c < 8; ++c) {
      const __m256i q = Q3_K::I(blk, c);
      const __m256i s2 = _mm256_set_m128i(_mm_set1_epi16(sc[2 * c + 1]), _mm_set1_epi16(sc[2 * c]));
      for (int r = 0; r < MR; ++r) {
        const __m256i x = _mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(a.q + r * a.K + b * 256 + 32 * kq8k_slot(c)));
        sumi[r] = madd_acc(sumi[r], _mm256_maddubs_epi16(q, x), s2);
      }
    }
    for (int r = 0; r < MR; ++r)
      acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * a.d[r * nb + b]), _mm256_cvtepi32_ps(sumi[r]),
                               acc[r]);
  }
  for (int r = 0; r < MR; ++r) out[r] = hsum(acc[r]);
}

}  // namespace

#include "iq4.h"  // IQ4_NL, IQ4_XS
#include "gemm_i8.h"  // the int8 GEMM of the 256-weight types
#include "gemm_b32.h"  // the int8 GEMV and GEMM of the 32-weight types
#include "q4k_r16.h"  // Q4_K repacked 16 rows at a time

namespace {

// ggml type ids (gguf.py GGMLType)
enum : int64_t { kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ2_K = 10,
                 kQ3_K = 11, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14, kIQ4_NL = 20,
                 kIQ4_XS = 23 };
// moeflow's own layout, not a ggml type: Q4_K repacked 16 rows at a time (q4k_r16.h)
constexpr int64_t kQ4_K_R16 = 1012;

template <class F>
void dispatch_type(int64_t qtype, F&& f) {
  switch (qtype) {
    case kQ4_0: f(Q4_0{}); break;
    case kQ4_1: f(Q4_1{}); break;
    case kQ5_0: f(Q5_0{}); break;
    case kQ5_1: f(Q5_1{}); break;
    case kQ8_0: f(Q8_0{}); break;
    case kQ2_K: f(Q2_K{}); break;
    case kQ3_K: f(Q3_K{}); break;
    case kQ4_K: f(Q4_K{}); break;
    case kQ5_K: f(Q5_K{}); break;
    case kQ6_K: f(Q6_K{}); break;
    case kIQ4_NL: f(IQ4_NL{}); break;
    case kIQ4_XS: f(IQ4_XS{}); break;
    default: TORCH_CHECK(false, "moeflow cpu_ops: unsupported ggml type ", qtype);
  }
}

// y[:, n0:n1] = x W[n0:n1]^T for weight rows of any type kept here, the repacked Q4_K included.
inline void gemv_any(int64_t qtype, const ActsView& a, const uint8_t* w, int64_t N, int64_t n0,
                     int64_t n1, float* y, GemvScratch& scratch) {
  if (qtype == kQ4_K_R16) {
    gemv_q4k_r16(a, w, N, n0, n1, y, scratch);
    return;
  }
  dispatch_type(qtype, [&](auto t) { gemv_rows<decltype(t)>(a, w, N, n0, n1, y, scratch); });
}

// Rows of K weights of `qtype` hold `row_bytes` bytes, and there are N of them: checked (what).
inline void check_rows_of(int64_t qtype, int64_t K, int64_t N, int64_t row_bytes,
                          const char* what) {
  const bool r16 = qtype == kQ4_K_R16;
  dispatch_type(r16 ? kQ4_K : qtype, [&](auto t) {
    using T = decltype(t);
    TORCH_CHECK(K % T::QK == 0, what, ": in_features ", K, " is not a multiple of the block size ",
                T::QK);
    TORCH_CHECK(row_bytes == K / T::QK * T::BYTES, what, " rows hold ", row_bytes,
                " bytes, expected ", K / T::QK * T::BYTES);
  });
  TORCH_CHECK(!r16 || N % 16 == 0, what, ": repacked Q4_K needs a multiple of 16 rows, not ", N);
}

// A weight of `qtype` (the repacked Q4_K included): contiguous rows of K weights' blocks.
inline void check_weight(const at::Tensor& w, int64_t qtype, int64_t K) {
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous(),
              "quantised weight must be a contiguous 2-D uint8 tensor");
  check_rows_of(qtype, K, w.size(0), w.size(1), "weight");
}

void check_f32(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.device().is_cpu(), what,
              " must be a contiguous float32 CPU tensor");
}

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

}  // namespace
