// The int8 path's GEMM for the 256-weight types (Q2_K Q3_K Q4_K Q5_K Q6_K IQ4_XS) against Q8_K
// activations, for weight rows that meet many activation rows (prefill projections, an expert's
// gathered tokens). dot_q8k decodes a weight super-block again for every MR activation rows;
// here kGemmNR weight rows are decoded once, over all of K, into KBlocks (the weights as bytes
// beside their int16 scales per 16 values), and a register-blocked microkernel runs kGemmMR
// activation rows x kGemmNR weight rows per step over them (AVX-512: 64 bytes a step, maddubs +
// vpdpwssd; AVX2: 32 bytes, maddubs + madd).
//
// Bit for bit dot_q8k: a super-block's integer sums land in the same 8 int32 lanes (lane i sums
// bytes 4i..4i+3 of every chunk; integer sums do not depend on their order, and no int16 step
// saturates, as in dot_q8k), and the float work per super-block and at the end is dot_q8k's,
// operation for operation (the build has no FP contraction). So a row's result never depends
// on how many rows it was multiplied with, nor on which kernel ran it.
// Included by cpu_common.h after the block types; gemv_rows calls gemm_q8k_rows.
#pragma once

namespace {

// How a type's 16-value activation sums (Q8_K bsums) enter: not at all (IQ4_XS); as the min
// term, subtracted in float per super-block (Q2_K Q4_K Q5_K: dmin * d8 * sum(c16 * bsums)); or
// as the offset of the stored values, added to the integer lanes (Q3_K -4, Q6_K -32: c16 holds
// offset * scale per 16 values, the lane sums madd(bsums, c16)).
enum class BsumTerm { kNone, kMin, kOffset };

// Per type: decode() one super-block into a KBlock; kTerm (above); kSigned: the weights are
// stored as signed bytes (IQ4_XS), else unsigned.
template <class T> struct KDecode;

inline void store_chunk(KBlock& o, int c, __m256i q, int16_t s_lo, int16_t s_hi) {
  const int slot = kq8k_slot(c);
  _mm256_store_si256(reinterpret_cast<__m256i*>(o.q + 32 * slot), q);
  _mm256_store_si256(reinterpret_cast<__m256i*>(o.s + 16 * slot),
                     _mm256_set_m128i(_mm_set1_epi16(s_hi), _mm_set1_epi16(s_lo)));
}

template <class T>
inline void decode_k45(const uint8_t* blk, KBlock& o) {
  alignas(16) uint8_t sm[16];
  k4_scale_bytes(blk + 4, sm);
  o.d = fp16(blk);
  o.dmin = fp16(blk + 2);
  for (int c = 0; c < 8; ++c) store_chunk(o, c, T::I(blk, c), sm[c], sm[c]);
  for (int j = 0; j < 16; ++j) o.c16[j] = sm[8 + j / 2];
}

template <> struct KDecode<Q4_K> {
  static constexpr bool kSigned = false;
  static constexpr BsumTerm kTerm = BsumTerm::kMin;
  static void decode(const uint8_t* blk, KBlock& o) { decode_k45<Q4_K>(blk, o); }
};

template <> struct KDecode<Q5_K> {
  static constexpr bool kSigned = false;
  static constexpr BsumTerm kTerm = BsumTerm::kMin;
  static void decode(const uint8_t* blk, KBlock& o) { decode_k45<Q5_K>(blk, o); }
};

template <> struct KDecode<Q6_K> {
  static constexpr bool kSigned = false;
  static constexpr BsumTerm kTerm = BsumTerm::kOffset;
  static void decode(const uint8_t* blk, KBlock& o) {
    const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
    o.d = fp16(blk + 208);
    o.dmin = 0.0f;
    for (int c = 0; c < 8; ++c)  // I() gives q - 32: back to 0..63
      store_chunk(o, c, _mm256_add_epi8(Q6_K::I(blk, c), _mm256_set1_epi8(32)), sc[2 * c],
                  sc[2 * c + 1]);
    for (int j = 0; j < 16; ++j) o.c16[j] = static_cast<int16_t>(-32 * sc[j]);
  }
};

template <> struct KDecode<Q2_K> {
  static constexpr bool kSigned = false;
  static constexpr BsumTerm kTerm = BsumTerm::kMin;
  static void decode(const uint8_t* blk, KBlock& o) {
    o.d = fp16(blk + 80);
    o.dmin = fp16(blk + 82);
    for (int c = 0; c < 8; ++c)
      store_chunk(o, c, Q2_K::I(blk, c), blk[2 * c] & 0xF, blk[2 * c + 1] & 0xF);
    for (int j = 0; j < 16; ++j) o.c16[j] = blk[j] >> 4;
  }
};

template <> struct KDecode<Q3_K> {
  static constexpr bool kSigned = false;
  static constexpr BsumTerm kTerm = BsumTerm::kOffset;
  static void decode(const uint8_t* blk, KBlock& o) {
    int8_t sc[16];
    q3k_scales(blk + 96, sc);
    o.d = fp16(blk + 108);
    o.dmin = 0.0f;
    for (int c = 0; c < 8; ++c) store_chunk(o, c, Q3_K::I(blk, c), sc[2 * c], sc[2 * c + 1]);
    for (int j = 0; j < 16; ++j) o.c16[j] = static_cast<int16_t>(-4 * sc[j]);
  }
};

template <> struct KDecode<IQ4_XS> {
  static constexpr bool kSigned = true;  // the microkernel moves the weights' sign onto x
  static constexpr BsumTerm kTerm = BsumTerm::kNone;
  static void decode(const uint8_t* blk, KBlock& o) {
    o.d = fp16(blk);
    o.dmin = 0.0f;
    for (int c = 0; c < 8; ++c) {
      const auto s = static_cast<int16_t>(IQ4_XS::ls(blk, c) - 32);
      store_chunk(o, c, IQ4_XS::I(blk, c), s, s);
    }
    for (int j = 0; j < 16; ++j) o.c16[j] = 0;
  }
};

// The int8 microkernels' integer vector (here and in gemm_b32.h): 64 bytes (here two chunks, in
// kq8k_slot order) with AVX-512, else 32.
#ifdef MOEFLOW_VNNI
using KVec = __m512i;
constexpr int kKStep = 64;
inline KVec kload(const void* p) { return _mm512_load_si512(p); }
inline KVec kloadu(const void* p) { return _mm512_loadu_si512(p); }
inline KVec kzero() { return _mm512_setzero_si512(); }
inline KVec kset1(int32_t v) { return _mm512_set1_epi32(v); }
inline KVec kmaddubs(KVec u, KVec s) { return _mm512_maddubs_epi16(u, s); }
inline KVec kdot(KVec acc, KVec a, KVec b) { return _mm512_dpwssd_epi32(acc, a, b); }
inline KVec kabs(KVec w) { return _mm512_abs_epi8(w); }
// x with w's sign (x where w > 0, -x where w < 0; where w is 0, |w| zeroes the product anyway)
inline KVec ksign(KVec x, KVec w) {
  return _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), _mm512_setzero_si512(), x);
}
// the two chunks' lanes summed: AVX2's 8 lanes
inline __m256i kfold(KVec v) {
  return _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
}
#else
using KVec = __m256i;
constexpr int kKStep = 32;
inline KVec kload(const void* p) { return _mm256_load_si256(static_cast<const __m256i*>(p)); }
inline KVec kloadu(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline KVec kzero() { return _mm256_setzero_si256(); }
inline KVec kset1(int32_t v) { return _mm256_set1_epi32(v); }
inline KVec kmaddubs(KVec u, KVec s) { return _mm256_maddubs_epi16(u, s); }
inline KVec kdot(KVec acc, KVec a, KVec b) { return madd_acc(acc, a, b); }
inline KVec kabs(KVec w) { return _mm256_sign_epi8(w, w); }
inline KVec ksign(KVec x, KVec w) { return _mm256_sign_epi8(x, w); }
inline __m256i kfold(KVec v) { return v; }
#endif

// out[r][n] = activation row r (of a) . weight row n (its nb KBlocks at wt + n * nb), for MR x NR
template <class T, int MR, int NR>
void kgemm_tile(const KBlock* wt, int64_t nb, const Q8KRows& a, float (*out)[NR]) {
  constexpr BsumTerm term = KDecode<T>::kTerm;
  __m256 acc[MR][NR];
  float macc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int n = 0; n < NR; ++n) {
      acc[r][n] = _mm256_setzero_ps();
      macc[r][n] = 0.0f;
    }
  for (int64_t b = 0; b < nb; ++b) {
    KVec sum[MR][NR];
    for (int r = 0; r < MR; ++r)
      for (int n = 0; n < NR; ++n) sum[r][n] = kzero();
    for (int j = 0; j < 256; j += kKStep) {
      KVec x[MR];
      for (int r = 0; r < MR; ++r) x[r] = kloadu(a.q + r * a.K + b * 256 + j);
      for (int n = 0; n < NR; ++n) {
        const KBlock& t = wt[n * nb + b];
        const KVec w = kload(t.q + j), s = kload(t.s + j / 2);
        if constexpr (KDecode<T>::kSigned) {
          const KVec wu = kabs(w);
          for (int r = 0; r < MR; ++r)
            sum[r][n] = kdot(sum[r][n], kmaddubs(wu, ksign(x[r], w)), s);
        } else {
          for (int r = 0; r < MR; ++r) sum[r][n] = kdot(sum[r][n], kmaddubs(w, x[r]), s);
        }
      }
    }
    // The float work of dot_q8k, per (r, n): acc += (d * d8) * float(lanes), and for kMin
    // macc -= dmin * d8 * float(sum(c16 * bsums)); with 4 weight rows, these products and the
    // integer sums are taken for the 4 at once (the same values lane by lane).
    alignas(16) float dn[NR], dminn[NR];
    for (int n = 0; n < NR; ++n) {
      dn[n] = wt[n * nb + b].d;
      dminn[n] = wt[n * nb + b].dmin;
    }
    for (int r = 0; r < MR; ++r) {
      const float d8 = a.d[r * nb + b];
      const __m256i bs =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.bsums + r * (a.K / 16) + b * 16));
      alignas(16) float dd[NR];
      [[maybe_unused]] alignas(16) int32_t ms[NR];
      if constexpr (NR == 4) {
        _mm_store_ps(dd, _mm_mul_ps(_mm_load_ps(dn), _mm_set1_ps(d8)));
      } else {
        for (int n = 0; n < NR; ++n) dd[n] = dn[n] * d8;
      }
      for (int n = 0; n < NR; ++n) {
        const KBlock& t = wt[n * nb + b];
        __m256i si = kfold(sum[r][n]);
        const __m256i c16 = _mm256_load_si256(reinterpret_cast<const __m256i*>(t.c16));
        if constexpr (term == BsumTerm::kOffset) si = madd_acc(si, bs, c16);
        acc[r][n] = _mm256_fmadd_ps(_mm256_set1_ps(dd[n]), _mm256_cvtepi32_ps(si), acc[r][n]);
        if constexpr (term == BsumTerm::kMin && NR != 4)
          ms[n] = hsum_i32(_mm256_madd_epi16(bs, c16));
      }
      if constexpr (term == BsumTerm::kMin && NR == 4) {
        __m256i p[4];
        for (int n = 0; n < 4; ++n)
          p[n] = _mm256_madd_epi16(
              bs, _mm256_load_si256(reinterpret_cast<const __m256i*>(wt[n * nb + b].c16)));
        const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]),
                                            _mm256_hadd_epi32(p[2], p[3]));
        const __m128 msf = _mm_cvtepi32_ps(
            _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
        const __m128 prod = _mm_mul_ps(_mm_mul_ps(_mm_load_ps(dminn), _mm_set1_ps(d8)), msf);
        _mm_storeu_ps(macc[r], _mm_sub_ps(_mm_loadu_ps(macc[r]), prod));
      } else if constexpr (term == BsumTerm::kMin) {
        for (int n = 0; n < NR; ++n)
          macc[r][n] -= dminn[n] * d8 * static_cast<float>(ms[n]);
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int n = 0; n < NR; ++n)
      out[r][n] = term == BsumTerm::kMin ? hsum(acc[r][n]) + macc[r][n] : hsum(acc[r][n]);
}

// y[m, n] for every activation row m < M and weight rows n0..n0+NR-1 (decoded at wt)
template <class T, int NR>
void kgemm_rows(const ActsView& a, const KBlock* wt, float* y, int64_t N, int64_t n0) {
  const int64_t K = a.K, nb = K / 256;
  const auto rows = [&](int64_t m) {
    return Q8KRows{a.kq + m * K, a.kd + m * nb, a.kbs + m * (K / 16), K};
  };
  float out[kGemmMR][NR];
  int64_t m = 0;
  for (; m + kGemmMR <= a.M; m += kGemmMR) {
    kgemm_tile<T, kGemmMR, NR>(wt, nb, rows(m), out);
    for (int r = 0; r < kGemmMR; ++r)
      for (int n = 0; n < NR; ++n) y[(m + r) * N + n0 + n] = out[r][n];
  }
  if constexpr (kGemmMR > 2) {
    for (; m + 2 <= a.M; m += 2) {
      kgemm_tile<T, 2, NR>(wt, nb, rows(m), out);
      for (int r = 0; r < 2; ++r)
        for (int n = 0; n < NR; ++n) y[(m + r) * N + n0 + n] = out[r][n];
    }
  }
  for (; m < a.M; ++m) {
    kgemm_tile<T, 1, NR>(wt, nb, rows(m), out);
    for (int n = 0; n < NR; ++n) y[m * N + n0 + n] = out[0][n];
  }
}

// Activation rows per pass over the weight rows: 256 rows of K int8 values stay in L2 while
// every group of kGemmNR weight rows is decoded and run against them.
constexpr int64_t kGemmMB = 256;

template <class T>
void gemm_q8k_rows(const ActsView& a, const uint8_t* w, int64_t N, int64_t n0, int64_t n1,
                   float* y, GemvScratch& scratch) {
  const int64_t nb = a.K / 256, row_bytes = nb * T::BYTES;
  if (static_cast<int64_t>(scratch.kblocks.size()) < kGemmNR * nb)
    scratch.kblocks.resize(static_cast<size_t>(kGemmNR * nb));
  KBlock* wt = scratch.kblocks.data();
  for (int64_t m0 = 0; m0 < a.M; m0 += kGemmMB) {
    const ActsView am = a.rows(m0, std::min(kGemmMB, a.M - m0));
    float* ym = y + m0 * N;
    for (int64_t n = n0; n < n1; n += kGemmNR) {
      const int64_t nr = std::min<int64_t>(kGemmNR, n1 - n);
      for (int64_t i = 0; i < nr; ++i)
        for (int64_t b = 0; b < nb; ++b) {
          const uint8_t* blk = w + (n + i) * row_bytes + b * T::BYTES;
          prefetch_ahead(blk, T::BYTES);
          KDecode<T>::decode(blk, wt[i * nb + b]);
        }
      if (nr == kGemmNR) {
        kgemm_rows<T, kGemmNR>(am, wt, ym, N, n);
      } else {
        for (int64_t i = 0; i < nr; ++i) kgemm_rows<T, 1>(am, wt + i * nb, ym, N, n + i);
      }
    }
  }
}

}  // namespace
