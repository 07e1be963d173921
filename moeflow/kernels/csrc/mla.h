// DeepSeek's multi-head latent attention (layers/mla.py MLAAttention) in the fused decode step:
// the attention half of one decoder layer, for B new tokens (one per sequence), run by every
// thread of DecodeStack's parallel region. Included by cpu_ops.cpp after the row functions it
// uses (rms_row, rope_head, the paged attention's attend_part / attend_merge, Proj, gemv_team,
// proj_rows).
//
// Per token (what the torch path of layers/mla.py computes, to rounding):
//   a = [q | c, k_r] = x [q_proj | kv_a]^T    or with q LoRA: [q_a | c, k_r], q = q_b(norm(q_a))
//   c = kv_a_norm(c); k_r, q_r = rope(k_r), rope(q_r)        (q per head: [q_nope Dn | q_r R])
//   cache row (slot of the token) = [c, k_r]                 (the latent cache, L + R floats)
//   q_lat[h] = W_UK[h]^T q_nope[h]                           (absorbed: keys stay latent)
//   o_lat[h] = softmax(scale * [q_lat[h], q_r[h]] . rows) . rows[:, :L]   over the context
//   o[h] = W_UV[h] o_lat[h];  out = o_proj(o)
// W_UK and W_UV come either as the rows of kv_b_proj's float32 weight [H (Dn + Dv), L] per head
// (W_UK [H, Dn, L], W_UV [H, Dv, L]), or as a GGUF file's quantised halves, read as they are:
// k_b [H, L, Dn] (W_UK[h]^T, so q_lat[h] is a GEMV of k_b[h]'s L rows over q_nope[h]) and v_b
// [H, Dv, L] (o[h] a GEMV of v_b[h]'s Dv rows over o_lat[h]), each head's rows by the quantised
// GEMV of the other projections (proj_rows; their activation rows prepared per head).
// Attention runs the dense path's attend_part over the latent rows with the heads as query
// heads of one KV head (the values are the same rows; their last R dims are dropped), in
// tasks of (sequence, head group, key split). Every token's result depends on its own row only:
// batched rows equal solo rows.
//
// The layer-by-layer path (layers/mla.py, decode on the CPU with the projections kept quantised)
// runs the same attend() through forward(), in a parallel region of its own, so the fused step's
// output is that path's bit for bit.
//
// Shape legend: B tokens, E hidden, H heads, L kv_lora_rank, R rope dims, Dn nope dims, Dv value
// dims, Lq q_lora_rank, D = L + R (a latent row).
#pragma once

#include <string>

namespace {

enum RopeLayout : int { kRopeNeox = 0, kRopeInterleaved = 1, kRopeDeinterleave = 2 };
constexpr int64_t kMaxRope = 256;

// Rotation of the R dims x in place (kernels/rotary.py's layouts): neox pairs the halves (tables
// [R]); interleaved and deinterleave pair neighbours (tables [R/2]), the result interleaved or as
// [rotated evens, rotated odds].
inline void rope_latent(float* x, const float* c, const float* s, int64_t R, int layout) {
  if (layout == kRopeNeox) {
    rope_head(x, c, s, R);
    return;
  }
  const int64_t half = R / 2;
  float out[kMaxRope];
  for (int64_t i = 0; i < half; ++i) {
    const float e = x[2 * i], o = x[2 * i + 1];
    const float re = e * c[i] - o * s[i], ro = o * c[i] + e * s[i];
    if (layout == kRopeInterleaved) {
      out[2 * i] = re;
      out[2 * i + 1] = ro;
    } else {
      out[i] = re;
      out[i + half] = ro;
    }
  }
  std::memcpy(x, out, static_cast<size_t>(R) * sizeof(float));
}

// y[0:n] += a * x[0:n]
inline void axpy(float a, const float* x, float* y, int64_t n) {
  const __m256 av = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * x[i];
}

}  // namespace

struct MlaTasks;
struct MlaBuffers;

// One layer's latent attention: its projections and norms (tensors held, may be views of a
// memory-mapped file). Built from Python (kernels/decode_stack.py) and handed to
// DecodeStack.add_layer.
class MlaAttention {
 public:
  // qa_w / qa_type: the rows of q_proj (Lq = 0) or q_a_proj (Lq > 0), then kv_a's L + R rows,
  // as weight parts of ggml types; qa_bias: their bias (zeros where one has none). q_b: Lq > 0.
  MlaAttention(int64_t hidden, int64_t heads, int64_t kv_lora_rank, int64_t nope, int64_t rope,
               int64_t v_dim, int64_t q_lora_rank, const std::vector<at::Tensor>& qa_w,
               const std::vector<int64_t>& qa_type, const c10::optional<at::Tensor>& qa_bias,
               const c10::optional<at::Tensor>& q_a_norm, const std::vector<at::Tensor>& q_b_w,
               const std::vector<int64_t>& q_b_type, const at::Tensor& kv_a_norm,
               const c10::optional<at::Tensor>& kv_b, const c10::optional<at::Tensor>& k_b,
               int64_t k_b_type, const c10::optional<at::Tensor>& v_b, int64_t v_b_type,
               double eps, const std::string& rope_layout)
      : E(hidden), H(heads), L(kv_lora_rank), Dn(nope), R(rope), Dv(v_dim), Lq(q_lora_rank),
        eps(static_cast<float>(eps)) {
    TORCH_CHECK(E > 0 && H > 0 && L > 0 && Dn > 0 && Dv > 0 && Lq >= 0, "bad MLA dims");
    TORCH_CHECK(R > 0 && R % 2 == 0 && R <= kMaxRope, "the rope dims must be even, at most ",
                kMaxRope);
    TORCH_CHECK((L + R) % 8 == 0, "kv_lora_rank + rope dims must be a multiple of 8");
    if (rope_layout == "neox")
      layout = kRopeNeox;
    else if (rope_layout == "interleaved")
      layout = kRopeInterleaved;
    else if (rope_layout == "deinterleave")
      layout = kRopeDeinterleave;
    else
      TORCH_CHECK(false, "unknown rotary layout ", rope_layout);
    qa = make_proj(qa_w, qa_type, E, qa_bias);
    TORCH_CHECK(qa.N == q_width() + L + R, "q / q_a + kv_a rows: ", qa.N, ", expected ",
                q_width() + L + R);
    check_f32(kv_a_norm, "kv_a_norm");
    TORCH_CHECK(kv_a_norm.numel() == L, "kv_a_norm must be [kv_lora_rank]");
    kv_norm = kv_a_norm;
    TORCH_CHECK(q_a_norm.has_value() == (Lq > 0) && q_b_w.empty() == (Lq == 0),
                "q_a_norm and q_b go with a q LoRA rank");
    if (Lq > 0) {
      check_f32(*q_a_norm, "q_a_norm");
      TORCH_CHECK(q_a_norm->numel() == Lq, "q_a_norm must be [q_lora_rank]");
      q_norm = *q_a_norm;
      q_b = make_proj(q_b_w, q_b_type, Lq, c10::nullopt);
      TORCH_CHECK(q_b.N == H * (Dn + R), "q_b rows");
    }
    TORCH_CHECK(kv_b.has_value() != (k_b.has_value() && v_b.has_value()) &&
                    k_b.has_value() == v_b.has_value(),
                "give kv_b (float32) or both quantised halves k_b and v_b");
    if (kv_b.has_value()) {
      check_f32(*kv_b, "kv_b");
      TORCH_CHECK(kv_b->dim() == 2 && kv_b->size(0) == H * (Dn + Dv) && kv_b->size(1) == L,
                  "kv_b must be [heads * (nope + v), kv_lora_rank]");
      w_kv_b = *kv_b;
    } else {  // [H L, row bytes of Dn] and [H Dv, row bytes of L]
      uk = make_proj({*k_b}, {k_b_type}, Dn, c10::nullopt);
      TORCH_CHECK(uk.N == H * L, "k_b must hold heads * kv_lora_rank rows");
      uv = make_proj({*v_b}, {v_b_type}, L, c10::nullopt);
      TORCH_CHECK(uv.N == H * Dv, "v_b must hold heads * v_dim rows");
    }
  }

  // Every thread of the parallel region calls it, with `acts` holding the normed hidden rows
  // [B, E] prepared; ends with `acts` holding the heads' outputs [B, H Dv] prepared for o_proj
  // (and a barrier). cache: the layer's latent cache [N, S, D]; c: its paged context.
  void attend(Acts& acts, int64_t B, const int64_t* pos, const int64_t* slots, const float* cp,
              const float* sp, int64_t table_w, float* cache, const PagedCtx& c,
              const MlaTasks& tasks, MlaBuffers& buf, bool int8,
              GemvScratch& scratch, float* p) const;

  // The layer-by-layer decode step: x [B, E] (the normed hidden rows) -> the heads' outputs
  // [B, H Dv] (o_proj's input); the latent rows written into cache [N, S, D]. cos / sin: the
  // rope tables [P, R] (neox) or [P, R / 2].
  at::Tensor forward(const at::Tensor& x, const at::Tensor& positions,
                     const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                     const at::Tensor& context_lens, const at::Tensor& cache,
                     const at::Tensor& cos, const at::Tensor& sin, double scale, bool int8) const;

  int64_t q_width() const { return Lq > 0 ? Lq : H * (Dn + R); }  // the q part of qa's rows
  bool quantized_halves() const { return !uk.parts.empty(); }

  int64_t E, H, L, Dn, R, Dv, Lq;
  float eps;
  int layout = kRopeNeox;
  Proj qa, q_b, uk, uv;  // uk / uv: the quantised halves k_b, v_b (else w_kv_b)
  at::Tensor q_norm, kv_norm, w_kv_b;
};

// The attention tasks of a batch: (sequence, head group of `ng` heads, key split), the splits of
// one (sequence, group) adjacent; first[b]: sequence b's first task. Groups of fewer heads give
// more tasks (a short context with few sequences would leave threads idle otherwise); a head's
// result does not depend on its group.
struct MlaTasks {
  std::vector<int64_t> first, splits;
  int64_t ng = 1, groups = 1, total = 0;
  MlaTasks(const PagedCtx& c, int64_t B, int64_t H, int64_t nt) : first(B + 1), splits(B) {
    int64_t all_splits = 0;
    for (int64_t b = 0; b < B; ++b) all_splits += (splits[b] = key_splits(c, b));
    ng = H;
    while (ng % 2 == 0 && ng > 4 && all_splits * (H / ng) < 2 * nt) ng /= 2;
    groups = H / ng;
    for (int64_t b = 0; b < B; ++b) {
      first[b] = total;
      total += groups * splits[b];
    }
    first[B] = total;
  }
  void decode(int64_t t, int64_t* b, int64_t* g, int64_t* split) const {
    const int64_t bb = std::upper_bound(first.begin(), first.end() - 1, t) - first.begin() - 1;
    const int64_t r = t - first[bb];
    *b = bb;
    *g = r / splits[bb];
    *split = r % splits[bb];
  }
};

// The step's buffers, shared by the region's threads (sized once per forward).
struct MlaBuffers {
  std::vector<float> a, qa, q, qcat, parts, olat, outv;
  std::vector<float> hx, hy;  // quantised halves: one head's rows gathered [H, B, *]; [B, H, *]
  std::vector<Acts> head_acts;  // quantised halves: each head's activation rows
  MlaBuffers(const MlaAttention& m, int64_t B, const MlaTasks& t) {
    const auto z = [](int64_t n) { return static_cast<size_t>(n); };
    const int64_t D = m.L + m.R;
    a.resize(z(B * m.qa.N));  // [B, q_width + D]
    qa.resize(z(B * m.Lq));  // [B, Lq] normed
    q.resize(z(m.Lq > 0 ? B * m.H * (m.Dn + m.R) : 0));  // [B, H, Dn + R] from q_b
    qcat.resize(z(B * m.H * D));  // [B, H, D]: [q_lat, q_r] per head
    parts.resize(z(t.total * t.ng * part_size(D)));
    olat.resize(z(B * m.H * D));  // [B, H, D]: the first L of each head are o_lat
    outv.resize(z(B * m.H * m.Dv));  // [B, H Dv]
    if (m.quantized_halves()) {
      const int64_t w = std::max(m.L, m.Dn);
      hx.resize(z(m.H * B * w));
      hy.resize(z(B * m.H * w));
      head_acts.resize(z(m.H));
    }
  }
};

inline void MlaAttention::attend(Acts& acts, int64_t B, const int64_t* pos, const int64_t* slots,
                                 const float* cp, const float* sp, int64_t table_w, float* cache,
                                 const PagedCtx& c, const MlaTasks& tasks, MlaBuffers& buf,
                                 bool int8, GemvScratch& scratch, float* p) const {
  const int64_t D = L + R, QH = Dn + R, NA = qa.N, qw = q_width();
  gemv_team(acts, qa, buf.a.data(), scratch);  // [B, NA]
#pragma omp single
  {  // the latent row into the cache; the q LoRA's norm
    for (int64_t b = 0; b < B; ++b) {
      const float* kv = buf.a.data() + b * NA + qw;
      float* row = cache + slots[b] * D;
      rms_row(kv, nullptr, false, kv_norm.data_ptr<float>(), L, eps, row);
      std::memcpy(row + L, kv + L, static_cast<size_t>(R) * sizeof(float));
      rope_latent(row + L, cp + pos[b] * table_w, sp + pos[b] * table_w, R, layout);
      if (Lq > 0)
        rms_row(buf.a.data() + b * NA, nullptr, false, q_norm.data_ptr<float>(), Lq, eps,
                buf.qa.data() + b * Lq);
    }
    if (Lq > 0) acts.prepare(buf.qa.data(), B, Lq, int8);
  }
  if (Lq > 0) gemv_team(acts, q_b, buf.q.data(), scratch);  // [B, H (Dn + R)]
  const float* q = Lq > 0 ? buf.q.data() : buf.a.data();
  const int64_t q_stride = Lq > 0 ? H * QH : NA;
  const float* w = quantized_halves() ? nullptr : w_kv_b.data_ptr<float>();
  const auto floats = [](int64_t n) { return static_cast<size_t>(n) * sizeof(float); };
#pragma omp for schedule(static)
  for (int64_t h = 0; h < H; ++h) {  // q_r roped; q_lat = W_UK[h]^T q_nope
    for (int64_t b = 0; b < B; ++b) {
      const float* qh = q + b * q_stride + h * QH;
      float* qc = buf.qcat.data() + (b * H + h) * D;
      std::memcpy(qc + L, qh + Dn, floats(R));
      rope_latent(qc + L, cp + pos[b] * table_w, sp + pos[b] * table_w, R, layout);
      if (w != nullptr) {
        const float* w_uk = w + h * (Dn + Dv) * L;  // [Dn, L]
        std::fill(qc, qc + L, 0.0f);
        for (int64_t n = 0; n < Dn; ++n) axpy(qh[n], w_uk + n * L, qc, L);
      } else {
        std::memcpy(buf.hx.data() + (h * B + b) * Dn, qh, floats(Dn));
      }
    }
    if (w == nullptr) {  // the B rows of q_nope[:, h] through k_b[h]'s L rows
      Acts& a = buf.head_acts[h];
      a.prepare(buf.hx.data() + h * B * Dn, B, Dn, int8);
      proj_rows(a, uk, h * L, (h + 1) * L, buf.hy.data(), scratch);  // [B, H L]
      for (int64_t b = 0; b < B; ++b)
        std::memcpy(buf.qcat.data() + (b * H + h) * D, buf.hy.data() + (b * H + h) * L,
                    floats(L));
    }
  }
  const int64_t ng = tasks.ng, PS = ng * part_size(D);
#pragma omp for schedule(dynamic, 1)
  for (int64_t t = 0; t < tasks.total; ++t) {
    int64_t b, g, split;
    tasks.decode(t, &b, &g, &split);
    attend_part(c, b, 0, ng, buf.qcat.data() + (b * H + g * ng) * D, split,
                buf.parts.data() + t * PS, p);
  }
#pragma omp for schedule(static)
  for (int64_t i = 0; i < B * tasks.groups; ++i) {
    const int64_t b = i / tasks.groups, g = i % tasks.groups;
    attend_merge(ng, D, buf.parts.data() + (tasks.first[b] + g * tasks.splits[b]) * PS,
                 tasks.splits[b], buf.olat.data() + (b * H + g * ng) * D);
  }
#pragma omp for schedule(static)
  for (int64_t h = 0; h < H; ++h) {  // o[h] = W_UV[h] o_lat[h]
    if (w != nullptr) {
      const float* w_uv = w + (h * (Dn + Dv) + Dn) * L;  // [Dv, L]
      for (int64_t v = 0; v < Dv; ++v)
        for (int64_t b = 0; b < B; ++b)
          buf.outv[(b * H + h) * Dv + v] =
              dot_f32(w_uv + v * L, buf.olat.data() + (b * H + h) * D, L);
      continue;
    }
    float* x = buf.hx.data() + h * B * L;  // the B rows of o_lat[:, h] through v_b[h]'s Dv rows
    for (int64_t b = 0; b < B; ++b)
      std::memcpy(x + b * L, buf.olat.data() + (b * H + h) * D, floats(L));
    Acts& a = buf.head_acts[h];
    a.prepare(x, B, L, int8);
    proj_rows(a, uv, h * Dv, (h + 1) * Dv, buf.outv.data(), scratch);  // [B, H Dv]
  }
#pragma omp single
  acts.prepare(buf.outv.data(), B, H * Dv, int8);
}

inline at::Tensor MlaAttention::forward(const at::Tensor& x, const at::Tensor& positions,
                                        const at::Tensor& slot_mapping,
                                        const at::Tensor& block_tables,
                                        const at::Tensor& context_lens, const at::Tensor& cache,
                                        const at::Tensor& cos, const at::Tensor& sin,
                                        double scale, bool int8) const {
  check_f32(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == E, "x must be [B, ", E, "]");
  const int64_t B = x.size(0), D = L + R;
  TORCH_CHECK(cache.dim() == 3 && cache.size(2) == D, "the latent cache must be [N, S, ", D, "]");
  const at::Tensor rows = cache.unsqueeze(2);  // [N, S, 1, D]: one KV head
  check_paged(rows, rows, slot_mapping, block_tables, context_lens, B, 1, D);
  check_f32(cos, "cos");
  check_f32(sin, "sin");
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() &&
                  cos.size(1) == (layout == kRopeNeox ? R : R / 2),
              "the rotary tables do not fit the rope dims");
  check_positions(positions, B, cos.size(0));
  at::Tensor out = at::empty({B, H * Dv}, x.options());
  if (B == 0) return out;
  const PagedCtx c = paged_ctx(rows, rows, block_tables, context_lens, 0, scale);
  const int nt = at::get_num_threads();
  const MlaTasks tasks(c, B, H, nt);
  MlaBuffers buf(*this, B, tasks);
  Acts acts;
#pragma omp parallel num_threads(nt)
  {
    GemvScratch scratch;
    scratch.reserve(B, std::max({E, Lq, H * Dv}));
    std::vector<float> p(static_cast<size_t>(tasks.ng * kKeySplit));
#pragma omp single
    acts.prepare(x.data_ptr<float>(), B, E, int8);
    attend(acts, B, positions.data_ptr<int64_t>(), slot_mapping.data_ptr<int64_t>(),
           cos.data_ptr<float>(), sin.data_ptr<float>(), cos.size(1), rows.data_ptr<float>(), c,
           tasks, buf, int8, scratch, p.data());
  }
  std::memcpy(out.data_ptr<float>(), buf.outv.data(),
              static_cast<size_t>(B * H * Dv) * sizeof(float));
  return out;
}
