// Device helpers shared by the rasterizer kernels. CUDA runtime only (no torch headers).
//
// The kernel headers (*_kernels.cuh) are also compiled by a plain C++ compiler for the CPU emulation
// used in tests (host_emulation.h defines STUDIO_CUDA_HOST_EMULATION and the CUDA built-ins first).
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "raster.h"

#ifndef STUDIO_CUDA_HOST_EMULATION
#include <cuda_runtime.h>
// Block-wide dynamic shared memory (sized at launch).
#define STUDIO_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace studio_cuda {
namespace detail {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }

// Round-to-nearest multiply/add that the compiler may not fuse into FMAs, so that sigma is
// evaluated with exactly the operation order of the torch twin (keeps threshold decisions equal).
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

// sigma = 0.5 * (a dx^2 + c dy^2) + b dx dy, evaluated left to right like torch does.
template <typename S>
__device__ __forceinline__ S gaussian_sigma(S a, S b, S c, S dx, S dy) {
    const S quad = add_rn(mul_rn(mul_rn(a, dx), dx), mul_rn(mul_rn(c, dy), dy));
    return add_rn(mul_rn(S(0.5), quad), mul_rn(mul_rn(b, dx), dy));
}

template <typename S>
__device__ __forceinline__ S warp_sum(S v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(kFullMask, v, off);
    return v;
}

// Half-open tile box [x0,x1) x [y0,y1) of a Gaussian with centre (mx,my) and radii (rx,ry): every
// tile holding a pixel centre (j+0.5, i+0.5) with |j+0.5-mx| <= rx and |i+0.5-my| <= ry.
template <typename S>
__device__ __forceinline__ void tile_box(S mx, S my, int rx, int ry, int tile_size, int tiles_x, int tiles_y,
                                         int& x0, int& x1, int& y0, int& y1) {
    const S ts = S(tile_size);
    // Clamp in floating point before converting so huge / non-finite values cannot overflow.
    const S fx0 = floor((mx - S(rx)) / ts), fx1 = floor((mx + S(rx)) / ts) + S(1);
    const S fy0 = floor((my - S(ry)) / ts), fy1 = floor((my + S(ry)) / ts) + S(1);
    x0 = int(fmin(fmax(fx0, S(0)), S(tiles_x)));
    x1 = int(fmin(fmax(fx1, S(0)), S(tiles_x)));
    y0 = int(fmin(fmax(fy0, S(0)), S(tiles_y)));
    y1 = int(fmin(fmax(fy1, S(0)), S(tiles_y)));
    if (x1 < x0) x1 = x0;
    if (y1 < y0) y1 = y0;
}

// Monotone map of a depth to 32 unsigned bits (larger depth -> larger key). Doubles are rounded to
// float first (monotone, so only depths closer than a float ulp can tie; ties keep index order).
__device__ __forceinline__ uint32_t depth_key(float d) {
    const uint32_t u = __float_as_uint(d);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ uint32_t depth_key(double d) { return depth_key(float(d)); }

}  // namespace detail

// Calls f(std::integral_constant<int, CDIM>{}) with CDIM = D for the specialised channel counts
// (see channels_specialised) and CDIM = 0 (generic kernel) otherwise.
template <typename F>
inline auto dispatch_channels(int D, F&& f) {
    switch (D) {
        case 1: return f(std::integral_constant<int, 1>{});
        case 2: return f(std::integral_constant<int, 2>{});
        case 3: return f(std::integral_constant<int, 3>{});
        case 4: return f(std::integral_constant<int, 4>{});
        default: return f(std::integral_constant<int, 0>{});
    }
}

// Dynamic shared memory of the blend kernels: per batch entry mean(2) + opacity + conic(3) +
// CDIM colours in S, plus the int32 Gaussian id.
template <typename S, int CDIM>
inline size_t blend_smem_bytes(int tile_size) {
    return size_t(tile_size) * size_t(tile_size) * ((6 + CDIM) * sizeof(S) + sizeof(int32_t));
}

}  // namespace studio_cuda
