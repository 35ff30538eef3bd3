// torch.ops.magicdec.linear: y = x W^T for bfloat16 activations and weights on CPUs with AVX512-BF16.
//
// Semantics (the specification and test oracle is torch.nn.functional.linear; magicdec_rt/linear.py
// packs the weights):
//   x       [..., K] bfloat16, K even
//   packed  [ceil(N/32), K/2, 32, 2] bfloat16: W [N, K] in blocks of 32 output features, each K
//           pair of a feature side by side (rows past N are zero)
//   n       N
// Returns [..., N] bfloat16: float32 sums of exact bf16 products, rounded once.
//
// Why a kernel: decoding multiplies 16-64 rows (the batch, times gamma + 1 in a verify) by every
// weight matrix, and oneDNN's bf16 GEMM ran those at 20-25 GB/s of weights here (M = 16), well below
// what vdpbf16ps can do. The tile here keeps up to 12 rows x 32 features of float32 sums in
// registers; per K pair it loads 2 vectors of weights and broadcasts one x pair per row, so each
// weight byte loaded serves up to 12 rows. Threads split the feature blocks.
// Blocks of 32 features, not 64 (6-row tiles): a block (32 x 576 x 2 bytes) stays in L1 for the
// batch's second tile, the K/V projections (192 features) split evenly over 2 threads (64-feature
// blocks: 2 + 1), and 16 rows are 2 tiles of 8. On the AVX512-BF16 EPYC, 30 layers' linears
// from memory (bench/linears.py): M = 16 6.33-6.84 -> 5.24-5.44 ms, M = 64 15.9-16.2 -> 14.1-14.7 ms.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

namespace {

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 10
#include <immintrin.h>
#define TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))
#define INLINE inline __attribute__((always_inline))

constexpr int NB = 32;       // output features per block
constexpr int NV = NB / 16;  // weight vectors per K pair
constexpr int MR = 12;       // most rows per tile: 12 x 2 accumulators + 2 weight vectors + 1 broadcast

// Rows [0, R) (R <= MR) of x times one packed block of NB features, into y (row stride ldy); only
// the first `cols` features are stored. Tile i of the block's nt tiles prefetches the i-th of nt
// interleaved shares of the thread's next block (`next`, or null), so the next weights stream in
// while every tile of this block computes (one tile prefetching it all overlapped the reads with
// only that tile; measured with 64-feature blocks, 30 layers' linears at M = 16 from memory: 7.7 ->
// 7.0 ms spread out).
template <int R>
TARGET INLINE void tile(const uint16_t* x, int64_t K, const uint16_t* w, uint16_t* y, int64_t ldy, int cols,
                        const char* next, int64_t i, int64_t nt) {
  __m512 c[R][NV];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) c[r][j] = _mm512_setzero_ps();
  // Step p fetches the next block's pair (i * K/2 + p) / nt when nt divides i * K/2 + p; phase and
  // pair are counted along (a division per step cost ~1.5%).
  int64_t phase = i * (K / 2) % nt, pair_ahead = (i * (K / 2) + nt - 1) / nt;
  for (int64_t p = 0; p < K / 2; ++p) {
    const uint16_t* wp = w + p * 2 * NB;
    const bool fetch = phase == 0;
    if (++phase == nt) phase = 0;
    if (next && fetch) {
      const char* np = next + pair_ahead++ * 4 * NB;
      for (int j = 0; j < NV; ++j) _mm_prefetch(np + 64 * j, _MM_HINT_T0);
    }
    __m512bh v[NV];
    for (int j = 0; j < NV; ++j) v[j] = (__m512bh)_mm512_loadu_si512(wp + 32 * j);
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, x + r * K + 2 * p, sizeof pair);
      const __m512bh b = (__m512bh)_mm512_set1_epi32(pair);
      for (int j = 0; j < NV; ++j) c[r][j] = _mm512_dpbf16_ps(c[r][j], v[j], b);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) {
      const int left = cols - 16 * j;
      if (left <= 0) break;
      const __mmask16 keep = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
      _mm256_mask_storeu_epi16(y + r * ldy + 16 * j, keep, (__m256i)_mm512_cvtneps_pbh(c[r][j]));
    }
}

TARGET void blocks(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, uint16_t* y, int64_t N,
                   int64_t begin, int64_t end) {
  for (int64_t nb = begin; nb < end; ++nb) {
    const uint16_t* wb = w + nb * K * NB;
    const int cols = int(std::min<int64_t>(NB, N - nb * NB));
    const int64_t nt = (M + MR - 1) / MR;
    const char* next = nb + 1 < end ? reinterpret_cast<const char*>(wb + K * NB) : nullptr;
    // nt tiles of near-equal rows (M = 16: 8 + 8, not 12 + 4, whose 8 sums would wait on each other).
    for (int64_t i = 0, m = 0; i < nt; ++i) {
      const int64_t rows = (M - m) / (nt - i);
      const uint16_t* xm = x + m * K;
      uint16_t* ym = y + m * N + nb * NB;
      m += rows;
      switch (rows) {
        case 12: tile<12>(xm, K, wb, ym, N, cols, next, i, nt); break;
        case 11: tile<11>(xm, K, wb, ym, N, cols, next, i, nt); break;
        case 10: tile<10>(xm, K, wb, ym, N, cols, next, i, nt); break;
        case 9: tile<9>(xm, K, wb, ym, N, cols, next, i, nt); break;
        case 8: tile<8>(xm, K, wb, ym, N, cols, next, i, nt); break;
        case 7: tile<7>(xm, K, wb, ym, N, cols, next, i, nt); break;
        case 6: tile<6>(xm, K, wb, ym, N, cols, next, i, nt); break;
        case 5: tile<5>(xm, K, wb, ym, N, cols, next, i, nt); break;
        case 4: tile<4>(xm, K, wb, ym, N, cols, next, i, nt); break;
        case 3: tile<3>(xm, K, wb, ym, N, cols, next, i, nt); break;
        case 2: tile<2>(xm, K, wb, ym, N, cols, next, i, nt); break;
        default: tile<1>(xm, K, wb, ym, N, cols, next, i, nt); break;
      }
    }
  }
}

bool supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}
#else
bool supported() { return false; }
#endif

void check(const at::Tensor& x, const at::Tensor& packed, int64_t n) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && packed.scalar_type() == at::kBFloat16,
              "linear: x and the packed weights must be bfloat16");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) % 2 == 0, "linear: x must be [..., K] with K even, got ", x.sizes());
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == NB && packed.size(3) == 2 && packed.size(1) * 2 == x.size(-1) &&
                  n >= 1 && packed.size(0) == (n + NB - 1) / NB,
              "linear: packed weights ", packed.sizes(), " do not hold ", n, " features of K = ", x.size(-1));
}

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& packed, int64_t n) {
  check(x, packed, n);
  TORCH_CHECK(supported(), "linear: this CPU has no AVX512-BF16; use torch.nn.functional.linear");
  const at::Tensor xc = x.contiguous(), wc = packed.contiguous();
  const int64_t K = x.size(-1), M = x.numel() / K;
  auto sizes = x.sizes().vec();
  sizes.back() = n;
  at::Tensor y = at::empty(sizes, x.options());
#ifdef TARGET
  const auto* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  const auto* wp = reinterpret_cast<const uint16_t*>(wc.data_ptr<at::BFloat16>());
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  at::parallel_for(0, packed.size(0), 1, [&](int64_t b, int64_t e) { blocks(xp, M, K, wp, yp, n, b, e); });
#endif
  return y;
}

at::Tensor linear_meta(const at::Tensor& x, const at::Tensor& packed, int64_t n) {
  check(x, packed, n);
  auto sizes = x.sizes().vec();
  sizes.back() = n;
  return at::empty(sizes, x.options());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(magicdec, m) { m.def("linear(Tensor x, Tensor packed, int n) -> Tensor"); }
TORCH_LIBRARY_IMPL(magicdec, CPU, m) { m.impl("linear", linear_cpu); }
TORCH_LIBRARY_IMPL(magicdec, Meta, m) { m.impl("linear", linear_meta); }
