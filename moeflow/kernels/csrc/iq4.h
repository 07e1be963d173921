// IQ4_NL and IQ4_XS, the 4-bit types of llama.cpp's IQ family, as block types of the CPU kernels
// (the interface of cpu_common.h's Q4_0 .. Q6_K: scales(), chunk(), I()) plus IQ4_XS's product
// against Q8_K activations. Included by cpu_common.h ahead of dispatch_type; uses its helpers.
//
// Both read each 4-bit quant through a 16-entry codebook of int8 values (ggml-common.h
// kvalues_iq4nl; weights/ggml_quants.py IQ4_VALUES), a non-linear grid denser near zero:
//   w = scale * kvalues[q]
// with no min term. One shuffle (pshufb) looks up 32 quants at once, giving the weights as signed
// bytes: the exact path converts them to floats; the int8 path multiplies them with maddubs as
// Q8_0's signed weights are (dot_i8<SIGNED>), IQ4_XS with its 6-bit sub-block scales as int16 in
// the madd (as Q4_K's scales).
//   IQ4_NL: 32-weight blocks, d (fp16) + 16 bytes of nibbles (low nibbles elements 0..15).
//   IQ4_XS: 256-weight super-blocks, d (fp16), uint16 scales_h, uint8 scales_l[4], 128 bytes of
//           nibbles (16 a chunk, as IQ4_NL's); chunk c's scale is d * (ls_c - 32), ls_c the low
//           nibble c of scales_l (c % 2 = 0: low) with bits 2c..2c+1 of scales_h above it.
#pragma once

namespace {

// The 16 codebook values as signed bytes
inline __m128i iq4_codebook() {
  return _mm_setr_epi8(-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113);
}

// 16 bytes of nibbles -> 32 codebook values as signed bytes, in element order
inline __m256i iq4_values32(const uint8_t* qs) {
  return _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(iq4_codebook()), nibbles32(qs));
}

struct IQ4_NL {
  static constexpr int QK = 32, BYTES = 18, NC = 1;
  static constexpr bool SIGNED = true;
  static __m256i I(const uint8_t* b, int) { return iq4_values32(b + 2); }
  static void scales(const uint8_t* b, float* sc, float* mn) {
    sc[0] = fp16(b);
    mn[0] = 0.0f;
  }
  static void chunk(const uint8_t* b, int c, __m256* q) { i8x32_to_f32(I(b, c), q); }
};

struct IQ4_XS {
  static constexpr int QK = 256, BYTES = 136, NC = 8;
  static constexpr bool SIGNED = true;
  // chunk c's 6-bit scale, stored plus 32
  static int ls(const uint8_t* b, int c) {
    uint16_t high;
    std::memcpy(&high, b + 2, 2);
    return ((b[4 + c / 2] >> (4 * (c % 2))) & 0xF) | (((high >> (2 * c)) & 3) << 4);
  }
  static __m256i I(const uint8_t* b, int c) { return iq4_values32(b + 8 + 16 * c); }
  static void scales(const uint8_t* b, float* sc, float* mn) {
    const float d = fp16(b);
    for (int c = 0; c < NC; ++c) {
      sc[c] = d * static_cast<float>(ls(b, c) - 32);
      mn[c] = 0.0f;
    }
  }
  static void chunk(const uint8_t* b, int c, __m256* q) { i8x32_to_f32(I(b, c), q); }
};

// IQ4_XS against Q8_K activations (gemv_rows takes the 256-weight types there): per super-block
// sum_c (ls_c - 32) * sum(w_c x_c) in int32 lanes, then times d * d8 once. Exact integers: a
// maddubs pair is at most 2 * 127 * 127, times |ls - 32| <= 32, 8 chunks: far from int32's
// limit, and the same on the VNNI build (dpwssd) as on AVX2 (madd).
template <int MR>
void dot_q8k(IQ4_XS, const uint8_t* wrow, const Q8KRows& a, float* out) {
  const int64_t nb = a.K / 256;
  __m256 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = wrow + b * IQ4_XS::BYTES;
    prefetch_ahead(blk, IQ4_XS::BYTES);
    __m256i sumi[MR];
    for (int r = 0; r < MR; ++r) sumi[r] = _mm256_setzero_si256();
    for (int c = 0; c < IQ4_XS::NC; ++c) {
      const __m256i w = IQ4_XS::I(blk, c);
      const __m256i wu = _mm256_sign_epi8(w, w);  // |w|, the sign moved onto x below
      const __m256i s = _mm256_set1_epi16(static_cast<int16_t>(IQ4_XS::ls(blk, c) - 32));
      for (int r = 0; r < MR; ++r) {
        const __m256i x = _mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(a.q + r * a.K + b * 256 + 32 * kq8k_slot(c)));
        sumi[r] = madd_acc(sumi[r], _mm256_maddubs_epi16(wu, _mm256_sign_epi8(x, w)), s);
      }
    }
    const float d = fp16(blk);
    for (int r = 0; r < MR; ++r)
      acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * a.d[r * nb + b]), _mm256_cvtepi32_ps(sumi[r]),
                               acc[r]);
  }
  for (int r = 0; r < MR; ++r) out[r] = hsum(acc[r]);
}

}  // namespace
