// Forward blend kernel (launched by raster_fwd.cu; also compiled on the host by host_emulation.h).
//
// One block per tile, one thread per pixel; the tile's Gaussians (sorted by depth) are streamed
// through shared memory in batches of tile_size^2 and blended front to back with gsplat's early
// termination. Each pixel stores its final transmittance and the sorted-list index of its last
// added Gaussian for the backward pass.
#pragma once

#include <cstdint>

#include "raster_common.cuh"

namespace studio_cuda {
namespace kernels {

// CDIM > 0: channels held in registers / shared memory; CDIM == 0: any D, accumulated in `render`.
template <typename S, int CDIM>
__global__ void rasterize_fwd_kernel(const RasterFwdArgs<S> a) {
    const int ts = a.tile_size;
    const int BS = ts * ts;
    const int tiles_per_cam = a.tiles_x * a.tiles_y;
    const int64_t tile = blockIdx.x;
    const int cam = int(tile / tiles_per_cam);
    const int tile_local = int(tile - int64_t(cam) * tiles_per_cam);
    const int tile_y = tile_local / a.tiles_x, tile_x = tile_local - tile_y * a.tiles_x;
    const int tid = threadIdx.y * blockDim.x + threadIdx.x;
    const int i = tile_y * ts + threadIdx.y, j = tile_x * ts + threadIdx.x;
    const bool inside = i < a.height && j < a.width;
    const int D = CDIM > 0 ? CDIM : a.D;
    const S px = S(j) + S(0.5), py = S(i) + S(0.5);
    const int64_t pix = (int64_t(cam) * a.height + i) * a.width + j;

    STUDIO_DYNAMIC_SMEM(smem);
    S* s_xyo = reinterpret_cast<S*>(smem);  // [BS][3] mean x, mean y, opacity
    S* s_con = s_xyo + 3 * BS;              // [BS][3] conic a, b, c
    S* s_col = s_con + 3 * BS;              // [BS][CDIM]
    int32_t* s_id = reinterpret_cast<int32_t*>(s_col + (CDIM > 0 ? CDIM : 0) * BS);

    const int start = a.tile_ranges[2 * tile], end = a.tile_ranges[2 * tile + 1];
    const S alpha_min = S(kAlphaMin), alpha_max = S(kAlphaMax), t_eps = S(kTransmittanceEps);

    S T = S(1);
    int32_t last = -1;
    bool done = !inside;
    S acc[CDIM > 0 ? CDIM : 1];
#pragma unroll
    for (int k = 0; k < (CDIM > 0 ? CDIM : 1); ++k) acc[k] = S(0);
    S* out = a.render + (inside ? pix * D : 0);
    if constexpr (CDIM == 0) {
        if (inside) {
            for (int k = 0; k < D; ++k) out[k] = S(0);
        }
    }

    const int n = end - start;
    const int n_batches = (n + BS - 1) / BS;
    for (int b = 0; b < n_batches; ++b) {
        // Barrier (protects the previous batch) and block-wide exit once every pixel is done.
        if (__syncthreads_count(done) == BS) break;
        const int batch_start = start + b * BS;
        const int idx = batch_start + tid;
        if (idx < end) {
            const int32_t g = a.gauss_ids[idx];
            s_id[tid] = g;
            s_xyo[3 * tid + 0] = a.means2d[2 * int64_t(g) + 0];
            s_xyo[3 * tid + 1] = a.means2d[2 * int64_t(g) + 1];
            s_xyo[3 * tid + 2] = a.opacities[g];
            s_con[3 * tid + 0] = a.conics[3 * int64_t(g) + 0];
            s_con[3 * tid + 1] = a.conics[3 * int64_t(g) + 1];
            s_con[3 * tid + 2] = a.conics[3 * int64_t(g) + 2];
            if constexpr (CDIM > 0) {
#pragma unroll
                for (int k = 0; k < CDIM; ++k) s_col[tid * CDIM + k] = a.colors[int64_t(g) * CDIM + k];
            }
        }
        __syncthreads();
        const int cnt = min(BS, end - batch_start);
        for (int t = 0; t < cnt && !done; ++t) {
            const S dx = px - s_xyo[3 * t + 0];
            const S dy = py - s_xyo[3 * t + 1];
            const S sigma = detail::gaussian_sigma(s_con[3 * t + 0], s_con[3 * t + 1], s_con[3 * t + 2], dx, dy);
            if (sigma < S(0)) continue;
            const S vis = s_xyo[3 * t + 2] * detail::exp_(-sigma);
            const S alpha = vis > alpha_max ? alpha_max : vis;  // NaN stays NaN and is skipped below
            if (!(alpha >= alpha_min)) continue;
            const S next_T = T * (S(1) - alpha);
            if (next_T <= t_eps) {  // early termination: this Gaussian is not added
                done = true;
                break;
            }
            const S w = alpha * T;
            if constexpr (CDIM > 0) {
#pragma unroll
                for (int k = 0; k < CDIM; ++k) acc[k] += w * s_col[t * CDIM + k];
            } else {
                const S* col = a.colors + int64_t(s_id[t]) * D;
                for (int k = 0; k < D; ++k) out[k] += w * col[k];
            }
            T = next_T;
            last = batch_start + t;
        }
    }

    if (!inside) return;
    const S* bg = a.backgrounds ? a.backgrounds + int64_t(cam) * D : nullptr;
    if constexpr (CDIM > 0) {
#pragma unroll
        for (int k = 0; k < CDIM; ++k) out[k] = acc[k] + (bg ? T * bg[k] : S(0));
    } else {
        if (bg) {
            for (int k = 0; k < D; ++k) out[k] += T * bg[k];
        }
    }
    a.alphas[pix] = S(1) - T;
    a.final_T[pix] = T;
    a.last_idx[pix] = last;
}

}  // namespace kernels
}  // namespace studio_cuda
