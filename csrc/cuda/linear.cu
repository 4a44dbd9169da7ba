// CUDA kernels of lowrank_ext::linear: y = ((x V) Sᵀ) Uᵀ + bias and its backward.
//
// Two implementations behind one op (backend.h): the default composes cuBLAS GEMMs
// (linear_cublas.cu); the SIMT fused kernels below run when set_cuda_kernels("fused") asks for
// them. They use no tensor cores (scalar FFMA), so they are opt-in until a GPU measurement shows
// a shape where they win.
//
// Design of the fused kernels (every kernel runs 256 threads; every sum is in a fixed order, so
// results are bit-reproducible run to run on one device — no float atomics anywhere):
//   forward       one kernel per tile of BM rows: t = x V stays in shared memory (acc type, i.e.
//                 float, or double for double), then y = t USᵀ + bias is written once.
//                 US = U diag(S) or U S (m × r) is precomputed with ATen in the acc type.
//   backward dy   one pass over row tiles of dy: g = dy U (acc workspace) and per-block column
//                 sums of dy (dbias partials), summed over blocks afterwards.
//   backward dx   one pass over row tiles of g: dt = g S in shared memory, dx = dt Vᵀ written
//                 directly, dt kept in a workspace only when dV is wanted.
//   reductions    dU = dyᵀ z, dV = xᵀ dt, dS = gᵀ t (or Σ g ⊙ t): split over the batch into
//                 fixed chunks, per-chunk partials, then summed over the chunks in order.
// BM (64, 16, 4 or 1 rows) is picked from r so the t tile fits in shared memory; when not even
// one row of t fits (r in the tens of thousands), both directions use the cuBLAS composition.
#include "linear.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

namespace lowrank_ext {
namespace {

constexpr int kThreads = 256;

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
__host__ __device__ constexpr int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Thread layout of a BM-row tile: TY × TX threads, each owning RM rows (ty + i·TY) and CN
// columns (tx + j·TX) of a RC-wide column chunk. Strided ownership keeps a warp's shared-memory
// reads on consecutive banks (or broadcasts). Small BM (large r) widens the chunk instead, and BK
// shrinks with it so the staged M chunk stays at 32 KB (fp32).
template <int BM>
struct TileConfig {
  static constexpr int TY = BM < 16 ? BM : 16;
  static constexpr int TX = kThreads / TY;
  static constexpr int RM = BM / TY;
  static constexpr int CN = 4;
  static constexpr int RC = TX * CN;
  static constexpr int BK = RC <= 256 ? 32 : 8192 / RC;
  static constexpr int XS = BK + 1;  // padded strides: rows of a tile land on different banks
  static constexpr int MS = RC + 1;
  static_assert(TY * RM == BM && TX * TY == kThreads, "bad tile layout");
};

// Row stride of the t tile: the k loop of tile_times_mat_t runs to a multiple of BK, and the
// +1 keeps two rows read by one warp on different banks.
template <int BM>
__host__ __device__ constexpr int64_t tile_ld(int64_t r) {
  return round_up(r, TileConfig<BM>::BK) + 1;
}

template <int BM>
__host__ __device__ constexpr int64_t tile_smem_elems(int64_t r) {
  using Cfg = TileConfig<BM>;
  return BM * tile_ld<BM>(r) + BM * Cfg::XS + Cfg::BK * Cfg::MS;
}

__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char lowrank_ext_smem[];
  return lowrank_ext_smem;
}

// Shared memory of one row tile: T (BM × ldT, the t / g / dt tile), Xs (a BM × BK chunk of the
// streamed input) and Ms (a BK × RC chunk of the small matrix).
template <typename acc_t, int BM>
struct RowTileSmem {
  int ldT;
  acc_t* T;
  acc_t* Xs;
  acc_t* Ms;
  __device__ explicit RowTileSmem(int r) {
    ldT = static_cast<int>(tile_ld<BM>(r));
    T = reinterpret_cast<acc_t*>(dynamic_smem());
    Xs = T + BM * ldT;
    Ms = Xs + BM * TileConfig<BM>::XS;
  }
};

// T[i][c] += Σ_k X[row0 + i][k] · M[k][c] for i < BM, c < ncols, with X (.., K) and M (K, ldm)
// row-major; rows past `rows` read as zero. When colsum is given, colsum[k] += Σ_{i<rows}
// X[row0 + i][k] from the same staged chunk, so the input is read from global memory once.
// T must be zeroed and is complete (synchronized) on return.
template <int BM, typename acc_t, typename x_t, typename m_t>
__device__ void tile_times_mat(const x_t* __restrict__ X, int64_t row0, int rows, int64_t K,
                               const m_t* __restrict__ M, int ldm, int ncols,
                               const RowTileSmem<acc_t, BM>& sm, acc_t* __restrict__ colsum) {
  using Cfg = TileConfig<BM>;
  const int tid = threadIdx.x, tx = tid % Cfg::TX, ty = tid / Cfg::TX;
  for (int64_t k0 = 0; k0 < K; k0 += Cfg::BK) {
    const int kc = static_cast<int>(min64(Cfg::BK, K - k0));
    for (int e = tid; e < BM * Cfg::BK; e += kThreads) {
      const int i = e / Cfg::BK, kk = e % Cfg::BK;
      sm.Xs[i * Cfg::XS + kk] =
          (i < rows && kk < kc) ? static_cast<acc_t>(X[(row0 + i) * K + k0 + kk]) : acc_t(0);
    }
    __syncthreads();
    if (colsum != nullptr && tid < kc) {
      acc_t s = 0;
      for (int i = 0; i < rows; ++i) s += sm.Xs[i * Cfg::XS + tid];
      colsum[k0 + tid] += s;  // this block's own row of partials, always this thread: no race
    }
    for (int c0 = 0; c0 < ncols; c0 += Cfg::RC) {
      for (int e = tid; e < Cfg::BK * Cfg::RC; e += kThreads) {
        const int kk = e / Cfg::RC, c = e % Cfg::RC;
        sm.Ms[kk * Cfg::MS + c] = (kk < kc && c0 + c < ncols)
                                      ? static_cast<acc_t>(M[(k0 + kk) * ldm + c0 + c])
                                      : acc_t(0);
      }
      __syncthreads();
      acc_t acc[Cfg::RM][Cfg::CN] = {};
#pragma unroll
      for (int kk = 0; kk < Cfg::BK; ++kk) {
        acc_t a[Cfg::RM], b[Cfg::CN];
#pragma unroll
        for (int i = 0; i < Cfg::RM; ++i) a[i] = sm.Xs[(ty + i * Cfg::TY) * Cfg::XS + kk];
#pragma unroll
        for (int j = 0; j < Cfg::CN; ++j) b[j] = sm.Ms[kk * Cfg::MS + tx + j * Cfg::TX];
#pragma unroll
        for (int i = 0; i < Cfg::RM; ++i)
#pragma unroll
          for (int j = 0; j < Cfg::CN; ++j) acc[i][j] += a[i] * b[j];
      }
      // T accumulates in shared memory so the input is streamed once whatever r is; each
      // element has a single owner thread, so the read-modify-write needs no barrier.
#pragma unroll
      for (int i = 0; i < Cfg::RM; ++i)
#pragma unroll
        for (int j = 0; j < Cfg::CN; ++j) {
          const int c = c0 + tx + j * Cfg::TX;
          if (c < ncols) sm.T[(ty + i * Cfg::TY) * sm.ldT + c] += acc[i][j];
        }
      __syncthreads();  // Ms is restaged for the next column chunk
    }
    __syncthreads();  // Xs is restaged for the next k chunk (colsum may still read it)
  }
  __syncthreads();  // T is complete, also when K == 0 (zeroed T)
}

// out[row0 + i][c] = Σ_k T[i][k] · M[c][k] (+ bias[c]) for i < rows, c < N, with M (N, r)
// row-major. T's columns [r, ldT - 1) must be zero: they meet the zero padding of Ms.
template <int BM, typename acc_t, typename m_t, typename out_t>
__device__ void tile_times_mat_t(const RowTileSmem<acc_t, BM>& sm, int r,
                                 const m_t* __restrict__ M, int64_t N,
                                 const out_t* __restrict__ bias, out_t* __restrict__ out,
                                 int64_t row0, int rows) {
  using Cfg = TileConfig<BM>;
  const int tid = threadIdx.x, tx = tid % Cfg::TX, ty = tid / Cfg::TX;
  const int rpad = sm.ldT - 1;
  for (int64_t n0 = 0; n0 < N; n0 += Cfg::RC) {
    acc_t acc[Cfg::RM][Cfg::CN] = {};
    for (int k0 = 0; k0 < rpad; k0 += Cfg::BK) {
      // k fastest: coalesced reads along M's rows, and (MS odd) conflict-free transposed stores.
      for (int e = tid; e < Cfg::BK * Cfg::RC; e += kThreads) {
        const int kk = e % Cfg::BK, c = e / Cfg::BK;
        sm.Ms[kk * Cfg::MS + c] = (k0 + kk < r && n0 + c < N)
                                      ? static_cast<acc_t>(M[(n0 + c) * r + k0 + kk])
                                      : acc_t(0);
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < Cfg::BK; ++kk) {
        acc_t a[Cfg::RM], b[Cfg::CN];
#pragma unroll
        for (int i = 0; i < Cfg::RM; ++i) a[i] = sm.T[(ty + i * Cfg::TY) * sm.ldT + k0 + kk];
#pragma unroll
        for (int j = 0; j < Cfg::CN; ++j) b[j] = sm.Ms[kk * Cfg::MS + tx + j * Cfg::TX];
#pragma unroll
        for (int i = 0; i < Cfg::RM; ++i)
#pragma unroll
          for (int j = 0; j < Cfg::CN; ++j) acc[i][j] += a[i] * b[j];
      }
      __syncthreads();  // Ms is restaged next
    }
#pragma unroll
    for (int i = 0; i < Cfg::RM; ++i)
#pragma unroll
      for (int j = 0; j < Cfg::CN; ++j) {
        const int row = ty + i * Cfg::TY;
        const int64_t c = n0 + tx + j * Cfg::TX;
        if (row < rows && c < N) {
          acc_t v = acc[i][j];
          if (bias != nullptr) v += static_cast<acc_t>(bias[c]);
          out[(row0 + row) * N + c] = static_cast<out_t>(v);
        }
      }
  }
}

template <int BM, typename acc_t>
__device__ void zero_tile(const RowTileSmem<acc_t, BM>& sm) {
  for (int e = threadIdx.x; e < BM * sm.ldT; e += kThreads) sm.T[e] = acc_t(0);
}

// out[row0 + i][c] = T[i][c] for i < rows, c < r (out is (batch, r) row-major).
template <int BM, typename acc_t, typename out_t>
__device__ void store_tile(const RowTileSmem<acc_t, BM>& sm, int rows, int r,
                           out_t* __restrict__ out, int64_t row0) {
  for (int e = threadIdx.x; e < rows * r; e += kThreads) {
    const int i = e / r, c = e % r;
    out[(row0 + i) * r + c] = static_cast<out_t>(sm.T[i * sm.ldT + c]);
  }
}

// Row tiles are visited grid-stride, so any batch runs on a grid sized to the device.
template <typename scalar_t, typename acc_t, int BM>
__global__ void __launch_bounds__(kThreads)
    linear_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ V,
                          const acc_t* __restrict__ US, const scalar_t* __restrict__ bias,
                          scalar_t* __restrict__ y, acc_t* __restrict__ t, int64_t batch,
                          int64_t n, int64_t m, int r) {
  const RowTileSmem<acc_t, BM> sm(r);
  const int64_t num_tiles = ceil_div(batch, BM);
  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const int64_t row0 = tile * BM;
    const int rows = static_cast<int>(min64(BM, batch - row0));
    zero_tile(sm);
    tile_times_mat<BM>(x, row0, rows, n, V, r, r, sm, static_cast<acc_t*>(nullptr));
    if (t != nullptr) store_tile<BM>(sm, rows, r, t, row0);
    tile_times_mat_t<BM>(sm, r, US, m, bias, y, row0, rows);
    __syncthreads();  // the next tile zeroes T
  }
}

// g = dy U for a row tile (when g is given) and this block's dbias partial row (when given).
template <typename scalar_t, typename acc_t, int BM>
__global__ void __launch_bounds__(kThreads)
    linear_grad_g_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ U,
                         acc_t* __restrict__ g, acc_t* __restrict__ dbias_partial, int64_t batch,
                         int64_t m, int r) {
  const RowTileSmem<acc_t, BM> sm(r);
  acc_t* colsum =
      dbias_partial == nullptr ? nullptr : dbias_partial + static_cast<int64_t>(blockIdx.x) * m;
  const int64_t num_tiles = ceil_div(batch, BM);
  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const int64_t row0 = tile * BM;
    const int rows = static_cast<int>(min64(BM, batch - row0));
    zero_tile(sm);
    tile_times_mat<BM>(dy, row0, rows, m, U, r, g != nullptr ? r : 0, sm, colsum);
    if (g != nullptr) store_tile<BM>(sm, rows, r, g, row0);
    __syncthreads();  // the next tile zeroes T
  }
}

// dt = g S (diagonal: g ⊙ s) for a row tile; dx = dt Vᵀ and/or dt written when given.
template <typename scalar_t, typename acc_t, int BM, bool kDiag>
__global__ void __launch_bounds__(kThreads)
    linear_grad_x_kernel(const acc_t* __restrict__ g, const acc_t* __restrict__ S,
                         const scalar_t* __restrict__ V, scalar_t* __restrict__ dx,
                         acc_t* __restrict__ dt, int64_t batch, int64_t n, int r) {
  const RowTileSmem<acc_t, BM> sm(r);
  const int64_t num_tiles = ceil_div(batch, BM);
  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const int64_t row0 = tile * BM;
    const int rows = static_cast<int>(min64(BM, batch - row0));
    if constexpr (kDiag) {
      for (int e = threadIdx.x; e < BM * sm.ldT; e += kThreads) {
        const int i = e / sm.ldT, c = e % sm.ldT;
        sm.T[e] = (i < rows && c < r) ? g[(row0 + i) * r + c] * S[c] : acc_t(0);
      }
      __syncthreads();
    } else {
      zero_tile(sm);
      tile_times_mat<BM>(g, row0, rows, r, S, r, r, sm, static_cast<acc_t*>(nullptr));
    }
    if (dt != nullptr) store_tile<BM>(sm, rows, r, dt, row0);
    if (dx != nullptr)
      tile_times_mat_t<BM>(sm, r, V, n, static_cast<const scalar_t*>(nullptr), dx, row0, rows);
    __syncthreads();  // the next tile overwrites T
  }
}

constexpr int kRedP = 64;        // output rows (P) per reduction block
constexpr int kRedRows = 32;     // batch rows staged per step
constexpr int kMinSplitRows = 256;  // fewer rows per split would make the partials dominate

// partial[s][p][q] = Σ_{b in split s} A[b][p] · Bm[b][q], A (batch, P), Bm (batch, Q) row-major.
// A block owns a kRedP × TQ output tile and one batch split; each (s, p, q) has one writer.
template <typename a_t, typename acc_t, int TQ>
__global__ void __launch_bounds__(kThreads)
    batch_outer_kernel(const a_t* __restrict__ A, const acc_t* __restrict__ Bm,
                       acc_t* __restrict__ partial, int64_t batch, int64_t P, int64_t Q,
                       int64_t chunk, int64_t q_tiles) {
  constexpr int CQ = TQ / 16;
  __shared__ acc_t As[kRedRows][kRedP];
  __shared__ acc_t Bs[kRedRows][TQ];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t p0 = static_cast<int64_t>(blockIdx.x / q_tiles) * kRedP;
  const int64_t q0 = static_cast<int64_t>(blockIdx.x % q_tiles) * TQ;
  const int64_t split = blockIdx.y;
  const int64_t b_begin = split * chunk, b_end = min64(batch, b_begin + chunk);
  acc_t acc[kRedP / 16][CQ] = {};
  for (int64_t b0 = b_begin; b0 < b_end; b0 += kRedRows) {
    for (int e = tid; e < kRedRows * kRedP; e += kThreads) {
      const int kb = e / kRedP, p = e % kRedP;
      const int64_t b = b0 + kb;
      As[kb][p] = (b < b_end && p0 + p < P) ? static_cast<acc_t>(A[b * P + p0 + p]) : acc_t(0);
    }
    for (int e = tid; e < kRedRows * TQ; e += kThreads) {
      const int kb = e / TQ, q = e % TQ;
      const int64_t b = b0 + kb;
      Bs[kb][q] = (b < b_end && q0 + q < Q) ? Bm[b * Q + q0 + q] : acc_t(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int kb = 0; kb < kRedRows; ++kb) {
      acc_t a[kRedP / 16], bq[CQ];
#pragma unroll
      for (int i = 0; i < kRedP / 16; ++i) a[i] = As[kb][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < CQ; ++j) bq[j] = Bs[kb][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < kRedP / 16; ++i)
#pragma unroll
        for (int j = 0; j < CQ; ++j) acc[i][j] += a[i] * bq[j];
    }
    __syncthreads();  // As / Bs are restaged next
  }
#pragma unroll
  for (int i = 0; i < kRedP / 16; ++i)
#pragma unroll
    for (int j = 0; j < CQ; ++j) {
      const int64_t p = p0 + ty + 16 * i, q = q0 + tx + 16 * j;
      if (p < P && q < Q) partial[(split * P + p) * Q + q] = acc[i][j];
    }
}

// partial[s][q] = Σ_{b in split s} g[b][q] · t[b][q]: the diagonal core's dS.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    diag_outer_kernel(const acc_t* __restrict__ g, const acc_t* __restrict__ t,
                      acc_t* __restrict__ partial, int64_t batch, int r, int64_t chunk) {
  const int64_t b_begin = static_cast<int64_t>(blockIdx.x) * chunk;
  const int64_t b_end = min64(batch, b_begin + chunk);
  for (int q = threadIdx.x; q < r; q += kThreads) {
    acc_t s = 0;
    for (int64_t b = b_begin; b < b_end; ++b) s += g[b * r + q] * t[b * r + q];
    partial[static_cast<int64_t>(blockIdx.x) * r + q] = s;
  }
}

// out[l] = Σ_s partial[s][l], s in increasing order.
template <typename acc_t, typename out_t>
__global__ void __launch_bounds__(kThreads)
    sum_splits_kernel(const acc_t* __restrict__ partial, out_t* __restrict__ out, int64_t splits,
                      int64_t L) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t l = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; l < L;
       l += stride) {
    acc_t s = 0;
    for (int64_t k = 0; k < splits; ++k) s += partial[k * L + l];
    out[l] = static_cast<out_t>(s);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

struct DeviceLimits {
  int sm_count;
  int max_smem;  // opt-in dynamic shared memory per block
};

// Per-device and per-kernel facts are queried once and kept (a query per call cost more than a
// small launch); a mutex guards the caches, since any host thread may call the op.
std::mutex g_cache_mutex;

int current_device() {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  return device;
}

DeviceLimits device_limits() {
  static std::map<int, DeviceLimits> cache;
  const int device = current_device();
  const std::lock_guard<std::mutex> lock(g_cache_mutex);
  auto found = cache.find(device);
  if (found != cache.end()) return found->second;
  int sms = 0, smem = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return cache.emplace(device, DeviceLimits{sms, smem}).first->second;
}

// Resident blocks per SM of `kernel` with `smem` bytes of dynamic shared memory. The kernel's
// dynamic shared-memory limit is raised once per device to the device's maximum, never set to a
// call's own size: the attribute is process-wide, and a smaller value set by one call (or one
// host thread) would make another's larger launch, or a CUDA graph captured earlier, fail.
int blocks_per_sm(const void* kernel, int64_t smem, const DeviceLimits& lim) {
  static std::map<std::pair<int, const void*>, bool> raised;
  static std::map<std::tuple<int, const void*, int64_t>, int> occupancy;
  const int device = current_device();
  const std::lock_guard<std::mutex> lock(g_cache_mutex);
  auto found = occupancy.find({device, kernel, smem});
  if (found != occupancy.end()) return found->second;
  if (!raised[{device, kernel}]) {
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, lim.max_smem));
    raised[{device, kernel}] = true;
  }
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads,
                                                               static_cast<size_t>(smem)));
  occupancy[{device, kernel, smem}] = per_sm;
  return per_sm;
}

at::ScalarType acc_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// Largest tile height whose shared memory stays under a soft budget (so two blocks share an SM
// and one's loads overlap the other's math), else the largest that fits at all, else 0.
int pick_tile_rows(int64_t r, size_t acc_size, int max_smem) {
  const int64_t soft = std::min<int64_t>(96 * 1024, max_smem);
  const int64_t bytes[4] = {
      tile_smem_elems<64>(r) * static_cast<int64_t>(acc_size),
      tile_smem_elems<16>(r) * static_cast<int64_t>(acc_size),
      tile_smem_elems<4>(r) * static_cast<int64_t>(acc_size),
      tile_smem_elems<1>(r) * static_cast<int64_t>(acc_size)};
  const int rows[4] = {64, 16, 4, 1};
  for (int i = 0; i < 4; ++i)
    if (bytes[i] <= soft) return rows[i];
  for (int i = 0; i < 4; ++i)
    if (bytes[i] <= max_smem) return rows[i];
  return 0;
}

template <typename F>
void dispatch_tile_rows(int bm, F&& f) {
  switch (bm) {
    case 64: f(std::integral_constant<int, 64>{}); break;
    case 16: f(std::integral_constant<int, 16>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 1: f(std::integral_constant<int, 1>{}); break;
    default: TORCH_INTERNAL_ASSERT(false, "lowrank_ext: unsupported tile height ", bm);
  }
}

// One wave of resident blocks; the kernels loop over the remaining tiles. The size depends only
// on the device and kernel, so the dbias partials are summed in the same order every run.
template <typename Kernel>
int row_tile_grid(Kernel* kernel, int64_t smem, int64_t num_tiles, const DeviceLimits& lim) {
  const int per_sm = blocks_per_sm(reinterpret_cast<const void*>(kernel), smem, lim);
  TORCH_CHECK(per_sm > 0, "lowrank_ext.linear: a ", smem,
              "-byte shared-memory tile cannot be scheduled on this device");
  return static_cast<int>(min64(num_tiles, static_cast<int64_t>(per_sm) * lim.sm_count));
}

template <typename acc_t, typename out_t>
void launch_sum_splits(const acc_t* partial, int64_t splits, int64_t L, out_t* out,
                       cudaStream_t stream) {
  if (L == 0) return;
  const int blocks = static_cast<int>(min64(ceil_div(L, kThreads), 4096));
  sum_splits_kernel<acc_t, out_t><<<blocks, kThreads, 0, stream>>>(partial, out, splits, L);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Splits so that about 4 blocks per SM run, each over at least kMinSplitRows batch rows.
int64_t batch_chunk(int64_t batch, int64_t tiles, const DeviceLimits& lim) {
  int64_t splits = std::max<int64_t>(1, ceil_div(int64_t{4} * lim.sm_count, tiles));
  splits = std::min(splits, ceil_div(batch, kMinSplitRows));
  return ceil_div(batch, splits);
}

// out (P, Q) = Aᵀ Bm over the batch, deterministic split-K. batch, P, Q > 0.
template <typename a_t, typename acc_t, typename out_t>
void batch_outer(const a_t* A, const acc_t* Bm, out_t* out, int64_t batch, int64_t P, int64_t Q,
                 const DeviceLimits& lim, cudaStream_t stream, const at::TensorOptions& acc_opts) {
  const int tq = Q <= 16 ? 16 : (Q <= 32 ? 32 : 64);
  const int64_t q_tiles = ceil_div(Q, tq);
  const int64_t tiles = ceil_div(P, kRedP) * q_tiles;
  TORCH_CHECK(tiles <= INT32_MAX, "lowrank_ext.linear_backward: a ", P, " x ", Q,
              " reduction is too large for one grid");
  const int64_t chunk = batch_chunk(batch, tiles, lim);
  const int64_t splits = ceil_div(batch, chunk);
  at::Tensor partial = at::empty({splits, P, Q}, acc_opts);
  acc_t* partial_ptr = partial.mutable_data_ptr<acc_t>();
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(splits));
  auto launch = [&](auto tq_const) {
    constexpr int TQ = decltype(tq_const)::value;
    batch_outer_kernel<a_t, acc_t, TQ>
        <<<grid, kThreads, 0, stream>>>(A, Bm, partial_ptr, batch, P, Q, chunk, q_tiles);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (tq == 16) launch(std::integral_constant<int, 16>{});
  else if (tq == 32) launch(std::integral_constant<int, 32>{});
  else launch(std::integral_constant<int, 64>{});
  launch_sum_splits(partial_ptr, splits, P * Q, out, stream);
}

template <typename acc_t, typename out_t>
void diag_outer(const acc_t* g, const acc_t* t, out_t* out, int64_t batch, int r,
                const DeviceLimits& lim, cudaStream_t stream, const at::TensorOptions& acc_opts) {
  const int64_t chunk = batch_chunk(batch, 1, lim);
  const int64_t splits = ceil_div(batch, chunk);
  at::Tensor partial = at::empty({splits, r}, acc_opts);
  acc_t* partial_ptr = partial.mutable_data_ptr<acc_t>();
  diag_outer_kernel<acc_t><<<static_cast<unsigned>(splits), kThreads, 0, stream>>>(
      g, t, partial_ptr, batch, r, chunk);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  launch_sum_splits(partial_ptr, splits, r, out, stream);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> linear_forward_fused(const at::Tensor& x, const at::Tensor& U,
                                                        const at::Tensor& S, const at::Tensor& V,
                                                        const std::optional<at::Tensor>& bias,
                                                        bool save_t) {
  const LinearSizes sz = check_linear_args(x, U, S, V, bias, at::kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // ATen calls below are internal
  const int64_t B = sz.batch, n = sz.in_features, m = sz.out_features, r = sz.rank;
  const bool has_bias = bias.has_value() && bias->defined();
  const auto y_shape = linear_output_shape(x, m);
  const at::Tensor x2 = x.contiguous().reshape({B, n});
  const at::Tensor Vc = V.contiguous();
  const DeviceLimits lim = device_limits();
  const at::ScalarType acc_type = acc_dtype(x.scalar_type());
  const int bm = pick_tile_rows(r, c10::elementSize(acc_type), lim.max_smem);
  if (bm == 0) return linear_forward_cublas(x, U, S, V, bias, save_t);

  at::Tensor y = at::empty(y_shape, x.options());
  at::Tensor t = save_t ? at::empty({B, r}, x.options().dtype(saved_t_dtype(x.scalar_type())))
                        : at::empty({0}, x.options());
  if (B == 0) return {y, t};

  const at::Tensor U_acc = U.to(acc_type);
  const at::Tensor S_acc = S.to(acc_type);
  const at::Tensor US =
      (sz.diagonal_core ? U_acc * S_acc : at::mm(U_acc, S_acc)).contiguous();
  const at::Tensor bias_c = has_bias ? bias->contiguous() : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "lowrank_ext_linear_forward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        dispatch_tile_rows(bm, [&](auto bm_const) {
          constexpr int BM = decltype(bm_const)::value;
          auto* kernel = linear_forward_kernel<scalar_t, acc_t, BM>;
          const int64_t smem = tile_smem_elems<BM>(r) * static_cast<int64_t>(sizeof(acc_t));
          const int grid = row_tile_grid(kernel, smem, ceil_div(B, BM), lim);
          kernel<<<grid, kThreads, static_cast<size_t>(smem), stream>>>(
              x2.const_data_ptr<scalar_t>(), Vc.const_data_ptr<scalar_t>(),
              US.const_data_ptr<acc_t>(),
              has_bias ? bias_c.const_data_ptr<scalar_t>() : nullptr,
              y.mutable_data_ptr<scalar_t>(), save_t ? t.mutable_data_ptr<acc_t>() : nullptr,
              B, n, m, static_cast<int>(r));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
  return {y, t};
}

LinearGrads linear_backward_fused(const at::Tensor& grad_y, const at::Tensor& x,
                                  const at::Tensor& t, const at::Tensor& U, const at::Tensor& S,
                                  const at::Tensor& V, std::array<bool, 5> output_mask) {
  const LinearSizes sz = check_linear_backward_args(grad_y, x, t, U, S, V, at::kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // ATen calls below are internal
  const int64_t B = sz.batch, n = sz.in_features, m = sz.out_features, r = sz.rank;
  const bool diag = sz.diagonal_core;
  const bool need_dx = output_mask[0], need_dU = output_mask[1], need_dS = output_mask[2],
             need_dV = output_mask[3], need_db = output_mask[4];
  const auto opts = x.options();
  // Every gradient not asked for is its own (0,) tensor: the schema's outputs must not alias.
  const auto none = [&] { return at::empty({0}, opts); };

  if (B == 0) {  // sums over an empty batch
    return {need_dx ? at::empty(x.sizes(), opts) : none(),
            need_dU ? at::zeros({m, r}, opts) : none(),
            need_dS ? at::zeros(S.sizes(), opts) : none(),
            need_dV ? at::zeros({n, r}, opts) : none(),
            need_db ? at::zeros({m}, opts) : none()};
  }

  const at::Tensor dy2 = grad_y.contiguous().reshape({B, m});
  const bool need_x = need_dV || ((need_dU || need_dS) && t.numel() == 0);
  const at::Tensor x2 = need_x ? x.contiguous().reshape({B, n}) : at::Tensor();
  const at::Tensor Uc = U.contiguous(), Vc = V.contiguous();
  const DeviceLimits lim = device_limits();
  const at::ScalarType acc_type = acc_dtype(x.scalar_type());
  const int bm = pick_tile_rows(r, c10::elementSize(acc_type), lim.max_smem);
  if (bm == 0) return linear_backward_cublas(grad_y, x, t, U, S, V, output_mask);

  const auto acc_opts = opts.dtype(acc_type);
  const at::Tensor S_acc = S.to(acc_type).contiguous();
  const bool need_g = need_dx || need_dS || need_dV;
  const bool need_t = need_dU || need_dS;
  // t is only needed for dU and dS; recompute it when the forward did not save it.
  at::Tensor t_acc;
  if (need_t) {  // recomputed as the forward saves it: float32 for half inputs
    t_acc = (t.numel() != 0 ? t : saved_t_cuda(x2, Vc)).to(acc_type).contiguous();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  at::Tensor dx = need_dx ? at::empty(x.sizes(), opts) : none();
  at::Tensor dU = need_dU ? at::empty({m, r}, opts) : none();
  at::Tensor dS = need_dS ? at::empty(S.sizes(), opts) : none();
  at::Tensor dV = need_dV ? at::empty({n, r}, opts) : none();
  at::Tensor db = need_db ? at::empty({m}, opts) : none();
  at::Tensor g = need_g ? at::empty({B, r}, acc_opts) : at::Tensor();
  const bool x_pass = (need_dx || need_dV) && n > 0;
  at::Tensor dt = x_pass && need_dV ? at::empty({B, r}, acc_opts) : at::Tensor();
  const int ri = static_cast<int>(r);

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "lowrank_ext_linear_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        acc_t* g_ptr = need_g ? g.mutable_data_ptr<acc_t>() : nullptr;
        dispatch_tile_rows(bm, [&](auto bm_const) {
          constexpr int BM = decltype(bm_const)::value;
          const int64_t smem = tile_smem_elems<BM>(r) * static_cast<int64_t>(sizeof(acc_t));
          const int64_t num_tiles = ceil_div(B, BM);

          // Pass over dy: g and the dbias partials from one read of dy.
          if (need_g || need_db) {
            auto* kernel = linear_grad_g_kernel<scalar_t, acc_t, BM>;
            const int grid = row_tile_grid(kernel, smem, num_tiles, lim);
            at::Tensor partial = need_db ? at::zeros({grid, m}, acc_opts) : at::Tensor();
            acc_t* partial_ptr = need_db ? partial.mutable_data_ptr<acc_t>() : nullptr;
            kernel<<<grid, kThreads, static_cast<size_t>(smem), stream>>>(
                dy2.const_data_ptr<scalar_t>(), Uc.const_data_ptr<scalar_t>(), g_ptr,
                partial_ptr, B, m, ri);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
            if (need_db) {
              launch_sum_splits(partial_ptr, grid, m, db.mutable_data_ptr<scalar_t>(), stream);
            }
          }

          // Pass over row tiles of g: dt = g S, dx = dt Vᵀ (skipped when neither dx nor dV).
          if (x_pass) {
            auto launch = [&](auto* kernel) {
              const int grid = row_tile_grid(kernel, smem, num_tiles, lim);
              kernel<<<grid, kThreads, static_cast<size_t>(smem), stream>>>(
                  g_ptr, S_acc.const_data_ptr<acc_t>(), Vc.const_data_ptr<scalar_t>(),
                  need_dx ? dx.mutable_data_ptr<scalar_t>() : nullptr,
                  need_dV ? dt.mutable_data_ptr<acc_t>() : nullptr, B, n, ri);
              C10_CUDA_KERNEL_LAUNCH_CHECK();
            };
            if (diag) launch(linear_grad_x_kernel<scalar_t, acc_t, BM, true>);
            else launch(linear_grad_x_kernel<scalar_t, acc_t, BM, false>);
          }
        });

        // Reductions over the batch.
        if (need_dU && m > 0) {
          const at::Tensor z = (diag ? t_acc * S_acc : at::mm(t_acc, S_acc.t())).contiguous();
          batch_outer(dy2.const_data_ptr<scalar_t>(), z.const_data_ptr<acc_t>(),
                      dU.mutable_data_ptr<scalar_t>(), B, m, r, lim, stream, acc_opts);
        }
        if (need_dS) {
          if (diag) {
            diag_outer(g.const_data_ptr<acc_t>(), t_acc.const_data_ptr<acc_t>(),
                       dS.mutable_data_ptr<scalar_t>(), B, ri, lim, stream, acc_opts);
          } else {
            batch_outer(g.const_data_ptr<acc_t>(), t_acc.const_data_ptr<acc_t>(),
                        dS.mutable_data_ptr<scalar_t>(), B, r, r, lim, stream, acc_opts);
          }
        }
        if (need_dV && n > 0) {
          batch_outer(x2.const_data_ptr<scalar_t>(), dt.const_data_ptr<acc_t>(),
                      dV.mutable_data_ptr<scalar_t>(), B, n, r, lim, stream, acc_opts);
        }
      });
  return {dx, dU, dS, dV, db};
}

}  // namespace lowrank_ext
