// lowrank_ext::linear on tensor cores (sm_80 mma.sync; runs on sm_80/86/89/90): the
// "tensorcore" CUDA kernels (backend.h), opt-in until a GPU measurement says they beat "cublas".
//
// Forward, one launch, a back-to-back GEMM per block of BM = 64 rows of x:
//   phase 1  t = x V over all of in (cp.async 3- or 4-stage pipeline, ldmatrix, mma m16n8k16,
//            float32 accumulators in registers), then z = t ⊙ s rounded to x's dtype into
//            shared memory (t itself, float32, written out when the forward saves it);
//   phase 2  y = z Uᵀ + bias, output tiles of BN = 128 columns streamed through the same
//            pipeline, bias added in float32 in the epilogue.
// t never goes to global memory unless asked. A full (r, r) core is folded into U first (U S,
// one small GEMM), so the kernel only ever scales by a vector (or by nothing).
// Small batches: the output columns are split over grid.y so that every SM has a block (each
// block recomputes its rows' t, which costs B·in·r and reads V from L2).
// Backward: its first pass, g = dy U (float32) and dbias, is phase 1 again over dy
// (linear_grad_g_tc_kernel); the other gradients are the composition's
// (linear_backward_cublas_given).
//
// Limits (else the cuBLAS composition runs, see tensorcore_takes): float16/bfloat16 only,
// 1 <= r <= kTensorcoreMaxRank = 256 (r is padded to 32/64/128/256 with zeros). Any batch (0
// included), any in/out: rows, columns and k past the end are predicated (zero fill). 16-byte
// cp.async needs in % 8 == 0 and an aligned x (for x's tiles), r % 8 == 0 and aligned U, V (for
// theirs); otherwise the same kernel loads those tiles element by element (slower, same
// results). Offsets are int64.
#include "linear.h"

#include <ATen/ATen.h>
// Not ATen/cuda/CUDAContext.h: it pulls in cusparse.h, which a toolkit without the math
// libraries' headers lacks (the CUDA wheel build in CI), as linear.cu avoids it too.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cute/arch/copy_sm75.hpp>
#include <cute/arch/copy_sm80.hpp>
#include <cute/arch/mma_sm80.hpp>

#include <map>
#include <mutex>
#include <type_traits>

namespace lowrank_ext {

constexpr int64_t kTensorcoreMaxRank = 256;

namespace {

constexpr int kThreads = 256;  // 8 warps
constexpr int kBM = 64;        // rows of x per block
constexpr int kBK = 32;        // k (= rank) per phase-2 stage
constexpr int kBN = 128;       // output columns per phase-2 tile
constexpr int kStages = 3;     // phase 2
constexpr int kPad = 8;        // halves added to each shared row: ldmatrix rows hit distinct banks

// Phase 1 streams x from DRAM: its k step and stage count keep ~18-35 KB of x in flight per SM
// (bandwidth per SM × latency, H100/H200) at the small ranks, where the phase is memory-bound,
// while the whole tile fits the 99 KiB opt-in of sm_86/sm_89 at every rank.
template <int RP>
struct Smem {
  static constexpr int kBK1 = RP <= 32 ? 128 : (RP <= 128 ? 64 : 32);
  static constexpr int kStages1 = RP == 64 ? 4 : 3;
  static constexpr int kXStride = kBK1 + kPad;    // x stage: kBM × kBK1
  static constexpr int kVStride = RP + kPad;      // V stage: kBK1 × RP
  static constexpr int kUStride = kBK + kPad;     // U stage: kBN × kBK
  static constexpr int kZStride = RP + kPad;      // z: kBM × RP
  static constexpr int kXStage = kBM * kXStride;  // in halves
  static constexpr int kVStage = kBK1 * kVStride;
  static constexpr int kUStage = kBN * kUStride;
  static constexpr int kPhase1 = kStages1 * (kXStage + kVStage);
  static constexpr int kPhase2 = kStages * kUStage;
  static constexpr int kPipe = kPhase1 > kPhase2 ? kPhase1 : kPhase2;
  static constexpr int kBytes = (kPipe + kBM * kZStride) * 2;
  static_assert(kBytes <= 101376, "over the 99 KiB opt-in shared memory of sm_86/sm_89");
};

// The MMA atom and the conversions of T (__half or __nv_bfloat16).
template <typename T>
struct Mma {
  static constexpr bool kHalf = std::is_same_v<T, __half>;
  using Atom = std::conditional_t<kHalf, cute::SM80_16x8x16_F32F16F16F32_TN,
                                  cute::SM80_16x8x16_F32BF16BF16F32_TN>;
  __device__ static float to_float(T v) {
    if constexpr (kHalf) return __half2float(v);
    else return __bfloat162float(v);
  }
  __device__ static T from_float(float v) {
    if constexpr (kHalf) return __float2half_rn(v);
    else return __float2bfloat16_rn(v);
  }
  __device__ static uint32_t pack(float a, float b) {  // two values, a in the low half
    uint32_t bits;
    if constexpr (kHalf) {
      const __half2 h = __floats2half2_rn(a, b);
      memcpy(&bits, &h, sizeof(bits));
    } else {
      const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
      memcpy(&bits, &h, sizeof(bits));
    }
    return bits;
  }
};

struct Args {
  const void* x;     // (batch, in) row-major
  const void* V;     // (in, r) row-major
  const void* U;     // (out, r) row-major (U S for a full core)
  const void* s;     // (r) or nullptr (full core already folded into U)
  const void* bias;  // (out) or nullptr
  void* y;           // (batch, out)
  float* t;          // (batch, r) float32 or nullptr
  float* col_sums;   // grad kernel: (row blocks, in) float32 column sums of x's tiles, or nullptr
  int64_t batch, in, out, r;
  int n_tiles;       // ceil(out / kBN)
  bool vec_x;        // 16-byte cp.async for x (in % 8 == 0, x 16-byte aligned)
  bool vec_r;        // 16-byte cp.async for V and U (r % 8 == 0, both 16-byte aligned)
};

// One 16-byte chunk (8 halves) of a row-major (rows × cols) matrix into shared memory, zero
// where (row, col..col+7) is out of range.
template <typename T>
__device__ __forceinline__ void load_chunk(T* dst, const T* base, int64_t row, int64_t col,
                                           int64_t rows, int64_t cols, bool vec16) {
  if (vec16) {
    // cols % 8 == 0 and col % 8 == 0: the chunk is wholly in or wholly out.
    const bool in_range = row < rows && col < cols;
    const T* src = in_range ? base + row * cols + col : base;
    cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(
        *reinterpret_cast<const cute::uint128_t*>(src), *reinterpret_cast<cute::uint128_t*>(dst),
        in_range);
  } else {
    const bool row_ok = row < rows;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      dst[e] = row_ok && col + e < cols ? base[row * cols + col + e] : Mma<T>::from_float(0.0f);
    }
  }
}

template <typename T>
__device__ __forceinline__ void ldsm_x4(const T* p, uint32_t (&r)[4]) {
  cute::SM75_U32x4_LDSM_N::copy(*reinterpret_cast<const cute::uint128_t*>(p), r[0], r[1], r[2],
                                r[3]);
}
template <typename T>
__device__ __forceinline__ void ldsm_x4_trans(const T* p, uint32_t (&r)[4]) {
  cute::SM75_U16x8_LDSM_T::copy(*reinterpret_cast<const cute::uint128_t*>(p), r[0], r[1], r[2],
                                r[3]);
}
template <typename T>
__device__ __forceinline__ void ldsm_x2_trans(const T* p, uint32_t& r0, uint32_t& r1) {
  cute::SM75_U16x4_LDSM_T::copy(*reinterpret_cast<const cute::uint128_t*>(p), r0, r1);
}

template <typename T>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                    uint32_t b1) {
  Mma<T>::Atom::fma(d[0], d[1], d[2], d[3], a[0], a[1], a[2], a[3], b0, b1, d[0], d[1], d[2],
                    d[3]);
}

// RP: r padded to a multiple of 32 (32, 64, 128 or 256). kGrad: phase 1 only, for the
// backward's first pass (x = dy, V = U, in = out): t = dy U written to a.t, and the column sums
// of dy's tiles (dbias, summed over row blocks by the host) to a.col_sums.
template <typename T, int RP, bool kGrad>
__device__ __forceinline__ void tc_body(const Args& a) {
  using L = Smem<RP>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* pipe = reinterpret_cast<T*>(smem_raw);
  T* zs = pipe + L::kPipe;

  const T* x = static_cast<const T*>(a.x);
  const T* V = static_cast<const T*>(a.V);
  const T* U = static_cast<const T*>(a.U);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wm = warp % 2;  // 32-row half of the block's 64 rows (both phases)
  const int wn = warp / 2;  // quarter of the columns: RP/4 of t, 32 of an output tile
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;

  // ---- phase 1: t = x V -------------------------------------------------------------------
  constexpr int kNT1 = RP / 32;  // n8 tiles per warp (RP/4 columns)
  float acc1[2][kNT1][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < kNT1; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc1[i][j][c] = 0.0f;

  constexpr int kBK1 = L::kBK1, kStages1 = L::kStages1;
  const int k_steps = static_cast<int>((a.in + kBK1 - 1) / kBK1);
  auto load1 = [&](int step, int stage) {
    T* xs = pipe + stage * (L::kXStage + L::kVStage);
    T* vs = xs + L::kXStage;
    const int64_t k0 = static_cast<int64_t>(step) * kBK1;
    // x: kBM × kBK1 (256 to 1024 chunks of 8).
#pragma unroll
    for (int c = tid; c < kBM * (kBK1 / 8); c += kThreads) {
      const int row = c / (kBK1 / 8), cc = c % (kBK1 / 8);
      load_chunk(xs + row * L::kXStride + cc * 8, x, m0 + row, k0 + cc * 8, a.batch, a.in,
                 a.vec_x);
    }
    // V: kBK1 × RP.
    for (int c = tid; c < kBK1 * (RP / 8); c += kThreads) {
      const int row = c / (RP / 8), cc = c % (RP / 8);
      load_chunk(vs + row * L::kVStride + cc * 8, V, k0 + row, static_cast<int64_t>(cc) * 8,
                 a.in, a.r, a.vec_r);
    }
  };

#pragma unroll
  for (int s = 0; s < kStages1 - 1; ++s) {
    if (s < k_steps) load1(s, s);
    cute::cp_async_fence();
  }
  for (int step = 0; step < k_steps; ++step) {
    cute::cp_async_wait<kStages1 - 2>();
    __syncthreads();
    if (step + kStages1 - 1 < k_steps) {
      load1(step + kStages1 - 1, (step + kStages1 - 1) % kStages1);
    }
    cute::cp_async_fence();
    const T* xs = pipe + (step % kStages1) * (L::kXStage + L::kVStage);
    const T* vs = xs + L::kXStage;
#pragma unroll
    for (int kk = 0; kk < kBK1; kk += 16) {
      uint32_t af[2][4];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        ldsm_x4(xs + (wm * 32 + i * 16 + lane % 16) * L::kXStride + kk + (lane / 16) * 8, af[i]);
      }
      // B fragments from V stored k-major ([k][n]): ldmatrix .trans.
      const int krow = kk + lane % 8 + ((lane / 8) % 2) * 8;
      if constexpr (kNT1 % 2 == 0) {
#pragma unroll
        for (int j = 0; j < kNT1; j += 2) {
          uint32_t bf[4];
          ldsm_x4_trans(vs + krow * L::kVStride + wn * (RP / 4) + j * 8 + (lane / 16) * 8, bf);
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            mma<T>(acc1[i][j], af[i], bf[0], bf[1]);
            mma<T>(acc1[i][j + 1], af[i], bf[2], bf[3]);
          }
        }
      } else {
#pragma unroll
        for (int j = 0; j < kNT1; ++j) {
          uint32_t b0, b1;
          ldsm_x2_trans(vs + krow * L::kVStride + wn * (RP / 4) + j * 8, b0, b1);
#pragma unroll
          for (int i = 0; i < 2; ++i) mma<T>(acc1[i][j], af[i], b0, b1);
        }
      }
    }
    if constexpr (kGrad) {  // dbias: this block's column sums of the stage, in a fixed order
      if (a.col_sums != nullptr) {
        for (int c = tid; c < kBK1; c += kThreads) {
          const int64_t col = static_cast<int64_t>(step) * kBK1 + c;
          float sum = 0.0f;
          for (int row = 0; row < kBM; ++row) sum += Mma<T>::to_float(xs[row * L::kXStride + c]);
          if (col < a.in) a.col_sums[static_cast<int64_t>(blockIdx.x) * a.in + col] = sum;
        }
      }
    }
  }
  cute::cp_async_wait<0>();

  // ---- z = t ⊙ s into shared memory (and t to global when saved) -----------------------------
  const T* s = static_cast<const T*>(a.s);
  const bool write_t = a.t != nullptr && blockIdx.y == 0;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int j = 0; j < kNT1; ++j) {
      const int col = wn * (RP / 4) + j * 8 + (lane % 4) * 2;
      float s0 = 1.0f, s1 = 1.0f;
      if (s != nullptr) {
        s0 = col < a.r ? Mma<T>::to_float(s[col]) : 0.0f;
        s1 = col + 1 < a.r ? Mma<T>::to_float(s[col + 1]) : 0.0f;
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = wm * 32 + i * 16 + lane / 4 + h * 8;
        const float t0 = acc1[i][j][2 * h], t1 = acc1[i][j][2 * h + 1];
        if constexpr (!kGrad) {
          *reinterpret_cast<uint32_t*>(zs + row * L::kZStride + col) =
              Mma<T>::pack(t0 * s0, t1 * s1);
        }
        if (write_t && m0 + row < a.batch) {
          float* trow = a.t + (m0 + row) * a.r;
          if (col < a.r) trow[col] = t0;
          if (col + 1 < a.r) trow[col + 1] = t1;
        }
      }
    }
  }
  if constexpr (kGrad) return;
  __syncthreads();  // z complete; the pipeline buffers are free for phase 2

  // ---- phase 2: y = z Uᵀ + bias over this block's output tiles ------------------------------
  constexpr int kKC = RP / kBK;  // k chunks per output tile
  const int my_tiles =
      a.n_tiles > static_cast<int>(blockIdx.y)
          ? (a.n_tiles - static_cast<int>(blockIdx.y) + gridDim.y - 1) / gridDim.y
          : 0;
  const int steps2 = my_tiles * kKC;
  auto tile_of = [&](int it) {  // this block's tiles: blockIdx.y, blockIdx.y + gridDim.y, ...
    return static_cast<int64_t>(blockIdx.y) + static_cast<int64_t>(it / kKC) * gridDim.y;
  };
  auto load2 = [&](int it, int stage) {
    T* us = pipe + stage * L::kUStage;
    const int64_t n0 = tile_of(it) * kBN;
    const int64_t k0 = static_cast<int64_t>(it % kKC) * kBK;
    // U: kBN × kBK = 512 chunks, two per thread.
#pragma unroll
    for (int c = tid; c < kBN * (kBK / 8); c += kThreads) {
      const int row = c / (kBK / 8), cc = c % (kBK / 8);
      load_chunk(us + row * L::kUStride + cc * 8, U, n0 + row, k0 + cc * 8, a.out, a.r, a.vec_r);
    }
  };

  const T* bias = static_cast<const T*>(a.bias);
  T* y = static_cast<T*>(a.y);
  float acc2[2][4][4];
#pragma unroll
  for (int s2 = 0; s2 < kStages - 1; ++s2) {
    if (s2 < steps2) load2(s2, s2);
    cute::cp_async_fence();
  }
  for (int it = 0; it < steps2; ++it) {
    const int kc = it % kKC;
    if (kc == 0) {
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int c = 0; c < 4; ++c) acc2[i][j][c] = 0.0f;
    }
    cute::cp_async_wait<kStages - 2>();
    __syncthreads();
    if (it + kStages - 1 < steps2) load2(it + kStages - 1, (it + kStages - 1) % kStages);
    cute::cp_async_fence();
    const T* us = pipe + (it % kStages) * L::kUStage;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      uint32_t af[2][4];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        ldsm_x4(zs + (wm * 32 + i * 16 + lane % 16) * L::kZStride + kc * kBK + kk +
                    (lane / 16) * 8,
                af[i]);
      }
      // B fragments from U stored n-major ([n][k]): plain ldmatrix, two n8 tiles per x4.
#pragma unroll
      for (int j = 0; j < 4; j += 2) {
        uint32_t bf[4];
        ldsm_x4(us + (wn * 32 + j * 8 + lane % 8 + (lane / 16) * 8) * L::kUStride + kk +
                    ((lane / 8) % 2) * 8,
                bf);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          mma<T>(acc2[i][j], af[i], bf[0], bf[1]);
          mma<T>(acc2[i][j + 1], af[i], bf[2], bf[3]);
        }
      }
    }
    if (kc == kKC - 1) {  // epilogue: bias in float32, one rounding into T
      const int64_t n0 = tile_of(it) * kBN;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t col = n0 + wn * 32 + j * 8 + (lane % 4) * 2;
        float b0 = 0.0f, b1 = 0.0f;
        if (bias != nullptr) {
          if (col < a.out) b0 = Mma<T>::to_float(bias[col]);
          if (col + 1 < a.out) b1 = Mma<T>::to_float(bias[col + 1]);
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int64_t row = m0 + wm * 32 + i * 16 + lane / 4 + h * 8;
            if (row >= a.batch) continue;
            const float v0 = acc2[i][j][2 * h] + b0, v1 = acc2[i][j][2 * h + 1] + b1;
            const int64_t at = row * a.out + col;
            if (col + 1 < a.out && at % 2 == 0) {  // both columns, 4-byte aligned: one store
              *reinterpret_cast<uint32_t*>(y + at) = Mma<T>::pack(v0, v1);
            } else {
              if (col < a.out) y[at] = Mma<T>::from_float(v0);
              if (col + 1 < a.out) y[at + 1] = Mma<T>::from_float(v1);
            }
          }
        }
      }
    }
  }
  cute::cp_async_wait<0>();
}

template <typename T, int RP>
__global__ void __launch_bounds__(kThreads, 1) linear_forward_tc_kernel(const Args a) {
  tc_body<T, RP, false>(a);
}

template <typename T, int RP>
__global__ void __launch_bounds__(kThreads, 1) linear_grad_g_tc_kernel(const Args a) {
  tc_body<T, RP, true>(a);
}

template <typename T, int RP, bool kGrad>
constexpr auto tc_kernel() {
  if constexpr (kGrad) return linear_grad_g_tc_kernel<T, RP>;
  else return linear_forward_tc_kernel<T, RP>;
}

// Opt every (kernel, device) into its shared memory once: the size is fixed per kernel, so no
// call can ever lower it under another (the defect D1 of the SIMT kernels cannot happen here).
template <typename T, int RP, bool kGrad>
void ensure_smem_attribute(int device) {
  static std::mutex mutex;
  static uint64_t done = 0;  // bit d: set on device d (devices >= 64 re-set it on every call)
  const std::lock_guard<std::mutex> lock(mutex);
  const uint64_t bit = device < 64 ? (uint64_t{1} << device) : 0;
  if (bit != 0 && (done & bit) != 0) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(tc_kernel<T, RP, kGrad>(),
                                      cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      Smem<RP>::kBytes));
  done |= bit;
}

template <typename T, int RP, bool kGrad>
void launch(const Args& args, int64_t m_blocks, int splits, int device, cudaStream_t stream) {
  ensure_smem_attribute<T, RP, kGrad>(device);
  const dim3 grid(static_cast<unsigned>(m_blocks), static_cast<unsigned>(splits));
  tc_kernel<T, RP, kGrad>()<<<grid, kThreads, Smem<RP>::kBytes, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool kGrad>
void launch_rank(const Args& args, at::ScalarType dtype, int64_t m_blocks, int splits,
                 cudaStream_t stream) {
  const int device = c10::cuda::current_device();
  const auto by_rank = [&](auto tag) {
    using T = decltype(tag);
    if (args.r <= 32) return launch<T, 32, kGrad>(args, m_blocks, splits, device, stream);
    if (args.r <= 64) return launch<T, 64, kGrad>(args, m_blocks, splits, device, stream);
    if (args.r <= 128) return launch<T, 128, kGrad>(args, m_blocks, splits, device, stream);
    return launch<T, 256, kGrad>(args, m_blocks, splits, device, stream);
  };
  if (dtype == at::kHalf) {
    by_rank(__half{});
  } else {
    by_rank(__nv_bfloat16{});
  }
}

// SM count per device, queried once (a per-call query is issue 13's defect D6).
int sm_count(int device) {
  static std::mutex mutex;
  static std::map<int, int> counts;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = counts.find(device);
  if (found != counts.end()) return found->second;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  counts.emplace(device, sms);
  return sms;
}

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

}  // namespace

bool tensorcore_takes(const at::Tensor& x, int64_t rank) {
  const at::ScalarType dt = x.scalar_type();
  return (dt == at::kHalf || dt == at::kBFloat16) && rank >= 1 && rank <= kTensorcoreMaxRank;
}

std::tuple<at::Tensor, at::Tensor> linear_forward_tensorcore(
    const at::Tensor& x, const at::Tensor& U, const at::Tensor& S, const at::Tensor& V,
    const std::optional<at::Tensor>& bias, bool save_t) {
  const LinearSizes sz = check_linear_args(x, U, S, V, bias, at::kCUDA);
  if (!tensorcore_takes(x, sz.rank)) return linear_forward_cublas(x, U, S, V, bias, save_t);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::ScalarType dtype = x.scalar_type();
  const at::Tensor x2 = x.reshape({sz.batch, sz.in_features}).contiguous();
  const at::Tensor Vc = V.contiguous();
  // A full core is folded into U (U S, float32 product rounded once); a diagonal one is applied
  // to t on chip.
  const at::Tensor Uc = sz.diagonal_core ? U.contiguous()
                                         : at::mm(U.to(at::kFloat), S.to(at::kFloat)).to(dtype);
  const at::Tensor Sc = sz.diagonal_core ? S.contiguous() : at::Tensor();
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor bc = has_bias ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty({sz.batch, sz.out_features}, x.options());
  at::Tensor t = save_t ? at::empty({sz.batch, sz.rank}, x.options().dtype(saved_t_dtype(dtype)))
                        : at::empty({0}, x.options());
  const std::vector<int64_t> out_shape = linear_output_shape(x, sz.out_features);
  if (sz.batch == 0) return {y.view(out_shape), t};
  if (sz.out_features == 0) {
    // No output tile to launch (t, if saved, still comes from the composition).
    return linear_forward_cublas(x, U, S, V, bias, save_t);
  }

  Args args{};
  args.x = x2.data_ptr();
  args.V = Vc.data_ptr();
  args.U = Uc.data_ptr();
  args.s = sz.diagonal_core ? Sc.data_ptr() : nullptr;
  args.bias = has_bias ? bc.data_ptr() : nullptr;
  args.y = y.data_ptr();
  args.t = save_t ? t.data_ptr<float>() : nullptr;
  args.batch = sz.batch;
  args.in = sz.in_features;
  args.out = sz.out_features;
  args.r = sz.rank;
  args.n_tiles = static_cast<int>((sz.out_features + kBN - 1) / kBN);
  args.vec_x = sz.in_features % 8 == 0 && aligned16(x2);
  args.vec_r = sz.rank % 8 == 0 && aligned16(Vc) && aligned16(Uc);

  const int64_t m_blocks = (sz.batch + kBM - 1) / kBM;
  TORCH_CHECK(m_blocks <= std::numeric_limits<int32_t>::max(),
              "lowrank_ext.linear (tensorcore): batch ", sz.batch,
              " needs more than 2^31-1 row blocks");
  // Split the output columns over grid.y until every SM has a block, when the row blocks fill
  // at most half the SMs (each split recomputes its rows' t: at B = 8192, 128 row blocks on 132
  // SMs, reading x twice would cost more than the 4 idle SMs).
  const int sms = sm_count(c10::cuda::current_device());
  int64_t splits = 1;
  if (2 * m_blocks <= sms) {
    splits = std::min<int64_t>(args.n_tiles, (sms + m_blocks - 1) / m_blocks);
  }
  splits = std::min<int64_t>(splits, 65535);

  launch_rank<false>(args, dtype, m_blocks, static_cast<int>(splits),
                     c10::cuda::getCurrentCUDAStream());
  return {y.view(out_shape), t};
}

LinearGrads linear_backward_tensorcore(const at::Tensor& grad_y, const at::Tensor& x,
                                       const at::Tensor& t, const at::Tensor& U,
                                       const at::Tensor& S, const at::Tensor& V,
                                       std::array<bool, 5> output_mask) {
  const LinearSizes sz = check_linear_backward_args(grad_y, x, t, U, S, V, at::kCUDA);
  const auto [need_dx, need_dU, need_dS, need_dV, need_db] = output_mask;
  // g = dy U feeds dx, dV and dS; dbias alone is a plain column sum, cheaper without g.
  const bool need_g = need_dx || need_dV || need_dS;
  if (!need_g || !tensorcore_takes(x, sz.rank) || sz.batch == 0 || sz.out_features == 0) {
    return linear_backward_cublas(grad_y, x, t, U, S, V, output_mask);
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor dy2 = grad_y.reshape({sz.batch, sz.out_features}).contiguous();
  const at::Tensor Uc = U.contiguous();
  const int64_t m_blocks = (sz.batch + kBM - 1) / kBM;
  TORCH_CHECK(m_blocks <= std::numeric_limits<int32_t>::max(),
              "lowrank_ext.linear (tensorcore): batch ", sz.batch,
              " needs more than 2^31-1 row blocks");
  const at::TensorOptions f32 = x.options().dtype(at::kFloat);
  at::Tensor g = at::empty({sz.batch, sz.rank}, f32);
  at::Tensor col_sums = need_db ? at::empty({m_blocks, sz.out_features}, f32) : at::Tensor();

  // The first pass over dy: the forward kernel's phase 1 with x = dy, V = U, in = out.
  Args args{};
  args.x = dy2.data_ptr();
  args.V = Uc.data_ptr();
  args.t = g.data_ptr<float>();
  args.col_sums = need_db ? col_sums.data_ptr<float>() : nullptr;
  args.batch = sz.batch;
  args.in = sz.out_features;
  args.r = sz.rank;
  args.vec_x = sz.out_features % 8 == 0 && aligned16(dy2);
  args.vec_r = sz.rank % 8 == 0 && aligned16(Uc);
  launch_rank<true>(args, x.scalar_type(), m_blocks, 1, c10::cuda::getCurrentCUDAStream());
  const at::Tensor db = need_db ? col_sums.sum(0).to(x.scalar_type()) : at::Tensor();
  return linear_backward_cublas_given(grad_y, x, t, U, S, V, output_mask, g, db);
}

}  // namespace lowrank_ext
