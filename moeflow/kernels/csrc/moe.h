// The CPU Mixture-of-Experts layer over quantised experts kept in their blocks (GGUF's stacked
// [E, N, row_bytes] tensors, read in place, e.g. from a memory-mapped file): the router
// (float32 logits, every family's expert selection) and the grouped expert kernel. Included by
// cpu_ops.cpp, whose fused decode step (DecodeStack) runs the same functions inside its own
// parallel region, so the fused step and the layer-by-layer path compute the same numbers.
//
// The grouped kernel runs the routed experts of a batch of T tokens, K experts each:
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
// Threads: phases 2 and 4 hand out tasks dynamically, so experts with many tokens do not hold
// the others up.
//
// Shape legend: T tokens, H hidden, E experts, I expert intermediate size, K experts per token,
// P = T*K pairs, G expert groups.
#pragma once

#include "cpu_common.h"

#include <atomic>
#include <functional>
#include <memory>

namespace {

// One projection of every expert: [E, N, row_bytes] uint8, rows contiguous, any expert stride
// (so gate and up may be two views of one stacked [E, 2I, row_bytes] tensor).
struct ExpertProj {
  at::Tensor w;  // keeps the blocks alive
  const uint8_t* p = nullptr;
  int64_t E = 0, N = 0, K = 0, qtype = 0, stride = 0;
  const uint8_t* expert(int64_t e) const { return p + e * stride; }
};

ExpertProj expert_proj(const at::Tensor& w, int64_t qtype, int64_t K, const char* what) {
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 3 && w.device().is_cpu(), what,
              " must be a 3-D uint8 CPU tensor [E, N, row_bytes]");
  TORCH_CHECK(w.stride(2) == 1 && w.stride(1) == w.size(2), what,
              " must have contiguous rows of blocks");
  check_rows_of(qtype, K, w.size(1), w.size(2), what);
  ExpertProj p;
  p.w = w;
  p.p = w.data_ptr<uint8_t>();
  p.E = w.size(0);
  p.N = w.size(1);
  p.K = K;
  p.qtype = qtype;
  p.stride = w.stride(0);
  return p;
}

// gate, up [E, I, row_bytes(H)] and down [E, H, row_bytes(I)]
struct Experts {
  ExpertProj gate, up, down;
  int64_t E = 0, H = 0, I = 0;
};

Experts make_experts(const at::Tensor& gate, int64_t gate_type, const at::Tensor& up,
                     int64_t up_type, const at::Tensor& down, int64_t down_type, int64_t H) {
  TORCH_CHECK(gate.dim() == 3 && up.dim() == 3 && down.dim() == 3, "expert weights must be 3-D");
  Experts ex;
  ex.E = gate.size(0);
  ex.I = gate.size(1);
  ex.H = H;
  ex.gate = expert_proj(gate, gate_type, H, "gate");
  ex.up = expert_proj(up, up_type, H, "up");
  ex.down = expert_proj(down, down_type, ex.I, "down");
  TORCH_CHECK(ex.up.E == ex.E && ex.up.N == ex.I, "up must be [E, I, ..] like gate");
  TORCH_CHECK(ex.down.E == ex.E && ex.down.N == H, "down must be [E, H, ..]");
  TORCH_CHECK(H % 32 == 0 && ex.I % 32 == 0,
              "hidden and intermediate sizes must be multiples of 32");
  return ex;
}

// Weight rows per task: ~64 KB of one projection's blocks (a long run for the prefetcher),
// fewer when that leaves too few tasks to share out; a multiple of 16 (whole tiles of the int8
// kernels: gemm_b32.h takes weight rows 8 or 16 at a time).
int64_t rows_per_task(int64_t row_bytes, int64_t N, int64_t num_experts, int64_t threads) {
  int64_t rows = std::max<int64_t>(16, 65536 / std::max<int64_t>(row_bytes, 1) / 16 * 16);
  while (rows > 16 && num_experts * ((N + rows - 1) / rows) < 4 * threads)
    rows = std::max<int64_t>(16, rows / 32 * 16);
  return std::min(rows, N);
}

struct Task {
  int64_t e, n0, n1;
};

// Up to this many tokens per touched expert on average, each thread takes one contiguous share
// of the touched experts' weight rows (static_shares) instead of tasks handed out one by one:
// a decode step (a token or two per expert) or a short prompt, where the pass streams weights
// and a task that starts cold costs most. Measured on Qwen3-30B-A3B's and OLMoE's shapes, 2
// threads: decode steps 4-12% faster, a 128-token prefill 6-12%; 512 and more tokens even.
constexpr int64_t kShareTokens = 16;
// A weight row's cost in a share: its decode, about kRowCost tokens' work, + one per token.
constexpr int64_t kRowCost = 2;

// The tasks of thread i < nt are tasks[first[i]..first[i+1]): rows 0..N-1 of each touched
// expert (in `experts` order) laid end to end, a row of expert e costing counts[e] + kRowCost
// (counts: tokens per expert), and cut into nt runs of about equal cost (on multiples of 16
// rows), each run cut again at expert boundaries.
// One long read per thread and expert: the next rows stream in while a run goes on (tasks
// handed out dynamically start cold, each of them).
void static_shares(const std::vector<int64_t>& experts, const std::vector<int64_t>& counts,
                   int64_t N, int64_t nt, std::vector<Task>& tasks, std::vector<int64_t>& first) {
  const int64_t ne = static_cast<int64_t>(experts.size());
  const auto cost = [&](int64_t j) { return counts[static_cast<size_t>(experts[j])] + kRowCost; };
  int64_t total = 0;
  for (int64_t j = 0; j < ne; ++j) total += cost(j) * N;
  first.assign(static_cast<size_t>(nt + 1), 0);
  int64_t j = 0, n = 0, done = 0;  // the next row: expert j's row n; cost done before it
  for (int64_t i = 0; i < nt; ++i) {
    first[i] = static_cast<int64_t>(tasks.size());
    const int64_t goal = total * (i + 1) / nt;
    while (j < ne && (i == nt - 1 || done < goal)) {
      int64_t rows = N - n;
      if (i < nt - 1 && done + rows * cost(j) > goal)  // up to the goal, on 16 rows
        rows = std::min(rows, ((goal - done) / cost(j) + 8) / 16 * 16);
      if (rows == 0) break;
      tasks.push_back({experts[j], n, n + rows});
      done += rows * cost(j);
      n += rows;
      if (n == N) {
        ++j;
        n = 0;
      }
    }
  }
  first[nt] = static_cast<int64_t>(tasks.size());
}

// Every thread of the region: its share of `tasks` (first not empty: static_shares; thread i
// of T takes shares i, i + T, ..., so every share runs whatever the region's size) or tasks
// taken one by one from `next` until none is left.
void run_tasks(const std::vector<Task>& tasks, const std::vector<int64_t>& first,
               std::atomic<int64_t>& next, const std::function<void(const Task&)>& f) {
  if (!first.empty()) {
    const int64_t shares = static_cast<int64_t>(first.size()) - 1;
    for (int64_t i = omp_get_thread_num(); i < shares; i += omp_get_num_threads())
      for (int64_t k = first[i]; k < first[i + 1]; ++k) f(tasks[k]);
    return;
  }
  const int64_t n = static_cast<int64_t>(tasks.size());
  for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) f(tasks[i]);
}

// Floats that grow without being initialised: every element is written before it is read (a
// std::vector would zero tens of MB on a prefill's MoE layer, each layer, first).
template <class T>
struct RawBuffer {
  std::unique_ptr<T[]> p;
  size_t n = 0;
  void resize(size_t m) {
    if (m > n) {
      p.reset(new T[m]);
      n = m;
    }
  }
  T* data() { return p.get(); }
  const T* data() const { return p.get(); }
};

// The state of one call of the grouped kernel over up to `capacity` tokens: the pairs grouped by
// expert, the tasks, and the buffers (each pair's activation row, act(gate) * up, and down
// output). plan() runs on one thread; run() on every thread of a parallel region.
class ExpertPass {
 public:
  // Group the T*K pairs (ids [T, K]) by expert and lay out the tasks for nt threads.
  void plan(const Experts& ex, const int64_t* ids, int64_t T, int64_t K, int nt, bool int8) {
    const int64_t E = ex.E, H = ex.H, I = ex.I, P = T * K;
    T_ = T;
    K_ = K;
    const auto z = [](int64_t n) { return static_cast<size_t>(n); };
    if (P > cap_pairs_ || H != H_ || I != I_ || int8 != int8_) {
      cap_pairs_ = std::max(P, cap_pairs_);
      H_ = H;
      I_ = I;
      int8_ = int8;
      x_.resize(cap_pairs_, H, int8, true);
      g_.resize(z(cap_pairs_ * I));
      u_.resize(z(cap_pairs_ * I));
      hf_.resize(z(cap_pairs_ * I));
      h_.resize(cap_pairs_, I, int8, false);
      h_.x = hf_.data();
      y_.resize(z(cap_pairs_ * H));
    }
    counts_.assign(z(E), 0);
    offsets_.assign(z(E + 1), 0);
    for (int64_t p = 0; p < P; ++p) ++counts_[z(ids[p])];
    for (int64_t e = 0; e < E; ++e) offsets_[e + 1] = offsets_[e] + counts_[e];
    pair_at_.assign(z(P), 0);
    pos_of_.assign(z(P), 0);
    std::vector<int64_t> fill(offsets_.begin(), offsets_.end() - 1);
    for (int64_t p = 0; p < P; ++p) {  // counting sort, stable
      const int64_t s = fill[z(ids[p])]++;
      pair_at_[s] = p;
      pos_of_[p] = s;
    }
    touched_.clear();
    for (int64_t e = 0; e < E; ++e)
      if (counts_[e] > 0) touched_.push_back(e);
    const int64_t touched = static_cast<int64_t>(touched_.size());
    up_tasks_.clear();
    down_tasks_.clear();
    up_first_.clear();
    down_first_.clear();
    next_up_ = 0;
    next_down_ = 0;
    if (P <= kShareTokens * touched) {
      static_shares(touched_, counts_, I, nt, up_tasks_, up_first_);
      static_shares(touched_, counts_, H, nt, down_tasks_, down_first_);
      return;
    }
    const int64_t up_rows = rows_per_task(ex.gate.w.size(2), I, touched, nt);
    const int64_t down_rows = rows_per_task(ex.down.w.size(2), H, touched, nt);
    for (int64_t e : touched_) {
      for (int64_t n = 0; n < I; n += up_rows)
        up_tasks_.push_back({e, n, std::min(I, n + up_rows)});
      for (int64_t n = 0; n < H; n += down_rows)
        down_tasks_.push_back({e, n, std::min(H, n + down_rows)});
    }
  }

  // out [T, H] = the planned tokens' routed experts over x [T, H], weighted by wts [T, K].
  // Every thread of the region calls it (the plan was made and published before); it ends with
  // the worksharing loop's barrier.
  void run(const Experts& ex, const float* x, const float* wts, float* out,
           GemvScratch& scratch) {
    const int64_t H = ex.H, I = ex.I, K = K_, P = T_ * K;
    // 1. each pair's activation row, in expert order
#pragma omp for schedule(static)
    for (int64_t s = 0; s < P; ++s) x_.prepare_row(s, x + (pair_at_[s] / K) * H);
    const ActsView xv = x_;
    // 2. gate and up
    run_tasks(up_tasks_, up_first_, next_up_, [&](const Task& tk) {
      const ActsView a = xv.rows(offsets_[tk.e], counts_[tk.e]);
      float* gy = g_.data() + offsets_[tk.e] * I;
      float* uy = u_.data() + offsets_[tk.e] * I;
      gemv_any(ex.gate.qtype, a, ex.gate.expert(tk.e), I, tk.n0, tk.n1, gy, scratch);
      gemv_any(ex.up.qtype, a, ex.up.expert(tk.e), I, tk.n0, tk.n1, uy, scratch);
    });
#pragma omp barrier
    // 3. act(gate) * up, prepared for the down projection
#pragma omp for schedule(static)
    for (int64_t s = 0; s < P; ++s) {
      float* h = hf_.data() + s * I;
      silu_row(g_.data() + s * I, u_.data() + s * I, h, I);
      h_.prepare_row(s, h);
    }
    const ActsView hv = h_;
    // 4. down
    run_tasks(down_tasks_, down_first_, next_down_, [&](const Task& tk) {
      const ActsView a = hv.rows(offsets_[tk.e], counts_[tk.e]);
      float* y = y_.data() + offsets_[tk.e] * H;
      gemv_any(ex.down.qtype, a, ex.down.expert(tk.e), H, tk.n0, tk.n1, y, scratch);
    });
#pragma omp barrier
    // 5. each token's K results in slot order
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T_; ++t) {
      float* o = out + t * H;
      for (int64_t k = 0; k < K; ++k) {
        const float* y = y_.data() + pos_of_[t * K + k] * H;
        const float w = wts[t * K + k];
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

 private:
  int64_t T_ = 0, K_ = 0, cap_pairs_ = 0, H_ = 0, I_ = 0;
  bool int8_ = false;
  Acts x_, h_;  // [P, H], [P, I] prepared
  RawBuffer<float> g_, u_, hf_, y_;  // [P, I] x 3, [P, H]
  std::vector<int64_t> counts_, offsets_;  // [E], [E + 1]
  std::vector<int64_t> touched_;  // the experts with tokens, in order
  std::vector<int64_t> pair_at_, pos_of_;  // sorted position -> pair (t * K + k), and back
  std::vector<Task> up_tasks_, down_tasks_;
  std::vector<int64_t> up_first_, down_first_;  // static_shares' runs, or empty
  std::atomic<int64_t> next_up_{0}, next_down_{0};
};

// Tokens per call of the pass: bounds its buffers (~4096 pairs, tens of MB at real sizes).
inline int64_t chunk_tokens(int64_t K) { return std::max<int64_t>(1, 4096 / K); }

// ---------------------------------------------------------------------------------------------
// Expert selection (kernels/fused_moe.py select_experts, every family's router), one token at a
// time in float32: scores = softmax or sigmoid(logits); experts chosen on scores (+ correction
// bias), within the topk_group best of G groups when G > 1 (groups ranked by their best score
// or the sum of their best two; experts of dropped groups get mask_value); the chosen experts'
// scores renormalised to sum 1 (renorm; + 1e-20 under sigmoid), times scale. Ties go to the
// lower index.

struct Route {
  at::Tensor weight, bias;  // router [E, H] float32, correction bias [E] (or undefined)
  int64_t E = 0, H = 0, K = 0, groups = 1, topk_group = 1;
  bool sigmoid = false, renorm = true, top2_sum = false;
  float scale = 1.0f, mask_value = 0.0f;
};

inline float dot_f32(const float* a, const float* b, int64_t n) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                   _mm256_setzero_ps()};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32)
    for (int u = 0; u < 4; ++u)
      acc[u] = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8 * u), _mm256_loadu_ps(b + i + 8 * u),
                               acc[u]);
  for (; i + 8 <= n; i += 8)
    acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc[0]);
  float tail = 0.0f;
  for (; i < n; ++i) tail += a[i] * b[i];
  return hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]))) +
         tail;
}

// The index of the largest v[i] over i in [0, n) with !taken[i] (ties: the lowest index).
inline int64_t argmax_free(const float* v, const std::vector<char>& taken, int64_t n) {
  int64_t best = -1;
  for (int64_t i = 0; i < n; ++i)
    if (!taken[i] && (best < 0 || v[i] > v[best])) best = i;
  return best;
}

// The router's logits of experts e0..e1-1 for B tokens x [B, H]: logits[b * E + e] (each
// expert's router row read once for the B tokens).
inline void router_logits(const Route& r, const float* x, int64_t B, int64_t e0, int64_t e1,
                          float* logits) {
  const float* w = r.weight.data_ptr<float>();
  for (int64_t e = e0; e < e1; ++e)
    for (int64_t b = 0; b < B; ++b) logits[b * r.E + e] = dot_f32(x + b * r.H, w + e * r.H, r.H);
}

// One token's experts from its router logits [E] (router_logits; turned into its scores in
// place) -> ids [K], wts [K]. choice: E floats of scratch.
void route_logits(const Route& r, float* scores, int64_t* ids, float* wts, float* choice) {
  const int64_t E = r.E;
  if (r.sigmoid) {
    for (int64_t e = 0; e < E; ++e) scores[e] = 1.0f / (1.0f + std::exp(-scores[e]));
  } else {
    float mx = -std::numeric_limits<float>::infinity(), sum = 0.0f;
    for (int64_t e = 0; e < E; ++e) mx = std::max(mx, scores[e]);
    for (int64_t e = 0; e < E; ++e) sum += (scores[e] = std::exp(scores[e] - mx));
    for (int64_t e = 0; e < E; ++e) scores[e] /= sum;
  }
  const float* bias = r.bias.defined() ? r.bias.data_ptr<float>() : nullptr;
  for (int64_t e = 0; e < E; ++e) choice[e] = bias ? scores[e] + bias[e] : scores[e];
  std::vector<char> taken(static_cast<size_t>(std::max(E, r.groups)), 0);
  if (r.groups > 1) {
    const int64_t per = E / r.groups;
    std::vector<float> gs(static_cast<size_t>(r.groups));
    for (int64_t g = 0; g < r.groups; ++g) {
      const float* c = choice + g * per;
      std::vector<char> none(static_cast<size_t>(per), 0);
      const int64_t a = argmax_free(c, none, per);
      gs[g] = c[a];
      if (r.top2_sum) {
        none[a] = 1;
        gs[g] += c[argmax_free(c, none, per)];
      }
    }
    for (int64_t i = 0; i < r.topk_group; ++i) taken[argmax_free(gs.data(), taken, r.groups)] = 1;
    for (int64_t g = 0; g < r.groups; ++g)
      if (!taken[g])
        for (int64_t e = g * per; e < (g + 1) * per; ++e) choice[e] = r.mask_value;
    std::fill(taken.begin(), taken.end(), 0);
  }
  float sum = 0.0f;
  for (int64_t k = 0; k < r.K; ++k) {
    const int64_t e = argmax_free(choice, taken, E);
    taken[e] = 1;
    ids[k] = e;
    wts[k] = scores[e];
    sum += scores[e];
  }
  if (r.renorm) {
    const float denom = sum + (r.sigmoid ? 1e-20f : 0.0f);
    for (int64_t k = 0; k < r.K; ++k) wts[k] /= denom;
  }
  if (r.scale != 1.0f)
    for (int64_t k = 0; k < r.K; ++k) wts[k] *= r.scale;
}

// One token x [H] -> ids [K], wts [K]. scratch: 2 * E floats.
void route_row(const Route& r, const float* x, int64_t* ids, float* wts, float* scratch) {
  router_logits(r, x, 1, 0, r.E, scratch);
  route_logits(r, scratch, ids, wts, scratch + r.E);
}

}  // namespace

// A routed-experts layer (router + experts kept in blocks), as the eager path and the fused
// decode step run it. Holds its tensors (which may be views of a memory-mapped file).
class MoeLayer {
 public:
  MoeLayer(const at::Tensor& router, const c10::optional<at::Tensor>& bias, int64_t top_k,
           const std::string& scoring, bool renorm, int64_t num_groups, int64_t topk_group,
           const std::string& group_score, double scale, double mask_value,
           const at::Tensor& gate, int64_t gate_type, const at::Tensor& up, int64_t up_type,
           const at::Tensor& down, int64_t down_type) {
    check_f32(router, "router weight");
    TORCH_CHECK(router.dim() == 2, "router weight must be [E, H]");
    route_.weight = router;
    route_.E = router.size(0);
    route_.H = router.size(1);
    if (bias.has_value()) {
      check_f32(*bias, "correction bias");
      TORCH_CHECK(bias->numel() == route_.E, "correction bias must be [E]");
      route_.bias = *bias;
    }
    TORCH_CHECK(top_k >= 1 && top_k <= route_.E, "top_k must be in [1, E]");
    TORCH_CHECK(scoring == "softmax" || scoring == "sigmoid", "unknown scoring ", scoring);
    TORCH_CHECK(group_score == "max" || group_score == "top2_sum", "unknown group score ",
                group_score);
    TORCH_CHECK(num_groups >= 1 && route_.E % num_groups == 0 && topk_group >= 1 &&
                    topk_group <= num_groups && (group_score == "max" || route_.E / num_groups >= 2),
                "bad expert groups");
    route_.K = top_k;
    route_.sigmoid = scoring == "sigmoid";
    route_.renorm = renorm;
    route_.groups = num_groups;
    route_.topk_group = topk_group;
    route_.top2_sum = group_score == "top2_sum";
    route_.scale = static_cast<float>(scale);
    route_.mask_value = static_cast<float>(mask_value);
    ex_ = make_experts(gate, gate_type, up, up_type, down, down_type, route_.H);
    TORCH_CHECK(ex_.E == route_.E, "the router scores ", route_.E, " experts, the weights hold ",
                ex_.E);
  }

  const Route& route() const { return route_; }
  const Experts& experts() const { return ex_; }
  int64_t top_k() const { return route_.K; }
  int64_t hidden() const { return route_.H; }

  // x [T, H] -> (weights [T, K] float32, ids [T, K] int64)
  std::vector<at::Tensor> select(const at::Tensor& x) const {
    check_f32(x, "x");
    TORCH_CHECK(x.dim() == 2 && x.size(1) == route_.H, "x must be [T, ", route_.H, "]");
    const int64_t T = x.size(0), K = route_.K;
    at::Tensor w = at::empty({T, K}, x.options());
    at::Tensor ids = at::empty({T, K}, x.options().dtype(at::kLong));
    const float* xp = x.data_ptr<float>();
    at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
      std::vector<float> scratch(static_cast<size_t>(2 * route_.E));
      for (int64_t t = t0; t < t1; ++t)
        route_row(route_, xp + t * route_.H, ids.data_ptr<int64_t>() + t * K,
                  w.data_ptr<float>() + t * K, scratch.data());
    });
    return {w, ids};
  }

  // x [T, H] -> (out [T, H], ids [T, K]): the routed experts' weighted sum (no shared experts)
  std::vector<at::Tensor> forward(const at::Tensor& x, bool int8) {
    std::vector<at::Tensor> sel = select(x);
    return {run_experts(ex_, x, sel[1], sel[0], int8), sel[1]};
  }

  // The grouped pass over ids [T, K] and weights [T, K], T * K pairs at most 4096 at a time.
  static at::Tensor run_experts(const Experts& ex, const at::Tensor& x, const at::Tensor& ids,
                                const at::Tensor& wts, bool int8) {
    check_f32(x, "x");
    TORCH_CHECK(x.dim() == 2 && x.size(1) == ex.H, "x must be [T, ", ex.H, "]");
    const int64_t T = x.size(0);
    TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 2 && ids.is_contiguous() &&
                    ids.size(0) == T,
                "topk_ids must be a contiguous int64 [T, K] tensor");
    check_f32(wts, "topk_weights");
    TORCH_CHECK(wts.sizes() == ids.sizes(), "topk_weights must be [T, K]");
    const int64_t K = ids.size(1);
    const int64_t* idp = ids.data_ptr<int64_t>();
    for (int64_t i = 0; i < T * K; ++i)
      TORCH_CHECK(idp[i] >= 0 && idp[i] < ex.E, "expert id ", idp[i], " out of range [0, ",
                  ex.E, ")");
    at::Tensor out = at::empty({T, ex.H}, x.options());
    const int nt = at::get_num_threads();
    ExpertPass pass;
    for (int64_t t0 = 0; t0 < T; t0 += chunk_tokens(K)) {
      const int64_t Tc = std::min(chunk_tokens(K), T - t0);
      pass.plan(ex, idp + t0 * K, Tc, K, nt, int8);
#pragma omp parallel num_threads(nt)
      {
        GemvScratch scratch;
        pass.run(ex, x.data_ptr<float>() + t0 * ex.H, wts.data_ptr<float>() + t0 * K,
                 out.data_ptr<float>() + t0 * ex.H, scratch);
      }
    }
    return out;
  }

 private:
  Route route_;
  Experts ex_;
};

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
  const Experts ex = make_experts(gate, gate_type, up, up_type, down, down_type, x.size(1));
  return MoeLayer::run_experts(ex, x, topk_ids, topk_weights, int8);
}
