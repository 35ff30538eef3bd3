// torch.ops.magicdec.linear and torch.ops.magicdec.linear_q8: y = x W^T, the first for bfloat16
// activations and weights on CPUs with AVX512-BF16 or float32 ones on CPUs with AVX2 and FMA, the
// second for int8 weights: float32 activations on CPUs with AVX512-VNNI or (a slower path) AVX2,
// bfloat16 ones on CPUs with AVX512-VNNI and AVX512-BF16.
//
// Semantics (the specifications and test oracles are torch.nn.functional.linear and
// magicdec_rt/linear.py: q8_reference, which also packs the weights):
//   linear(x, packed, n)
//     x       [..., K] bfloat16 (K even) or float32
//     packed  [ceil(N/32), K/P, 32, P] in x's dtype, P = 2 for bfloat16, 1 for float32: W [N, K] in
//             blocks of 32 output features, each K pair (bf16) or value (float32) of a feature side
//             by side (features past N are zero)
//     returns [..., N] in x's dtype: float32 sums of exact products (bf16: rounded once), summed
//             in the order of K.
//   linear_q8(x, packed, scale, wsum, n)
//     x       [..., K] bfloat16 or float32, K a multiple of 4; each row is quantized here to int8 with its own
//             scale amax / 127 (round to nearest even), held as unsigned bytes q + 128 (AVX2 path: q)
//     packed  [ceil(N/32), K/4, 32, 4] int8: the int8 weights W8 [N, K] in blocks of 32 features,
//             each K quad of a feature side by side
//     scale   [32 ceil(N/32)] float32, per feature; wsum [32 ceil(N/32)] int32, sum_k W8[n, k]
//     returns [..., N] in x's dtype: float(sum_k (q[k] + 128) W8[n, k] - 128 wsum[n]) * x_scale * scale[n].
//
// Why a kernel: decoding multiplies 16-64 rows (the batch, times gamma + 1 in a verify) by every
// weight matrix, and oneDNN's bf16 GEMM ran those at 20-25 GB/s of weights here (M = 16), well below
// what vdpbf16ps can do. The tile here keeps up to 12 rows x 32 features of sums in registers; per
// step of K (a pair in bf16, a quad in int8: 128 bytes of the block either way) it loads 2 vectors of
// weights and broadcasts 4 bytes of x per row, so each weight byte loaded serves up to 12 rows.
// Threads split the feature blocks. The int8 form (used by the draft step: its weights need not be
// the target's) reads half the bytes and does twice the products per instruction (vpdpbusd).
// float32 (engines on CPUs without native bf16) is the same tile with one FMA per K value; MKL's
// sgemm ran 8-12 GB/s of weights at M = 16 on the AVX512-BF16 EPYC (64-98 GFLOP/s, AVX2 or
// AVX-512) and ~145 GFLOP/s at M = 80. On CPUs without AVX-512, an AVX2 tile (6 rows x 16 features,
// the block's two halves one after the other) does the same sums in the same order.
// Blocks of 32 features, not 64 (6-row tiles): a block (32 x 576 x 2 bytes) stays in L1 for the
// batch's second tile, the K/V projections (192 features) split evenly over 2 threads (64-feature
// blocks: 2 + 1), and 16 rows are 2 tiles of 8. On the AVX512-BF16 EPYC, 30 layers' linears
// from memory (bench/linears.py): M = 16 6.33-6.84 -> 5.24-5.44 ms, M = 64 15.9-16.2 -> 14.1-14.7 ms.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

namespace magicdec {
const char* kernel_isa();  // attention.cpp
}

namespace {

constexpr int NB = 32;       // output features per block
constexpr int STEP = 4 * NB; // bytes of a block per step of K

// What a step of K multiplies: a bf16 pair, an int8 quad or a float32 value per feature and row.
enum class Kind { Bf16, Q8, F32 };

// How the int8 form's epilogue turns a feature's sums into outputs: x rows' scales, the features'.
struct Dequant {
  const float* row_scale;  // [M]
  const float* scale;      // [blocks * NB]
  const int32_t* wsum;     // [blocks * NB]
};

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 10
#include <immintrin.h>
#define TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx512vnni")))
#define INLINE inline __attribute__((always_inline))

constexpr int NV = NB / 16;  // weight vectors per step of K

// Tile i of a block's nt tiles prefetches the i-th of nt interleaved shares of the thread's next
// block (`next`, or null): its step p fetches the next block's step (i * steps + p) / nt when nt
// divides i * steps + p; phase and step are counted along (a division per step cost ~1.5%).
struct NextBlock {
  const char* next;
  int64_t nt, phase, ahead;
  NextBlock(const char* next, int64_t i, int64_t steps, int64_t nt)
      : next(next), nt(nt), phase(i * steps % nt), ahead((i * steps + nt - 1) / nt) {}
  INLINE void step() {
    const bool fetch = phase == 0;
    if (++phase == nt) phase = 0;
    if (next && fetch) {
      const char* np = next + ahead++ * STEP;
      _mm_prefetch(np, _MM_HINT_T0);
      _mm_prefetch(np + 64, _MM_HINT_T0);
    }
  }
};
constexpr int MR = 12;       // most rows per tile: 12 x 2 accumulators + 2 weight vectors + 1 broadcast

// Rows [0, R) (R <= MR) of x (4 bytes per row and step: a bf16 pair, 4 quantized bytes or a float;
// row stride ldx bytes) times one packed block of NB features over `steps` steps of K, into y (row
// stride ldy); only the first `cols` features are stored (the float32 form uses AVX-512F and BW/VL
// masks only, so it also runs without AVX512-BF16 and VNNI). Each tile prefetches its share of the
// thread's next block (NextBlock), so the next weights stream in while every tile of this block
// computes (one tile prefetching it all overlapped the reads with only that tile; measured with
// 64-feature blocks, 30 layers' linears at M = 16 from memory: 7.7 -> 7.0 ms spread out).
template <int R, Kind KIND, typename Out>
TARGET INLINE void tile(const char* x, int64_t ldx, int64_t steps, const char* w, Out* y, int64_t ldy, int cols,
                        const char* next, int64_t i, int64_t nt, const Dequant& dq, int64_t row0, int64_t col0) {
  constexpr bool Q8 = KIND == Kind::Q8;
  using Sum = std::conditional_t<Q8, __m512i, __m512>;  // int32 or float32 sums
  Sum c[R][NV];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) c[r][j] = Sum{};
  NextBlock prefetch(next, i, steps, nt);
  for (int64_t p = 0; p < steps; ++p) {
    const char* wp = w + p * STEP;
    prefetch.step();
    __m512i v[NV];
    for (int j = 0; j < NV; ++j) v[j] = _mm512_loadu_si512(wp + 64 * j);
    for (int r = 0; r < R; ++r) {
      int32_t four;
      std::memcpy(&four, x + r * ldx + 4 * p, sizeof four);
      const __m512i b = _mm512_set1_epi32(four);
      for (int j = 0; j < NV; ++j) {
        if constexpr (Q8)
          c[r][j] = _mm512_dpbusd_epi32(c[r][j], b, v[j]);
        else if constexpr (KIND == Kind::Bf16)
          c[r][j] = _mm512_dpbf16_ps(c[r][j], (__m512bh)v[j], (__m512bh)b);
        else
          c[r][j] = _mm512_fmadd_ps(_mm512_castsi512_ps(v[j]), _mm512_castsi512_ps(b), c[r][j]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) {
      const int left = cols - 16 * j;
      if (left <= 0) break;
      __m512 out;
      if constexpr (!Q8) {
        out = c[r][j];
      } else {
        const int64_t f = col0 + 16 * j;
        const __m512i offset = _mm512_slli_epi32(_mm512_loadu_si512(dq.wsum + f), 7);  // 128 wsum
        out = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(c[r][j], offset)),
                                          _mm512_set1_ps(dq.row_scale[row0 + r])),
                            _mm512_loadu_ps(dq.scale + f));
      }
      const __mmask16 keep = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
      if constexpr (std::is_same_v<Out, float>)
        _mm512_mask_storeu_ps(y + r * ldy + 16 * j, keep, out);
      else
        _mm256_mask_storeu_epi16(y + r * ldy + 16 * j, keep, (__m256i)_mm512_cvtneps_pbh(out));
    }
}

// f(std::integral_constant<int, rows>{}) for 1 <= rows <= MAX: a tile's rows must be a compile-time
// constant for its sums to stay in registers.
template <int MAX, typename F>
INLINE void with_rows(int64_t rows, F&& f) {
  if constexpr (MAX > 1)
    if (rows < MAX) return with_rows<MAX - 1>(rows, f);
  f(std::integral_constant<int, MAX>{});
}

template <Kind KIND, typename Out>
TARGET void blocks(const char* x, int64_t M, int64_t ldx, const char* w, Out* y, int64_t N, const Dequant& dq,
                   int64_t begin, int64_t end) {
  const int64_t steps = ldx / 4;
  for (int64_t nb = begin; nb < end; ++nb) {
    const char* wb = w + nb * steps * STEP;
    const int cols = int(std::min<int64_t>(NB, N - nb * NB));
    const int64_t nt = (M + MR - 1) / MR;
    const char* next = nb + 1 < end ? wb + steps * STEP : nullptr;
    // nt tiles of near-equal rows (M = 16: 8 + 8, not 12 + 4, whose 8 sums would wait on each other).
    for (int64_t i = 0, m = 0; i < nt; ++i) {
      const int64_t rows = (M - m) / (nt - i);
      const char* xm = x + m * ldx;
      Out* ym = y + m * N + nb * NB;
      with_rows<MR>(rows, [&](auto r) TARGET {
        tile<decltype(r)::value, KIND, Out>(xm, ldx, steps, wb, ym, N, cols, next, i, nt, dq, m, nb * NB);
      });
      m += rows;
    }
  }
}

// float32 on CPUs with AVX2 and FMA (16 ymm registers): rows [0, R) (R <= MR2) of x times half h
// (features 16h .. 16h + 15) of a packed block, summed in the order of K as the AVX-512 tile does;
// prefetching as there, tile i of nt fetching its share of the next block.
#define TARGET_AVX2 __attribute__((target("avx2,fma")))
constexpr int MR2 = 6;  // 6 x 2 accumulators + 2 weight vectors + 1 broadcast

template <int R>
TARGET_AVX2 INLINE void tile_avx2(const float* x, int64_t K, const char* w, int h, float* y, int64_t ldy, int cols,
                                  const char* next, int64_t i, int64_t nt) {
  __m256 c[R][2];
  for (int r = 0; r < R; ++r) c[r][0] = c[r][1] = _mm256_setzero_ps();
  NextBlock prefetch(next, i, K, nt);
  for (int64_t p = 0; p < K; ++p) {
    const float* wp = reinterpret_cast<const float*>(w + p * STEP) + 16 * h;
    prefetch.step();
    const __m256 v0 = _mm256_loadu_ps(wp), v1 = _mm256_loadu_ps(wp + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 b = _mm256_broadcast_ss(x + r * K + p);
      c[r][0] = _mm256_fmadd_ps(v0, b, c[r][0]);
      c[r][1] = _mm256_fmadd_ps(v1, b, c[r][1]);
    }
  }
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 2; ++j) {
      const int left = cols - 16 * h - 8 * j;
      if (left <= 0) break;
      float* out = y + r * ldy + 16 * h + 8 * j;
      if (left >= 8)
        _mm256_storeu_ps(out, c[r][j]);
      else
        _mm256_maskstore_ps(out, _mm256_cmpgt_epi32(_mm256_set1_epi32(left), lane), c[r][j]);
    }
}

TARGET_AVX2 void blocks_avx2(const float* x, int64_t M, int64_t K, const char* w, float* y, int64_t N, int64_t begin,
                             int64_t end) {
  for (int64_t nb = begin; nb < end; ++nb) {
    const char* wb = w + nb * K * STEP;
    const int cols = int(std::min<int64_t>(NB, N - nb * NB));
    const int64_t halves = cols > 16 ? 2 : 1, rt = (M + MR2 - 1) / MR2, nt = halves * rt;
    const char* next = nb + 1 < end ? wb + K * STEP : nullptr;
    for (int h = 0; h < halves; ++h)
      for (int64_t i = 0, m = 0; i < rt; ++i) {
        const int64_t rows = (M - m) / (rt - i);
        const float* xm = x + m * K;
        float* ym = y + m * N + nb * NB;
        with_rows<MR2>(rows, [&](auto r) TARGET_AVX2 {
          tile_avx2<decltype(r)::value>(xm, K, wb, h, ym, N, cols, next, h * rt + i, nt);
        });
        m += rows;
      }
  }
}

// int8 on CPUs with AVX2 but no AVX512-VNNI: x quantized to signed bytes q (not q + 128: vpmaddubsw
// would saturate), multiplied by vpmaddubsw as |w| times q with w's sign (a pair sum is at most
// 2 * 127 * 127 < 2^15, so exact) and widened to int32 by vpmaddwd against ones. The int32 sums
// are sum_k q[k] W8[n, k] exactly, the same integers the VNNI tile gets; the epilogue is the same
// float32 arithmetic, so both paths give equal outputs. Rows [0, R) of x times half h of a block,
// prefetching as tile_avx2. 4 rows: 8 sums, 2 weight vectors and their absolute values, ones and
// the broadcast fit in 16 registers.
constexpr int MRQ = 4;

template <int R>
TARGET_AVX2 INLINE void tile_q8_avx2(const int8_t* x, int64_t K, const char* w, int h, float* y, int64_t ldy,
                                     int cols, const char* next, int64_t i, int64_t nt, const Dequant& dq,
                                     int64_t row0, int64_t col0) {
  __m256i c[R][2];
  for (int r = 0; r < R; ++r) c[r][0] = c[r][1] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t steps = K / 4;
  NextBlock prefetch(next, i, steps, nt);
  for (int64_t p = 0; p < steps; ++p) {
    const char* wp = w + p * STEP + 64 * h;
    prefetch.step();
    const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp));
    const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + 32));
    const __m256i a0 = _mm256_abs_epi8(v0), a1 = _mm256_abs_epi8(v1);
    for (int r = 0; r < R; ++r) {
      int32_t four;
      std::memcpy(&four, x + r * K + 4 * p, sizeof four);
      const __m256i b = _mm256_set1_epi32(four);
      c[r][0] = _mm256_add_epi32(c[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(a0, _mm256_sign_epi8(b, v0)), ones));
      c[r][1] = _mm256_add_epi32(c[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(a1, _mm256_sign_epi8(b, v1)), ones));
    }
  }
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 2; ++j) {
      const int left = cols - 16 * h - 8 * j;
      if (left <= 0) break;
      const int64_t f = col0 + 16 * h + 8 * j;
      const __m256 out = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(c[r][j]), _mm256_set1_ps(dq.row_scale[row0 + r])),
                                       _mm256_loadu_ps(dq.scale + f));
      float* o = y + r * ldy + 16 * h + 8 * j;
      if (left >= 8)
        _mm256_storeu_ps(o, out);
      else
        _mm256_maskstore_ps(o, _mm256_cmpgt_epi32(_mm256_set1_epi32(left), lane), out);
    }
}

TARGET_AVX2 void blocks_q8_avx2(const int8_t* x, int64_t M, int64_t K, const char* w, float* y, int64_t N,
                                const Dequant& dq, int64_t begin, int64_t end) {
  for (int64_t nb = begin; nb < end; ++nb) {
    const char* wb = w + nb * K / 4 * STEP;
    const int cols = int(std::min<int64_t>(NB, N - nb * NB));
    const int64_t halves = cols > 16 ? 2 : 1, rt = (M + MRQ - 1) / MRQ, nt = halves * rt;
    const char* next = nb + 1 < end ? wb + K / 4 * STEP : nullptr;
    for (int h = 0; h < halves; ++h)
      for (int64_t i = 0, m = 0; i < rt; ++i) {
        const int64_t rows = (M - m) / (rt - i);
        with_rows<MRQ>(rows, [&](auto r) TARGET_AVX2 {
          tile_q8_avx2<decltype(r)::value>(x + m * K, K, wb, h, y + m * N + nb * NB, N, cols, next, h * rt + i, nt, dq,
                                           m, nb * NB);
        });
        m += rows;
      }
  }
}

// float32 rows of x [M, K] (K a multiple of 4) to signed bytes q as quantize below makes them (q + 128
// there), with AVX2: the same float32 products and round-half-even conversion.
TARGET_AVX2 void quantize_avx2(const float* x, int64_t M, int64_t K, int8_t* q, float* row_scale) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i low_bytes = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                             0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * K;
    __m256 amax = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) amax = _mm256_max_ps(amax, _mm256_and_ps(_mm256_loadu_ps(row + k), absmask));
    float a = 0.f;
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, amax);
    for (float v : lanes) a = std::max(a, v);
    for (int64_t t = k; t < K; ++t) a = std::max(a, std::fabs(row[t]));
    const float inv = a > 0.f ? 127.f / a : 0.f;
    row_scale[m] = a / 127.f;
    const __m256 vinv = _mm256_set1_ps(inv);
    for (k = 0; k + 8 <= K; k += 8) {
      __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(row + k), vinv));  // MXCSR: nearest even
      v = _mm256_min_epi32(_mm256_max_epi32(v, _mm256_set1_epi32(-127)), _mm256_set1_epi32(127));
      v = _mm256_shuffle_epi8(v, low_bytes);
      const int32_t lo = _mm256_extract_epi32(v, 0), hi = _mm256_extract_epi32(v, 4);
      std::memcpy(q + m * K + k, &lo, 4);
      std::memcpy(q + m * K + k + 4, &hi, 4);
    }
    for (int64_t t = k; t < K; ++t)
      q[m * K + t] = int8_t(std::min(127.f, std::max(-127.f, std::nearbyint(row[t] * inv))));
  }
}

TARGET INLINE __m512 load16(const uint16_t* p, __mmask16 keep) {  // bf16
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(keep, p)), 16));
}
TARGET INLINE __m512 load16(const float* p, __mmask16 keep) { return _mm512_maskz_loadu_ps(keep, p); }

// Rows of x [M, K] (bf16 or float32, K a multiple of 4) to bytes q + 128, q = round_half_even(x * (127 / amax))
// clamped to +-127, and each row's scale amax / 127 (a row of zeros: all q 0, scale 0).
template <typename In>
TARGET void quantize(const In* x, int64_t M, int64_t K, uint8_t* q, float* row_scale) {
  for (int64_t m = 0; m < M; ++m) {
    const In* row = x + m * K;
    __m512 amax = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 keep = K - k >= 16 ? __mmask16(0xffff) : __mmask16((1u << (K - k)) - 1);
      amax = _mm512_max_ps(amax, _mm512_abs_ps(load16(row + k, keep)));
    }
    const float a = _mm512_reduce_max_ps(amax);
    const float inv = a > 0.f ? 127.f / a : 0.f;
    row_scale[m] = a / 127.f;
    const __m512 vinv = _mm512_set1_ps(inv);
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 keep = K - k >= 16 ? __mmask16(0xffff) : __mmask16((1u << (K - k)) - 1);
      __m512i v = _mm512_cvt_roundps_epi32(_mm512_mul_ps(load16(row + k, keep), vinv),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      v = _mm512_add_epi32(_mm512_min_epi32(_mm512_max_epi32(v, _mm512_set1_epi32(-127)), _mm512_set1_epi32(127)),
                           _mm512_set1_epi32(128));
      _mm512_mask_cvtepi32_storeu_epi8(q + m * K + k, keep, v);
    }
  }
}

// AVX512-BF16 for bf16 products or outputs, AVX512-VNNI for int8 products.
bool supported(bool bf16, bool q8) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         (!bf16 || __builtin_cpu_supports("avx512bf16")) && (!q8 || __builtin_cpu_supports("avx512vnni"));
}
bool supported_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#else
bool supported(bool, bool) { return false; }
bool supported_avx2() { return false; }
#endif

std::vector<int64_t> out_sizes(const at::Tensor& x, int64_t n) {
  auto sizes = x.sizes().vec();
  sizes.back() = n;
  return sizes;
}

void check(const at::Tensor& x, const at::Tensor& packed, int64_t n, bool q8) {
  const int per = q8 ? 4 : x.scalar_type() == at::kFloat ? 1 : 2;  // K values per step
  if (q8) {
    TORCH_CHECK((x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat) && packed.scalar_type() == at::kChar,
                "linear_q8: x must be bfloat16 or float32 and the packed weights int8");
  } else {
    TORCH_CHECK((x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat) &&
                    packed.scalar_type() == x.scalar_type(),
                "linear: x and the packed weights must be both bfloat16 or both float32");
  }
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) % per == 0, "linear: x must be [..., K] with K a multiple of ", per,
              ", got ", x.sizes());
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == NB && packed.size(3) == per && packed.size(1) * per == x.size(-1) &&
                  n >= 1 && packed.size(0) == (n + NB - 1) / NB,
              "linear: packed weights ", packed.sizes(), " do not hold ", n, " features of K = ", x.size(-1));
}

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& packed, int64_t n) {
  check(x, packed, n, false);
  const bool f32 = x.scalar_type() == at::kFloat;
  // float32: the AVX-512 tile unless the CPU ops were forced to a narrower instruction set.
  const std::string isa = magicdec::kernel_isa();
  const bool avx512 = supported(!f32, false) && (!f32 || isa == "avx512bf16" || isa == "avx512");
  TORCH_CHECK(avx512 || (f32 && supported_avx2()), f32 ? "linear: this CPU has no AVX2 and FMA" : "linear: this CPU has no AVX512-BF16",
              "; use torch.nn.functional.linear");
  const at::Tensor xc = x.contiguous(), wc = packed.contiguous();
  const int64_t K = x.size(-1), M = x.numel() / K;
  at::Tensor y = at::empty(out_sizes(x, n), x.options());
#ifdef TARGET
  const auto* xp = static_cast<const char*>(xc.data_ptr());
  const auto* wp = static_cast<const char*>(wc.data_ptr());
  const Dequant none{};
  if (!f32) {
    auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
    at::parallel_for(0, packed.size(0), 1,
                     [&](int64_t b, int64_t e) { blocks<Kind::Bf16, uint16_t>(xp, M, 2 * K, wp, yp, n, none, b, e); });
  } else if (avx512) {
    auto* yp = y.data_ptr<float>();
    at::parallel_for(0, packed.size(0), 1,
                     [&](int64_t b, int64_t e) { blocks<Kind::F32, float>(xp, M, 4 * K, wp, yp, n, none, b, e); });
  } else {
    const float* xf = xc.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, packed.size(0), 1, [&](int64_t b, int64_t e) { blocks_avx2(xf, M, K, wp, yp, n, b, e); });
  }
#endif
  return y;
}

at::Tensor linear_q8_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                         const at::Tensor& wsum, int64_t n) {
  check(x, packed, n, true);
  const int64_t padded = packed.size(0) * NB;
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.size(0) == padded &&
                  wsum.scalar_type() == at::kInt && wsum.dim() == 1 && wsum.size(0) == padded,
              "linear_q8: scale must be float32 and wsum int32, both [", padded, "]");
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  // float32: the VNNI tile unless the CPU ops were forced to a narrower instruction set.
  const std::string isa = magicdec::kernel_isa();
  const bool vnni = supported(bf16, true) && (bf16 || isa == "avx512bf16" || isa == "avx512");
  TORCH_CHECK(vnni || (!bf16 && supported_avx2()),
              bf16 ? "linear_q8: this CPU has no AVX512-VNNI and AVX512-BF16" : "linear_q8: this CPU has no AVX2",
              "; use the layer's own weights");
  const at::Tensor xc = x.contiguous(), wc = packed.contiguous(), sc = scale.contiguous(), ws = wsum.contiguous();
  const int64_t K = x.size(-1), M = x.numel() / K;
  at::Tensor y = at::empty(out_sizes(x, n), x.options());
  // Each row quantized once, as q8_reference does (a few microseconds at the draft's 16 rows).
  at::Tensor xq = at::empty({M, K}, x.options().dtype(at::kByte));
  at::Tensor row_scale = at::empty({M}, x.options().dtype(at::kFloat));
  auto* qs = xq.data_ptr<uint8_t>();
  auto* rs = row_scale.data_ptr<float>();
#ifdef TARGET
  const auto* wp = static_cast<const char*>(wc.data_ptr());
  const auto* xp = reinterpret_cast<const char*>(qs);
  const Dequant dq{rs, sc.data_ptr<float>(), ws.data_ptr<int32_t>()};
  if (bf16) {
    quantize(reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()), M, K, qs, rs);
    auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
    at::parallel_for(0, packed.size(0), 1, [&](int64_t b, int64_t e) { blocks<Kind::Q8>(xp, M, K, wp, yp, n, dq, b, e); });
  } else if (vnni) {
    quantize(xc.data_ptr<float>(), M, K, qs, rs);
    auto* yp = y.data_ptr<float>();
    at::parallel_for(0, packed.size(0), 1, [&](int64_t b, int64_t e) { blocks<Kind::Q8>(xp, M, K, wp, yp, n, dq, b, e); });
  } else {
    auto* q = reinterpret_cast<int8_t*>(qs);
    quantize_avx2(xc.data_ptr<float>(), M, K, q, rs);
    auto* yp = y.data_ptr<float>();
    at::parallel_for(0, packed.size(0), 1, [&](int64_t b, int64_t e) { blocks_q8_avx2(q, M, K, wp, yp, n, dq, b, e); });
  }
#endif
  return y;
}

at::Tensor linear_meta(const at::Tensor& x, const at::Tensor& packed, int64_t n) {
  check(x, packed, n, false);
  return at::empty(out_sizes(x, n), x.options());
}

at::Tensor linear_q8_meta(const at::Tensor& x, const at::Tensor& packed, const at::Tensor&, const at::Tensor&,
                          int64_t n) {
  check(x, packed, n, true);
  return at::empty(out_sizes(x, n), x.options());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(magicdec, m) {
  m.def("linear(Tensor x, Tensor packed, int n) -> Tensor");
  m.def("linear_q8(Tensor x, Tensor packed, Tensor scale, Tensor wsum, int n) -> Tensor");
}
TORCH_LIBRARY_IMPL(magicdec, CPU, m) {
  m.impl("linear", linear_cpu);
  m.impl("linear_q8", linear_q8_cpu);
}
TORCH_LIBRARY_IMPL(magicdec, Meta, m) {
  m.impl("linear", linear_meta);
  m.impl("linear_q8", linear_q8_meta);
}
