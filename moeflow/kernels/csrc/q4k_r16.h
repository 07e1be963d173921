// Q4_K repacked at load 16 weight rows at a time (moeflow's own layout, ggml type id kQ4_K_R16,
// weights/ggml_quants.py Q4_K_R16): the bytes of rows 16g..16g+15 (the same 16 * row_bytes
// bytes, where the file's rows lie one after another) hold, per super-block b, 2304 bytes:
//   [0, 64)       16 int32: row l's bytes 0..3 (d and dmin, fp16) in lane l
//   [64, 256)     3 x 16 int32: row l's scale bytes 4..7, 8..11, 12..15 in lane l
//   [256, 2304)   32 x 16 int32: vector p holds row l's quant bytes 4p..4p+3 in lane l
// so one 64-byte load is 4 quant bytes (8 nibbles) of each of the 16 rows, side by side: what
// q4k_decode16 (gemm_i8.h) builds on every call from the file's rows, two 16 x 16 transposes a
// super-block, is stored once. The AVX-512 kernel below splits the nibbles in registers and
// runs q4k_tile16's integer work (one vpdpbusd for 64 products against 4 broadcast activation
// bytes; vpdpwssd for the rows' sub-block scales) at every activation row count, the GEMV
// included, with the rows' scales and mins decoded for 16 rows at once and the min term
// (kmin_rows') taken in the same pass. Results are gemm_q4k_rows' bit for bit, so the GEMV's
// (dot_q8k_k45) too: the same integer sums, the same float operations in the same order.
// Elsewhere (the exact fp32 path, the AVX2 build) a group is unpacked to the file's rows and
// run by gemv_rows<Q4_K>. Included by cpu_common.h after gemm_i8.h.
#pragma once

namespace {

constexpr int64_t kQ4KR16Block = 16 * 144;  // one super-block of 16 rows

// The 16 rows at w (row_bytes apart, nb super-blocks each) -> their group at out, and back.
inline void q4k_r16_pack(const uint8_t* w, int64_t row_bytes, int64_t nb, uint8_t* out) {
  for (int64_t b = 0; b < nb; ++b) {
    uint8_t* o = out + b * kQ4KR16Block;
    for (int l = 0; l < 16; ++l) {
      const uint8_t* blk = w + l * row_bytes + b * 144;
      for (int f = 0; f < 4; ++f) std::memcpy(o + 64 * f + 4 * l, blk + 4 * f, 4);
      for (int p = 0; p < 32; ++p) std::memcpy(o + 256 + 64 * p + 4 * l, blk + 16 + 4 * p, 4);
    }
  }
}

inline void q4k_r16_unpack(const uint8_t* g, int64_t row_bytes, int64_t nb, uint8_t* w) {
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* s = g + b * kQ4KR16Block;
    for (int l = 0; l < 16; ++l) {
      uint8_t* blk = w + l * row_bytes + b * 144;
      for (int f = 0; f < 4; ++f) std::memcpy(blk + 4 * f, s + 64 * f + 4 * l, 4);
      for (int p = 0; p < 32; ++p) std::memcpy(blk + 16 + 4 * p, s + 256 + 64 * p + 4 * l, 4);
    }
  }
}

#ifdef MOEFLOW_VNNI
// y[m + r, n + l] for MR activation rows from m and the 16 rows of the group at g: q4k_tile16's
// sums, then kmin_rows' min term, added as kmin_rows adds it.
template <int MR>
void q4k_r16_tile(const uint8_t* g, const ActsView& a, int64_t m, float* y, int64_t N, int64_t n,
                  Prefetcher& pf) {
  const int64_t K = a.K, nb = K / 256;
  const __m512i m4 = _mm512_set1_epi8(0x0F), byte = _mm512_set1_epi32(0xFF);
  __m512 acc[MR], macc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = macc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* s = g + b * kQ4KR16Block;
    pf.step();
    const __m512i dm = _mm512_loadu_si512(s), w0 = _mm512_loadu_si512(s + 64),
                  w1 = _mm512_loadu_si512(s + 128), w2 = _mm512_loadu_si512(s + 192);
    __m512i v[4];  // scales 0..3, 4..7, mins 0..3, 4..7
    k4_scales16(w0, w1, w2, v);
    const auto scale = [&](int j) {  // sub-block j's scales (int16 low halves)
      return _mm512_and_si512(_mm512_srli_epi32(v[j / 4], 8 * (j % 4)), byte);
    };
    __m512i sum[MR];
    for (int r = 0; r < MR; ++r) sum[r] = _mm512_setzero_si512();
    for (int q = 0; q < 4; ++q) {  // sub-blocks 2q (low nibbles) and 2q + 1 (high)
      const __m512i sc_lo = scale(2 * q), sc_hi = scale(2 * q + 1);
      const int8_t* x_lo = a.kq + m * K + b * 256 + 32 * kq8k_slot(2 * q);
      const int8_t* x_hi = a.kq + m * K + b * 256 + 32 * kq8k_slot(2 * q + 1);
      for (int h = 0; h < 2; ++h) {
        __m512i lo[4], hi[4];
        for (int i = 0; i < 4; ++i) {
          const __m512i wv = _mm512_loadu_si512(s + 256 + 64 * (q * 8 + h * 4 + i));
          lo[i] = _mm512_and_si512(wv, m4);
          hi[i] = _mm512_and_si512(_mm512_srli_epi16(wv, 4), m4);
        }
        for (int r = 0; r < MR; ++r) {
          __m512i part = _mm512_setzero_si512();
          for (int i = 0; i < 4; ++i)
            part = _mm512_dpbusd_epi32(part, lo[i], bcast4(x_lo + r * K + 16 * h + 4 * i));
          sum[r] = _mm512_dpwssd_epi32(sum[r], part, sc_lo);
        }
        for (int r = 0; r < MR; ++r) {
          __m512i part = _mm512_setzero_si512();
          for (int i = 0; i < 4; ++i)
            part = _mm512_dpbusd_epi32(part, hi[i], bcast4(x_hi + r * K + 16 * h + 4 * i));
          sum[r] = _mm512_dpwssd_epi32(sum[r], part, sc_hi);
        }
      }
    }
    const __m512 d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dm));
    const __m512 dmin = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(dm, 16)));
    // the min term's integer part, sum_j min_j * (sub-block j's activation sum), two
    // sub-blocks a vpdpwssd: mp[k] = (min 2k, min 2k + 1) as int16 against a.ks2's pairs
    const __m512i hi8 = _mm512_set1_epi32(0xFF0000);
    __m512i mp[4];
    for (int k = 0; k < 4; ++k) {
      const __m512i mv = k % 2 ? _mm512_srli_epi32(v[2 + k / 2], 16) : v[2 + k / 2];
      mp[k] = _mm512_or_si512(_mm512_and_si512(mv, byte),
                              _mm512_and_si512(_mm512_slli_epi32(mv, 8), hi8));
    }
    for (int r = 0; r < MR; ++r) {
      const float d8 = a.kd[(m + r) * nb + b];
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[r]), _mm512_mul_ps(d, _mm512_set1_ps(d8)),
                               acc[r]);
      const int32_t* s2 = a.ks2 + ((m + r) * nb + b) * 4;
      __m512i ms = _mm512_setzero_si512();
      for (int k = 0; k < 4; ++k) ms = _mm512_dpwssd_epi32(ms, mp[k], _mm512_set1_epi32(s2[k]));
      macc[r] = _mm512_sub_ps(
          macc[r], _mm512_mul_ps(_mm512_mul_ps(dmin, _mm512_set1_ps(d8)), _mm512_cvtepi32_ps(ms)));
    }
  }
  for (int r = 0; r < MR; ++r) _mm512_storeu_ps(y + (m + r) * N + n, _mm512_add_ps(acc[r], macc[r]));
}

constexpr int kQ4KR16MR = 8;  // activation rows per q4k_r16_tile
#endif

// y[:, n0:n1] = x W[n0:n1]^T for the repacked rows at w (n0, n1 multiples of 16).
inline void gemv_q4k_r16(const ActsView& a, const uint8_t* w, int64_t N, int64_t n0, int64_t n1,
                         float* y, GemvScratch& scratch) {
  const int64_t nb = a.K / 256, row_bytes = nb * 144;
  TORCH_CHECK(n0 % 16 == 0 && n1 % 16 == 0, "repacked Q4_K rows run 16 at a time");
#ifdef MOEFLOW_VNNI
  if (a.int8) {
    for (int64_t n = n0; n < n1; n += 16) {
      const uint8_t* g = w + n * row_bytes;
      Prefetcher pf = Prefetcher::over(g + 16 * row_bytes, w + std::min(n1, n + 32) * row_bytes,
                                       ((a.M + kQ4KR16MR - 1) / kQ4KR16MR) * nb);
      for (int64_t m0 = 0; m0 < a.M; m0 += kGemmMB) {
        const ActsView am = a.rows(m0, std::min(kGemmMB, a.M - m0));
        float* ym = y + m0 * N;
        int64_t m = 0;
        for (; m + kQ4KR16MR <= am.M; m += kQ4KR16MR)
          q4k_r16_tile<kQ4KR16MR>(g, am, m, ym, N, n, pf);
        // the rest in one tile: each pass splits the nibbles and decodes the scales again
        switch (am.M - m) {
          case 1: q4k_r16_tile<1>(g, am, m, ym, N, n, pf); break;
          case 2: q4k_r16_tile<2>(g, am, m, ym, N, n, pf); break;
          case 3: q4k_r16_tile<3>(g, am, m, ym, N, n, pf); break;
          case 4: q4k_r16_tile<4>(g, am, m, ym, N, n, pf); break;
          case 5: q4k_r16_tile<5>(g, am, m, ym, N, n, pf); break;
          case 6: q4k_r16_tile<6>(g, am, m, ym, N, n, pf); break;
          case 7: q4k_r16_tile<7>(g, am, m, ym, N, n, pf); break;
          default: break;
        }
      }
    }
    return;
  }
#endif
  std::vector<uint8_t> rows(static_cast<size_t>(16 * row_bytes));
  for (int64_t n = n0; n < n1; n += 16) {
    q4k_r16_unpack(w + n * row_bytes, row_bytes, nb, rows.data());
    gemv_rows<Q4_K>(a, rows.data(), N, 0, 16, y + n, scratch);
  }
}

}  // namespace
