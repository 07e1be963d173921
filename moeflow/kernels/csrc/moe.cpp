// The grouped CPU MoE kernel over quantised experts kept in their blocks (GGUF's stacked
// [E, N, row_bytes] tensors, read in place, e.g. from a memory-mapped file).
//
// One call runs the routed experts of a batch of T tokens, K experts each:
//   1. group the T*K (token, expert) pairs by expert (stable: token order within an expert) and
//      gather each pair's activation row, prepared once: int8 per 32-chunk (the fast path,
//      llama.cpp's numerics) or float (the exact path);
//   2. gate and up projections: tasks of (expert, block of weight rows) over every touched
//      expert, each task multiplying its weight rows by all that expert's tokens (a small GEMM:
//      a weight block is decoded once per 4 tokens and stays in L1 across them);
//   3. act(gate) * up per pair, prepared (quantised) once for the down projection;
//   4. down projection, tasks of (expert, block of output rows);
//   5. each token's K results summed in slot order, times the router weights.
// Pairs are written to their own rows and summed in a fixed order, so a token's output never
// depends on the other tokens of the batch or on the thread count (batched rows == solo rows).
// Threads: one OpenMP region (ATen's pool); phases 2 and 4 hand out tasks dynamically, so
// experts with many tokens do not hold the others up.
//
// Shape legend: T tokens, H hidden, E experts, I expert intermediate size, K experts per token,
// P = T*K pairs.

#include "cpu_common.h"

#include <atomic>
#include <functional>

namespace {

// One projection of every expert: [E, N, row_bytes] uint8, rows contiguous, any expert stride
// (so gate and up may be two views of one stacked [E, 2I, row_bytes] tensor).
struct ExpertProj {
  const uint8_t* p = nullptr;
  int64_t E = 0, N = 0, K = 0, qtype = 0, stride = 0;
  const uint8_t* expert(int64_t e) const { return p + e * stride; }
};

ExpertProj expert_proj(const at::Tensor& w, int64_t qtype, int64_t K, const char* what) {
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 3 && w.device().is_cpu(), what,
              " must be a 3-D uint8 CPU tensor [E, N, row_bytes]");
  TORCH_CHECK(w.stride(2) == 1 && w.stride(1) == w.size(2), what,
              " must have contiguous rows of blocks");
  dispatch_type(qtype, [&](auto t) {
    using T = decltype(t);
    TORCH_CHECK(K % T::QK == 0, what, ": in_features ", K, " is not a multiple of the block size ",
                T::QK);
    TORCH_CHECK(w.size(2) == K / T::QK * T::BYTES, what, " rows hold ", w.size(2),
                " bytes, expected ", K / T::QK * T::BYTES);
  });
  ExpertProj p;
  p.p = w.data_ptr<uint8_t>();
  p.E = w.size(0);
  p.N = w.size(1);
  p.K = K;
  p.qtype = qtype;
  p.stride = w.stride(0);
  return p;
}

// Weight rows per task: ~64 KB of one projection's blocks (a long run for the prefetcher),
// fewer when that leaves too few tasks to share out.
int64_t rows_per_task(int64_t row_bytes, int64_t N, int64_t num_experts, int64_t threads) {
  int64_t rows = std::max<int64_t>(16, 65536 / std::max<int64_t>(row_bytes, 1));
  while (rows > 16 && num_experts * ((N + rows - 1) / rows) < 4 * threads) rows /= 2;
  return std::min(rows, N);
}

struct Task {
  int64_t e, n0, n1;
};

// The buffers of one chunk of pairs, in expert order: each pair's activation row, act(gate) *
// up of each pair, and each pair's down output.
struct PairBuffers {
  Acts x;  // [P, H] prepared
  std::vector<float> g, u;  // [P, I] gate and up outputs
  std::vector<float> hf;  // [P, I] act(gate) * up
  Acts h;  // [P, I] prepared
  std::vector<float> y;  // [P, H] each pair's down output
  void resize(int64_t P, int64_t H, int64_t I, bool int8) {
    const auto z = [](int64_t n) { return static_cast<size_t>(n); };
    x.resize(P, H, int8, true);
    g.resize(z(P * I));
    u.resize(z(P * I));
    hf.resize(z(P * I));
    h.resize(P, I, int8, false);
    h.x = hf.data();
    y.resize(z(P * H));
  }
};

void run_tasks(const std::vector<Task>& tasks, std::atomic<int64_t>& next,
               const std::function<void(const Task&)>& f) {
  const int64_t n = static_cast<int64_t>(tasks.size());
  for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) f(tasks[i]);
}

}  // namespace

// x [T, H] float32; gate, up [E, I, row_bytes(H)] and down [E, H, row_bytes(I)] uint8 blocks of
// the given ggml types; topk_ids [T, K] int64, topk_weights [T, K] float32 -> [T, H] float32 =
// sum_k topk_weights[t, k] * down_e(silu(gate_e x_t) * up_e x_t) with e = topk_ids[t, k].
// int8: activations quantised to int8 per 32-chunk (llama.cpp's scheme), else exact fp32.
at::Tensor moe_experts(const at::Tensor& x, const at::Tensor& gate, int64_t gate_type,
                       const at::Tensor& up, int64_t up_type, const at::Tensor& down,
                       int64_t down_type, const at::Tensor& topk_ids,
                       const at::Tensor& topk_weights, bool int8) {
  check_f32(x, "x");
  TORCH_CHECK(x.dim() == 2, "x must be [T, H]");
  const int64_t T = x.size(0), H = x.size(1);
  TORCH_CHECK(gate.dim() == 3 && up.dim() == 3 && down.dim() == 3, "expert weights must be 3-D");
  const int64_t E = gate.size(0), I = gate.size(1);
  const ExpertProj pg = expert_proj(gate, gate_type, H, "gate");
  const ExpertProj pu = expert_proj(up, up_type, H, "up");
  const ExpertProj pd = expert_proj(down, down_type, I, "down");
  TORCH_CHECK(pu.E == E && pu.N == I, "up must be [E, I, ..] like gate");
  TORCH_CHECK(pd.E == E && pd.N == H, "down must be [E, H, ..]");
  TORCH_CHECK(H % 32 == 0 && I % 32 == 0, "hidden and intermediate sizes must be multiples of 32");
  TORCH_CHECK(topk_ids.scalar_type() == at::kLong && topk_ids.dim() == 2 &&
                  topk_ids.is_contiguous() && topk_ids.size(0) == T,
              "topk_ids must be a contiguous int64 [T, K] tensor");
  check_f32(topk_weights, "topk_weights");
  TORCH_CHECK(topk_weights.sizes() == topk_ids.sizes(), "topk_weights must be [T, K]");
  const int64_t K = topk_ids.size(1);
  const int64_t* ids = topk_ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < T * K; ++i)
    TORCH_CHECK(ids[i] >= 0 && ids[i] < E, "expert id ", ids[i], " out of range [0, ", E, ")");
  const float* wts = topk_weights.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  at::Tensor out = at::empty({T, H}, x.options());
  float* op = out.data_ptr<float>();
  if (T == 0) return out;

  const int nt = at::get_num_threads();
  // Tokens per chunk: bounds the pair buffers (~4096 pairs, tens of MB at real sizes).
  const int64_t chunk_tokens = std::max<int64_t>(1, 4096 / K);
  PairBuffers buf;
  buf.resize(std::min(T, chunk_tokens) * K, H, I, int8);
  std::vector<int64_t> counts(static_cast<size_t>(E)), offsets(static_cast<size_t>(E + 1));
  std::vector<int64_t> pair_at;  // sorted position -> pair index (t * K + k) within the chunk
  std::vector<int64_t> pos_of;  // pair index -> sorted position
  std::vector<Task> up_tasks, down_tasks;

  for (int64_t t0 = 0; t0 < T; t0 += chunk_tokens) {
    const int64_t Tc = std::min(chunk_tokens, T - t0), P = Tc * K;
    const int64_t* cid = ids + t0 * K;
    // Group the pairs by expert (counting sort, stable).
    std::fill(counts.begin(), counts.end(), 0);
    for (int64_t p = 0; p < P; ++p) ++counts[static_cast<size_t>(cid[p])];
    offsets[0] = 0;
    for (int64_t e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + counts[e];
    pair_at.assign(static_cast<size_t>(P), 0);
    pos_of.assign(static_cast<size_t>(P), 0);
    {
      std::vector<int64_t> fill(offsets.begin(), offsets.end() - 1);
      for (int64_t p = 0; p < P; ++p) {
        const int64_t s = fill[static_cast<size_t>(cid[p])]++;
        pair_at[s] = p;
        pos_of[p] = s;
      }
    }
    int64_t touched = 0;
    for (int64_t e = 0; e < E; ++e) touched += counts[e] > 0;
    up_tasks.clear();
    down_tasks.clear();
    const int64_t up_rows = rows_per_task(gate.size(2), I, touched, nt);
    const int64_t down_rows = rows_per_task(down.size(2), H, touched, nt);
    for (int64_t e = 0; e < E; ++e) {
      if (counts[e] == 0) continue;
      for (int64_t n = 0; n < I; n += up_rows) up_tasks.push_back({e, n, std::min(I, n + up_rows)});
      for (int64_t n = 0; n < H; n += down_rows)
        down_tasks.push_back({e, n, std::min(H, n + down_rows)});
    }
    std::atomic<int64_t> next_up{0}, next_down{0};

#pragma omp parallel num_threads(nt)
    {
      GemvScratch scratch;
      // 1. each pair's activation row, in expert order
#pragma omp for schedule(static)
      for (int64_t s = 0; s < P; ++s) buf.x.prepare_row(s, xp + (t0 + pair_at[s] / K) * H);
      const ActsView xv = buf.x;
      // 2. gate and up
      run_tasks(up_tasks, next_up, [&](const Task& tk) {
        const ActsView a = xv.rows(offsets[tk.e], counts[tk.e]);
        float* gy = buf.g.data() + offsets[tk.e] * I;
        float* uy = buf.u.data() + offsets[tk.e] * I;
        dispatch_type(pg.qtype, [&](auto t) {
          gemv_rows<decltype(t)>(a, pg.expert(tk.e), I, tk.n0, tk.n1, gy, scratch);
        });
        dispatch_type(pu.qtype, [&](auto t) {
          gemv_rows<decltype(t)>(a, pu.expert(tk.e), I, tk.n0, tk.n1, uy, scratch);
        });
      });
#pragma omp barrier
      // 3. act(gate) * up, prepared for the down projection
#pragma omp for schedule(static)
      for (int64_t s = 0; s < P; ++s) {
        float* h = buf.hf.data() + s * I;
        silu_row(buf.g.data() + s * I, buf.u.data() + s * I, h, I);
        buf.h.prepare_row(s, h);
      }
      const ActsView hv = buf.h;
      // 4. down
      run_tasks(down_tasks, next_down, [&](const Task& tk) {
        const ActsView a = hv.rows(offsets[tk.e], counts[tk.e]);
        float* y = buf.y.data() + offsets[tk.e] * H;
        dispatch_type(pd.qtype, [&](auto t) {
          gemv_rows<decltype(t)>(a, pd.expert(tk.e), H, tk.n0, tk.n1, y, scratch);
        });
      });
#pragma omp barrier
      // 5. each token's K results in slot order
#pragma omp for schedule(static)
      for (int64_t t = 0; t < Tc; ++t) {
        float* o = op + (t0 + t) * H;
        for (int64_t k = 0; k < K; ++k) {
          const float* y = buf.y.data() + pos_of[t * K + k] * H;
          const float w = wts[(t0 + t) * K + k];
          const __m256 wv = _mm256_set1_ps(w);
          int64_t i = 0;
          if (k == 0) {
            for (; i + 8 <= H; i += 8)
              _mm256_storeu_ps(o + i, _mm256_mul_ps(wv, _mm256_loadu_ps(y + i)));
            for (; i < H; ++i) o[i] = w * y[i];
          } else {
            for (; i + 8 <= H; i += 8)
              _mm256_storeu_ps(o + i, _mm256_fmadd_ps(wv, _mm256_loadu_ps(y + i),
                                                      _mm256_loadu_ps(o + i)));
            for (; i < H; ++i) o[i] += w * y[i];
          }
        }
      }
    }
  }
  return out;
}
