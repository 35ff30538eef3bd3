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
// for all R query rows: blocks of KB keys are widened to float32 into L1-resident buffers (bf16 a
// pair of dims at a time, so dims are kept in an order of their own: Kernel::dim); scores
// are computed with the query rows in SIMD lanes (one FMA per key element serves N rows) or, for
// few rows, with keys in lanes (dot products folded by a shuffle butterfly); the softmax is kept
// online in float32 (exp2 with log2(e) folded into the query scale), and P·V accumulates in
// registers. Slots at or past lengths[b] are never read. When B*kv is small the slots are split
// across threads and the partial softmaxes merged by their maxima and sums (flash-decoding). The
// block's own keys (causal) are one more masked block at the merge.
//
// Dispatch: one generic kernel written with GCC vector extensions, compiled three times
// (always_inline into functions with a target attribute): AVX-512 (16 lanes), AVX2+FMA (8 lanes)
// and portable (4 lanes, the baseline ISA); plus an AVX512-BF16 variant for bf16 caches and 5 or
// more query rows (struct Bf16). Chosen at run time from the CPU's features (set_isa overrides).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

namespace {

#define INLINE inline __attribute__((always_inline))

constexpr int KB = 16;          // keys per block
constexpr int MAX_NATURAL = 12; // most query rows for the keys-in-lanes path
constexpr int MIN_SPLIT = 512;  // fewest slots worth a thread of their own
constexpr int MERGE_ROWS = 48;  // query rows per merge item (a multiple of every lane count)

struct Args {
  const float* q;        // [B, kv, R, d]
  float qscale;          // scale * log2(e): scores in base 2
  const void* kc;        // [B, kv, S, d]
  const void* vc;
  const int64_t* len;    // [B]
  const float* kn;       // [B, kv, T, d] or null
  const float* vn;
  float* m;              // partial softmax state per (b, h, split): max, sum, unnormalised output
  float* l;
  float* acc;
  float* out;            // [B, kv, R, d]
  int64_t B, kv, R, S, T, d, splits, chunk, rows_padded, merge_parts;  // merge item: (b, h, MERGE_ROWS rows)
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

// Work item w = (b, h, split): cache slots [lo, hi) = [split*chunk, min((split+1)*chunk, lengths[b]))
// of row-head bh = (b, h), and its softmax state (max, sum, unnormalised output per query row).
struct Slots {
  int64_t bh, lo, hi;
};
INLINE Slots slots(const Args& a, int64_t w) {
  const int64_t bh = w / a.splits, lo = w % a.splits * a.chunk;
  return {bh, lo, std::min(lo + a.chunk, a.len[bh / a.kv])};
}

struct Item {
  int64_t bh, lo, hi;
  float *m, *l, *acc;
};

// Item w with its state set to "no key seen".
INLINE Item start_item(const Args& a, int64_t w) {
  const int64_t Rp = a.rows_padded;
  const auto [bh, lo, hi] = slots(a, w);
  Item it{bh, lo, hi, a.m + w * Rp, a.l + w * Rp, a.acc + w * Rp * a.d};
  std::fill(it.m, it.m + Rp, -INFINITY);
  std::fill(it.l, it.l + Rp, 0.0f);
  std::fill(it.acc, it.acc + Rp * a.d, 0.0f);
  return it;
}

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
  // 32 bfloat16 as 16 32-bit words: the even elements (low halves shifted up) to out [0, 16), the
  // odd ones (high halves masked) to out [16, 32). Two instructions per 2N elements, against four
  // for widen; the layout is the same for every N, so each path sums in the same order.
  static INLINE void widen_pairs(const uint16_t* p, float* out) {
    for (int v = 0; v < 16 / N; ++v) {
      U w; std::memcpy(&w, p + 2 * N * v, sizeof w);
      store(out + N * v, (F)(w << 16));
      store(out + 16 + N * v, (F)(w & 0xffff0000u));
    }
  }

  // 2^x for x <= 0 to ~2e-7 relative: x = n + f, n = round(x), |f| <= 1/2; 2^f by Cephes' exp2f
  // polynomial (as Bf16::exp2). Adding 1.5 * 2^23 rounds x to an integer that the sum's low bits
  // hold, so n costs two additions and 2^n an integer subtraction (no conversions). Inputs below
  // -126 give 2^-126.
  static INLINE F exp2(F x) {
    constexpr float MAGIC = 12582912.0f;  // 1.5 * 2^23
    x = x < -126.0f ? splat(-126.0f) : x;
    const F t = x + MAGIC, f = x - (t - MAGIC);
    F p = splat(1.535336188319500e-4f);
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = p * f + 1.0f;
    return p * (F)(((I)t - (I)splat(MAGIC) + 127) << 23);
  }
};

template <int N, int D>
struct Kernel {
  using V = Vec<N>;
  using F = typename V::F;
  static constexpr int C = D / N;  // vectors per key row

  // bf16 caches are widened a pair of dims at a time (Vec::widen_pairs), so a widened row holds each
  // chunk of 32 dims even dims first, then odd ones; queries are read and sums kept in that order,
  // and merge writes the output back in dim order. Position p of such a row holds dim(p).
  static constexpr int dim(int p) { return p / 32 * 32 + (p % 32 < 16 ? 2 * (p % 16) : 2 * (p % 16) + 1); }
  // Rows [0, R) of x times `scale`, in widened order when `pairs`; x itself where neither applies.
  static INLINE const float* in_order(const float* x, int64_t R, bool pairs, float* buf, float scale = 1.0f) {
    if (!pairs && scale == 1.0f) return x;
    for (int64_t i = 0; i < R; ++i)
      for (int p = 0; p < D; ++p) buf[i * D + p] = x[i * D + (pairs ? dim(p) : p)] * scale;
    return buf;
  }
  // P·V register tile: RT query rows x CC vectors of dims. AVX-512 has 32 vector registers: a whole
  // row (C <= 8 vectors) per tile row, up to 16 sums. AVX2 and SSE have 16: 4 rows x 2 vectors, so
  // each V vector loaded serves 4 rows and nothing spills (a whole row, 2 x 8 sums at d 64, spilled:
  // AVX2 path, B16 x 7680 bf16 slots, 12-15 query rows, 10.0-11.5 -> 8.9-10.1 ms a layer).
  static constexpr int CC = N == 16 ? C : (C < 2 ? C : 2);
  static constexpr int RT = N == 16 ? (16 / C < 1 ? 1 : (16 / C > 4 ? 4 : 16 / C)) : 4;

  // acc[i] = acc[i] * corr[i] + sum_j P(i, j) V[j] for query rows i < rows (P(i, j) = P[i*si + j*sj]),
  // RT rows x CC dim vectors at a time with their sums in registers; a last tile of fewer rows
  // computes only those (a full tile for the 9th query row of a gamma-2 verify did 4x its products).
  static INLINE void pv(float* acc, int rows, const float* P, int si, int sj, const float* corr, const float* Vf, int nk) {
    for (int c0 = 0; c0 < C; c0 += CC) {
      int i0 = 0;
      for (; i0 + RT <= rows; i0 += RT) pv_rows<RT>(acc + i0 * D, P + i0 * si, si, sj, corr + i0, Vf, nk, c0);
      if (i0 < rows) pv_tail(rows - i0, acc + i0 * D, P + i0 * si, si, sj, corr + i0, Vf, nk, c0);
    }
  }
  template <int R>
  static INLINE void pv_rows(float* acc, const float* P, int si, int sj, const float* corr, const float* Vf, int nk, int c0) {
    F a[R][CC];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < CC; ++c) a[r][c] = V::load(acc + r * D + (c0 + c) * N) * corr[r];
    for (int j = 0; j < nk; ++j)
      for (int c = 0; c < CC; ++c) {
        F v = V::load(Vf + j * D + (c0 + c) * N);
        for (int r = 0; r < R; ++r) a[r][c] += P[r * si + j * sj] * v;
      }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < CC; ++c) V::store(acc + r * D + (c0 + c) * N, a[r][c]);
  }
  // pv_rows<left> for 0 < left <= R.
  template <int R = RT - 1>
  static INLINE void pv_tail(int left, float* acc, const float* P, int si, int sj, const float* corr, const float* Vf,
                             int nk, int c0) {
    if constexpr (R > 1)
      if (left < R) return pv_tail<R - 1>(left, acc, P, si, sj, corr, Vf, nk, c0);
    if constexpr (R >= 1) pv_rows<R>(acc, P, si, sj, corr, Vf, nk, c0);
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

  // Across lanes by an xor butterfly of shuffles (lane-by-lane access goes through memory).
  template <int W = N / 2>
  static INLINE F butterfly_max(F x) {
    typename V::I mask;
    for (int i = 0; i < N; ++i) mask[i] = i ^ W;
    x = V::max(x, __builtin_shuffle(x, mask));
    if constexpr (W > 1) return butterfly_max<W / 2>(x); else return x;
  }
  template <int W = N / 2>
  static INLINE F butterfly_sum(F x) {
    typename V::I mask;
    for (int i = 0; i < N; ++i) mask[i] = i ^ W;
    x += __builtin_shuffle(x, mask);
    if constexpr (W > 1) return butterfly_sum<W / 2>(x); else return x;
  }
  static INLINE F iota() { F r; for (int i = 0; i < N; ++i) r[i] = float(i); return r; }

  // One query row's scores (q already scaled) against the block's KB keys, keys in lanes: KB dot
  // products over D (C FMAs each) folded together into KB / N vectors.
  static INLINE void row_scores(const float* q, const float* Kf, F* s) {
    F qv[C];
    for (int c = 0; c < C; ++c) qv[c] = V::load(q + c * N);
    for (int j0 = 0; j0 < KB; j0 += N) {
      F x[N];
      for (int j = 0; j < N; ++j) {
        x[j] = V::load(Kf + (j0 + j) * D) * qv[0];
        for (int c = 1; c < C; ++c) x[j] += V::load(Kf + (j0 + j) * D + c * N) * qv[c];
      }
      fold<N / 2>(x, N);
      s[j0 / N] = x[0];
    }
  }
  // A row's scores masked from key nk on; returns its running max m updated by them.
  static INLINE float row_max(F* s, int nk, float m) {
    F mx = V::splat(-INFINITY);
    for (int v = 0; v < KB / N; ++v) {
      s[v] = iota() + float(v * N) < float(nk) ? s[v] : V::splat(-INFINITY);
      mx = V::max(mx, s[v]);
    }
    return std::max(m, butterfly_max(mx)[0]);  // finite: nk >= 1
  }
  // A row's weights 2^(s - m_new) in s, its sum l moved from max m to m_new and added to; returns
  // the correction of the old state.
  static INLINE float row_exp(F* s, float m, float m_new, float& l) {
    const float corr = m_new == m ? 1.0f : std::exp2(m - m_new);  // the max rarely moves: skip the call
    F sum = F{};
    for (int v = 0; v < KB / N; ++v) {
      s[v] = s[v] == V::splat(-INFINITY) ? F{} : V::exp2(s[v] - m_new);
      sum += s[v];
    }
    l = l * corr + butterfly_sum(sum)[0];
    return corr;
  }

  // Keys in lanes, for few query rows: the rows' scores and online softmaxes over full vectors of
  // keys, then P·V for all rows. AVX-512 keeps a row's scores in registers from its dot products
  // through its softmax; with 16 registers several rows go stage by stage (scores, maxima, exp2), so
  // one row's chains of dependent shuffles and FMAs overlap the next row's (AVX2, 3 rows: 1.2x a
  // block; AVX-512 0.9x staged; AVX2, a verify's 9th row alone: 0.97x).
  static INLINE void block_natural(const float* q, int R, const float* Kf, const float* Vf, int nk,
                                   float* m, float* l, float* acc) {
    alignas(64) float P[MAX_NATURAL * KB], cr[MAX_NATURAL];
    F s[KB / N];
    const auto load = [&](int i) { for (int v = 0; v < KB / N; ++v) s[v] = V::load(P + i * KB + v * N); };
    const auto store = [&](int i) { for (int v = 0; v < KB / N; ++v) V::store(P + i * KB + v * N, s[v]); };
    if (N == 16 || R == 1) {
      for (int i = 0; i < R; ++i) {
        row_scores(q + i * D, Kf, s);
        const float m_new = row_max(s, nk, m[i]);
        cr[i] = row_exp(s, m[i], m_new, l[i]);
        m[i] = m_new;
        store(i);
      }
    } else {
      float m_new[MAX_NATURAL];
      for (int i = 0; i < R; ++i) row_scores(q + i * D, Kf, s), store(i);
      for (int i = 0; i < R; ++i) load(i), m_new[i] = row_max(s, nk, m[i]), store(i);
      for (int i = 0; i < R; ++i) load(i), cr[i] = row_exp(s, m[i], m_new[i], l[i]), m[i] = m_new[i], store(i);
    }
    pv(acc, R, P, KB, 1, cr, Vf, nk);
  }

  // Lane group g of a query block [R][D] transposed into Qt [D][N] (rows past R are zero), its dims
  // in widened order when `pairs`.
  static INLINE int transpose(const float* q, float qscale, int64_t R, int64_t g, bool pairs, float* Qt) {
    int rows = int(std::min<int64_t>(N, R - g * N));
    std::memset(Qt, 0, sizeof(float) * D * N);
    for (int i = 0; i < rows; ++i)
      for (int k = 0; k < D; ++k) Qt[k * N + i] = q[(g * N + i) * D + (pairs ? dim(k) : k)] * qscale;
    return rows;
  }

  template <typename KT>
  static INLINE void item(const Args& a, int64_t w) {
    const auto [bh, lo, hi, m, l, acc] = start_item(a, w);
    const int64_t groups = a.rows_padded / N;
    if (lo >= hi) return;
    const KT* kc = static_cast<const KT*>(a.kc) + bh * a.S * D;
    const KT* vc = static_cast<const KT*>(a.vc) + bh * a.S * D;
    alignas(64) float Kf[KB * D], Vf[KB * D], qn[MAX_NATURAL * D];
    constexpr bool pairs = std::is_same_v<KT, uint16_t>;
    if (natural(a.R)) {
      const float* q = in_order(a.q + bh * a.R * D, a.R, pairs, qn, a.qscale);  // scaled once an item
      for (int64_t s = lo; s < hi; s += KB) {
        const int nk = widen(kc, vc, s, hi, Kf, Vf);
        block_natural(q, int(a.R), Kf, Vf, nk, m, l, acc);
      }
      return;
    }
    // Rows in lanes, N at a time; a short last group (e.g. 18 rows = 16 + 2) goes keys-in-lanes
    // instead of costing a whole lane group.
    const int64_t R = a.R, rem = R % N, lane_groups = rem && natural(rem) ? R / N : groups;
    const float* q = a.q + bh * R * D;
    constexpr int GC = (48 + N - 1) / N;  // up to 48 query rows held transposed at a time
    alignas(64) float Qt[GC][D * N];
    for (int64_t g0 = 0; g0 < lane_groups; g0 += GC) {
      const int64_t ng = std::min<int64_t>(GC, lane_groups - g0), tail = lane_groups * N;
      const bool with_tail = g0 + ng == lane_groups && tail < R;
      int rows[GC];
      for (int64_t g = 0; g < ng; ++g) rows[g] = transpose(q, a.qscale, R, g0 + g, pairs, Qt[g]);
      const float* qt = with_tail ? in_order(q + tail * D, R - tail, pairs, qn, a.qscale) : nullptr;
      for (int64_t s = lo; s < hi; s += KB) {
        const int nk = widen(kc, vc, s, hi, Kf, Vf);
        for (int64_t g = 0; g < ng; ++g) {
          const int64_t o = (g0 + g) * N;
          block(Qt[g], rows[g], Kf, Vf, nk, nullptr, 0, m + o, l + o, acc + o * D);
        }
        if (with_tail)
          block_natural(qt, int(R - tail), Kf, Vf, nk, m + tail, l + tail, acc + tail * D);
      }
    }
  }

  static constexpr bool natural(int64_t R) { return R <= MAX_NATURAL && R * (C + 8) < D * ((R + N - 1) / N); }

  // Slots [s, min(s + KB, hi)) of a K and V plane widened to float32 rows; returns their number.
  template <typename KT>
  static INLINE int widen(const KT* kc, const KT* vc, int64_t s, int64_t hi, float* Kf, float* Vf) {
    const int nk = int(std::min<int64_t>(KB, hi - s));
    for (int j = 0; j < nk; ++j)
      if constexpr (std::is_same_v<KT, uint16_t>) {
        for (int c = 0; c < D; c += 32) {
          V::widen_pairs(kc + (s + j) * D + c, Kf + j * D + c);
          V::widen_pairs(vc + (s + j) * D + c, Vf + j * D + c);
        }
      } else {
        for (int c = 0; c < C; ++c) {
          V::store(Kf + j * D + c * N, V::widen(kc + (s + j) * D + c * N));
          V::store(Vf + j * D + c * N, V::widen(vc + (s + j) * D + c * N));
        }
      }
    for (int j = nk; j < KB; ++j)  // finite scores for the unused keys (masked afterwards)
      std::memset(Kf + j * D, 0, sizeof(float) * D);
    return nk;
  }

  // Per merge item (b, h, rows [r0, r0 + MERGE_ROWS)): merge the splits, attend to the block's own
  // keys, normalise, write the output (a prefill chunk's 768 rows of a head on every thread).
  // `pairs`: the items kept their sums in widened bf16 order (item<uint16_t>).
  static INLINE void merge(const Args& a, int64_t w, bool pairs) {
    const int64_t Rp = a.rows_padded, bh = w / a.merge_parts, r0 = w % a.merge_parts * MERGE_ROWS;
    const int64_t r1 = std::min<int64_t>(r0 + MERGE_ROWS, Rp), R1 = std::min(r1, a.R);
    float* m = a.m + bh * a.splits * Rp;
    float* l = a.l + bh * a.splits * Rp;
    float* acc = a.acc + bh * a.splits * Rp * D;
    for (int64_t sp = 1; sp < a.splits; ++sp) {
      const float* ms = m + sp * Rp;
      const float* ls = l + sp * Rp;
      const float* as = acc + sp * Rp * D;
      for (int64_t r = r0; r < R1; ++r) {
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
      alignas(64) float Qt[D * N], t[N], Kf[KB * D], Vf[KB * D];
      for (int64_t g = r0 / N; g < r1 / N; ++g) {
        const int rows = transpose(a.q + bh * a.R * D, a.qscale, a.R, g, pairs, Qt);
        for (int i = 0; i < N; ++i) t[i] = float((g * N + i) % a.T);
        for (int64_t s = 0; s < a.T; s += KB) {
          const int nk = int(std::min<int64_t>(KB, a.T - s));
          if (pairs) in_order(kn + s * D, nk, true, Kf);
          else std::memcpy(Kf, kn + s * D, sizeof(float) * nk * D);  // block reads whole groups of 8 keys
          const float* v = in_order(vn + s * D, nk, pairs, Vf);
          block(Qt, rows, Kf, v, nk, t, int(s), m + g * N, l + g * N, acc + g * N * D);
        }
      }
    }
    float* out = a.out + bh * a.R * D;
    for (int64_t r = r0; r < R1; ++r) {
      const float inv = l[r] > 0 ? 1.0f / l[r] : 0.0f;
      if (pairs)
        for (int p = 0; p < D; ++p) out[r * D + dim(p)] = acc[r * D + p] * inv;
      else
        for (int c = 0; c < C; ++c) V::store(out + r * D + c * N, V::load(acc + r * D + c * N) * V::splat(inv));
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
INLINE void run_merge(const Args& a, int64_t begin, int64_t end, bool pairs) {
  for (int64_t w = begin; w < end; ++w) {
    if (a.d == 64) Kernel<N, 64>::merge(a, w, pairs);
    else Kernel<N, 128>::merge(a, w, pairs);
  }
}

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 10
#define MAGICDEC_AVX512BF16 1
#include <immintrin.h>
#define ISA_AVX512BF16 "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,fma,f16c"

// bfloat16 caches on CPUs with AVX512-BF16, any number of query rows. q.k and p.v are dot
// products of bf16 pairs (vdpbf16ps: exact products, float32 sums) read straight from the cache, so
// K is never widened and V only interleaved by key pairs. q is rounded to bf16 (exact when the
// model runs in bf16) and the softmax weights are rounded to bf16 before p.v, as a bf16 GEMM
// would; the softmax itself stays float32.
// Scores are computed with the query rows in lanes: the queries of 16 rows as bf16 pairs Qp [D/2]
// (lane r: row r's dims 2j, 2j+1), each key's pair of dims broadcast from the cache, so one
// vdpbf16ps computes a 2-dim slice of 16 rows' scores for one key, with no transpose and no
// widening; the softmax's row maxima and sums are then lane-wise. Accumulators hold their dims
// in the order unpack gives them, and are put back in order at the end of the item.
// Measured on an AVX512-BF16 EPYC, one layer over B16 x 7752 slots, 3 KV heads, against the float32
// path (Kernel<16, D>, keys in lanes for few rows): 1.4x at 3 rows, 1.7-2.5x at 6-21
// (bench/results/roofline/aoti-b16-7752-prefetch.md); with group size 1, 1.05-1.4x at 1-4 rows.
constexpr int PREFETCH_KEYS = 128;  // how far ahead of the block being computed the cache is fetched

template <int D>
struct Bf16 {
  static constexpr int Z = D / 32;  // zmm per bf16 key row
  static constexpr int A = D / 16;  // float32 accumulators per query row
  static constexpr int LK = 16;     // keys per block (one score accumulator each)
  static constexpr int LT = (28 / A - 1) > 6 ? 6 : 28 / A - 1;  // query rows per p.v tile: LT*A + A registers

  // The block PREFETCH_KEYS ahead is fetched towards L1 while this one computes: its lines
  // (D/2 per plane: LK keys x 2D bytes) are prefetched one K line and one V line per step of the
  // q.k loop, those below hi only. With more compute per block (rows in lanes) the hardware
  // prefetcher alone fell behind, and all of a block's prefetches issued at once, before its
  // compute, still left the reads and the arithmetic one after the other. Measured at B16 x 7680
  // slots, one layer, bf16 cache, 6-15 query rows: 88-95% of the read floor spread out, 50-58% all
  // at once (~440 ns per 16-key block with no prefetch, 330-375 at once, 180-220 spread). The
  // float32 keys-in-lanes path gained nothing from prefetch (3 rows), so it has none.
  struct Ahead {
    const char *k, *v;
    int lines;  // lines of each plane to fetch: D/2 for a whole block, fewer near hi, 0 past it
  };
  static_assert(LK * 2 * D / 64 == D / 2, "one line of each plane per step of the q.k loop");
  // Slots [lo, hi) of one item's planes.
  struct Span {
    const uint16_t *kc, *vc;
    int64_t lo, hi;
  };
  static INLINE Span span(const Args& a, int64_t w) {
    const auto [bh, lo, hi] = slots(a, w);
    return {static_cast<const uint16_t*>(a.kc) + bh * a.S * D, static_cast<const uint16_t*>(a.vc) + bh * a.S * D, lo, hi};
  }
  // The block PREFETCH_KEYS after slot s of `cur`, continuing into `next` (the thread's next item,
  // or lo == hi for none) past cur's end: a short item's first blocks are then fetched while the
  // previous item computes.
  static INLINE Ahead ahead(const Span& cur, const Span& next, int64_t s) {
    int64_t at = s + PREFETCH_KEYS;
    const Span& sp = at < cur.hi ? cur : next;
    if (at >= cur.hi) at = next.lo + (at - cur.hi);
    const int64_t keys = std::clamp<int64_t>(sp.hi - at, 0, LK);
    if (keys == 0) return {nullptr, nullptr, 0};
    return {reinterpret_cast<const char*>(sp.kc + at * D), reinterpret_cast<const char*>(sp.vc + at * D),
            int((keys * D * 2 + 63) / 64)};
  }

  // V of slots [s, s + 2 * pairs) (those below nk) interleaved by key pairs for vdpbf16ps.
  __attribute__((target(ISA_AVX512BF16))) static INLINE void interleave(const uint16_t* vc, int64_t s, int nk,
                                                                         __m512i (*Vp)[A], int pairs) {
    for (int p = 0; p < pairs; ++p)
      for (int z = 0; z < Z; ++z) {
        const int j = 2 * p;
        const __m512i v0 = j < nk ? _mm512_loadu_si512(vc + (s + j) * D + 32 * z) : _mm512_setzero_si512();
        const __m512i v1 = j + 1 < nk ? _mm512_loadu_si512(vc + (s + j + 1) * D + 32 * z) : _mm512_setzero_si512();
        Vp[p][2 * z] = _mm512_unpacklo_epi16(v0, v1);
        Vp[p][2 * z + 1] = _mm512_unpackhi_epi16(v0, v1);
      }
  }

  // Accumulator 2z+h, lane 4L+e holds dim 32z + 8L + 4h + e (unpack works within 128-bit lanes).
  static INLINE void unpermute(float* acc, int R) {
    for (int i = 0; i < R; ++i) {
      float t[D];
      for (int z = 0; z < Z; ++z)
        for (int h = 0; h < 2; ++h)
          for (int L = 0; L < 4; ++L)
            for (int e = 0; e < 4; ++e) t[32 * z + 8 * L + 4 * h + e] = acc[i * D + (2 * z + h) * 16 + 4 * L + e];
      std::memcpy(acc + i * D, t, sizeof t);
    }
  }

  // 2^x for x <= 0 to ~2e-7 relative, as Vec::exp2 in half its instructions: x = n + f with
  // n = round(x), |f| <= 1/2; 2^f by Cephes' exp2f polynomial; scalef applies 2^n. x is first
  // raised to -1000, whose 2^x is still exactly 0 in float32, so -inf never meets x - round(x).
  __attribute__((target(ISA_AVX512BF16))) static INLINE __m512 exp2(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-1000.0f));
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
  }

  // Lane r of lo and hi rounded to bf16 and paired in dword r (lo in the low half), as vdpbf16ps
  // reads its operands.
  __attribute__((target(ISA_AVX512BF16))) static INLINE __m512i zip(__m512 lo, __m512 hi) {
    const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                           23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    return _mm512_permutexvar_epi16(order, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  }

  // p.v for NR query rows: o[r] = o[r] * cr[r] + sum over key pairs p < pairs of row r's weight
  // pair W[p * 16 + r] dotted with the interleaved V pair Vp[p], the rows' accumulators in registers.
  template <int NR>
  __attribute__((target(ISA_AVX512BF16))) static INLINE void pv_tile(float* acc, const uint32_t* W, const float* cr,
                                                                      const __m512i (*Vp)[A], int pairs) {
    __m512 o[NR][A];
    for (int r = 0; r < NR; ++r)
      for (int c = 0; c < A; ++c) o[r][c] = _mm512_mul_ps(_mm512_loadu_ps(acc + r * D + 16 * c), _mm512_set1_ps(cr[r]));
    for (int p = 0; p < pairs; ++p) {
      __m512i v[A];
      for (int c = 0; c < A; ++c) v[c] = _mm512_load_si512(&Vp[p][c]);
      for (int r = 0; r < NR; ++r) {
        const __m512bh w = (__m512bh)_mm512_set1_epi32(int(W[p * 16 + r]));
        for (int c = 0; c < A; ++c) o[r][c] = _mm512_dpbf16_ps(o[r][c], (__m512bh)v[c], w);
      }
    }
    for (int r = 0; r < NR; ++r)
      for (int c = 0; c < A; ++c) _mm512_storeu_ps(acc + r * D + 16 * c, o[r][c]);
  }

  // pv_tile over `rows` rows, LT at a time, then the rest.
  template <int NR = LT>
  __attribute__((target(ISA_AVX512BF16))) static INLINE void pv_rows(float* acc, int rows, const uint32_t* W,
                                                                      const float* cr, const __m512i (*Vp)[A], int pairs) {
    if constexpr (NR > 0) {
      if (rows >= NR) {
        for (; rows >= NR; rows -= NR, acc += NR * D, W += NR, cr += NR) pv_tile<NR>(acc, W, cr, Vp, pairs);
      }
      if (rows > 0) pv_rows<NR - 1>(acc, rows, W, cr, Vp, pairs);
    }
  }

  // One block of nk <= LK keys (K rows at kb, stride D) for the <= 16 query rows of Qp: scores,
  // the rows' online softmax state m, l [16] and acc [16][D].
  // The next blocks' lines (`next`) are prefetched along the q.k loop.
  __attribute__((target(ISA_AVX512BF16))) static INLINE void block(const __m512i* Qp, int rows, float qscale,
                                                                          const uint16_t* kb, const __m512i (*Vp)[A],
                                                                          int nk, float* m, float* l, float* acc,
                                                                          Ahead next) {
    __m512 s[LK];
    for (int k = 0; k < LK; ++k) s[k] = _mm512_setzero_ps();
    for (int j = 0; j < D / 2; ++j) {
      if (j < next.lines) {
        _mm_prefetch(next.k + 64 * j, _MM_HINT_T0);
        _mm_prefetch(next.v + 64 * j, _MM_HINT_T0);
      }
      const __m512bh qv = (__m512bh)_mm512_load_si512(Qp + j);
      for (int k = 0; k < LK; ++k) {
        int32_t pair;
        std::memcpy(&pair, kb + k * D + 2 * j, sizeof pair);
        s[k] = _mm512_dpbf16_ps(s[k], qv, (__m512bh)_mm512_set1_epi32(pair));
      }
    }
    const __m512 scale = _mm512_set1_ps(qscale);
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int k = 0; k < LK; ++k) {
      s[k] = k < nk ? _mm512_mul_ps(s[k], scale) : _mm512_set1_ps(-INFINITY);
      mx = _mm512_max_ps(mx, s[k]);
    }
    const __m512 m_old = _mm512_loadu_ps(m), m_new = _mm512_max_ps(m_old, mx);  // finite: nk >= 1
    const __m512 corr = exp2(_mm512_sub_ps(m_old, m_new));
    __m512 sum = _mm512_setzero_ps();
    for (int k = 0; k < LK; ++k) {
      s[k] = exp2(_mm512_sub_ps(s[k], m_new));
      sum = _mm512_add_ps(sum, s[k]);
    }
    _mm512_storeu_ps(m, m_new);
    _mm512_storeu_ps(l, _mm512_fmadd_ps(_mm512_loadu_ps(l), corr, sum));
    alignas(64) float cr[16];
    _mm512_store_ps(cr, corr);
    // Key pair p's weights for row r as one bf16 pair, at W[p * 16 + r].
    alignas(64) uint32_t W[LK / 2 * 16];
    for (int p = 0; p < LK / 2; ++p) _mm512_store_si512(W + p * 16, zip(s[2 * p], s[2 * p + 1]));
    pv_rows(acc, rows, W, cr, Vp, (nk + 1) / 2);
  }

  // Item w; `last` says whether it is the last of this thread's range.
  __attribute__((target(ISA_AVX512BF16))) static void item(const Args& a, int64_t w, bool last) {
    const auto [bh, lo, hi, m, l, acc] = start_item(a, w);
    if (lo >= hi) return;
    const int64_t R = a.R, groups = (R + 15) / 16;
    const Span cur = span(a, w), next = last ? Span{nullptr, nullptr, 0, 0} : span(a, w + 1);
    const uint16_t* kc = cur.kc;
    const uint16_t* vc = cur.vc;
    const float* q = a.q + bh * R * D;
    constexpr int MAXG = 4;  // up to 64 query rows held as pairs at a time
    alignas(64) __m512i Qp[MAXG][D / 2];
    alignas(64) uint16_t tail[LK * D];  // a last partial block, so no slot at or past hi is read
    alignas(64) __m512i Vp[LK / 2][A];
    for (int64_t g0 = 0; g0 < groups; g0 += MAXG) {
      const int64_t ng = std::min<int64_t>(MAXG, groups - g0);
      for (int64_t g = 0; g < ng; ++g) {
        // Row r in bf16 is D/2 dwords, dword j its pair j: transposed into lane r of Qp[g][j].
        std::memset(Qp[g], 0, sizeof Qp[g]);
        uint32_t* lanes = reinterpret_cast<uint32_t*>(Qp[g]);
        const int rows = int(std::min<int64_t>(16, R - (g0 + g) * 16));
        for (int r = 0; r < rows; ++r) {
          const float* row = q + ((g0 + g) * 16 + r) * D;
          for (int z = 0; z < D / 32; ++z) {
            alignas(64) uint32_t pairs[16];
            _mm512_store_si512(pairs, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(row + 32 * z + 16),
                                                                   _mm512_loadu_ps(row + 32 * z)));
            for (int j = 0; j < 16; ++j) lanes[(16 * z + j) * 16 + r] = pairs[j];
          }
        }
      }
      for (int64_t s = lo; s < hi; s += LK) {
        const int nk = int(std::min<int64_t>(LK, hi - s));
        // More passes over this item's slots (over 64 rows) start again at lo.
        const Ahead ahd = ahead(cur, g0 + ng < groups ? cur : next, s);
        const uint16_t* kb = kc + s * D;
        if (nk < LK) {
          std::memset(tail, 0, sizeof tail);
          std::memcpy(tail, kb, sizeof(uint16_t) * nk * D);
          kb = tail;
        }
        interleave(vc, s, nk, Vp, LK / 2);
        for (int64_t g = 0; g < ng; ++g) {
          const int64_t o = (g0 + g) * 16;
          block(Qp[g], int(std::min<int64_t>(16, R - o)), a.qscale, kb, Vp, nk, m + o, l + o, acc + o * D,
                g == 0 ? ahd : Ahead{nullptr, nullptr, 0});
        }
      }
    }
    unpermute(acc, int(R));
  }
};

__attribute__((target(ISA_AVX512BF16))) void items_avx512bf16(const Args& a, int64_t begin, int64_t end) {
  for (int64_t w = begin; w < end; ++w) {
    if (a.dtype != 1) run_items<16>(a, w, w + 1);
    else if (a.d == 64) Bf16<64>::item(a, w, w + 1 == end);
    else Bf16<128>::item(a, w, w + 1 == end);
  }
}
// Bf16::item leaves its sums in dim order.
__attribute__((target(ISA_AVX512BF16))) void merge_avx512bf16(const Args& a, int64_t b, int64_t e) { run_merge<16>(a, b, e, false); }
#endif

#define ISA_AVX512 "avx512f,avx512bw,avx512dq,avx512vl,fma,f16c"
#define ISA_AVX2 "avx2,fma,f16c"
__attribute__((target(ISA_AVX512))) void items_avx512(const Args& a, int64_t b, int64_t e) { run_items<16>(a, b, e); }
__attribute__((target(ISA_AVX512))) void merge_avx512(const Args& a, int64_t b, int64_t e) { run_merge<16>(a, b, e, a.dtype == 1); }
__attribute__((target(ISA_AVX2))) void items_avx2(const Args& a, int64_t b, int64_t e) { run_items<8>(a, b, e); }
__attribute__((target(ISA_AVX2))) void merge_avx2(const Args& a, int64_t b, int64_t e) { run_merge<8>(a, b, e, a.dtype == 1); }
void items_portable(const Args& a, int64_t b, int64_t e) { run_items<4>(a, b, e); }
void merge_portable(const Args& a, int64_t b, int64_t e) { run_merge<4>(a, b, e, a.dtype == 1); }

struct Isa {
  const char* name;
  int lanes;
  void (*items)(const Args&, int64_t, int64_t);
  void (*merge)(const Args&, int64_t, int64_t);
};
const Isa ISAS[] = {
#ifdef MAGICDEC_AVX512BF16
    {"avx512bf16", 16, items_avx512bf16, merge_avx512bf16},
#endif
    {"avx512", 16, items_avx512, merge_avx512},
    {"avx2", 8, items_avx2, merge_avx2},
    {"portable", 4, items_portable, merge_portable},
};

constexpr int NUM_ISAS = sizeof(ISAS) / sizeof(ISAS[0]);

bool supported(int i) {
  const std::string name = ISAS[i].name;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#ifdef MAGICDEC_AVX512BF16
  if (name == "avx512bf16") return avx512 && __builtin_cpu_supports("avx512bf16");
#endif
  if (name == "avx512") return avx512;
  if (name == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
  return name == "portable";
}

std::atomic<int> forced{-1};

int active_isa() {
  const int f = forced.load();
  if (f >= 0) return f;
  static const int best = [] {
    int i = 0;
    while (!supported(i)) ++i;  // the portable path, last, is always supported
    return i;
  }();
  return best;
}

// Selects the kernel's instruction set ("auto" = the best this CPU has); returns the one in use.
std::string set_isa(std::string isa) {
  if (isa == "auto") {
    forced = -1;
  } else if (!isa.empty()) {
    int i = 0;
    while (i < NUM_ISAS && isa != ISAS[i].name) ++i;
    std::string names;
    for (const Isa& x : ISAS) names += std::string(", ") + x.name;
    TORCH_CHECK(i < NUM_ISAS, "unknown kernel ISA '", isa, "'; choose auto", names);
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
  const at::Tensor qf = q.to(at::kFloat).contiguous();
  const at::Tensor kc = k_cache.contiguous(), vc = v_cache.contiguous();
  at::Tensor knf, vnf;
  if (k_new) {
    knf = k_new->to(at::kFloat).contiguous();
    vnf = v_new->to(at::kFloat).contiguous();
  }
  // Split the slots across threads when there are fewer (row, head) pairs than ~4 per thread.
  const int64_t threads = at::get_num_threads();
  int64_t splits = std::max<int64_t>(1, std::min((4 * threads + B * kv - 1) / (B * kv), longest / MIN_SPLIT));
  // As many items per thread: a prefill row's 3 heads on 2 threads split 4 ways (6 + 6 items), not 3
  // (5 + 4).
  while ((B * kv * splits) % threads && splits < longest / MIN_SPLIT) ++splits;
  const int64_t chunk = std::max<int64_t>(1, (longest + splits - 1) / splits);
  const int64_t Rp = (R + isa.lanes - 1) / isa.lanes * isa.lanes;
  at::Tensor state = at::empty({B * kv * splits * Rp * (d + 2)}, q.options().dtype(at::kFloat));
  at::Tensor out = at::empty({B, kv, R, d}, q.options().dtype(at::kFloat));
  float* sp = state.data_ptr<float>();
  const int64_t n = B * kv * splits * Rp;
  Args a{qf.data_ptr<float>(), float(scale * M_LOG2E), kc.data_ptr(), vc.data_ptr(), visible.data(),
         k_new ? knf.data_ptr<float>() : nullptr, k_new ? vnf.data_ptr<float>() : nullptr,
         sp, sp + n, sp + 2 * n, out.data_ptr<float>(),
         B, kv, R, S, k_new ? knf.size(2) : 1, d, splits, chunk, Rp, (Rp + MERGE_ROWS - 1) / MERGE_ROWS,
         kc.scalar_type() == at::kFloat ? 0 : kc.scalar_type() == at::kBFloat16 ? 1 : 2};
  at::parallel_for(0, B * kv * splits, 1, [&](int64_t b, int64_t e) { isa.items(a, b, e); });
  at::parallel_for(0, B * kv * a.merge_parts, 1, [&](int64_t b, int64_t e) { isa.merge(a, b, e); });
  return out.scalar_type() == q.scalar_type() ? out : out.to(q.scalar_type());
}

at::Tensor attention_meta(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& lengths, const c10::optional<at::Tensor>& k_new,
                          const c10::optional<at::Tensor>& v_new, double scale) {
  check_inputs(q, k_cache, v_cache, lengths, k_new, v_new);
  return at::empty_like(q, at::MemoryFormat::Contiguous);
}

}  // namespace

// The instruction set the package's CPU ops run: linear.cpp's float32 path follows the attention
// kernel's choice, so a forced one (set_isa, MAGICDEC_KERNEL_ISA) applies to both.
namespace magicdec {
const char* kernel_isa() { return ISAS[active_isa()].name; }
}  // namespace magicdec

TORCH_LIBRARY(magicdec, m) {
  m.def("attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor lengths, Tensor? k_new, Tensor? v_new, float scale) -> Tensor");
  m.def("set_isa(str isa) -> str", &set_isa);
}

TORCH_LIBRARY_IMPL(magicdec, CPU, m) { m.impl("attention", attention_cpu); }
TORCH_LIBRARY_IMPL(magicdec, Meta, m) { m.impl("attention", attention_meta); }
