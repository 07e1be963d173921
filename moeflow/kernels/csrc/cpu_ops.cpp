// moeflow CPU kernels (x86-64 AVX2 + FMA + F16C, or AVX-512 + VNNI), built on first use by
// kernels/cpu_ext.py (once per instruction set).
//
// GEMV/GEMM over GGUF-quantised weights kept in their file layout ([N, row_bytes] uint8, one
// row of blocks per output feature; the block types are in cpu_common.h), and the small fused
// ops of a decode step: RMSNorm with the residual add, SiLU-and-mul, NeoX rotary embedding, and
// paged decode attention that also writes the step's K/V into the cache; and DecodeStack, which
// runs a decoder's whole decode step with them in one call. The MoE layer (router and grouped
// expert kernel) is in moe.h. Everything computes in fp32; threads come from ATen's OpenMP pool
// (at::parallel_for, or one `omp parallel` region in DecodeStack: the same libgomp as torch's),
// so these kernels share torch's workers.

#include <torch/csrc/utils/pybind.h>  // pybind11 with at::Tensor

#include <chrono>

#include "cpu_common.h"
#include "moe.h"

// x [M, K] float32, w [N, row_bytes] uint8 -> [M, N] float32; int8: quantise x to int8 per
// 32-chunk for the products (llama.cpp's scheme) instead of using it as is.
at::Tensor qgemm_any(const at::Tensor& x, const at::Tensor& w, int64_t qtype, bool int8) {
  check_f32(x, "x");
  TORCH_CHECK(x.dim() == 2, "x must be 2-D");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  check_weight(w, qtype, K);
  Acts a;
  a.prepare(x.data_ptr<float>(), M, K, int8);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  // repacked Q4_K runs 16 rows at a time: the threads' shares are whole groups
  const int64_t unit = qtype == kQ4_K_R16 ? 16 : 1;
  at::parallel_for(0, N / unit, std::max<int64_t>(1, row_grain(w.size(1)) / unit),
                   [&](int64_t u0, int64_t u1) {
                     GemvScratch scratch;
                     gemv_any(qtype, a, wp, N, unit * u0, unit * u1, yp, scratch);
                   });
  return y;
}

at::Tensor qgemm(const at::Tensor& x, const at::Tensor& w, int64_t qtype) {
  return qgemm_any(x, w, qtype, false);
}

at::Tensor qgemm_i8(const at::Tensor& x, const at::Tensor& w, int64_t qtype) {
  return qgemm_any(x, w, qtype, true);
}

// The int8 activations the int8 path multiplies, for tests: x [M, K] -> (q int8 [M, K],
// d float32 [M, K / block]) with block 32 (the 32-weight block types) or 256 (the K-quants'
// Q8_K; then also the int16 sums of each 16 values, [M, K / 16]).
std::vector<at::Tensor> quantize_acts(const at::Tensor& x, int64_t block) {
  check_f32(x, "x");
  TORCH_CHECK(x.dim() == 2 && (block == 32 || block == 256) && x.size(1) % block == 0,
              "x must be [M, K] with K a multiple of the block (32 or 256)");
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor q = at::empty({M, K}, at::TensorOptions().dtype(at::kChar));
  at::Tensor d = at::empty({M, K / block}, x.options());
  at::Tensor bs = at::zeros({M, K / 16}, at::TensorOptions().dtype(at::kShort));
  std::vector<float> sums(static_cast<size_t>(K / 32));
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x.data_ptr<float>() + m * K;
    if (block == 32)
      quantize_row_q8(row, K, q.data_ptr<int8_t>() + m * K, d.data_ptr<float>() + m * (K / 32),
                      sums.data());
    else
    {
      int8_t* qr = q.data_ptr<int8_t>() + m * K;
      quantize_row_q8k(row, K, qr, d.data_ptr<float>() + m * (K / 256),
                       bs.data_ptr<int16_t>() + m * (K / 16));
      std::vector<int8_t> stored(qr, qr + K);  // back to the natural order (kq8k_slot)
      for (int64_t c = 0; c < K / 32; ++c)
        std::memcpy(qr + 32 * c, stored.data() + (c / 8) * 256 + 32 * kq8k_slot(c % 8), 32);
    }
  }
  return {q, d, bs};
}

// Q4_K blocks [..., N, row_bytes] (N a multiple of 16) -> the same bytes repacked 16 rows at a
// time (q4k_r16.h), a new contiguous tensor; unpack: back.
at::Tensor q4k_r16_convert(const at::Tensor& w, bool pack) {
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() >= 2 && w.device().is_cpu(),
              "Q4_K blocks must be a uint8 CPU tensor [..., N, row_bytes]");
  const int64_t N = w.size(-2), row_bytes = w.size(-1);
  TORCH_CHECK(row_bytes % 144 == 0 && N % 16 == 0,
              "repacking Q4_K needs rows of whole super-blocks (144 bytes) and a multiple of 16 "
              "rows; got ", N, " rows of ", row_bytes, " bytes");
  const at::Tensor src = w.contiguous();
  at::Tensor out = at::empty(src.sizes(), src.options());
  const int64_t groups = src.numel() / (16 * row_bytes), nb = row_bytes / 144;
  const uint8_t* sp = src.data_ptr<uint8_t>();
  uint8_t* op = out.data_ptr<uint8_t>();
  at::parallel_for(0, groups, 16, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t off = g * 16 * row_bytes;
      if (pack)
        q4k_r16_pack(sp + off, row_bytes, nb, op + off);
      else
        q4k_r16_unpack(sp + off, row_bytes, nb, op + off);
    }
  });
  return out;
}

at::Tensor repack_q4k_r16(const at::Tensor& w) { return q4k_r16_convert(w, true); }
at::Tensor unpack_q4k_r16(const at::Tensor& w) { return q4k_r16_convert(w, false); }

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
  const bool r16 = qtype == kQ4_K_R16;  // the file's rows first (q4k_r16.h)
  const at::Tensor rows_of = r16 ? unpack_q4k_r16(w) : w;
  const int64_t type = r16 ? kQ4_K : qtype;
  check_weight(rows_of, type, K);
  dispatch_type(type, [&](auto t) {
    dequant_impl<decltype(t)>(rows_of.data_ptr<uint8_t>(), K, idx, R, y.data_ptr<float>());
  });
  return y;
}

// ---------------------------------------------------------------------------------------------
// The other ops of a decode step as row functions, shared by the single ops and the fused
// decode stack below: RMSNorm with the residual add, SiLU-and-mul, NeoX rotary embedding, and
// paged decode attention.

namespace {

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

// Keys ahead of the one in use whose K and V rows are prefetched: a (sequence, KV head) task
// reads D floats of each key, Hkv * D floats apart in the cache (a stride the hardware
// prefetcher does not follow once it passes a page).
constexpr int64_t kKeyPrefetch = 8;

inline void prefetch_row(const float* row, int64_t D) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t o = 0; o < D * 4; o += 64) _mm_prefetch(p + o, _MM_HINT_T0);
}

// scores of keys rows[0..n) for one or two query heads (kTwo), 4 keys at a time, each K row
// loaded once for both heads, one FMA chain per (key, head) over D; `ahead`: prefetch the K
// and V rows kKeyPrefetch keys on (the first pass over these keys).
template <bool kTwo>
void score_keys(const PagedCtx& c, const int64_t* rows, int64_t n, const float* qa,
                const float* qb, float* pa, float* pb, bool ahead) {
  const int64_t D = c.D;
  for (int64_t j0 = 0; j0 < n; j0 += 4) {
    if (ahead)
      for (int64_t j = j0 + kKeyPrefetch; j < std::min(n, j0 + kKeyPrefetch + 4); ++j) {
        prefetch_row(c.kc + rows[j], D);
        prefetch_row(c.vc + rows[j], D);
      }
    const float* kr[4];
    for (int64_t u = 0; u < 4; ++u) kr[u] = c.kc + rows[std::min(j0 + u, n - 1)];
    __m256 aa[4], ab[4];
    for (int u = 0; u < 4; ++u) aa[u] = ab[u] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 qva = _mm256_loadu_ps(qa + d);
      const __m256 qvb = kTwo ? _mm256_loadu_ps(qb + d) : qva;
      for (int u = 0; u < 4; ++u) {
        const __m256 kv = _mm256_loadu_ps(kr[u] + d);
        aa[u] = _mm256_fmadd_ps(qva, kv, aa[u]);
        if constexpr (kTwo) ab[u] = _mm256_fmadd_ps(qvb, kv, ab[u]);
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
    if constexpr (kTwo) reduce(ab, pb);
  }
}

// sum_j p_j v_j for one or two query heads (kTwo): 32-wide slices of D at a time (each V row
// loaded once for both heads), the accumulators in registers -> oa, ob.
template <bool kTwo>
void weigh_values(const PagedCtx& c, const int64_t* rows, int64_t n, const float* pa,
                  const float* pb, float* oa, float* ob) {
  const int64_t D = c.D;
  for (int64_t d0 = 0; d0 < D; d0 += 32) {
    const int64_t nch = std::min<int64_t>(4, (D - d0) / 8);
    __m256 aa[4], ab[4];
    for (int u = 0; u < 4; ++u) aa[u] = ab[u] = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      const float* vv = c.vc + rows[j] + d0;
      const __m256 wa = _mm256_set1_ps(pa[j]);
      const __m256 wb = kTwo ? _mm256_set1_ps(pb[j]) : wa;
      if (nch == 4) {
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) {
          const __m256 v = _mm256_loadu_ps(vv + 8 * u);
          aa[u] = _mm256_fmadd_ps(wa, v, aa[u]);
          if constexpr (kTwo) ab[u] = _mm256_fmadd_ps(wb, v, ab[u]);
        }
      } else {
        for (int u = 0; u < nch; ++u) {
          const __m256 v = _mm256_loadu_ps(vv + 8 * u);
          aa[u] = _mm256_fmadd_ps(wa, v, aa[u]);
          if constexpr (kTwo) ab[u] = _mm256_fmadd_ps(wb, v, ab[u]);
        }
      }
    }
    for (int u = 0; u < nch; ++u) {
      _mm256_storeu_ps(oa + d0 + 8 * u, aa[u]);
      if constexpr (kTwo) _mm256_storeu_ps(ob + d0 + 8 * u, ab[u]);
    }
  }
}

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
  for (int64_t j = 0; j < std::min(n, kKeyPrefetch); ++j) {
    prefetch_row(c.kc + rows[j], D);
    prefetch_row(c.vc + rows[j], D);
  }
  for (int64_t g0 = 0; g0 < ng; g0 += 2) {
    const float* qa = q + g0 * D;
    float* pa = p + g0 * kKeySplit;
    if (g0 + 1 < ng)
      score_keys<true>(c, rows, n, qa, qa + D, pa, pa + kKeySplit, g0 == 0);
    else
      score_keys<false>(c, rows, n, qa, qa, pa, pa, g0 == 0);
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
  for (int64_t g0 = 0; g0 < ng; g0 += 2) {
    const float* pa = p + g0 * kKeySplit;
    float* oa = part + g0 * PS;
    if (g0 + 1 < ng)
      weigh_values<true>(c, rows, n, pa, pa + kKeySplit, oa, oa + PS);
    else
      weigh_values<false>(c, rows, n, pa, pa, oa, oa);
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

// Sampling a row of logits x [V] at temperature 1 / inv_temp: p_i = exp((x_i - max) * inv_temp)
// / sum, drawn by inverse CDF with one uniform u in [0, 1) (the sampler's plain case, without
// top-k / top-p / min-p). Three read-only passes over the row (max; the exps' sums per chunk;
// the chosen chunk's exps again, walked in order) instead of the temporaries [V] that the same
// draw costs in torch ops: ~1 ms per row of a 152k vocabulary on this memory system at 16 rows.
namespace {
constexpr int64_t kSampleChunk = 1024;

// exp((x[i] - mx) * it) for i in [0, n): 8 at a time, the tail with std::exp.
inline void exp_scaled(const float* x, int64_t n, float mx, float it, float* out) {
  const __m256 m8 = _mm256_set1_ps(mx), t8 = _mm256_set1_ps(it);
  int64_t i = 0;
  const __m256 lo = _mm256_set1_ps(-87.0f);  // below: 0 (exp256 would clamp -inf to ~1e-38)
  for (; i + 8 <= n; i += 8) {
    const __m256 a = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), m8), t8);
    _mm256_storeu_ps(out + i, _mm256_and_ps(exp256(a), _mm256_cmp_ps(a, lo, _CMP_GE_OQ)));
  }
  for (; i < n; ++i) {
    const float a = (x[i] - mx) * it;
    out[i] = a >= -87.0f ? std::exp(a) : 0.0f;
  }
}

int64_t sample_row(const float* x, int64_t V, float it, double u, std::vector<double>& sums) {
  __m256 m8 = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t i0 = 0;
  for (; i0 + 8 <= V; i0 += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(x + i0));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m8);
  float mx = *std::max_element(lanes, lanes + 8);
  for (; i0 < V; ++i0) mx = std::max(mx, x[i0]);
  TORCH_CHECK(std::isfinite(mx), "logits must be finite to sample from");
  const int64_t C = (V + kSampleChunk - 1) / kSampleChunk;
  sums.assign(C, 0.0);
  float e[kSampleChunk];
  double total = 0.0;
  for (int64_t c = 0; c < C; ++c) {
    const int64_t n = std::min(kSampleChunk, V - c * kSampleChunk);
    exp_scaled(x + c * kSampleChunk, n, mx, it, e);
    double s = 0.0;
    for (int64_t i = 0; i < n; ++i) s += e[i];
    total += (sums[c] = s);
  }
  double target = u * total, acc = 0.0;
  int64_t c = 0;
  while (c + 1 < C && acc + sums[c] <= target) acc += sums[c++];
  const int64_t n = std::min(kSampleChunk, V - c * kSampleChunk);
  exp_scaled(x + c * kSampleChunk, n, mx, it, e);
  int64_t last = -1;  // the chunk's last token with p > 0: where rounding leaves the target
  for (int64_t i = 0; i < n; ++i) {
    if (e[i] <= 0.0f) continue;
    last = i;
    acc += e[i];
    if (acc > target) break;
  }
  if (last >= 0) return c * kSampleChunk + last;
  for (int64_t i = c * kSampleChunk - 1; i >= 0; --i)  // u * total in a chunk of zeros: rounding
    if ((x[i] - mx) * it >= -87.0f) return i;
  return 0;
}
}  // namespace

// logits [S, V] float32, inv_temp [S] float32, u [S] float64 in [0, 1) -> ids [S] int64
at::Tensor sample_rows(const at::Tensor& logits, const at::Tensor& inv_temp, const at::Tensor& u) {
  check_f32(logits, "logits");
  check_f32(inv_temp, "inv_temp");
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, "logits must be [S, V]");
  const int64_t S = logits.size(0), V = logits.size(1);
  TORCH_CHECK(inv_temp.numel() == S, "one inverse temperature per row");
  TORCH_CHECK(u.scalar_type() == at::kDouble && u.is_contiguous() && u.numel() == S,
              "u must be [S] contiguous float64");
  at::Tensor ids = at::empty({S}, at::TensorOptions().dtype(at::kLong));
  const float* xp = logits.data_ptr<float>();
  const float* tp = inv_temp.data_ptr<float>();
  const double* up = u.data_ptr<double>();
  int64_t* ip = ids.data_ptr<int64_t>();
  at::parallel_for(0, S, 1, [&](int64_t s0, int64_t s1) {
    std::vector<double> sums;
    for (int64_t s = s0; s < s1; ++s) ip[s] = sample_row(xp + s * V, V, tp[s], up[s], sums);
  });
  return ids;
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
// The fused decode stack: every decoder layer of a Llama-family model (RMSNorm, q/k/v projection
// with optional bias and per-head q/k norm, NeoX rotary, paged attention, or DeepSeek's latent
// attention (mla.h) over its latent cache, o projection, RMSNorm,
// then a gated MLP (gate/up projection, SiLU-and-mul, down projection) or an MoE layer (router,
// the grouped expert pass of moe.h, plus an ungated shared MLP)) and the final norm, for a batch
// of one new token per sequence, in one call and one OpenMP parallel region: the phases are
// separated by the region's barriers instead of a Python dispatch and a thread fork/join per op.
// Every phase runs the same row functions as the single ops, so the result is theirs bit for
// bit.

namespace {

// A quantised projection [N, K] and its optional bias: the weight rows in one or more parts of
// possibly different types (a Q4_K_M file's q/k in Q4_K beside a Q6_K v), in row order.
struct Proj {
  struct Part {
    at::Tensor w;
    const uint8_t* wp = nullptr;
    int64_t qtype = 0, N = 0, off = 0;  // its rows are rows off..off+N-1 of the projection
  };
  std::vector<Part> parts;
  at::Tensor bias;
  int64_t N = 0, K = 0;
  const float* bp = nullptr;
};

// Weights: the parts' blocks [N_i, row_bytes_i] with their ggml types.
Proj make_proj(const std::vector<at::Tensor>& ws, const std::vector<int64_t>& qtypes, int64_t K,
               const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(!ws.empty() && ws.size() == qtypes.size(),
              "a projection needs one ggml type per weight part");
  Proj p;
  p.K = K;
  for (size_t i = 0; i < ws.size(); ++i) {
    check_weight(ws[i], qtypes[i], K);
    p.parts.push_back({ws[i], ws[i].data_ptr<uint8_t>(), qtypes[i], ws[i].size(0), p.N});
    p.N += ws[i].size(0);
  }
  if (bias.has_value()) {
    check_f32(*bias, "bias");
    TORCH_CHECK(bias->numel() == p.N, "bias has ", bias->numel(), " values, expected ", p.N);
    p.bias = *bias;
    p.bp = p.bias.data_ptr<float>();
  }
  return p;
}

// The first weight row of thread i's share of p (i = nt: p.N): the rows cut where the bytes
// before them reach i / nt of the projection's, on a multiple of 16 rows of their part (parts
// of several types have rows of different lengths: a Q6_K v beside Q4_K q and k).
int64_t team_row(const Proj& p, int64_t i, int64_t nt) {
  if (i >= nt) return p.N;
  int64_t total = 0;
  for (const Proj::Part& part : p.parts) total += part.N * part.w.size(1);
  int64_t goal = total * i / nt;
  for (const Proj::Part& part : p.parts) {
    const int64_t rb = part.w.size(1), bytes = part.N * rb;
    if (goal < bytes) return part.off + std::min(part.N, (goal / rb + 8) / 16 * 16);
    goal -= bytes;
  }
  return p.N;
}

// y[:, n0:n1] (y is [M, N]) = x W[n0:n1]^T without the bias, each part's rows of the range by
// its own type's GEMV (one thread).
void proj_rows(const Acts& a, const Proj& p, int64_t n0, int64_t n1, float* y,
               GemvScratch& scratch) {
  for (const Proj::Part& part : p.parts) {
    const int64_t lo = std::max(n0, part.off), hi = std::min(n1, part.off + part.N);
    if (lo >= hi) continue;
    // y's rows are N apart; the part's columns at off
    gemv_any(part.qtype, a, part.wp, p.N, lo - part.off, hi - part.off, y + part.off, scratch);
  }
}

// y [M, N] = x W^T (+ bias), the weight rows shared out among the region's threads in one
// contiguous range each, of equal bytes (team_row; long sequential streams for the hardware
// prefetcher, as at::parallel_for splits them; small interleaved tasks measured ~20% slower),
// each part's rows of the range by its own type's GEMV.
// Called by every thread of the parallel region; ends with the worksharing loop's barrier.
void gemv_team(const Acts& a, const Proj& p, float* y, GemvScratch& scratch) {
  const int64_t N = p.N, nt = omp_get_num_threads();
#pragma omp for schedule(static, 1)
  for (int64_t i = 0; i < nt; ++i) {
    const int64_t n0 = team_row(p, i, nt), n1 = team_row(p, i + 1, nt);
    proj_rows(a, p, n0, n1, y, scratch);
    if (p.bp != nullptr)
      for (int64_t m = 0; m < a.M; ++m)
        for (int64_t n = n0; n < n1; ++n) y[m * N + n] += p.bp[n];
  }
}

}  // namespace

#include "mla.h"  // DeepSeek's latent attention, on the row functions above

namespace {

struct StackLayer {
  at::Tensor ln1, ln2, q_norm, k_norm, k_cache, v_cache;
  // Qwen2-MoE: the shared MLP's output is scaled by sigmoid(x . gate), gate one row [1, E]
  // quantised (shared_gate_q) or float32 (shared_gate).
  at::Tensor shared_gate;
  Proj shared_gate_q;
  bool qk_norm_whole = false;  // q_norm / k_norm span all heads at once (OLMoE), not one head
  float clip = 0.0f;  // > 0: q, k, v clamped to [-clip, clip] after the whole-projection norm
  Proj qkv, o, gate_up, down;  // gate_up / down: the dense MLP, or an MoE layer's shared MLP
  std::shared_ptr<MoeLayer> moe;  // the routed experts of an MoE layer
  std::shared_ptr<MlaAttention> mla;  // latent attention in place of qkv (DeepSeek)
  bool has_mlp = true;  // gate_up / down are set
  int64_t window = 0;
};

}  // namespace

class DecodeStack {
 public:
  // H, Hkv query / KV heads of D dims; rotary tables cos/sin [P, R] (NeoX, R <= D); eps of
  // every RMSNorm; final_norm [E]. A latent-attention stack: H heads over one KV head of D = L + R
  // dims (the latent cache's rows [N, S, 1, D]); the tables of its rope layout.
  DecodeStack(int64_t H, int64_t Hkv, int64_t D, double eps, double scale, at::Tensor cos,
              at::Tensor sin, at::Tensor final_norm)
      : H_(H), Hkv_(Hkv), D_(D), eps_(static_cast<float>(eps)), scale_(scale),
        cos_(std::move(cos)), sin_(std::move(sin)), final_norm_(std::move(final_norm)) {
    check_f32(cos_, "cos");
    check_f32(sin_, "sin");
    check_f32(final_norm_, "final_norm");
    // (up to 128 query heads per KV head: DeepSeek-V3's latent attention)
    TORCH_CHECK(H > 0 && Hkv > 0 && H % Hkv == 0 && H / Hkv <= 128, "bad head counts");
    TORCH_CHECK(D % 8 == 0, "head_dim must be a multiple of 8");
    TORCH_CHECK(cos_.dim() == 2 && cos_.sizes() == sin_.sizes() && cos_.size(1) % 2 == 0 &&
                    cos_.size(1) <= D, "bad rotary tables");
    E_ = final_norm_.numel();
  }

  // Each projection: its weight parts and their ggml types (one of each when not mixed).
  using Tensors = std::vector<at::Tensor>;
  using Types = std::vector<int64_t>;
  void add_layer(const at::Tensor& ln1, const Tensors& qkv_w, const Types& qkv_type,
                 const c10::optional<at::Tensor>& qkv_bias,
                 const c10::optional<at::Tensor>& q_norm,
                 const c10::optional<at::Tensor>& k_norm, const Tensors& o_w,
                 const Types& o_type, const c10::optional<at::Tensor>& o_bias,
                 const at::Tensor& ln2, const Tensors& gate_up_w, const Types& gate_up_type,
                 const Tensors& down_w, const Types& down_type, const at::Tensor& k_cache,
                 const at::Tensor& v_cache, int64_t window, std::shared_ptr<MoeLayer> moe,
                 const c10::optional<at::Tensor>& shared_gate, const Types& shared_gate_type,
                 double clip_qkv, std::shared_ptr<MlaAttention> mla) {
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
      l.qk_norm_whole = q_norm->numel() != D_;
      const int64_t qn = l.qk_norm_whole ? H_ * D_ : D_, kn = l.qk_norm_whole ? Hkv_ * D_ : D_;
      TORCH_CHECK(q_norm->numel() == qn && k_norm->numel() == kn,
                  "q/k norm: one head's dims, or all heads'");
      l.q_norm = *q_norm;
      l.k_norm = *k_norm;
    }
    TORCH_CHECK(layers_.empty() || !layers_[0].mla == !mla,
                "latent and q/k/v attention layers in one stack");
    if (mla) {
      TORCH_CHECK(qkv_w.empty() && !q_norm.has_value(), "a latent-attention layer has no qkv");
      TORCH_CHECK(mla->E == E_ && mla->H == H_ && Hkv_ == 1 && mla->L + mla->R == D_,
                  "the latent attention's dims differ from the stack's");
      TORCH_CHECK(cos_.size(1) == (mla->layout == kRopeNeox ? mla->R : mla->R / 2),
                  "the rotary tables do not fit the latent attention's rope dims");
      for (const StackLayer& other : layers_)
        TORCH_CHECK(other.mla->Lq == mla->Lq && other.mla->Dn == mla->Dn &&
                        other.mla->Dv == mla->Dv, "latent attention layers differ in shape");
      l.mla = std::move(mla);
    } else {
      l.qkv = make_proj(qkv_w, qkv_type, E_, qkv_bias);
      TORCH_CHECK(l.qkv.N == (H_ + 2 * Hkv_) * D_, "qkv rows");
    }
    l.o = make_proj(o_w, o_type, l.mla ? H_ * l.mla->Dv : H_ * D_, o_bias);
    TORCH_CHECK(l.o.N == E_, "o rows");
    TORCH_CHECK(gate_up_w.empty() == down_w.empty(), "gate_up and down go together");
    l.has_mlp = !gate_up_w.empty();  // none: an MoE layer without shared experts
    TORCH_CHECK(l.has_mlp || moe, "a layer needs an MLP or an MoE layer");
    if (l.has_mlp) {
      l.gate_up = make_proj(gate_up_w, gate_up_type, E_, c10::nullopt);
      TORCH_CHECK(l.gate_up.N % 2 == 0, "gate_up rows");
      l.down = make_proj(down_w, down_type, l.gate_up.N / 2, c10::nullopt);
      TORCH_CHECK(l.down.N == E_, "down rows");
    }
    if (shared_gate.has_value()) {
      TORCH_CHECK(moe && l.has_mlp, "a shared-expert gate needs an MoE layer's shared MLP");
      if (shared_gate_type.empty()) {
        check_f32(*shared_gate, "shared_gate");
        TORCH_CHECK(shared_gate->numel() == E_, "shared_gate: one row of the hidden size");
        l.shared_gate = *shared_gate;
      } else {
        l.shared_gate_q = make_proj({*shared_gate}, shared_gate_type, E_, c10::nullopt);
        TORCH_CHECK(l.shared_gate_q.N == 1, "shared_gate: one row");
      }
    }
    TORCH_CHECK(clip_qkv >= 0.0, "clip_qkv must be >= 0");
    l.clip = static_cast<float>(clip_qkv);
    if (moe) {
      TORCH_CHECK(moe->hidden() == E_, "the MoE layer's hidden size differs");
      for (const StackLayer& other : layers_)
        TORCH_CHECK(!other.moe || other.moe->top_k() == moe->top_k(),
                    "MoE layers differ in experts per token");
      l.moe = std::move(moe);
    }
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

  // The experts each MoE layer chose in the last forward: [MoE layers, B, K] int64.
  at::Tensor routed_ids() const { return ids_.clone(); }

  // hidden [B, E] (the embedded new tokens, one per sequence) -> final-normed hidden [B, E];
  // the step's K/V are written into every layer's cache.
  at::Tensor forward(const at::Tensor& hidden, const at::Tensor& positions,
                     const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                     const at::Tensor& context_lens, bool int8) {
    TORCH_CHECK(!layers_.empty(), "no layers");
    check_f32(hidden, "hidden");
    TORCH_CHECK(hidden.dim() == 2 && hidden.size(1) == E_, "hidden must be [B, ", E_, "]");
    const int64_t B = hidden.size(0), H = H_, Hkv = Hkv_, D = D_, E = E_, G = H / Hkv;
    const int64_t R = cos_.size(1), NQ = (H + 2 * Hkv) * D;
    check_paged(layers_[0].k_cache, layers_[0].v_cache, slot_mapping, block_tables,
                context_lens, B, Hkv, D);
    check_positions(positions, B, cos_.size(0));
    const int64_t* pos = positions.data_ptr<int64_t>();
    const int64_t* slots = slot_mapping.data_ptr<int64_t>();
    const float* cp = cos_.data_ptr<float>();
    const float* sp = sin_.data_ptr<float>();
    int64_t max_i = 0, num_moe = 0, top_k = 1, num_experts = 0;
    for (const StackLayer& l : layers_) {
      max_i = std::max(max_i, l.gate_up.N / 2);
      if (l.moe) {
        ++num_moe;
        top_k = l.moe->top_k();
        num_experts = std::max(num_experts, l.moe->route().E);
      }
    }
    const int64_t max_k = std::max({E, H * D, max_i});
    ids_ = at::empty({num_moe, B, top_k}, at::TensorOptions().dtype(at::kLong));
    std::vector<float> wts(static_cast<size_t>(B * top_k)), logits(B * num_experts),
        choice(num_experts), shared(B * E), gate(B);

    at::Tensor out = at::empty({B, E}, hidden.options());
    std::vector<float> res(hidden.data_ptr<float>(), hidden.data_ptr<float>() + B * E);
    const MlaAttention* mla = layers_[0].mla.get();  // a latent-attention stack
    const int64_t B_mha = mla ? 0 : B;  // the q/k/v path's rows (none in a latent stack)
    std::vector<float> xn(B * E), qkv(B_mha * NQ), att(B_mha * H * D), h(B * E),
        gu(B * 2 * max_i), act(B * max_i);
    Acts acts;
    // Partial attention results: at most as many tasks as without a sliding window.
    const PagedCtx whole = paged_ctx(layers_[0].k_cache, layers_[0].v_cache, block_tables,
                                     context_lens, 0, scale_);
    const int64_t PS = G * part_size(D);
    std::vector<float> parts(static_cast<size_t>(mla ? 0 : AttnTasks(whole, B).total * PS));
    const int nt = at::get_num_threads();
    const MlaTasks mla_tasks(whole, mla ? B : 0, H, nt);
    std::unique_ptr<MlaBuffers> mla_buf;
    if (mla) mla_buf = std::make_unique<MlaBuffers>(*mla, B, mla_tasks);
    float* op = out.data_ptr<float>();

#pragma omp parallel num_threads(nt)
    {
      GemvScratch scratch;
      scratch.reserve(B, max_k);
      std::vector<float> p(static_cast<size_t>(G * kKeySplit));
      for (size_t li = 0, mi = 0; li < layers_.size(); ++li) {
        const StackLayer& l = layers_[li];
        const int64_t Il = l.gate_up.N / 2;
#pragma omp single
        {
          for (int64_t b = 0; b < B; ++b)
            rms_row(li == 0 ? res.data() + b * E : h.data() + b * E, res.data() + b * E, li > 0,
                    l.ln1.data_ptr<float>(), E, eps_, xn.data() + b * E);
          acts.prepare(xn.data(), B, E, int8);
        }
        if (l.mla) {
          const PagedCtx c =
              paged_ctx(l.k_cache, l.v_cache, block_tables, context_lens, 0, scale_);
          l.mla->attend(acts, B, pos, slots, cp, sp, R, l.k_cache.data_ptr<float>(), c,
                        mla_tasks, *mla_buf, int8, scratch, p.data());
        } else {
          gemv_team(acts, l.qkv, qkv.data(), scratch);
  #pragma omp single
          {  // q and k: norm, rotary; k and v into the cache
            float* kc = l.k_cache.data_ptr<float>();
            float* vc = l.v_cache.data_ptr<float>();
            for (int64_t b = 0; b < B; ++b) {
              float* q = qkv.data() + b * NQ;
              float* k = q + H * D;
              if (l.qk_norm_whole) {
                rms_row(q, nullptr, false, l.q_norm.data_ptr<float>(), H * D, eps_, q);
                rms_row(k, nullptr, false, l.k_norm.data_ptr<float>(), Hkv * D, eps_, k);
              }
              if (l.clip > 0.0f)
                for (int64_t i = 0; i < NQ; ++i) q[i] = std::min(std::max(q[i], -l.clip), l.clip);
              for (int64_t hd = 0; hd < H + Hkv; ++hd) {
                float* x = q + hd * D;  // q heads, then k heads
                const at::Tensor& norm = hd < H ? l.q_norm : l.k_norm;
                if (norm.defined() && !l.qk_norm_whole)
                  rms_row(x, nullptr, false, norm.data_ptr<float>(), D, eps_, x);
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
        }
        gemv_team(acts, l.o, h.data(), scratch);
        const auto post_norm = [&] {
          for (int64_t b = 0; b < B; ++b)
            rms_row(h.data() + b * E, res.data() + b * E, true, l.ln2.data_ptr<float>(), E,
                    eps_, xn.data() + b * E);
        };
        if (l.moe) {  // the router's logits, its rows shared out (route_row's, bit for bit)
#pragma omp single
          post_norm();
          const Route& r = l.moe->route();
          const int64_t chunks = 4 * nt;
#pragma omp for schedule(static)
          for (int64_t c = 0; c < chunks; ++c)
            router_logits(r, xn.data(), B, r.E * c / chunks, r.E * (c + 1) / chunks,
                          logits.data());
        }
#pragma omp single
        {
          if (!l.moe) post_norm();
          if (l.moe) {  // route, and plan the expert pass
            const Route& r = l.moe->route();
            const int64_t K = l.moe->top_k();
            int64_t* ids = ids_.data_ptr<int64_t>() + mi * B * K;
            for (int64_t b = 0; b < B; ++b)
              route_logits(r, logits.data() + b * r.E, ids + b * K, wts.data() + b * K,
                           choice.data());
            pass_.plan(l.moe->experts(), ids, B, K, nt, int8);
          }
          if (l.has_mlp) acts.prepare(xn.data(), B, E, int8);
        }
        if (l.moe) {
          pass_.run(l.moe->experts(), xn.data(), wts.data(), h.data(), scratch);
          ++mi;
        }
        if (l.has_mlp) {
          float* y = l.moe ? shared.data() : h.data();
          gemv_team(acts, l.gate_up, gu.data(), scratch);
          if (!l.shared_gate_q.parts.empty()) gemv_team(acts, l.shared_gate_q, gate.data(), scratch);
#pragma omp single
          {
            for (int64_t b = 0; b < B; ++b)
              silu_row(gu.data() + b * 2 * Il, gu.data() + b * 2 * Il + Il, act.data() + b * Il,
                       Il);
            acts.prepare(act.data(), B, Il, int8);
          }
          gemv_team(acts, l.down, y, scratch);
          if (l.moe && (l.shared_gate.defined() || !l.shared_gate_q.parts.empty())) {
#pragma omp single
            {  // Qwen2-MoE: routed + sigmoid(x . gate) * shared
              for (int64_t b = 0; b < B; ++b) {
                float dot = gate[b];
                if (l.shared_gate.defined()) {
                  const float* g = l.shared_gate.data_ptr<float>();
                  const float* x = xn.data() + b * E;
                  dot = 0.0f;
                  for (int64_t i = 0; i < E; ++i) dot += x[i] * g[i];
                }
                const float s = 1.0f / (1.0f + std::exp(-dot));
                for (int64_t i = 0; i < E; ++i) h[b * E + i] += s * shared[b * E + i];
              }
            }
          } else if (l.moe) {  // routed + shared, as the layer-by-layer path adds them
#pragma omp for schedule(static)
            for (int64_t i = 0; i < B * E; ++i) h[i] = h[i] + shared[i];
          }
        }
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
  ExpertPass pass_;  // the MoE layers' pass (one layer at a time)
  at::Tensor ids_;  // [MoE layers, B, K]: the last forward's routing
};

// one step of accumulator a against weights w and activations x
template <bool kVnni>
inline KVec mac_step(KVec a, KVec w, KVec x, KVec s) {
#ifdef MOEFLOW_VNNI
  if constexpr (kVnni) return _mm512_dpbusd_epi32(a, w, x);
#endif
  return kdot(a, kmaddubs(w, x), s);
}

// The int8 products' ceiling on this machine (the bench's prefill roofline): `threads` threads
// each run a 4 x 4 register tile of the int8 GEMM's integer step (kmaddubs into kdot,
// gemm_i8.h: every int8 product here goes through it, the block scales applied on the way) for
// `steps` steps, nothing loaded or stored. vnni (AVX-512 build only): one vpdpbusd a step
// instead, the CPU's plain int8 dot product, whose sums would need the block scales after.
// (named registers, not arrays: GCC kept an array of 16 accumulators in memory)
template <bool kVnni>
int32_t mac_tile_loop(int64_t steps, int32_t seed) {
  const KVec s = kset1(0x00010001);
  KVec x0 = kset1(seed), x1 = kset1(seed + 1), x2 = kset1(seed + 2), x3 = kset1(seed + 3);
  KVec w0 = kset1(seed + 4), w1 = kset1(seed + 5), w2 = kset1(seed + 6), w3 = kset1(seed + 7);
  KVec a00 = kzero(), a01 = kzero(), a02 = kzero(), a03 = kzero(), a10 = kzero(), a11 = kzero(),
       a12 = kzero(), a13 = kzero(), a20 = kzero(), a21 = kzero(), a22 = kzero(), a23 = kzero(),
       a30 = kzero(), a31 = kzero(), a32 = kzero(), a33 = kzero();
  for (int64_t i = 0; i < steps; ++i) {
    a00 = mac_step<kVnni>(a00, w0, x0, s);
    a01 = mac_step<kVnni>(a01, w1, x0, s);
    a02 = mac_step<kVnni>(a02, w2, x0, s);
    a03 = mac_step<kVnni>(a03, w3, x0, s);
    a10 = mac_step<kVnni>(a10, w0, x1, s);
    a11 = mac_step<kVnni>(a11, w1, x1, s);
    a12 = mac_step<kVnni>(a12, w2, x1, s);
    a13 = mac_step<kVnni>(a13, w3, x1, s);
    a20 = mac_step<kVnni>(a20, w0, x2, s);
    a21 = mac_step<kVnni>(a21, w1, x2, s);
    a22 = mac_step<kVnni>(a22, w2, x2, s);
    a23 = mac_step<kVnni>(a23, w3, x2, s);
    a30 = mac_step<kVnni>(a30, w0, x3, s);
    a31 = mac_step<kVnni>(a31, w1, x3, s);
    a32 = mac_step<kVnni>(a32, w2, x3, s);
    a33 = mac_step<kVnni>(a33, w3, x3, s);
    // unknown values from here on: the products may not be hoisted out of the loop
    asm volatile("" : "+v"(x0), "+v"(x1), "+v"(x2), "+v"(x3), "+v"(w0), "+v"(w1), "+v"(w2),
                 "+v"(w3));
  }
  __m256i t = kfold(a00);
  for (KVec a : {a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33})
    t = _mm256_add_epi32(t, kfold(a));
  return _mm256_extract_epi32(t, 0);
}

// int8 multiply-adds a second over `threads` threads together, from one run of `steps` steps
double int8_mac_rate(int64_t threads, int64_t steps, bool vnni) {
#ifndef MOEFLOW_VNNI
  TORCH_CHECK(!vnni, "vnni: the AVX-512 build only");
#endif
  TORCH_CHECK(threads >= 1 && steps >= 1, "threads and steps must be >= 1");
  std::vector<int32_t> sink(static_cast<size_t>(threads));
  const auto start = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(static_cast<int>(threads))
  {
    const int t = omp_get_thread_num();
    const int32_t sum = vnni ? mac_tile_loop<true>(steps, t) : mac_tile_loop<false>(steps, t);
    sink[static_cast<size_t>(t)] = sum;
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  volatile int32_t keep = 0;  // the sums are used: the loops stay
  for (int32_t v : sink) keep = keep + v;
  return static_cast<double>(threads) * static_cast<double>(steps) * 16.0 * kKStep / s;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qgemm", &qgemm, "x [M, K] f32 @ quantised W [N, row_bytes]^T -> [M, N] f32");
  m.def("qgemm_i8", &qgemm_i8, "qgemm with int8-quantised activations");
  m.def("repack_q4k_r16", &repack_q4k_r16,
        "Q4_K blocks [..., N, row_bytes] -> repacked 16 rows at a time (ggml type id 1012)");
  m.def("unpack_q4k_r16", &unpack_q4k_r16, "repacked Q4_K -> the file's Q4_K rows");
  m.def("quantize_acts", &quantize_acts, "the int8 path's activation quantisation (tests)");
  m.def("dequantize", &dequantize, "quantised rows -> float32 [R, K]", py::arg("w"),
        py::arg("qtype"), py::arg("K"), py::arg("rows") = py::none());
  m.def("rms_norm", &rms_norm, "residual += x (in place); rmsnorm * weight");
  m.def("silu_mul", &silu_mul, "silu(gate) * up over [M, 2I]");
  m.def("sample_rows", &sample_rows,
        "one inverse-CDF draw per row of softmax(logits * inv_temp), given uniforms u",
        py::call_guard<py::gil_scoped_release>());
  m.def("rotary_neox_", &rotary_neox_, "NeoX rotary embedding in place");
  m.def("decode_attention", &decode_attention, "store K/V and attend, one token per sequence");
  m.def("int8_mac_rate", &int8_mac_rate,
        "int8 multiply-adds a second of the int8 products' register tile on `threads` threads",
        py::arg("threads"), py::arg("steps"), py::arg("vnni") = false,
        py::call_guard<py::gil_scoped_release>());
  m.def("moe_experts", &moe_experts,
        "routed experts over quantised [E, N, row_bytes] weights, grouped by expert",
        py::call_guard<py::gil_scoped_release>());
  py::class_<MoeLayer, std::shared_ptr<MoeLayer>>(m, "MoeLayer", py::module_local())
      .def(py::init<const at::Tensor&, const c10::optional<at::Tensor>&, int64_t,
                    const std::string&, bool, int64_t, int64_t, const std::string&, double,
                    double, const at::Tensor&, int64_t, const at::Tensor&, int64_t,
                    const at::Tensor&, int64_t>(),
           py::arg("router"), py::arg("correction_bias"), py::arg("top_k"), py::arg("scoring"),
           py::arg("renormalize"), py::arg("num_expert_group"), py::arg("topk_group"),
           py::arg("group_score"), py::arg("routed_scaling_factor"),
           py::arg("group_mask_value"), py::arg("gate"), py::arg("gate_type"), py::arg("up"),
           py::arg("up_type"), py::arg("down"), py::arg("down_type"))
      .def("select", &MoeLayer::select, "x [T, H] -> (weights [T, K], ids [T, K])",
           py::call_guard<py::gil_scoped_release>())
      .def("forward", &MoeLayer::forward, "x [T, H] -> (routed experts' sum [T, H], ids [T, K])",
           py::call_guard<py::gil_scoped_release>());
  py::class_<MlaAttention, std::shared_ptr<MlaAttention>>(m, "MlaAttention", py::module_local())
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                    const std::vector<at::Tensor>&, const std::vector<int64_t>&,
                    const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                    const std::vector<at::Tensor>&, const std::vector<int64_t>&,
                    const at::Tensor&, const c10::optional<at::Tensor>&,
                    const c10::optional<at::Tensor>&, int64_t, const c10::optional<at::Tensor>&,
                    int64_t, double, const std::string&>(),
           py::arg("hidden"), py::arg("num_heads"), py::arg("kv_lora_rank"), py::arg("nope"),
           py::arg("rope"), py::arg("v_dim"), py::arg("q_lora_rank"), py::arg("qa"),
           py::arg("qa_type"), py::arg("qa_bias"), py::arg("q_a_norm"), py::arg("q_b"),
           py::arg("q_b_type"), py::arg("kv_a_norm"), py::arg("kv_b"), py::arg("k_b"),
           py::arg("k_b_type"), py::arg("v_b"), py::arg("v_b_type"), py::arg("eps"),
           py::arg("rope_layout"))
      .def("forward", &MlaAttention::forward,
           "normed hidden [B, E] -> heads' outputs [B, H Dv]; writes the latent cache",
           py::call_guard<py::gil_scoped_release>());
  // module_local: the avx2 and avx512 builds may both be loaded (tests), each with its class
  py::class_<DecodeStack>(m, "DecodeStack", py::module_local())
      .def(py::init<int64_t, int64_t, int64_t, double, double, at::Tensor, at::Tensor,
                    at::Tensor>(),
           py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("eps"),
           py::arg("scale"), py::arg("cos"), py::arg("sin"), py::arg("final_norm"))
      .def("add_layer", &DecodeStack::add_layer, py::arg("ln1"), py::arg("qkv"),
           py::arg("qkv_type"), py::arg("qkv_bias"), py::arg("q_norm"), py::arg("k_norm"),
           py::arg("o"), py::arg("o_type"), py::arg("o_bias"), py::arg("ln2"), py::arg("gate_up"),
           py::arg("gate_up_type"), py::arg("down"), py::arg("down_type"), py::arg("k_cache"),
           py::arg("v_cache"), py::arg("window"), py::arg("moe") = py::none(),
           py::arg("shared_gate") = py::none(), py::arg("shared_gate_type") = std::vector<int64_t>{},
           py::arg("clip_qkv") = 0.0, py::arg("mla") = py::none())
      .def("num_layers", &DecodeStack::num_layers)
      .def("routed_ids", &DecodeStack::routed_ids)
      .def("forward", &DecodeStack::forward, "one decode step of the whole stack",
           py::call_guard<py::gil_scoped_release>());
}
