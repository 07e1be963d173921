// The int8 path's GEMM for the 256-weight types (Q2_K Q3_K Q4_K Q5_K Q6_K IQ4_XS) against Q8_K
// activations, for weight rows that meet many activation rows (prefill projections, an expert's
// gathered tokens). dot_q8k decodes a weight super-block again for every MR activation rows;
// here kGemmNR weight rows are decoded once, over all of K, into KBlocks (the weights as bytes
// beside their int16 scales per 16 values), and a register-blocked microkernel runs kGemmMR
// activation rows x kGemmNR weight rows per step over them (AVX-512: 64 bytes a step, maddubs +
// vpdpwssd; AVX2: 32 bytes, maddubs + madd). With AVX-512 two weight rows share the vectors of
// the per-super-block float work (kgemm_tile_pairs). The min term of Q2_K Q4_K Q5_K is taken
// apart, for kGemmNB weight rows at once (kmin_rows). Q4_K and Q6_K with AVX-512 have GEMMs
// of their own (gemm_q4k_rows, gemm_q6k_rows, below): 16 weight rows side by side, one vpdpbusd
// for 64 products.
//
// Bit for bit dot_q8k: a super-block's integer sums land in the same 8 int32 lanes (lane i sums
// bytes 4i..4i+3 of every chunk; integer sums do not depend on their order, and no int16 step
// saturates, as in dot_q8k), and the float work per super-block and at the end is dot_q8k's,
// operation for operation (the build has no FP contraction). Q4_K's and Q6_K's float work takes
// the super-block's lanes summed whole (kWholeBlock), in dot_q8k and here alike. So a row's
// result never depends on how many rows it was multiplied with, nor on which kernel ran it.
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

// Q4_K's and Q6_K's float work takes a super-block's integer lanes summed whole (dot_q8k_k45,
// dot_q8k<Q6_K>; Q6_K's offset term in the lanes first): acc = fma(float(sum), d * d8, acc), one
// float per (activation row, weight row); the other types keep dot_q8k's 8 float lanes.
template <class T>
constexpr bool kWholeBlock = std::is_same_v<T, Q4_K> || std::is_same_v<T, Q6_K>;

// The scale vector of a chunk whose two 16-value halves have scales lo and hi
inline __m256i scale_halves(int16_t lo, int16_t hi) {
  return _mm256_set_m128i(_mm_set1_epi16(hi), _mm_set1_epi16(lo));
}

inline void store_chunk(KBlock& o, int c, __m256i q, __m256i s) {
  const int slot = kq8k_slot(c);
  _mm256_store_si256(reinterpret_cast<__m256i*>(o.q + 32 * slot), q);
  _mm256_store_si256(reinterpret_cast<__m256i*>(o.s + 16 * slot), s);
}

template <class T>
inline void decode_k45(const uint8_t* blk, KBlock& o) {
  alignas(16) uint8_t sm[16];
  k4_scale_bytes(blk + 4, sm);
  o.d = fp16(blk);
  o.dmin = fp16(blk + 2);
#ifdef MOEFLOW_VNNI
  // 64 bytes of nibbles at a time, as dot_q8k reads them (k45_half): lo is slots 4k and
  // 4k + 1, hi 4k + 2 and 4k + 3
  constexpr bool kHigh = std::is_same_v<T, Q5_K>;
  const uint8_t* qs = blk + (kHigh ? 48 : 16);
  const __m512i scz = _mm512_castsi256_si512(  // the scales as int16, lanes 0-7
      _mm256_cvtepu8_epi16(_mm_load_si128(reinterpret_cast<const __m128i*>(sm))));
  const __m512i qh =
      kHigh ? _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16)))
            : _mm512_setzero_si512();
  for (int k = 0; k < 2; ++k) {
    __m512i lo, hi, s_lo, s_hi;
    k45_half<kHigh>(qs, qh, scz, k, lo, hi, s_lo, s_hi);
    _mm512_store_si512(o.q + 128 * k, lo);
    _mm512_store_si512(o.q + 128 * k + 64, hi);
    _mm512_store_si512(o.s + 64 * k, s_lo);
    _mm512_store_si512(o.s + 64 * k + 32, s_hi);
  }
#else
  for (int c = 0; c < 8; ++c) store_chunk(o, c, T::I(blk, c), _mm256_set1_epi16(sm[c]));
#endif
  _mm256_store_si256(reinterpret_cast<__m256i*>(o.c16), k4_mins_twice(sm));  // c16[j] = mn[j / 2]
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
    const __m256i sc =
        _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 192)));
    o.d = fp16(blk + 208);
    o.dmin = 0.0f;
    // (the AVX2 build's: with AVX-512, Q6_K's GEMM is gemm_q6k_rows)
    const int8_t* sb = reinterpret_cast<const int8_t*>(blk + 192);
    for (int c = 0; c < 8; ++c)  // I() gives q - 32: back to 0..63
      store_chunk(o, c, _mm256_add_epi8(Q6_K::I(blk, c), _mm256_set1_epi8(32)),
                  scale_halves(sb[2 * c], sb[2 * c + 1]));
    _mm256_store_si256(reinterpret_cast<__m256i*>(o.c16),
                       _mm256_mullo_epi16(sc, _mm256_set1_epi16(-32)));
  }
};

template <> struct KDecode<Q2_K> {
  static constexpr bool kSigned = false;
  static constexpr BsumTerm kTerm = BsumTerm::kMin;
  static void decode(const uint8_t* blk, KBlock& o) {
    o.d = fp16(blk + 80);
    o.dmin = fp16(blk + 82);
    for (int c = 0; c < 8; ++c)
      store_chunk(o, c, Q2_K::I(blk, c), scale_halves(blk[2 * c] & 0xF, blk[2 * c + 1] & 0xF));
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
    for (int c = 0; c < 8; ++c)
      store_chunk(o, c, Q3_K::I(blk, c), scale_halves(sc[2 * c], sc[2 * c + 1]));
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
      store_chunk(o, c, IQ4_XS::I(blk, c), _mm256_set1_epi16(s));
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

// The next weight rows' bytes, streamed into L2 a few lines a step while the current rows are
// worked on (the decode or GEMV that follows then finds them there; a burst of prefetches
// before the work would stall on the line-fill buffers instead). Here and in gemm_b32.h.
struct Prefetcher {
  const char* p = nullptr;
  const char* end = nullptr;
  int64_t per_step = 0;
  // the bytes [begin, end) spread over `steps` calls of step() (none when end <= begin)
  static Prefetcher over(const uint8_t* begin, const uint8_t* end, int64_t steps) {
    Prefetcher f;
    f.p = reinterpret_cast<const char*>(begin);
    f.end = reinterpret_cast<const char*>(end);
    if (f.end > f.p) f.per_step = ((f.end - f.p) / 64 + steps) / steps;
    return f;
  }
  void step() {
    for (int64_t i = 0; i < per_step && p < end; ++i, p += 64) _mm_prefetch(p, _MM_HINT_T1);
  }
};

// One super-block b's integer sums of MR activation rows x NR decoded weight rows, in KVec
// lanes (with AVX-512 two chunks' lanes side by side: kfold sums them to dot_q8k's 8 lanes).
template <class T, int MR, int NR>
inline void kgemm_sums(const KBlock* wt, int64_t nb, const Q8KRows& a, int64_t b,
                       KVec (&sum)[MR][NR]) {
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
        for (int r = 0; r < MR; ++r) sum[r][n] = kdot(sum[r][n], kmaddubs(wu, ksign(x[r], w)), s);
      } else {
        for (int r = 0; r < MR; ++r) sum[r][n] = kdot(sum[r][n], kmaddubs(w, x[r]), s);
      }
    }
  }
}

// The float work of dot_q8k after a super-block's integer lanes si of (r, n), for the types
// whose bsum term enters the lanes (kOffset) or not at all: si += madd(bsums, c16) for kOffset,
// then acc += (d * d8) * float(si), lane by lane. The min term of the kMin types (dot_q8k's
// macc) is not taken here but by kmin_rows, once for 16 weight rows: the tile's out[r][n] is
// hsum(acc) alone, and kmin_rows adds macc to it, dot_q8k's last step.
// The kWholeBlock types: the (r, n) pairs' super-block sums 8 at a time (sum_lanes8; with the
// offset term in the lanes first), their float work lane by lane in one vector (pair p = r * NR
// + n in lane p % 8 of whole[p / 8]).
template <class T, int MR, int NR>
void kgemm_tile_lanes(const KBlock* wt, int64_t nb, const Q8KRows& a, float (*out)[NR],
                      Prefetcher& pf) {
  constexpr int kPairs = MR * NR, kGroups = (kPairs + 7) / 8;
  __m256 acc[MR][NR];
  __m256 whole[kGroups];
  for (int r = 0; r < MR; ++r)
    for (int n = 0; n < NR; ++n) acc[r][n] = _mm256_setzero_ps();
  for (int g = 0; g < kGroups; ++g) whole[g] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    KVec sum[MR][NR];
    kgemm_sums<T, MR, NR>(wt, nb, a, b, sum);
    pf.step();
    if constexpr (!kWholeBlock<T>) {
      for (int r = 0; r < MR; ++r) {
        const float d8 = a.d[r * nb + b];
        [[maybe_unused]] const __m256i bs = _mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(a.bsums + r * (a.K / 16) + b * 16));
        for (int n = 0; n < NR; ++n) {
          const KBlock& t = wt[n * nb + b];
          __m256i si = kfold(sum[r][n]);
          if constexpr (KDecode<T>::kTerm == BsumTerm::kOffset)
            si = madd_acc(si, bs, _mm256_load_si256(reinterpret_cast<const __m256i*>(t.c16)));
          acc[r][n] =
              _mm256_fmadd_ps(_mm256_set1_ps(t.d * d8), _mm256_cvtepi32_ps(si), acc[r][n]);
        }
      }
    } else {
      for (int g = 0; g < kGroups; ++g) {
        __m256i v[8];
        alignas(32) float dd[8];
        for (int k = 0; k < 8; ++k) {
          const int p = 8 * g + k, r = p / NR, n = p % NR;
          v[k] = p < kPairs ? kfold(sum[r][n]) : _mm256_setzero_si256();
          if constexpr (KDecode<T>::kTerm == BsumTerm::kOffset) {
            if (p < kPairs)
              v[k] = madd_acc(v[k],
                              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                                  a.bsums + r * (a.K / 16) + b * 16)),
                              _mm256_load_si256(reinterpret_cast<const __m256i*>(wt[n * nb + b].c16)));
          }
          dd[k] = p < kPairs ? wt[n * nb + b].d * a.d[r * nb + b] : 0.0f;
        }
        whole[g] =
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum_lanes8(v)), _mm256_load_ps(dd), whole[g]);
      }
    }
  }
  alignas(32) float w[kGroups][8];
  for (int g = 0; g < kGroups; ++g) _mm256_store_ps(w[g], whole[g]);
  for (int r = 0; r < MR; ++r)
    for (int n = 0; n < NR; ++n)
      out[r][n] = kWholeBlock<T> ? w[(r * NR + n) / 8][(r * NR + n) % 8] : hsum(acc[r][n]);
}

#ifdef MOEFLOW_VNNI
// kgemm_tile_lanes for an even NR with AVX-512: the lanes of two weight rows share a vector
// (n = 2p in lanes 0-7, 2p + 1 in 8-15), so the fold to 8 lanes, the conversion and the fma
// are one instruction per pair, not per row. The same values lane by lane.
template <class T, int MR, int NR>
void kgemm_tile_pairs(const KBlock* wt, int64_t nb, const Q8KRows& a, float (*out)[NR],
                      Prefetcher& pf) {
  static_assert(!kWholeBlock<T>, "kgemm_tile_lanes takes the whole-block types");
  constexpr int NP = NR / 2;
  __m512 acc[MR][NP];
  for (int r = 0; r < MR; ++r)
    for (int p = 0; p < NP; ++p) acc[r][p] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    KVec sum[MR][NR];
    kgemm_sums<T, MR, NR>(wt, nb, a, b, sum);
    pf.step();
    __m512 dp[NP];
    [[maybe_unused]] __m512i cp[NP];
    for (int p = 0; p < NP; ++p) {
      const KBlock &t0 = wt[2 * p * nb + b], &t1 = wt[(2 * p + 1) * nb + b];
      dp[p] = _mm512_insertf32x8(_mm512_set1_ps(t0.d), _mm256_set1_ps(t1.d), 1);
      if constexpr (KDecode<T>::kTerm == BsumTerm::kOffset)
        cp[p] = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_load_si256(reinterpret_cast<const __m256i*>(t0.c16))),
            _mm256_load_si256(reinterpret_cast<const __m256i*>(t1.c16)), 1);
    }
    for (int r = 0; r < MR; ++r) {
      const __m512 d8 = _mm512_set1_ps(a.d[r * nb + b]);
      [[maybe_unused]] __m512i bs;
      if constexpr (KDecode<T>::kTerm == BsumTerm::kOffset)
        bs = _mm512_broadcast_i64x4(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.bsums + r * (a.K / 16) + b * 16)));
      for (int p = 0; p < NP; ++p) {
        const __m512i u = sum[r][2 * p], v = sum[r][2 * p + 1];
        // lanes 0-7: kfold(u), 8-15: kfold(v)
        __m512i si = _mm512_add_epi32(_mm512_shuffle_i64x2(u, v, 0x44),
                                      _mm512_shuffle_i64x2(u, v, 0xEE));
        if constexpr (KDecode<T>::kTerm == BsumTerm::kOffset) si = _mm512_dpwssd_epi32(si, bs, cp[p]);
        acc[r][p] = _mm512_fmadd_ps(_mm512_mul_ps(dp[p], d8), _mm512_cvtepi32_ps(si), acc[r][p]);
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int p = 0; p < NP; ++p) {
      out[r][2 * p] = hsum(_mm512_castps512_ps256(acc[r][p]));
      out[r][2 * p + 1] = hsum(_mm512_extractf32x8_ps(acc[r][p], 1));
    }
}
#endif

// out[r][n] = activation row r (of a) . weight row n (its nb KBlocks at wt + n * nb), for MR x NR
// (without the kMin types' min term: kmin_rows)
template <class T, int MR, int NR>
void kgemm_tile(const KBlock* wt, int64_t nb, const Q8KRows& a, float (*out)[NR],
                Prefetcher& pf) {
#ifdef MOEFLOW_VNNI
  if constexpr (NR % 2 == 0 && !kWholeBlock<T>) {
    kgemm_tile_pairs<T, MR, NR>(wt, nb, a, out, pf);
    return;
  }
#endif
  kgemm_tile_lanes<T, MR, NR>(wt, nb, a, out, pf);
}

// y[m, n] for every activation row m < M and weight rows n0..n0+NR-1 (decoded at wt)
template <class T, int NR>
void kgemm_rows(const ActsView& a, const KBlock* wt, float* y, int64_t N, int64_t n0,
                Prefetcher& pf) {
  const int64_t K = a.K, nb = K / 256;
  const auto rows = [&](int64_t m) {
    return Q8KRows{a.kq + m * K, a.kd + m * nb, a.kbs + m * (K / 16), K};
  };
  float out[kGemmMR][NR];
  int64_t m = 0;
  for (; m + kGemmMR <= a.M; m += kGemmMR) {
    kgemm_tile<T, kGemmMR, NR>(wt, nb, rows(m), out, pf);
    for (int r = 0; r < kGemmMR; ++r)
      for (int n = 0; n < NR; ++n) y[(m + r) * N + n0 + n] = out[r][n];
  }
  if constexpr (kGemmMR > 2) {
    for (; m + 2 <= a.M; m += 2) {
      kgemm_tile<T, 2, NR>(wt, nb, rows(m), out, pf);
      for (int r = 0; r < 2; ++r)
        for (int n = 0; n < NR; ++n) y[(m + r) * N + n0 + n] = out[r][n];
    }
  }
  for (; m < a.M; ++m) {
    kgemm_tile<T, 1, NR>(wt, nb, rows(m), out, pf);
    for (int n = 0; n < NR; ++n) y[m * N + n0 + n] = out[0][n];
  }
}

// The kMin types' min term for up to kGemmNB decoded weight rows, dot_q8k's macc: per
// super-block b, ms = sum(c16 * bsums) (exact int32), then macc = macc - (dmin * d8) * float(ms),
// b by b, and the row's result is hsum(acc) + macc. Here the 16 weight rows are the lanes: c16
// of the rows transposed to [b][pair of c16 values][row] (c: one int32 per pair of int16), dmin
// to [b][row] (d), so a super-block's ms for all 16 rows is 8 madd against one broadcast pair of
// bsums, and the float work above is one vector operation each.
constexpr int kGemmNB = 16;

struct KMinTiles {
  int32_t* c;  // [nb][8][kGemmNB]
  float* d;    // [nb][kGemmNB]
  static void reserve(GemvScratch& s, int64_t nb) {
    if (static_cast<int64_t>(s.kmin_c.size()) < nb * 8 * kGemmNB)
      s.kmin_c.resize(static_cast<size_t>(nb * 8 * kGemmNB));
    if (static_cast<int64_t>(s.kmin_d.size()) < nb * kGemmNB)
      s.kmin_d.resize(static_cast<size_t>(nb * kGemmNB));
  }
  // weight row i's (< kGemmNB) super-block b, decoded in o
  void put(int64_t b, int i, const KBlock& o) const {
    int32_t pairs[8];
    std::memcpy(pairs, o.c16, sizeof pairs);
    for (int jp = 0; jp < 8; ++jp) c[(b * 8 + jp) * kGemmNB + i] = pairs[jp];
    d[b * kGemmNB + i] = o.dmin;
  }
  void clear(int64_t b, int i) const {
    for (int jp = 0; jp < 8; ++jp) c[(b * 8 + jp) * kGemmNB + i] = 0;
    d[b * kGemmNB + i] = 0.0f;
  }
};

// y[m, n0 + i] += macc of activation row m and weight row i < nr, for every m < M. With
// AVX-512 the 16 rows are one vector (the same operations lane by lane).
inline void kmin_rows(const ActsView& a, const KMinTiles& t, int64_t nr, float* y, int64_t N,
                      int64_t n0) {
  const int64_t K = a.K, nb = K / 256;
  for (int64_t m = 0; m < a.M; ++m) {
    alignas(64) float out[kGemmNB];
#ifdef MOEFLOW_VNNI
    __m512 macc = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      int32_t bs[8];
      std::memcpy(bs, a.kbs + m * (K / 16) + b * 16, sizeof bs);
      __m512i ms = _mm512_setzero_si512();
      for (int jp = 0; jp < 8; ++jp)
        ms = _mm512_dpwssd_epi32(ms, _mm512_loadu_si512(t.c + (b * 8 + jp) * kGemmNB),
                                 _mm512_set1_epi32(bs[jp]));
      const __m512 dd =
          _mm512_mul_ps(_mm512_loadu_ps(t.d + b * kGemmNB), _mm512_set1_ps(a.kd[m * nb + b]));
      macc = _mm512_sub_ps(macc, _mm512_mul_ps(dd, _mm512_cvtepi32_ps(ms)));
    }
    _mm512_store_ps(out, macc);
#else
    __m256 macc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t b = 0; b < nb; ++b) {
      int32_t bs[8];
      std::memcpy(bs, a.kbs + m * (K / 16) + b * 16, sizeof bs);
      const __m256 d8 = _mm256_set1_ps(a.kd[m * nb + b]);
      for (int h = 0; h < 2; ++h) {
        __m256i ms = _mm256_setzero_si256();
        for (int jp = 0; jp < 8; ++jp)
          ms = madd_acc(ms,
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                            t.c + (b * 8 + jp) * kGemmNB + 8 * h)),
                        _mm256_set1_epi32(bs[jp]));
        const __m256 dd = _mm256_mul_ps(_mm256_loadu_ps(t.d + b * kGemmNB + 8 * h), d8);
        macc[h] = _mm256_sub_ps(macc[h], _mm256_mul_ps(dd, _mm256_cvtepi32_ps(ms)));
      }
    }
    _mm256_store_ps(out, macc[0]);
    _mm256_store_ps(out + 8, macc[1]);
#endif
    for (int64_t i = 0; i < nr; ++i) y[m * N + n0 + i] += out[i];
  }
}

// Activation rows per pass over the weight rows: 256 rows of K int8 values stay in L2 while
// every group of kGemmNB weight rows is decoded and run against them.
constexpr int64_t kGemmMB = 256;

#ifdef MOEFLOW_VNNI
// ---------------------------------------------------------------------------------------------
// Q4_K with AVX-512: 16 weight rows side by side, one row a lane (as gemm_b32.h's tile), so a
// vpdpbusd of 4 bytes of the 16 rows against 4 activation bytes (broadcast) adds to all 16
// rows' sums at once, 64 products in one instruction where the KBlock tile takes two (maddubs
// + vpdpwssd). Four of them sum 16 values of a sub-block per row (|sum| <= 16 * 15 * 127 <
// 2^15), then one vpdpwssd multiplies that by the rows' sub-block scales (the int32 sums' int16
// low halves against the scales; the high halves, 0 or -1, against 0) into the super-block's
// integer sum per row, exact, which the float work takes whole (kWholeBlock: dot_q8k_k45's
// acc = fma(float(sum), d * d8, acc), 16 rows in one instruction); the min term is kmin_rows'.
// So each result is the GEMV's bit for bit.

// v[i] (row i's 16 int32) -> v[k] (int32 k of the 16 rows)
inline void transpose16x16(__m512i (&v)[16]) {
  __m512i t[16], u[16];
  for (int k = 0; k < 8; ++k) {
    t[2 * k] = _mm512_unpacklo_epi32(v[2 * k], v[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_epi32(v[2 * k], v[2 * k + 1]);
  }
  for (int k = 0; k < 4; ++k) {
    u[4 * k] = _mm512_unpacklo_epi64(t[4 * k], t[4 * k + 2]);
    u[4 * k + 1] = _mm512_unpackhi_epi64(t[4 * k], t[4 * k + 2]);
    u[4 * k + 2] = _mm512_unpacklo_epi64(t[4 * k + 1], t[4 * k + 3]);
    u[4 * k + 3] = _mm512_unpackhi_epi64(t[4 * k + 1], t[4 * k + 3]);
  }
  for (int k = 0; k < 2; ++k)
    for (int c = 0; c < 4; ++c) {
      t[8 * k + c] = _mm512_shuffle_i32x4(u[8 * k + c], u[8 * k + 4 + c], 0x88);
      t[8 * k + 4 + c] = _mm512_shuffle_i32x4(u[8 * k + c], u[8 * k + 4 + c], 0xdd);
    }
  for (int c = 0; c < 8; ++c) {
    v[c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0x88);
    v[8 + c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0xdd);
  }
}

// k4_scale_bytes lane by lane for 16 rows: from each row's scale bytes 4..7, 8..11 and 12..15
// (w0, w1, w2; row l in lane l), v[0] its scales 0..3, v[1] scales 4..7, v[2] mins 0..3 and v[3]
// mins 4..7, a byte each.
inline void k4_scales16(__m512i w0, __m512i w1, __m512i w2, __m512i (&v)[4]) {
  const __m512i low6 = _mm512_set1_epi32(0x3f3f3f3f), low4 = _mm512_set1_epi32(0x0f0f0f0f),
                top2 = _mm512_set1_epi32(0x03030303);
  const auto top = [&](__m512i x) {
    return _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(x, 6), top2), 4);
  };
  v[0] = _mm512_and_si512(w0, low6);
  v[1] = _mm512_or_si512(_mm512_and_si512(w2, low4), top(w0));
  v[2] = _mm512_and_si512(w1, low6);
  v[3] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(w2, 4), low4), top(w1));
}

// Lane l: l * row_bytes, the byte offsets of 16 rows for a gather of one field of each.
inline __m512i row_offsets16(int64_t row_bytes) {
  return _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(static_cast<int32_t>(row_bytes)));
}

// Weight rows 0..nr-1 (nr <= 16; the rows past nr are zeros) at w, all nb super-blocks, into
// out[b], their min terms into mt (rows past nr cleared).
inline void q4k_decode16(const uint8_t* w, int64_t row_bytes, int64_t nr, int64_t nb,
                         Q4KRows16* out, const KMinTiles& mt) {
  const __m512i m4 = _mm512_set1_epi8(0x0F), byte = _mm512_set1_epi32(0xFF);
  const __mmask16 rows = static_cast<__mmask16>((1u << nr) - 1);
  const __m512i offv = row_offsets16(row_bytes);
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t b = 0; b < nb; ++b) {
    Q4KRows16& o = out[b];
    __m512i qa[16], qb[16];  // row i's qs bytes 0..63 and 64..127
    for (int i = 0; i < 16; ++i) {
      if (i >= nr) {
        qa[i] = qb[i] = zero;
        continue;
      }
      const uint8_t* blk = w + i * row_bytes + b * Q4_K::BYTES;
      prefetch_ahead(blk, Q4_K::BYTES);
      qa[i] = _mm512_loadu_si512(blk + 16);
      qb[i] = _mm512_loadu_si512(blk + 80);
    }
    // the 16 rows' d, dmin and scale bytes side by side (rows past nr: zeros), then
    // k4_scale_bytes lane by lane: v0 scales 0..3, v1 scales 4..7, v2 mins 0..3, v3 mins 4..7
    const uint8_t* base = w + b * Q4_K::BYTES;
    const __m512i dm = _mm512_mask_i32gather_epi32(zero, rows, offv, base, 1);
    const __m512i w0 = _mm512_mask_i32gather_epi32(zero, rows, offv, base + 4, 1);
    const __m512i w1 = _mm512_mask_i32gather_epi32(zero, rows, offv, base + 8, 1);
    const __m512i w2 = _mm512_mask_i32gather_epi32(zero, rows, offv, base + 12, 1);
    __m512i v[4];
    k4_scales16(w0, w1, w2, v);
    for (int k = 0; k < 4; ++k) {
      for (int h = 0; h < 2; ++h)
        _mm512_store_si512(o.sc[4 * h + k],
                           _mm512_and_si512(_mm512_srli_epi32(v[h], 8 * k), byte));
      for (int h = 0; h < 2; ++h) {  // mins twice: (min, min) as int16
        const __m512i mn = _mm512_and_si512(_mm512_srli_epi32(v[2 + h], 8 * k), byte);
        _mm512_storeu_si512(mt.c + (b * 8 + 4 * h + k) * kGemmNB,
                            _mm512_or_si512(mn, _mm512_slli_epi32(mn, 16)));
      }
    }
    _mm512_store_ps(o.d, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dm)));
    _mm512_storeu_ps(mt.d + b * kGemmNB,
                     _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(dm, 16))));
    transpose16x16(qa);
    transpose16x16(qb);
    // qs int32 p (bytes 4p..4p+3; group g = p / 8 of 32 bytes, t = p % 8) holds values 4t..4t+3
    // of sub-block 2g (low nibbles) and of 2g + 1 (high): half t / 4, slot t % 4
    for (int p = 0; p < 32; ++p) {
      const __m512i qv = p < 16 ? qa[p] : qb[p - 16];
      const int g = p / 8, t = p % 8;  // vector (j * 2 + t / 4) * 4 + t % 4 = j * 8 + t
      _mm512_store_si512(o.q[2 * g * 8 + t], _mm512_and_si512(qv, m4));
      _mm512_store_si512(o.q[(2 * g + 1) * 8 + t],
                         _mm512_and_si512(_mm512_srli_epi16(qv, 4), m4));
    }
  }
}

// The 4 bytes at p in every int32 lane, broadcast from memory (vpbroadcastd zmm, m32: a load
// alone; set1 of an int32 read first goes through a general register and a shuffle-port uop,
// which the vpdpbusd beside it needs).
inline __m512i bcast4(const int8_t* p) { return _mm512_broadcastd_epi32(_mm_loadu_si32(p)); }

// y[m + r, n + l] (lane l is row l) for MR activation rows from m and the nr <= 16 rows decoded
// 16 a vector at t (Q4KRows16, Q6KRows16): per super-block b, sums(t[b], b, sum) gives each
// (activation row, weight row)'s integer sum whole, then acc = fma(float(sum), d * d8, acc).
template <int MR, class Rows, class Sums>
void rows16_tile(const Rows* t, const ActsView& a, int64_t m, float* y, int64_t N, int64_t n,
                 int64_t nr, Prefetcher& pf, Sums&& sums) {
  const int64_t nb = a.K / 256;
  __m512 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    pf.step();
    __m512i sum[MR];
    for (int r = 0; r < MR; ++r) sum[r] = _mm512_setzero_si512();
    sums(t[b], b, sum);
    const __m512 d = _mm512_load_ps(t[b].d);
    for (int r = 0; r < MR; ++r)
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[r]),
                               _mm512_mul_ps(d, _mm512_set1_ps(a.kd[(m + r) * nb + b])), acc[r]);
  }
  const __mmask16 keep = static_cast<__mmask16>((1u << nr) - 1);
  for (int r = 0; r < MR; ++r) _mm512_mask_storeu_ps(y + (m + r) * N + n, keep, acc[r]);
}

// rows16_tile for Q4_K (without the min term: kmin_rows adds it after).
template <int MR>
void q4k_tile16(const Q4KRows16* t, const ActsView& a, int64_t m, float* y, int64_t N, int64_t n,
                int64_t nr, Prefetcher& pf) {
  const int64_t K = a.K;
  rows16_tile<MR>(t, a, m, y, N, n, nr, pf,
                  [&](const Q4KRows16& tb, int64_t b, __m512i (&sum)[MR]) {
    for (int j = 0; j < 8; ++j) {
      const __m512i sc = _mm512_load_si512(tb.sc[j]);
      const int8_t* xj = a.kq + m * K + b * 256 + 32 * kq8k_slot(j);
      for (int h = 0; h < 2; ++h) {
        __m512i part[MR];
        for (int r = 0; r < MR; ++r) part[r] = _mm512_setzero_si512();
        for (int i = 0; i < 4; ++i) {
          const __m512i wv = _mm512_load_si512(tb.q[(j * 2 + h) * 4 + i]);
          for (int r = 0; r < MR; ++r)
            part[r] = _mm512_dpbusd_epi32(part[r], wv, bcast4(xj + r * K + 16 * h + 4 * i));
        }
        for (int r = 0; r < MR; ++r) sum[r] = _mm512_dpwssd_epi32(sum[r], part[r], sc);
      }
    }
  });
}

constexpr int kRows16MR = 8;  // activation rows per q4k_tile16 / q6k_tile16

// y[:, n0:n1] through a 16-rows-a-vector GEMM: each group of up to 16 weight rows decoded once
// (decode(rows, nr)), then tile(MR, activation rows, m, y rows, n, nr, prefetcher) over all the
// activation rows, kRows16MR at a time and the rest as 4 + 2 + 1, and after(activation rows, y
// rows, n, nr) once per pass over them.
template <class Decode, class Tile, class After>
void gemm_rows16(const ActsView& a, const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1,
                 float* y, int64_t N, Decode&& decode, Tile&& tile, After&& after) {
  const int64_t nb = a.K / 256;
  for (int64_t n = n0; n < n1; n += 16) {
    const int64_t nr = std::min<int64_t>(16, n1 - n);
    decode(w + n * row_bytes, nr);
    const int64_t next = n + nr;
    Prefetcher pf = Prefetcher::over(w + next * row_bytes,
                                     w + std::min(n1, next + 16) * row_bytes,
                                     ((a.M + kRows16MR - 1) / kRows16MR) * nb);
    for (int64_t m0 = 0; m0 < a.M; m0 += kGemmMB) {
      const ActsView am = a.rows(m0, std::min(kGemmMB, a.M - m0));
      float* ym = y + m0 * N;
      int64_t m = 0;
      for (; m + kRows16MR <= am.M; m += kRows16MR)
        tile(std::integral_constant<int, kRows16MR>{}, am, m, ym, n, nr, pf);
      if (am.M - m >= 4) {
        tile(std::integral_constant<int, 4>{}, am, m, ym, n, nr, pf);
        m += 4;
      }
      if (am.M - m >= 2) {
        tile(std::integral_constant<int, 2>{}, am, m, ym, n, nr, pf);
        m += 2;
      }
      if (am.M - m >= 1) tile(std::integral_constant<int, 1>{}, am, m, ym, n, nr, pf);
      after(am, ym, n, nr);
    }
  }
}

void gemm_q4k_rows(const ActsView& a, const uint8_t* w, int64_t N, int64_t n0, int64_t n1,
                   float* y, GemvScratch& scratch) {
  const int64_t nb = a.K / 256, row_bytes = nb * Q4_K::BYTES;
  if (static_cast<int64_t>(scratch.q4k16.size()) < nb)
    scratch.q4k16.resize(static_cast<size_t>(nb));
  Q4KRows16* t = scratch.q4k16.data();
  KMinTiles::reserve(scratch, nb);
  const KMinTiles mt{scratch.kmin_c.data(), scratch.kmin_d.data()};
  gemm_rows16(
      a, w, row_bytes, n0, n1, y, N,
      [&](const uint8_t* rows, int64_t nr) { q4k_decode16(rows, row_bytes, nr, nb, t, mt); },
      [&](auto mr, const ActsView& am, int64_t m, float* ym, int64_t n, int64_t nr,
          Prefetcher& pf) { q4k_tile16<decltype(mr)::value>(t, am, m, ym, N, n, nr, pf); },
      [&](const ActsView& am, float* ym, int64_t n, int64_t nr) { kmin_rows(am, mt, nr, ym, N, n); });
}

// ---------------------------------------------------------------------------------------------
// Q6_K with AVX-512, as Q4_K's above: 16 weight rows side by side, four vpdpbusd sum 16 values
// of a sub-block per row (|sum| <= 16 * 63 * 127: past int16, so the scale is a vpmulld, not a
// vpdpwssd), the -32 offset as 8 vpdpwssd of the rows' (-32 * scale) pairs against the
// activations' 16-value sums, then the super-block's integer sum per row, exact, taken whole:
// dot_q8k<Q6_K>'s float work, 16 rows in one instruction, so each result is the GEMV's.

// Weight rows 0..nr-1 (nr <= 16; the rows past nr are zeros) at w, all nb super-blocks, into
// out[b].
inline void q6k_decode16(const uint8_t* w, int64_t row_bytes, int64_t nr, int64_t nb,
                         Q6KRows16* out) {
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  const __m512i low16 = _mm512_set1_epi32(0xFFFF), minus32 = _mm512_set1_epi32(-32);
  const __mmask16 rows = static_cast<__mmask16>((1u << nr) - 1);
  const __m512i offv = row_offsets16(row_bytes);
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t b = 0; b < nb; ++b) {
    Q6KRows16& o = out[b];
    __m512i ql0[16], ql1[16], qh[16];  // row i's ql bytes 0..63, 64..127 and its qh bytes
    for (int i = 0; i < 16; ++i) {
      if (i >= nr) {
        ql0[i] = ql1[i] = qh[i] = zero;
        continue;
      }
      const uint8_t* blk = w + i * row_bytes + b * Q6_K::BYTES;
      prefetch_ahead(blk, Q6_K::BYTES);
      ql0[i] = _mm512_loadu_si512(blk);
      ql1[i] = _mm512_loadu_si512(blk + 64);
      qh[i] = _mm512_loadu_si512(blk + 128);
    }
    // the 16 rows' scale bytes (4 a lane, 4 gathers) and d (the high half of bytes 206..209)
    const uint8_t* base = w + b * Q6_K::BYTES;
    __m512i sc[16];
    for (int k = 0; k < 4; ++k) {
      const __m512i s4 = _mm512_mask_i32gather_epi32(zero, rows, offv, base + 192 + 4 * k, 1);
      for (int j = 0; j < 4; ++j)  // sign-extended byte j
        sc[4 * k + j] = _mm512_srai_epi32(_mm512_slli_epi32(s4, 24 - 8 * j), 24);
    }
    for (int s = 0; s < 16; ++s) _mm512_store_si512(o.sc[s], sc[s]);
    for (int k = 0; k < 8; ++k)
      _mm512_store_si512(
          o.off[k],
          _mm512_or_si512(_mm512_and_si512(_mm512_mullo_epi32(sc[2 * k], minus32), low16),
                          _mm512_slli_epi32(_mm512_mullo_epi32(sc[2 * k + 1], minus32), 16)));
    const __m512i dd = _mm512_mask_i32gather_epi32(zero, rows, offv, base + 206, 1);
    _mm512_store_ps(o.d, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(dd, 16))));
    transpose16x16(ql0);
    transpose16x16(ql1);
    transpose16x16(qh);
    // value 128h + 32g + 4t + e (t < 8, e < 4): ql int32 t + 8 (g % 2) of half h, its low
    // (g < 2) or high nibble, in bits 0-3; qh int32 8h + t, bits 2g and 2g + 1, moved to bits
    // 4-5 of a copy whose bits 6-7 are clear (qh & 0x33 for g = 0, 2; qh & 0xCC for 1, 3); one
    // vpternlogd takes bits 0-3 from the first, 4-7 from the second; sub-block 8h + 2g + t / 4
    const __m512i m33 = _mm512_set1_epi8(0x33), mcc = _mm512_set1_epi8(static_cast<char>(0xCC));
    for (int h = 0; h < 2; ++h)
      for (int t = 0; t < 8; ++t) {
        const __m512i l0 = (h ? ql1 : ql0)[t], l1 = (h ? ql1 : ql0)[t + 8];
        const __m512i hx = qh[8 * h + t];
        const __m512i h02 = _mm512_and_si512(hx, m33), h13 = _mm512_and_si512(hx, mcc);
        const __m512i nib[4] = {l0, l1, _mm512_srli_epi16(l0, 4), _mm512_srli_epi16(l1, 4)};
        const __m512i top[4] = {_mm512_slli_epi16(h02, 4), _mm512_slli_epi16(h13, 2), h02,
                                _mm512_srli_epi16(h13, 2)};
        for (int g = 0; g < 4; ++g)
          _mm512_store_si512(o.q[4 * (8 * h + 2 * g + t / 4) + t % 4],
                             _mm512_ternarylogic_epi32(nib[g], top[g], m4, 0xE4));
      }
  }
}

// rows16_tile for Q6_K.
template <int MR>
void q6k_tile16(const Q6KRows16* t, const ActsView& a, int64_t m, float* y, int64_t N, int64_t n,
                int64_t nr, Prefetcher& pf) {
  const int64_t K = a.K;
  rows16_tile<MR>(t, a, m, y, N, n, nr, pf,
                  [&](const Q6KRows16& tb, int64_t b, __m512i (&sum)[MR]) {
    for (int s = 0; s < 16; ++s) {  // chunk s / 2 (where kq8k_slot stores it), half s % 2
      const int8_t* xs = a.kq + m * K + b * 256 + 32 * kq8k_slot(s / 2) + 16 * (s % 2);
      __m512i part[MR];
      for (int r = 0; r < MR; ++r) part[r] = _mm512_setzero_si512();
      for (int i = 0; i < 4; ++i) {
        const __m512i wv = _mm512_load_si512(tb.q[4 * s + i]);
        for (int r = 0; r < MR; ++r)
          part[r] = _mm512_dpbusd_epi32(part[r], wv, bcast4(xs + r * K + 4 * i));
      }
      const __m512i sc = _mm512_load_si512(tb.sc[s]);
      for (int r = 0; r < MR; ++r) sum[r] = _mm512_add_epi32(sum[r], _mm512_mullo_epi32(part[r], sc));
    }
    for (int k = 0; k < 8; ++k) {  // the offset: bsums 2k and 2k + 1 as one int32
      const __m512i off = _mm512_load_si512(tb.off[k]);
      for (int r = 0; r < MR; ++r) {
        int32_t bs;
        std::memcpy(&bs, a.kbs + (m + r) * (K / 16) + b * 16 + 2 * k, sizeof bs);
        sum[r] = _mm512_dpwssd_epi32(sum[r], off, _mm512_set1_epi32(bs));
      }
    }
  });
}

void gemm_q6k_rows(const ActsView& a, const uint8_t* w, int64_t N, int64_t n0, int64_t n1,
                   float* y, GemvScratch& scratch) {
  const int64_t nb = a.K / 256, row_bytes = nb * Q6_K::BYTES;
  if (static_cast<int64_t>(scratch.q6k16.size()) < nb)
    scratch.q6k16.resize(static_cast<size_t>(nb));
  Q6KRows16* t = scratch.q6k16.data();
  gemm_rows16(
      a, w, row_bytes, n0, n1, y, N,
      [&](const uint8_t* rows, int64_t nr) { q6k_decode16(rows, row_bytes, nr, nb, t); },
      [&](auto mr, const ActsView& am, int64_t m, float* ym, int64_t n, int64_t nr,
          Prefetcher& pf) { q6k_tile16<decltype(mr)::value>(t, am, m, ym, N, n, nr, pf); },
      [](const ActsView&, float*, int64_t, int64_t) {});
}
#endif


template <class T>
void gemm_q8k_rows(const ActsView& a, const uint8_t* w, int64_t N, int64_t n0, int64_t n1,
                   float* y, GemvScratch& scratch) {
#ifdef MOEFLOW_VNNI
  if constexpr (std::is_same_v<T, Q4_K>) {
    gemm_q4k_rows(a, w, N, n0, n1, y, scratch);
    return;
  }
  if constexpr (std::is_same_v<T, Q6_K>) {
    gemm_q6k_rows(a, w, N, n0, n1, y, scratch);
    return;
  }
#endif
  constexpr bool kMin = KDecode<T>::kTerm == BsumTerm::kMin;
  const int64_t nb = a.K / 256, row_bytes = nb * T::BYTES;
  if (static_cast<int64_t>(scratch.kblocks.size()) < kGemmNR * nb)
    scratch.kblocks.resize(static_cast<size_t>(kGemmNR * nb));
  KBlock* wt = scratch.kblocks.data();  // kGemmNR rows at a time: they stay in L1
  if constexpr (kMin) KMinTiles::reserve(scratch, nb);
  const KMinTiles mt{scratch.kmin_c.data(), scratch.kmin_d.data()};
  for (int64_t m0 = 0; m0 < a.M; m0 += kGemmMB) {
    const ActsView am = a.rows(m0, std::min(kGemmMB, a.M - m0));
    float* ym = y + m0 * N;
    for (int64_t n = n0; n < n1; n += kGemmNB) {
      const int64_t nr = std::min<int64_t>(kGemmNB, n1 - n);
      for (int64_t g = 0; g < nr; g += kGemmNR) {
        const int64_t gr = std::min<int64_t>(kGemmNR, nr - g);
        for (int64_t i = 0; i < gr; ++i)
          for (int64_t b = 0; b < nb; ++b) {
            const uint8_t* blk = w + (n + g + i) * row_bytes + b * T::BYTES;
            prefetch_ahead(blk, T::BYTES);
            KDecode<T>::decode(blk, wt[i * nb + b]);
            if constexpr (kMin) mt.put(b, static_cast<int>(g + i), wt[i * nb + b]);
          }
        const int64_t next = n + g + gr;
        const int64_t steps = (am.M + kGemmMR - 1) / kGemmMR * nb * (gr == kGemmNR ? 1 : gr);
        Prefetcher pf = Prefetcher::over(w + next * row_bytes,
                                         w + std::min(n1, next + kGemmNR) * row_bytes, steps);
        if (gr == kGemmNR) {
          kgemm_rows<T, kGemmNR>(am, wt, ym, N, n + g, pf);
        } else {
          for (int64_t i = 0; i < gr; ++i)
            kgemm_rows<T, 1>(am, wt + i * nb, ym, N, n + g + i, pf);
        }
      }
      if constexpr (kMin) {
        for (int64_t i = nr; i < kGemmNB; ++i)
          for (int64_t b = 0; b < nb; ++b) mt.clear(b, static_cast<int>(i));
        kmin_rows(am, mt, nr, ym, N, n);
      }
    }
  }
}

}  // namespace
