// Tile-binning kernels (launched by binning.cu; also compiled on the host by host_emulation.h).
#pragma once

#include <cstdint>

#include "raster_common.cuh"

namespace studio_cuda {
namespace kernels {

// counts[i] = number of tiles touched by Gaussian i (0 when culled, i.e. a radius is 0).
template <typename S>
__global__ void tile_counts_kernel(const S* __restrict__ means2d, const int32_t* __restrict__ radii, int64_t n,
                                   int tiles_x, int tiles_y, int tile_size, int64_t* __restrict__ counts) {
    const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int rx = radii[2 * i], ry = radii[2 * i + 1];
    if (rx <= 0 || ry <= 0) {
        counts[i] = 0;
        return;
    }
    int x0, x1, y0, y1;
    detail::tile_box(means2d[2 * i], means2d[2 * i + 1], rx, ry, tile_size, tiles_x, tiles_y, x0, x1, y0, y1);
    counts[i] = int64_t(x1 - x0) * int64_t(y1 - y0);
}

// One (tile << 32 | depth) key and flattened Gaussian id per touched tile, written in index order at
// [offsets[i-1], offsets[i]) so that a stable sort keeps ties in ascending Gaussian index.
template <typename S>
__global__ void emit_kernel(const S* __restrict__ means2d, const int32_t* __restrict__ radii,
                            const S* __restrict__ depths, const int64_t* __restrict__ offsets, int C, int N,
                            int tiles_x, int tiles_y, int tile_size, uint64_t* __restrict__ keys,
                            int32_t* __restrict__ ids) {
    const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= int64_t(C) * N) return;
    const int rx = radii[2 * i], ry = radii[2 * i + 1];
    if (rx <= 0 || ry <= 0) return;
    int x0, x1, y0, y1;
    detail::tile_box(means2d[2 * i], means2d[2 * i + 1], rx, ry, tile_size, tiles_x, tiles_y, x0, x1, y0, y1);
    int64_t pos = i == 0 ? 0 : offsets[i - 1];
    const int64_t cam = i / N;
    const uint64_t tile_base = uint64_t(cam) * uint64_t(tiles_x) * uint64_t(tiles_y);
    const uint64_t dkey = detail::depth_key(depths[i]);
    for (int ty = y0; ty < y1; ++ty) {
        for (int tx = x0; tx < x1; ++tx) {
            const uint64_t tile = tile_base + uint64_t(ty) * uint64_t(tiles_x) + uint64_t(tx);
            keys[pos] = (tile << 32) | dkey;
            ids[pos] = int32_t(i);
            ++pos;
        }
    }
}

// ranges must be zeroed first; writes [start,end) of every tile that has intersections.
__global__ void tile_ranges_kernel(const uint64_t* __restrict__ keys, int64_t n,
                                   int32_t* __restrict__ ranges) {
    const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const uint64_t tile = keys[i] >> 32;
    if (i == 0) {
        ranges[2 * tile] = 0;
    } else {
        const uint64_t prev = keys[i - 1] >> 32;
        if (prev != tile) {
            ranges[2 * prev + 1] = int32_t(i);
            ranges[2 * tile] = int32_t(i);
        }
    }
    if (i == n - 1) ranges[2 * tile + 1] = int32_t(n);
}

}  // namespace kernels
}  // namespace studio_cuda
