// Tile binning launchers: per-Gaussian tile counts, prefix sum, (tile|depth) keys, stable radix sort,
// per-tile ranges. CUDA runtime + CUB only (no torch headers): `nvcc -c binning.cu` compiles it.
#include <cstdint>

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>
#include <cuda_runtime.h>

#include "binning_kernels.cuh"
#include "raster.h"

namespace studio_cuda {
namespace {

constexpr int kThreads = 256;

inline unsigned grid_for(int64_t n) { return unsigned((n + kThreads - 1) / kThreads); }

template <typename S>
cudaError_t tile_counts_impl(const S* means2d, const int32_t* radii, int64_t n, int tiles_x, int tiles_y,
                             int tile_size, int64_t* counts, cudaStream_t stream) {
    if (n <= 0) return cudaSuccess;
    kernels::tile_counts_kernel<S><<<grid_for(n), kThreads, 0, stream>>>(means2d, radii, n, tiles_x, tiles_y,
                                                                         tile_size, counts);
    return cudaGetLastError();
}

template <typename S>
cudaError_t emit_impl(const S* means2d, const int32_t* radii, const S* depths, const int64_t* offsets, int C,
                      int N, int tiles_x, int tiles_y, int tile_size, uint64_t* keys, int32_t* ids,
                      cudaStream_t stream) {
    const int64_t n = int64_t(C) * N;
    if (n <= 0) return cudaSuccess;
    kernels::emit_kernel<S><<<grid_for(n), kThreads, 0, stream>>>(means2d, radii, depths, offsets, C, N, tiles_x,
                                                                  tiles_y, tile_size, keys, ids);
    return cudaGetLastError();
}

}  // namespace
}  // namespace studio_cuda

// Qualified definitions: a signature that drifts from raster.h is a compile error, not a new overload.
cudaError_t studio_cuda::tile_counts(const float* means2d, const int32_t* radii, int64_t n, int tiles_x,
                                     int tiles_y, int tile_size, int64_t* counts, cudaStream_t stream) {
    return tile_counts_impl(means2d, radii, n, tiles_x, tiles_y, tile_size, counts, stream);
}

cudaError_t studio_cuda::tile_counts(const double* means2d, const int32_t* radii, int64_t n, int tiles_x,
                                     int tiles_y, int tile_size, int64_t* counts, cudaStream_t stream) {
    return tile_counts_impl(means2d, radii, n, tiles_x, tiles_y, tile_size, counts, stream);
}

cudaError_t studio_cuda::inclusive_scan_temp_bytes(int64_t n, size_t* bytes) {
    *bytes = 0;
    if (n <= 0) return cudaSuccess;
    return cub::DeviceScan::InclusiveSum(nullptr, *bytes, static_cast<const int64_t*>(nullptr),
                                         static_cast<int64_t*>(nullptr), static_cast<int>(n));
}

cudaError_t studio_cuda::inclusive_scan(const int64_t* in, int64_t* out, int64_t n, void* temp,
                                        size_t temp_bytes, cudaStream_t stream) {
    if (n <= 0) return cudaSuccess;
    return cub::DeviceScan::InclusiveSum(temp, temp_bytes, in, out, static_cast<int>(n), stream);
}

cudaError_t studio_cuda::emit_intersections(const float* means2d, const int32_t* radii, const float* depths,
                                            const int64_t* offsets, int C, int N, int tiles_x, int tiles_y,
                                            int tile_size, uint64_t* keys, int32_t* ids, cudaStream_t stream) {
    return emit_impl(means2d, radii, depths, offsets, C, N, tiles_x, tiles_y, tile_size, keys, ids, stream);
}

cudaError_t studio_cuda::emit_intersections(const double* means2d, const int32_t* radii, const double* depths,
                                            const int64_t* offsets, int C, int N, int tiles_x, int tiles_y,
                                            int tile_size, uint64_t* keys, int32_t* ids, cudaStream_t stream) {
    return emit_impl(means2d, radii, depths, offsets, C, N, tiles_x, tiles_y, tile_size, keys, ids, stream);
}

cudaError_t studio_cuda::sort_pairs_temp_bytes(int64_t n, int end_bit, size_t* bytes) {
    *bytes = 0;
    if (n <= 0) return cudaSuccess;
    return cub::DeviceRadixSort::SortPairs(nullptr, *bytes, static_cast<const uint64_t*>(nullptr),
                                           static_cast<uint64_t*>(nullptr), static_cast<const int32_t*>(nullptr),
                                           static_cast<int32_t*>(nullptr), static_cast<int>(n), 0, end_bit);
}

cudaError_t studio_cuda::sort_pairs(const uint64_t* keys_in, uint64_t* keys_out, const int32_t* ids_in,
                                    int32_t* ids_out, int64_t n, int end_bit, void* temp, size_t temp_bytes,
                                    cudaStream_t stream) {
    if (n <= 0) return cudaSuccess;
    // LSD radix sort is stable: equal keys keep the emission order (ascending Gaussian index).
    return cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys_in, keys_out, ids_in, ids_out,
                                           static_cast<int>(n), 0, end_bit, stream);
}

cudaError_t studio_cuda::tile_ranges(const uint64_t* sorted_keys, int64_t n, int64_t n_tiles, int32_t* ranges,
                                     cudaStream_t stream) {
    if (n_tiles <= 0) return cudaSuccess;
    cudaError_t err = cudaMemsetAsync(ranges, 0, sizeof(int32_t) * 2 * size_t(n_tiles), stream);
    if (err != cudaSuccess || n <= 0) return err;
    kernels::tile_ranges_kernel<<<grid_for(n), kThreads, 0, stream>>>(sorted_keys, n, ranges);
    return cudaGetLastError();
}
