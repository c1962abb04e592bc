// Host-side interface of the CUDA tile rasterizer (cuda_ext/cuda/*.cu).
//
// Plain C++ + the CUDA runtime API only: no torch / ATen / pybind headers, so the kernels compile
// standalone with `nvcc -c` and binding.cpp (the torch extension) only sees these declarations.
// Every launcher takes raw device pointers, sizes and a stream, enqueues work and returns the first
// CUDA error it saw (cudaSuccess otherwise); none of them synchronises the stream.
//
// Data layout (all contiguous, row-major, one float type S = float or double per call):
//   means2d [C,N,2]  conics [C,N,3] (a,b,c)  colors [C,N,D]  opacities [C,N]  depths [C,N]
//   radii [C,N,2] int32 (0 = culled)  backgrounds [C,D] or nullptr
//   render [C,H,W,D]  alphas/final_T [C,H,W]  last_idx [C,H,W] int32
// Gaussian ids in the intersection list index the flattened [C*N] arrays. Tiles of all cameras
// share one id space: tile = cam * tiles_x * tiles_y + ty * tiles_x + tx. tile_ranges [n_tiles,2]
// holds [start,end) into the sorted intersection list.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace studio_cuda {

// Blend constants (must equal studio/render/_common.py).
constexpr double kAlphaMin = 1.0 / 255.0;
constexpr double kAlphaMax = 0.999;
constexpr double kTransmittanceEps = 1e-4;

template <typename S>
struct RasterFwdArgs {
    const S* means2d = nullptr;
    const S* conics = nullptr;
    const S* colors = nullptr;
    const S* opacities = nullptr;
    const S* backgrounds = nullptr;     // [C,D] or nullptr
    const int32_t* tile_ranges = nullptr;
    const int32_t* gauss_ids = nullptr;  // sorted intersection list
    int C = 0, N = 0, D = 0;
    int width = 0, height = 0, tile_size = 16, tiles_x = 0, tiles_y = 0;
    S* render = nullptr;    // [C,H,W,D]
    S* alphas = nullptr;    // [C,H,W]  (1 - final_T)
    S* final_T = nullptr;   // [C,H,W]
    int32_t* last_idx = nullptr;  // [C,H,W]: sorted-list index of the last added Gaussian, -1 if none
};

template <typename S>
struct RasterBwdArgs {
    const S* means2d = nullptr;
    const S* conics = nullptr;
    const S* colors = nullptr;
    const S* opacities = nullptr;
    const S* backgrounds = nullptr;
    const int32_t* tile_ranges = nullptr;
    const int32_t* gauss_ids = nullptr;
    const S* final_T = nullptr;
    const int32_t* last_idx = nullptr;
    const S* v_render = nullptr;   // [C,H,W,D]
    const S* v_alphas = nullptr;   // [C,H,W] or nullptr
    int C = 0, N = 0, D = 0;
    int width = 0, height = 0, tile_size = 16, tiles_x = 0, tiles_y = 0;
    S* scratch = nullptr;     // [C,H,W,D] workspace, needed only when D is not specialised (see below)
    S* v_means2d = nullptr;   // [C,N,2]  accumulated with atomicAdd: zero them first
    S* v_conics = nullptr;    // [C,N,3]
    S* v_colors = nullptr;    // [C,N,D]
    S* v_opacities = nullptr; // [C,N]
};

// Channel counts with register-resident kernels; any other D runs the generic kernel, whose
// backward needs RasterBwdArgs::scratch.
inline bool channels_specialised(int D) { return D >= 1 && D <= 4; }

// Tile sizes the kernels accept: one thread per pixel, whole warps, at most 1024 threads.
inline bool tile_size_supported(int tile_size) {
    return tile_size > 0 && tile_size <= 32 && (tile_size * tile_size) % 32 == 0;
}

// Number of low key bits the radix sort must look at: 32 depth bits + bits of the tile id.
inline int sort_end_bit(int64_t n_tiles) {
    int bits = 0;
    while (bits < 32 && (int64_t(1) << bits) < n_tiles) ++bits;
    return 32 + (bits == 0 ? 1 : bits);
}

// ---- binning (binning.cu) ----------------------------------------------------------------------
// counts[i] = number of tiles touched by Gaussian i of the flattened [C*N] arrays (0 if culled).
cudaError_t tile_counts(const float* means2d, const int32_t* radii, int64_t n, int tiles_x, int tiles_y,
                        int tile_size, int64_t* counts, cudaStream_t stream);
cudaError_t tile_counts(const double* means2d, const int32_t* radii, int64_t n, int tiles_x, int tiles_y,
                        int tile_size, int64_t* counts, cudaStream_t stream);

// Temporary storage (bytes) that inclusive_scan needs for n items.
cudaError_t inclusive_scan_temp_bytes(int64_t n, size_t* bytes);
// out[i] = in[0] + ... + in[i]
cudaError_t inclusive_scan(const int64_t* in, int64_t* out, int64_t n, void* temp, size_t temp_bytes,
                           cudaStream_t stream);

// Writes, for every Gaussian and every tile it touches, key = tile << 32 | orderable(depth) and its
// flattened id, at positions [offsets[i-1], offsets[i]) (offsets = inclusive scan of the counts).
cudaError_t emit_intersections(const float* means2d, const int32_t* radii, const float* depths,
                               const int64_t* offsets, int C, int N, int tiles_x, int tiles_y, int tile_size,
                               uint64_t* keys, int32_t* ids, cudaStream_t stream);
cudaError_t emit_intersections(const double* means2d, const int32_t* radii, const double* depths,
                               const int64_t* offsets, int C, int N, int tiles_x, int tiles_y, int tile_size,
                               uint64_t* keys, int32_t* ids, cudaStream_t stream);

// Stable radix sort of (key, id) pairs on key bits [0, end_bit).
cudaError_t sort_pairs_temp_bytes(int64_t n, int end_bit, size_t* bytes);
cudaError_t sort_pairs(const uint64_t* keys_in, uint64_t* keys_out, const int32_t* ids_in, int32_t* ids_out,
                       int64_t n, int end_bit, void* temp, size_t temp_bytes, cudaStream_t stream);

// ranges [n_tiles,2]: [start,end) of each tile in the sorted keys; empty tiles get [0,0).
cudaError_t tile_ranges(const uint64_t* sorted_keys, int64_t n, int64_t n_tiles, int32_t* ranges,
                        cudaStream_t stream);

// ---- blending (raster_fwd.cu, raster_bwd.cu) -----------------------------------------------------
// One block per tile of tile_size^2 threads, grid = C * tiles_y * tiles_x blocks.
cudaError_t rasterize_forward(const RasterFwdArgs<float>& args, cudaStream_t stream);
cudaError_t rasterize_forward(const RasterFwdArgs<double>& args, cudaStream_t stream);
cudaError_t rasterize_backward(const RasterBwdArgs<float>& args, cudaStream_t stream);
cudaError_t rasterize_backward(const RasterBwdArgs<double>& args, cudaStream_t stream);

}  // namespace studio_cuda
