// A whole cached decode step of a small float32 Llama-family LM as one XLA FFI custom call.
//
// Why: a speculative draft is small so that its steps are cheap, but XLA:CPU runs a decode step as
// ~60 thunks (matmul custom calls, fusions, the cache scatter, attention), ~1 us each whatever
// their size: lm/draft's step (0.4M parameters, 1.6 MB, in L2) took 51-78 us, where one core reads
// its weights from L2 in ~34 us, and gamma draft steps were a quarter of a speculative round at
// batch 1. Here the step is one call (37 us on two cores; RESULTS.md, "A fused draft step"):
// embedding, every block, the final norm and the logits, the new keys and values written into the
// cache in place. Two cores share it: see run_phases.
//
// Operands (float32 unless noted; M = B * T rows, row m = b * T + t):
//   tokens [B, T] int32 (clamped into [0, V): callers validate ids; XLA's gather would give NaN)
//   lengths [B] int32 (the row's first new slot, = its position)
//   inv_freq [H / 2] (RoPE, Llama-3 scaling already applied); embed [V, D]; final_norm [D]
//   lm_head [D, V] (ignored when `tied`: the logits are then hidden @ embed^T)
//   per layer, 9 each: attn_norm [D], wq [D, N*H], wk [D, K*H], wv [D, K*H], wo [N*H, D],
//     mlp_norm [D], gate [D, F], up [D, F], down [F, D]
//   per layer k cache, then per layer v cache: [B*K, S, H] (kv head j of row b at b * K + j)
// Attributes: num_layers, num_heads, num_kv_heads (int64); eps (float); tied (bool)
// Results: logits [B, T, V]; then the caches, each aliased to its operand (written in place).
//
// Numerics: the weight matmuls are few_row_matmul.h's tiles, so they match the unfused step's
// (effjax.ops.few_row_matmul) bit for bit; norms, RoPE, the softmax and SiLU are written here and
// agree with XLA's to float32 rounding (tests/test_fused_lm_step.py: logits within 1e-5). A draft
// may differ from its unfused self that much: speculative decoding's exactness rests on the
// target's numbers and on q being what the draft sampled from, never on the draft's.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>  // _mm_pause
#endif

#include "exp_nonpositive.h"
#include "few_row_matmul.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLayerWeights = 9;

struct LayerWeights {
  const float *attn_norm, *wq, *wk, *wv, *wo, *mlp_norm, *gate, *up, *down;
};

// Work is split into units of kCols output columns (half of few_row_matmul's 128-column work unit
// with AVX-512), so that even lm/draft's 128-column matrices give both cores a share. Each output
// element is still one fused multiply-add per k in k order from zero: the unfused kernel's
// numbers, bit for bit.
constexpr int64_t kCols = 64;

inline int64_t col_units(int64_t n) { return (n + kCols - 1) / kCols; }

// out[:, c0:c0 + kCols] of x [m, k] @ w [k, n], c0 = unit * kCols: narrow full-width tiles (the
// wide ones would mask half their lanes at this width).
inline void nn_cols(const float* x, const float* w, float* out, int64_t m, int64_t k, int64_t n,
                    int64_t unit) {
  constexpr int64_t kNarrow = kNarrowVecs * kLanes;
  const Problem p{x, w, out, m, k, n, /*packed=*/false};
  const int64_t c0 = unit * kCols, c_end = std::min(n, c0 + kCols);
  for (int64_t r0 = 0; r0 < m; r0 += kMaxRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kMaxRows, m - r0));
    for (int64_t c = c0; c < c_end; c += kNarrow)
      nn_rows<kNarrowVecs>(p, r0, rows, c, std::min(kNarrow, c_end - c), 0, k);
  }
}

// x[:, c0:c0 + kCols] += y[:, c0:c0 + kCols] for x, y [m, n], c0 = unit * kCols.
inline void add_cols(const float* y, float* x, int64_t m, int64_t n, int64_t unit) {
  for (int64_t r = 0; r < m; ++r) {
    const int64_t end = std::min(n, (unit + 1) * kCols);
    for (int64_t c = unit * kCols; c < end; ++c) x[r * n + c] += y[r * n + c];
  }
}

// out[r] = scale * x[r] / sqrt(mean(x[r]^2) + eps), as effjax.models.lm.RMSNorm.
void rms_norm(const float* x, const float* scale, float* out, int64_t m, int64_t d, float eps) {
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = x + r * d;
    float ss = 0.0f;
    for (int64_t i = 0; i < d; ++i) ss += xr[i] * xr[i];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(d) + eps);
    for (int64_t i = 0; i < d; ++i) out[r * d + i] = scale[i] * (xr[i] * inv);
  }
}

// cos and sin of each row's position times each inverse frequency: [m, h / 2] each, computed once
// per call for every layer's queries and keys.
void rope_tables(const int64_t* pos, const float* inv_freq, int64_t m, int64_t half, float* cos_t,
                 float* sin_t) {
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t i = 0; i < half; ++i) {
      const float f = static_cast<float>(pos[r]) * inv_freq[i];
      cos_t[r * half + i] = std::cos(f);
      sin_t[r * half + i] = std::sin(f);
    }
  }
}

// Rotates one head vector v [h] by the angles of its row (transformers' rotate_half convention,
// as effjax.models.lm.rotate).
inline void rope(float* v, const float* c, const float* s, int64_t h) {
  const int64_t half = h / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = v[i], x2 = v[i + half];
    v[i] = x1 * c[i] - x2 * s[i];
    v[i + half] = x2 * c[i] + x1 * s[i];
  }
}

// silu(g) * u elementwise into g: g * sigmoid(g), with sigmoid from exp of -|g| (<= 0).
inline float silu_times(float g, float u) {
  const float e = exp_nonpositive(-std::fabs(g));  // exp(-|g|)
  const float sigmoid = g >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
  return g * sigmoid * u;
}

// Softmax attention of one query vector qv [h] over `seen` slots of keys/values [S, h].
void attend(const float* qv, const float* keys, const float* values, int64_t seen, int64_t h,
            float scale, float* logits, float* o) {
  std::fill(o, o + h, 0.0f);
  if (seen <= 0) return;  // A row that sees no slot (callers never ask for one): zeros.
  float top = -INFINITY;
  for (int64_t j = 0; j < seen; ++j) {
    Vec acc = vzero();
    for (int64_t i = 0; i < h; i += kLanes) {
      const int w = static_cast<int>(std::min<int64_t>(kLanes, h - i));
      acc = vfma(vload_n(qv + i, w), vload_n(keys + j * h + i, w), acc);
    }
    logits[j] = vsum(acc) * scale;
    top = std::max(top, logits[j]);
  }
  float total = 0.0f;
  for (int64_t j = 0; j < seen; ++j) {
    logits[j] = exp_nonpositive(logits[j] - top);
    total += logits[j];
  }
  for (int64_t j = 0; j < seen; ++j) {
    const float p = logits[j] / total;
    for (int64_t i = 0; i < h; ++i) o[i] += p * values[j * h + i];
  }
}

// ---- Two cores in lockstep over a list of phases. ----
// A phase is `units` independent pieces of work; a phase starts when the one before has finished.
// The calling thread publishes each phase and works on it; one helper from XLA's intra-op pool
// joins whenever it starts and claims units as they come. Units are claimed with a compare-and-swap
// on (phase, next unit), so a late helper can never take a unit of a phase not yet published, and
// the caller never waits for a unit nobody has claimed: a helper that never starts only costs
// the parallelism. Each phase is published only after every unit of the one before has finished,
// so no unit runs twice or after the call returns. The shared state outlives a helper that
// starts after the call returned.
struct Phase {
  int64_t units;
  std::function<void(int64_t)> run;
};

struct Team {
  std::vector<Phase> phases;
  // phase << 32 | next unit. Starts closed (no unit of phase 0 is claimable) until the caller
  // publishes phase 0: a lingering helper may pick the team up before that.
  static constexpr uint64_t kClosed = 0xffffffffu;
  std::atomic<uint64_t> ticket{kClosed};
  const std::thread::id caller = std::this_thread::get_id();
  std::unique_ptr<std::atomic<int64_t>[]> done;

  explicit Team(std::vector<Phase> p)
      : phases(std::move(p)), done(new std::atomic<int64_t>[phases.size()]) {
    for (size_t i = 0; i < phases.size(); ++i) done[i].store(0, std::memory_order_relaxed);
  }

  // Claims and runs units of phase `only` (any published phase if only < 0) until none is left;
  // returns false once every phase is over.
  bool work(int64_t only) {
    uint64_t t = ticket.load(std::memory_order_acquire);
    while (true) {
      const uint64_t ph = t >> 32, unit = t & 0xffffffffu;
      if (ph >= phases.size()) return false;
      if ((only >= 0 && static_cast<int64_t>(ph) != only) ||
          static_cast<int64_t>(unit) >= phases[ph].units) {
        return true;
      }
      if (ticket.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel)) {
        phases[ph].run(static_cast<int64_t>(unit));
        done[ph].fetch_add(1, std::memory_order_release);
        t = ticket.load(std::memory_order_acquire);
      }
    }
  }
};

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#endif
}

// The helper: one pool thread that works on each call's team and, between calls, stays awake for
// kLinger (a draft's next step follows within ~10-20 us of XLA ops) instead of being scheduled
// and woken afresh for every call, which cost about a quarter of a step (42 -> 32 us). Longer gaps
// (the target's verification pass) let it go: it holds a core for at most kLinger after a draft's
// last step, which the pass's own matmul helpers may then find busy (parallel_for.h never waits for
// a helper that has not started; the pass's first matmul may then run on one core). 20 us rather
// than 50: the isolated step is as fast (48-51 vs 49-56 us at batch 1), and whole speculative
// generations ran 0-23% faster (in-process A/B, 2026-11-30; RESULTS.md, "Speculative decoding").
constexpr auto kLinger = std::chrono::microseconds(20);

struct Crew {
  std::mutex mu;
  std::shared_ptr<Team> posted;          // The latest call's team (under mu).
  std::atomic<uint64_t> generation{0};   // Bumped when a team is posted.
  std::atomic<bool> helper_awake{false};
};

Crew& crew() {
  static Crew* c = new Crew;  // Never destroyed: a lingering helper may outlive static teardown.
  return *c;
}

void helper_loop() {
  Crew& c = crew();
  uint64_t seen = 0;
  while (true) {
    const auto since = std::chrono::steady_clock::now();
    std::shared_ptr<Team> team;
    while (team == nullptr) {
      if (c.generation.load(std::memory_order_acquire) != seen) {
        std::lock_guard<std::mutex> lock(c.mu);
        team = c.posted;
        seen = c.generation.load(std::memory_order_relaxed);
      } else if (std::chrono::steady_clock::now() - since > kLinger) {
        c.helper_awake.store(false, std::memory_order_seq_cst);
        // A call posted just now may have seen us awake and not scheduled another helper.
        if (c.generation.load(std::memory_order_seq_cst) == seen ||
            c.helper_awake.exchange(true, std::memory_order_seq_cst)) {
          return;
        }
      } else {
        cpu_relax();
      }
    }
    if (team->caller == std::this_thread::get_id()) {  // The pool ran us inline: no helper.
      c.helper_awake.store(false, std::memory_order_seq_cst);
      return;
    }
    while (team->work(-1)) cpu_relax();
  }
}

void run_phases(ffi::ThreadPool& pool, std::vector<Phase> phases) {
  auto team = std::make_shared<Team>(std::move(phases));
  const int64_t n = static_cast<int64_t>(team->phases.size());
  if (pool.num_threads() > 1) {
    Crew& c = crew();
    {
      std::lock_guard<std::mutex> lock(c.mu);
      c.posted = team;
      c.generation.fetch_add(1, std::memory_order_seq_cst);
    }
    if (!c.helper_awake.exchange(true, std::memory_order_seq_cst)) {
      pool.Schedule([] { helper_loop(); });
    }
  }
  for (int64_t ph = 0; ph < n; ++ph) {
    team->ticket.store(static_cast<uint64_t>(ph) << 32, std::memory_order_release);
    team->work(ph);
    while (team->done[ph].load(std::memory_order_acquire) < team->phases[ph].units) cpu_relax();
  }
  team->ticket.store(static_cast<uint64_t>(n) << 32, std::memory_order_release);
}

ffi::Error FusedLmStepImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> tokens,
                           ffi::Buffer<ffi::S32> lengths, ffi::Buffer<ffi::F32> inv_freq,
                           ffi::Buffer<ffi::F32> embed, ffi::Buffer<ffi::F32> final_norm,
                           ffi::Buffer<ffi::F32> lm_head, ffi::RemainingArgs rest,
                           int64_t num_layers, int64_t num_heads, int64_t num_kv_heads, float eps,
                           bool tied, ffi::Result<ffi::Buffer<ffi::F32>> logits_out,
                           ffi::RemainingRets caches_out) {
  const auto td = tokens.dimensions(), ed = embed.dimensions();
  if (td.size() != 2 || ed.size() != 2) {
    return ffi::Error::InvalidArgument(
        "effjax_fused_lm_step: tokens must be [B, T], embed [V, D]");
  }
  const int64_t b = td[0], t = td[1], m = b * t, vocab = ed[0], d = ed[1];
  if (static_cast<int64_t>(rest.size()) != num_layers * (kLayerWeights + 2) ||
      static_cast<int64_t>(caches_out.size()) != 2 * num_layers) {
    return ffi::Error::InvalidArgument(
        "effjax_fused_lm_step: expected 9 weights and a k and a v cache per layer");
  }
  std::vector<LayerWeights> layers(static_cast<size_t>(num_layers));
  for (int64_t l = 0; l < num_layers; ++l) {
    const float* w[kLayerWeights];
    for (int i = 0; i < kLayerWeights; ++i) {
      auto arg = rest.get<ffi::Buffer<ffi::F32>>(l * kLayerWeights + i);
      if (!arg.has_value()) return arg.error();
      w[i] = arg->typed_data();
    }
    layers[l] = {w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7], w[8]};
  }
  std::vector<float*> kc(num_layers), vc(num_layers);
  int64_t slots = 0, h = 0;
  for (int64_t l = 0; l < 2 * num_layers; ++l) {
    auto ret = caches_out.get<ffi::Buffer<ffi::F32>>(l);
    if (!ret.has_value()) return ret.error();
    const auto cd = (*ret)->dimensions();
    if (cd.size() != 3 || cd[0] != b * num_kv_heads) {
      return ffi::Error::InvalidArgument("effjax_fused_lm_step: caches must be [B*K, S, H]");
    }
    slots = cd[1];
    h = cd[2];
    (l < num_layers ? kc[l] : vc[l - num_layers]) = (*ret)->typed_data();
  }
  // The layer-0 weights give the remaining widths: wq [D, N*H], gate [D, F].
  const int64_t nh = num_heads * h, kh = num_kv_heads * h, half = h / 2;
  const int64_t f = rest.get<ffi::Buffer<ffi::F32>>(6)->dimensions()[1];
  const int64_t group = num_heads / num_kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(h));

  // Activations: x the residual stream [m, D]; normed [m, D]; q [m, N*H]; k, v [m, K*H];
  // attn [m, N*H]; gate [m, F] (then silu(gate) * up); up [m, F]; proj [m, D] (wo / down out).
  // Scratch reused across calls on the calling thread (the sizes only grow); the phases below use
  // it through the raw pointers, whichever thread runs them.
  thread_local std::vector<float> scratch;
  thread_local std::vector<int64_t> pos_scratch;
  const int64_t sizes[] = {m * d, m * d, m * nh, m * kh, m * kh, m * nh, m * f, m * f, m * d,
                           m * half, m * half, b * num_kv_heads * slots};
  int64_t total = 0;
  for (int64_t size : sizes) total += size;
  scratch.resize(static_cast<size_t>(total));
  pos_scratch.resize(static_cast<size_t>(m));
  float* next = scratch.data();
  float* bufs[12];
  for (int i = 0; i < 12; ++i) {
    bufs[i] = next;
    next += sizes[i];
  }
  float *const x = bufs[0], *const normed = bufs[1], *const q = bufs[2], *const k = bufs[3],
               *const v = bufs[4], *const attn = bufs[5], *const gate = bufs[6],
               *const up = bufs[7], *const proj = bufs[8], *const cos_t = bufs[9],
               *const sin_t = bufs[10], *const logits_scratch = bufs[11];
  int64_t* const pos = pos_scratch.data();

  const int32_t* tok = tokens.typed_data();
  const int32_t* len = lengths.typed_data();
  for (int64_t r = 0; r < m; ++r) {
    const int32_t id = std::clamp<int32_t>(tok[r], 0, static_cast<int32_t>(vocab - 1));
    std::memcpy(x + r * d, embed.typed_data() + id * d, sizeof(float) * d);
    pos[r] = static_cast<int64_t>(len[r / t]) + r % t;
  }
  rope_tables(pos, inv_freq.typed_data(), m, half, cos_t, sin_t);

  std::vector<Phase> phases;
  for (int64_t l = 0; l < num_layers; ++l) {
    const LayerWeights w = layers[l];
    float *kl = kc[l], *vl = vc[l];
    phases.push_back({1, [&, w](int64_t) { rms_norm(x, w.attn_norm, normed, m, d, eps); }});
    const int64_t uq = col_units(nh), uk = col_units(kh);
    phases.push_back({uq + 2 * uk, [&, w, uq, uk](int64_t u) {
      if (u < uq) nn_cols(normed, w.wq, q, m, d, nh, u);
      else if (u < uq + uk) nn_cols(normed, w.wk, k, m, d, kh, u - uq);
      else nn_cols(normed, w.wv, v, m, d, kh, u - uq - uk);
    }});
    // One unit per (batch row, kv head): RoPE on its heads, its new keys and values into their
    // slots, then attention for its query heads over slots 0..position (causal).
    phases.push_back({b * num_kv_heads, [&, kl, vl](int64_t u) {
      const int64_t row = u / num_kv_heads, j = u % num_kv_heads;
      float* keys = kl + u * slots * h;
      float* values = vl + u * slots * h;
      for (int64_t r = row * t; r < (row + 1) * t; ++r) {
        const float *c = &cos_t[r * half], *s = &sin_t[r * half];
        float* kv = &k[(r * num_kv_heads + j) * h];
        rope(kv, c, s, h);
        for (int64_t g = 0; g < group; ++g) {
          rope(&q[(r * num_heads + j * group + g) * h], c, s, h);
        }
        // A slot outside the cache is dropped, as the unfused scatter drops it.
        if (0 <= pos[r] && pos[r] < slots) {
          std::memcpy(keys + pos[r] * h, kv, sizeof(float) * h);
          std::memcpy(values + pos[r] * h, &v[(r * num_kv_heads + j) * h], sizeof(float) * h);
        }
      }
      float* logits = &logits_scratch[u * slots];
      for (int64_t r = row * t; r < (row + 1) * t; ++r) {
        const int64_t seen = std::min(pos[r] + 1, slots);
        for (int64_t g = 0; g < group; ++g) {
          const int64_t head = (r * num_heads + j * group + g) * h;
          attend(&q[head], keys, values, seen, h, scale, logits, &attn[head]);
        }
      }
    }});
    phases.push_back({col_units(d), [&, w](int64_t u) {  // x += attn @ wo
      nn_cols(attn, w.wo, proj, m, nh, d, u);
      add_cols(proj, x, m, d, u);
    }});
    phases.push_back({1, [&, w](int64_t) { rms_norm(x, w.mlp_norm, normed, m, d, eps); }});
    // gate = silu(normed @ gate) * (normed @ up)
    phases.push_back({col_units(f), [&, w](int64_t u) {
      nn_cols(normed, w.gate, gate, m, d, f, u);
      nn_cols(normed, w.up, up, m, d, f, u);
      for (int64_t r = 0; r < m; ++r) {
        for (int64_t c = u * kCols; c < std::min(f, (u + 1) * kCols); ++c)
          gate[r * f + c] = silu_times(gate[r * f + c], up[r * f + c]);
      }
    }});
    phases.push_back({col_units(d), [&, w](int64_t u) {  // x += gate @ down
      nn_cols(gate, w.down, proj, m, f, d, u);
      add_cols(proj, x, m, d, u);
    }});
  }
  phases.push_back({1, [&](int64_t) { rms_norm(x, final_norm.typed_data(), normed, m, d, eps); }});
  float* out = logits_out->typed_data();
  if (tied) {
    const Problem head{normed, embed.typed_data(), out, m, d, vocab, false};
    phases.push_back({(vocab + kDotUnit - 1) / kDotUnit, [head](int64_t u) { nt_unit(head, u); }});
  } else {
    const float* w = lm_head.typed_data();
    phases.push_back({col_units(vocab), [&, w, out](int64_t u) {
      nn_cols(normed, w, out, m, d, vocab, u);
    }});
  }
  run_phases(pool, std::move(phases));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffjaxFusedLmStep, FusedLmStepImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .Attr<int64_t>("num_layers")
                                  .Attr<int64_t>("num_heads")
                                  .Attr<int64_t>("num_kv_heads")
                                  .Attr<float>("eps")
                                  .Attr<bool>("tied")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .RemainingRets());
