// torch.ops.magicdec.attention: decode / draft / verify attention over a KV cache on the CPU.
//
// Semantics (the specification and test oracle is magicdec_rt/attention.py: `reference`):
//   q        [B, kv, R, d]   R = G*T query rows per KV head: query head g, block token t at row g*T + t
//   k_cache  [B, kv, S, d]   v_cache likewise; float32, bfloat16 or float16
//   lengths  [B] int64       row b attends to cache slots s < lengths[b]
//   k_new    [B, kv, T, d]   the block's own keys (v_new likewise), or absent; row g*T + t sees 0..t
//   scale    softmax scale
// Returns [B, kv, R, d] in q's dtype; a query row that sees no key returns zeros.
//
// Why a kernel: at decode shapes (head dim 64, 3-48 query rows per KV head, thousands of slots)
// attention is bound by reading the cache, and stock kernels read it at a fraction of the machine's
// bandwidth and slow down with every query row. Here each (row, KV head) reads its cache slots once
// for all R query rows: blocks of KB keys are widened to float32 into L1-resident buffers, scores
// are computed with the query rows in SIMD lanes (one FMA per key element serves N rows), the
// softmax is kept online in float32 (exp2 with log2(e) folded into the query scale), and P·V
// accumulates in registers. Slots at or past lengths[b] are never read. When B*kv is small the
// slots are split across threads and the partial softmaxes merged by their maxima and sums
// (flash-decoding). The block's own keys (causal) are one more masked block at the merge.
//
// Dispatch: one generic kernel written with GCC/Clang vector extensions, compiled three times
// (always_inline into functions with a target attribute): AVX-512 (16 lanes), AVX2+FMA (8 lanes)
// and portable (4 lanes, the baseline ISA), chosen at run time from the CPU's features.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace {

#define INLINE inline __attribute__((always_inline))

constexpr int KB = 16;          // keys per block
constexpr int MAX_NATURAL = 12; // most query rows for the keys-in-lanes path
constexpr int MIN_SPLIT = 512;  // fewest slots worth a thread of their own

struct Args {
  const float* q;        // [B, kv, R, d], already multiplied by scale * log2(e)
  const void* kc;        // [B, kv, S, d]
  const void* vc;
  const int64_t* len;    // [B]
  const float* kn;       // [B, kv, T, d] or null
  const float* vn;
  float* m;              // partial softmax state per (b, h, split): max, sum, unnormalised output
  float* l;
  float* acc;
  float* out;            // [B, kv, R, d]
  int64_t B, kv, R, S, T, d, splits, chunk, rows_padded;
  int dtype;             // 0 float32, 1 bfloat16, 2 float16
};

// Vector types of N lanes (spelled per N: GCC does not take a dependent vector_size).
template <int N> struct Types;
#define VECTOR_TYPES(N)                                           \
  template <> struct Types<N> {                                   \
    typedef float F __attribute__((vector_size(N * 4)));          \
    typedef int32_t I __attribute__((vector_size(N * 4)));        \
    typedef uint32_t U __attribute__((vector_size(N * 4)));       \
    typedef uint16_t H16 __attribute__((vector_size(N * 2)));     \
    typedef _Float16 F16 __attribute__((vector_size(N * 2)));     \
  };
VECTOR_TYPES(4)
VECTOR_TYPES(8)
VECTOR_TYPES(16)

template <int N>
struct Vec {
  using F = typename Types<N>::F;
  using I = typename Types<N>::I;
  using U = typename Types<N>::U;
  using H16 = typename Types<N>::H16;
  using F16 = typename Types<N>::F16;

  static INLINE F load(const float* p) { F v; std::memcpy(&v, p, sizeof v); return v; }
  static INLINE void store(float* p, F v) { std::memcpy(p, &v, sizeof v); }
  static INLINE F splat(float x) { return F{} + x; }
  static INLINE F max(F a, F b) { return a > b ? a : b; }

  // N cache elements widened to float32.
  static INLINE F widen(const float* p) { return load(p); }
  static INLINE F widen(const uint16_t* p) {  // bfloat16: the high half of a float32
    H16 h; std::memcpy(&h, p, sizeof h);
    return (F)(__builtin_convertvector(h, U) << 16);
  }
  static INLINE F widen(const _Float16* p) {
    F16 h; std::memcpy(&h, p, sizeof h);
    return __builtin_convertvector(h, F);
  }

  // 2^x for x <= 0 to ~2e-7 relative: x = n + f, |f| <= 1/2, e^(f ln2) by its degree-6 Taylor
  // polynomial (truncation error (ln2/2)^7/7! ~ 1.2e-7). Inputs below -126 give 2^-126.
  static INLINE F exp2(F x) {
    x = x < -126.0f ? splat(-126.0f) : x;
    F r = x + 0.5f;
    F n = __builtin_convertvector(__builtin_convertvector(r, I), F);
    n = n > r ? n - 1.0f : n;  // floor(x + 1/2)
    F g = (x - n) * 0.6931471805599453f;
    F p = 1.0f + g * (1.0f + g * (1.0f / 2 + g * (1.0f / 6 + g * (1.0f / 24 + g * (1.0f / 120 + g * (1.0f / 720))))));
    return p * (F)((__builtin_convertvector(n, I) + 127) << 23);
  }
};

template <int N, int D>
struct Kernel {
  using V = Vec<N>;
  using F = typename V::F;
  static constexpr int C = D / N;  // vectors per key row
  static constexpr int RT = 16 / C < 1 ? 1 : (16 / C > 4 ? 4 : 16 / C);  // query rows per P·V tile

  // acc[i] = acc[i] * corr[i] + sum_j P(i, j) V[j] for query rows i < rows (P(i, j) = P[i*si + j*sj]),
  // RT rows at a time with their accumulators in registers.
  static INLINE void pv(float* acc, int rows, const float* P, int si, int sj, const float* corr, const float* Vf, int nk) {
    for (int i0 = 0; i0 < rows; i0 += RT) {
      F a[RT][C];
      for (int r = 0; r < RT; ++r)
        for (int c = 0; c < C; ++c) a[r][c] = V::load(acc + (i0 + r) * D + c * N) * corr[i0 + r];
      for (int j = 0; j < nk; ++j)
        for (int c = 0; c < C; ++c) {
          F v = V::load(Vf + j * D + c * N);
          for (int r = 0; r < RT; ++r) a[r][c] += P[(i0 + r) * si + j * sj] * v;
        }
      for (int r = 0; r < RT; ++r)
        for (int c = 0; c < C; ++c) V::store(acc + (i0 + r) * D + c * N, a[r][c]);
    }
  }

  // Rows in lanes: one block of nk <= KB keys (float32 rows Kf, Vf [KB][D]) for the N query rows
  // of a lane group (Qt [D][N]: their queries transposed); one FMA per key element serves N rows.
  // Updates the rows' online softmax state m, l [N] and acc [N][D]. With t, key jbase+j is
  // visible to lane i iff jbase+j <= t[i] (the block's own keys).
  static INLINE void block(const float* Qt, int rows, const float* Kf, const float* Vf, int nk,
                           const float* t, int jbase, float* m, float* l, float* acc) {
    F s[KB];
    for (int j0 = 0; j0 < nk; j0 += 8) {  // 8 independent FMA chains
      F a[8] = {};
      for (int k = 0; k < D; ++k) {
        F q = V::load(Qt + k * N);
        for (int j = 0; j < 8; ++j) a[j] += Kf[(j0 + j) * D + k] * q;
      }
      for (int j = 0; j < 8; ++j) s[j0 + j] = a[j];
    }
    const F ninf = V::splat(-INFINITY);
    if (t) {
      F tv = V::load(t);
      for (int j = 0; j < nk; ++j) s[j] = float(jbase + j) <= tv ? s[j] : ninf;
    }
    F mx = ninf;
    for (int j = 0; j < nk; ++j) mx = V::max(mx, s[j]);
    F m_old = V::load(m), m_new = V::max(m_old, mx);
    F base = m_new == ninf ? F{} : m_new;  // a lane that has seen no key yet
    F corr = V::exp2(m_old - base), sum = F{};
    alignas(64) float P[KB * N], cr[N];
    for (int j = 0; j < nk; ++j) {
      F p = s[j] == ninf ? F{} : V::exp2(s[j] - base);
      sum += p;
      V::store(P + j * N, p);
    }
    V::store(m, m_new);
    V::store(l, V::load(l) * corr + sum);
    V::store(cr, corr);
    pv(acc, rows, P, 1, N, cr, Vf, nk);
  }

  // x[0..N) -> one vector whose lane j is the sum of x[j]'s lanes: a butterfly of N-1 shuffle
  // pairs. Level G halves every key's block of 2G lanes and packs two vectors into one.
  template <int G>
  static INLINE void fold(F* x, int n) {
    typename V::I lo, hi;
    constexpr int nb = N / (2 * G);
    for (int L = 0; L < N; ++L) {
      const int bi = L / G;
      lo[L] = (bi < nb ? 0 : N) + (bi % nb) * 2 * G + L % G;
      hi[L] = lo[L] + G;
    }
    for (int i = 0; i < n / 2; ++i)
      x[i] = __builtin_shuffle(x[2 * i], x[2 * i + 1], lo) + __builtin_shuffle(x[2 * i], x[2 * i + 1], hi);
    if constexpr (G > 1) fold<G / 2>(x, n / 2);
  }

  static INLINE float hmax(F x) { float r = x[0]; for (int i = 1; i < N; ++i) r = std::max(r, x[i]); return r; }
  static INLINE float hsum(F x) { float r = x[0]; for (int i = 1; i < N; ++i) r += x[i]; return r; }

  // Keys in lanes, for few query rows: each row's scores against KB keys are KB dot products over
  // D (C FMAs each) folded together; then the softmax runs over full vectors of keys. Cheaper than
  // rows in lanes when R * (C + 3) < D * ceil(R / N).
  static INLINE void block_natural(const float* q, int R, const float* Kf, const float* Vf, int nk,
                                   float* m, float* l, float* acc) {
    alignas(64) float P[MAX_NATURAL * KB] = {}, cr[MAX_NATURAL + 4] = {};
    for (int i = 0; i < R; ++i) {
      F qv[C];
      for (int c = 0; c < C; ++c) qv[c] = V::load(q + i * D + c * N);
      F s[KB / N];
      for (int j0 = 0; j0 < KB; j0 += N) {
        F x[N];
        for (int j = 0; j < N; ++j) {
          x[j] = V::load(Kf + (j0 + j) * D) * qv[0];
          for (int c = 1; c < C; ++c) x[j] += V::load(Kf + (j0 + j) * D + c * N) * qv[c];
        }
        fold<N / 2>(x, N);
        s[j0 / N] = x[0];
      }
      float mx = -INFINITY;
      for (int v = 0; v < KB / N; ++v) {
        for (int j = 0; j < N; ++j)
          if (v * N + j >= nk) s[v][j] = -INFINITY;
        mx = std::max(mx, hmax(s[v]));
      }
      const float m_new = std::max(m[i], mx);
      const float corr = std::exp2(m[i] - m_new);  // m_new is finite: nk >= 1
      F sum = F{};
      for (int v = 0; v < KB / N; ++v) {
        F p = s[v] == V::splat(-INFINITY) ? F{} : V::exp2(s[v] - m_new);
        sum += p;
        V::store(P + i * KB + v * N, p);
      }
      m[i] = m_new;
      l[i] = l[i] * corr + hsum(sum);
      cr[i] = corr;
    }
    pv(acc, R, P, KB, 1, cr, Vf, nk);
  }

  // Lane group g of a query block [R][D] transposed into Qt [D][N] (rows past R are zero).
  static INLINE int transpose(const float* q, int64_t R, int64_t g, float* Qt) {
    int rows = int(std::min<int64_t>(N, R - g * N));
    for (int k = 0; k < D; ++k)
      for (int i = 0; i < N; ++i) Qt[k * N + i] = i < rows ? q[(g * N + i) * D + k] : 0.0f;
    return rows;
  }

  // Work item (b, h, split): cache slots [split*chunk, min((split+1)*chunk, lengths[b])).
  template <typename KT>
  static INLINE void item(const Args& a, int64_t w) {
    const int64_t split = w % a.splits, bh = w / a.splits, b = bh / a.kv;
    const int64_t lo = split * a.chunk, hi = std::min(lo + a.chunk, a.len[b]);
    const int64_t Rp = a.rows_padded, groups = Rp / N;
    float* m = a.m + w * Rp;
    float* l = a.l + w * Rp;
    float* acc = a.acc + w * Rp * D;
    std::fill(m, m + Rp, -INFINITY);
    std::fill(l, l + Rp, 0.0f);
    std::fill(acc, acc + Rp * D, 0.0f);
    if (lo >= hi) return;
    const KT* kc = static_cast<const KT*>(a.kc) + bh * a.S * D;
    const KT* vc = static_cast<const KT*>(a.vc) + bh * a.S * D;
    alignas(64) float Kf[KB * D], Vf[KB * D];
    if (natural(a.R)) {
      const float* q = a.q + bh * a.R * D;
      for (int64_t s = lo; s < hi; s += KB) {
        const int nk = widen(kc, vc, s, hi, Kf, Vf);
        block_natural(q, int(a.R), Kf, Vf, nk, m, l, acc);
      }
      return;
    }
    alignas(64) float Qt[(48 + N - 1) / N][D * N];  // up to 48 query rows held transposed
    for (int64_t g0 = 0; g0 < groups; g0 += (48 + N - 1) / N) {
      const int64_t ng = std::min<int64_t>((48 + N - 1) / N, groups - g0);
      int rows[(48 + N - 1) / N];
      for (int64_t g = 0; g < ng; ++g) rows[g] = transpose(a.q + bh * a.R * D, a.R, g0 + g, Qt[g]);
      for (int64_t s = lo; s < hi; s += KB) {
        const int nk = widen(kc, vc, s, hi, Kf, Vf);
        for (int64_t g = 0; g < ng; ++g) {
          const int64_t o = (g0 + g) * N;
          block(Qt[g], rows[g], Kf, Vf, nk, nullptr, 0, m + o, l + o, acc + o * D);
        }
      }
    }
  }

  static constexpr bool natural(int64_t R) { return R <= MAX_NATURAL && R * (C + 8) < D * ((R + N - 1) / N); }

  // Slots [s, min(s + KB, hi)) of a K and V plane widened to float32 rows; returns their number.
  template <typename KT>
  static INLINE int widen(const KT* kc, const KT* vc, int64_t s, int64_t hi, float* Kf, float* Vf) {
    const int nk = int(std::min<int64_t>(KB, hi - s));
    for (int j = 0; j < nk; ++j)
      for (int c = 0; c < C; ++c) {
        V::store(Kf + j * D + c * N, V::widen(kc + (s + j) * D + c * N));
        V::store(Vf + j * D + c * N, V::widen(vc + (s + j) * D + c * N));
      }
    for (int j = nk; j < KB; ++j)  // finite scores for the unused keys (masked afterwards)
      std::memset(Kf + j * D, 0, sizeof(float) * D);
    return nk;
  }

  // Per (b, h): merge the splits, attend to the block's own keys, normalise, write the output.
  static INLINE void merge(const Args& a, int64_t bh) {
    const int64_t Rp = a.rows_padded, groups = Rp / N;
    float* m = a.m + bh * a.splits * Rp;
    float* l = a.l + bh * a.splits * Rp;
    float* acc = a.acc + bh * a.splits * Rp * D;
    for (int64_t sp = 1; sp < a.splits; ++sp) {
      const float* ms = m + sp * Rp;
      const float* ls = l + sp * Rp;
      const float* as = acc + sp * Rp * D;
      for (int64_t r = 0; r < a.R; ++r) {
        if (ms[r] == -INFINITY) continue;
        const float mn = std::max(m[r], ms[r]);
        const float w0 = std::exp2(m[r] - mn), w1 = std::exp2(ms[r] - mn);
        m[r] = mn;
        l[r] = l[r] * w0 + ls[r] * w1;
        for (int c = 0; c < C; ++c)
          V::store(acc + r * D + c * N, V::load(acc + r * D + c * N) * w0 + V::load(as + r * D + c * N) * w1);
      }
    }
    if (a.kn) {
      const float* kn = a.kn + bh * a.T * D;
      const float* vn = a.vn + bh * a.T * D;
      alignas(64) float Qt[D * N], t[N];
      for (int64_t g = 0; g < groups; ++g) {
        const int rows = transpose(a.q + bh * a.R * D, a.R, g, Qt);
        for (int i = 0; i < N; ++i) t[i] = float((g * N + i) % a.T);
        for (int64_t s = 0; s < a.T; s += KB) {
          const int nk = int(std::min<int64_t>(KB, a.T - s));
          alignas(64) float Kf[KB * D];
          std::memcpy(Kf, kn + s * D, sizeof(float) * nk * D);
          block(Qt, rows, Kf, vn + s * D, nk, t, int(s), m + g * N, l + g * N, acc + g * N * D);
        }
      }
    }
    float* out = a.out + bh * a.R * D;
    for (int64_t r = 0; r < a.R; ++r) {
      const F inv = V::splat(l[r] > 0 ? 1.0f / l[r] : 0.0f);
      for (int c = 0; c < C; ++c) V::store(out + r * D + c * N, V::load(acc + r * D + c * N) * inv);
    }
  }
};

template <int N>
INLINE void run_items(const Args& a, int64_t begin, int64_t end) {
  for (int64_t w = begin; w < end; ++w) {
    if (a.d == 64) {
      if (a.dtype == 0) Kernel<N, 64>::template item<float>(a, w);
      else if (a.dtype == 1) Kernel<N, 64>::template item<uint16_t>(a, w);
      else Kernel<N, 64>::template item<_Float16>(a, w);
    } else {
      if (a.dtype == 0) Kernel<N, 128>::template item<float>(a, w);
      else if (a.dtype == 1) Kernel<N, 128>::template item<uint16_t>(a, w);
      else Kernel<N, 128>::template item<_Float16>(a, w);
    }
  }
}

template <int N>
INLINE void run_merge(const Args& a, int64_t begin, int64_t end) {
  for (int64_t bh = begin; bh < end; ++bh) {
    if (a.d == 64) Kernel<N, 64>::merge(a, bh);
    else Kernel<N, 128>::merge(a, bh);
  }
}

#define ISA_AVX512 "avx512f,avx512bw,avx512dq,avx512vl,fma,f16c"
#define ISA_AVX2 "avx2,fma,f16c"
__attribute__((target(ISA_AVX512))) void items_avx512(const Args& a, int64_t b, int64_t e) { run_items<16>(a, b, e); }
__attribute__((target(ISA_AVX512))) void merge_avx512(const Args& a, int64_t b, int64_t e) { run_merge<16>(a, b, e); }
__attribute__((target(ISA_AVX2))) void items_avx2(const Args& a, int64_t b, int64_t e) { run_items<8>(a, b, e); }
__attribute__((target(ISA_AVX2))) void merge_avx2(const Args& a, int64_t b, int64_t e) { run_merge<8>(a, b, e); }
void items_portable(const Args& a, int64_t b, int64_t e) { run_items<4>(a, b, e); }
void merge_portable(const Args& a, int64_t b, int64_t e) { run_merge<4>(a, b, e); }

struct Isa {
  const char* name;
  int lanes;
  void (*items)(const Args&, int64_t, int64_t);
  void (*merge)(const Args&, int64_t, int64_t);
};
const Isa ISAS[] = {
    {"avx512", 16, items_avx512, merge_avx512},
    {"avx2", 8, items_avx2, merge_avx2},
    {"portable", 4, items_portable, merge_portable},
};

bool supported(int i) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (i == 0)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("f16c");
  if (i == 1) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return true;
#else
  return i == 2;
#endif
}

std::atomic<int> forced{-1};

int active_isa() {
  const int f = forced.load();
  if (f >= 0) return f;
  static const int best = supported(0) ? 0 : supported(1) ? 1 : 2;
  return best;
}

// Selects the kernel's instruction set ("auto" = the best this CPU has); returns the one in use.
std::string set_isa(std::string isa) {
  if (isa == "auto") {
    forced = -1;
  } else if (!isa.empty()) {
    int i = 0;
    while (i < 3 && isa != ISAS[i].name) ++i;
    TORCH_CHECK(i < 3, "unknown kernel ISA '", isa, "'; choose auto, avx512, avx2 or portable");
    TORCH_CHECK(supported(i), "this CPU cannot run the ", isa, " kernel");
    forced = i;
  }
  return ISAS[active_isa()].name;
}

void check_inputs(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& lengths,
                  const c10::optional<at::Tensor>& kn, const c10::optional<at::Tensor>& vn) {
  TORCH_CHECK(q.dim() == 4 && kc.dim() == 4, "attention: q and k_cache must be 4-D [B, kv, rows, d]");
  TORCH_CHECK(kc.sizes() == vc.sizes(), "attention: k_cache ", kc.sizes(), " and v_cache ", vc.sizes(), " differ");
  TORCH_CHECK(q.size(0) == kc.size(0) && q.size(1) == kc.size(1) && q.size(3) == kc.size(3),
              "attention: q ", q.sizes(), " does not match the cache ", kc.sizes());
  TORCH_CHECK(q.size(3) == 64 || q.size(3) == 128, "attention: head dim ", q.size(3), " is not 64 or 128");
  TORCH_CHECK(kc.scalar_type() == vc.scalar_type() &&
                  (kc.scalar_type() == at::kFloat || kc.scalar_type() == at::kBFloat16 || kc.scalar_type() == at::kHalf),
              "attention: cache dtype must be float32, bfloat16 or float16");
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == q.size(0) && lengths.scalar_type() == at::kLong,
              "attention: lengths must be int64 [B]");
  TORCH_CHECK(kn.has_value() == vn.has_value(), "attention: give both k_new and v_new, or neither");
  if (kn) {
    TORCH_CHECK(kn->dim() == 4 && kn->sizes() == vn->sizes() && kn->size(0) == q.size(0) && kn->size(1) == q.size(1) &&
                    kn->size(3) == q.size(3) && kn->size(2) >= 1 && q.size(2) % kn->size(2) == 0,
                "attention: k_new ", kn->sizes(), " must be [B, kv, T, d] with T dividing the ", q.size(2), " query rows");
  }
}

at::Tensor attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& lengths, const c10::optional<at::Tensor>& k_new,
                         const c10::optional<at::Tensor>& v_new, double scale) {
  check_inputs(q, k_cache, v_cache, lengths, k_new, v_new);
  const int64_t B = q.size(0), kv = q.size(1), R = q.size(2), d = q.size(3), S = k_cache.size(2);
  const at::Tensor len = lengths.contiguous();
  const int64_t* lp = len.data_ptr<int64_t>();
  // Row b sees slots s < lengths[b]: all S of them when lengths[b] >= S (a row past the bucket).
  std::vector<int64_t> visible(B);
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) {
    visible[b] = std::clamp<int64_t>(lp[b], 0, S);
    longest = std::max(longest, visible[b]);
  }
  const Isa& isa = ISAS[active_isa()];
  const at::Tensor qf = (q.to(at::kFloat) * float(scale * M_LOG2E)).contiguous();
  const at::Tensor kc = k_cache.contiguous(), vc = v_cache.contiguous();
  at::Tensor knf, vnf;
  if (k_new) {
    knf = k_new->to(at::kFloat).contiguous();
    vnf = v_new->to(at::kFloat).contiguous();
  }
  // Split the slots across threads when there are fewer (row, head) pairs than ~4 per thread.
  const int64_t threads = at::get_num_threads();
  int64_t splits = std::max<int64_t>(1, std::min((4 * threads + B * kv - 1) / (B * kv), longest / MIN_SPLIT));
  const int64_t chunk = std::max<int64_t>(1, (longest + splits - 1) / splits);
  const int64_t Rp = (R + isa.lanes - 1) / isa.lanes * isa.lanes;
  at::Tensor state = at::empty({B * kv * splits * Rp * (d + 2)}, q.options().dtype(at::kFloat));
  at::Tensor out = at::empty({B, kv, R, d}, q.options().dtype(at::kFloat));
  float* sp = state.data_ptr<float>();
  const int64_t n = B * kv * splits * Rp;
  Args a{qf.data_ptr<float>(), kc.data_ptr(), vc.data_ptr(), visible.data(),
         k_new ? knf.data_ptr<float>() : nullptr, k_new ? vnf.data_ptr<float>() : nullptr,
         sp, sp + n, sp + 2 * n, out.data_ptr<float>(),
         B, kv, R, S, k_new ? knf.size(2) : 1, d, splits, chunk, Rp,
         kc.scalar_type() == at::kFloat ? 0 : kc.scalar_type() == at::kBFloat16 ? 1 : 2};
  at::parallel_for(0, B * kv * splits, 1, [&](int64_t b, int64_t e) { isa.items(a, b, e); });
  at::parallel_for(0, B * kv, 1, [&](int64_t b, int64_t e) { isa.merge(a, b, e); });
  return out.scalar_type() == q.scalar_type() ? out : out.to(q.scalar_type());
}

at::Tensor attention_meta(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& lengths, const c10::optional<at::Tensor>& k_new,
                          const c10::optional<at::Tensor>& v_new, double scale) {
  check_inputs(q, k_cache, v_cache, lengths, k_new, v_new);
  return at::empty_like(q, at::MemoryFormat::Contiguous);
}

}  // namespace

TORCH_LIBRARY(magicdec, m) {
  m.def("attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor lengths, Tensor? k_new, Tensor? v_new, float scale) -> Tensor");
  m.def("set_isa(str isa) -> str", &set_isa);
}

TORCH_LIBRARY_IMPL(magicdec, CPU, m) { m.impl("attention", attention_cpu); }
TORCH_LIBRARY_IMPL(magicdec, Meta, m) { m.impl("attention", attention_meta); }
