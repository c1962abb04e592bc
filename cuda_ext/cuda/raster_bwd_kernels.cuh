// Backward blend kernel (launched by raster_bwd.cu; also compiled on the host by host_emulation.h).
//
// One block per tile, one thread per pixel, the tile's Gaussians visited back to
// front (from the block's furthest last contributor) through shared memory. Each thread recovers
// T_i = T_{i+1} / (1 - alpha_i) and the colour accumulated behind Gaussian i; per-Gaussian gradients
// are summed over the warp with shuffles and added with one atomicAdd per warp.
//
// With render_k = sum_i c_ik a_i T_i + T_final bg_k and alpha_out = 1 - T_final:
//   d render_k / d a_i  = c_ik T_i - (sum_{j>i} c_jk a_j T_j + T_final bg_k) / (1 - a_i)
//   d alpha_out / d a_i = T_final / (1 - a_i)
//   d render_k / d c_ik = a_i T_i
//   a_i = min(0.999, o exp(-sigma))  (no gradient when clamped), sigma = 0.5(a dx^2 + c dy^2) + b dx dy,
//   dx = px - mx, dy = py - my.
// Background gradients (sum over pixels of T_final * v_render) are formed by the caller.
#pragma once

#include <cstdint>

#include "raster_common.cuh"

namespace studio_cuda {
namespace kernels {

template <typename S, int CDIM>
__global__ void rasterize_bwd_kernel(const RasterBwdArgs<S> a) {
    constexpr int CREG = CDIM > 0 ? CDIM : 1;
    const int ts = a.tile_size;
    const int BS = ts * ts;
    const int tiles_per_cam = a.tiles_x * a.tiles_y;
    const int64_t tile = blockIdx.x;
    const int cam = int(tile / tiles_per_cam);
    const int tile_local = int(tile - int64_t(cam) * tiles_per_cam);
    const int tile_y = tile_local / a.tiles_x, tile_x = tile_local - tile_y * a.tiles_x;
    const int tid = threadIdx.y * blockDim.x + threadIdx.x;
    const int lane = tid & 31;
    const int i = tile_y * ts + threadIdx.y, j = tile_x * ts + threadIdx.x;
    const bool inside = i < a.height && j < a.width;
    const int D = CDIM > 0 ? CDIM : a.D;
    const S px = S(j) + S(0.5), py = S(i) + S(0.5);
    const int64_t pix = (int64_t(cam) * a.height + i) * a.width + j;

    STUDIO_DYNAMIC_SMEM(smem);
    S* s_xyo = reinterpret_cast<S*>(smem);  // [BS][3]
    S* s_con = s_xyo + 3 * BS;              // [BS][3]
    S* s_col = s_con + 3 * BS;              // [BS][CDIM]
    int32_t* s_id = reinterpret_cast<int32_t*>(s_col + (CDIM > 0 ? CDIM : 0) * BS);
    __shared__ int s_max_last;

    const int start = a.tile_ranges[2 * tile], end_all = a.tile_ranges[2 * tile + 1];
    const S alpha_min = S(kAlphaMin), alpha_max = S(kAlphaMax);

    const S T_final = inside ? a.final_T[pix] : S(1);
    const int32_t last = inside ? a.last_idx[pix] : -1;
    const S v_alpha_out = (inside && a.v_alphas) ? a.v_alphas[pix] : S(0);
    const S* bg = a.backgrounds ? a.backgrounds + int64_t(cam) * D : nullptr;

    // Per-pixel state: v_render and the colour "behind" (starts as the background term T_final bg).
    S v_out[CREG];
    S behind[CREG];
    const S* v_render_px = a.v_render + (inside ? pix * D : 0);
    S* scratch_px = a.scratch ? a.scratch + (inside ? pix * D : 0) : nullptr;
    if constexpr (CDIM > 0) {
#pragma unroll
        for (int k = 0; k < CDIM; ++k) {
            v_out[k] = inside ? v_render_px[k] : S(0);
            behind[k] = (inside && bg) ? T_final * bg[k] : S(0);
        }
    } else {
        v_out[0] = S(0);
        behind[0] = S(0);
        if (inside) {
            for (int k = 0; k < D; ++k) scratch_px[k] = bg ? T_final * bg[k] : S(0);
        }
    }

    if (tid == 0) s_max_last = -1;
    __syncthreads();
    if (inside && last >= start) atomicMax(&s_max_last, last);
    __syncthreads();
    const int end = min(end_all, s_max_last + 1);
    if (end <= start) return;  // uniform over the block

    S T = T_final;
    const int n = end - start;
    const int n_batches = (n + BS - 1) / BS;
    for (int b = 0; b < n_batches; ++b) {
        __syncthreads();  // previous batch fully consumed
        const int batch_end = end - b * BS;  // entries [batch_end - cnt, batch_end), visited downwards
        const int idx = batch_end - 1 - tid;
        if (idx >= start) {
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
        const int cnt = min(BS, batch_end - start);
        for (int t = 0; t < cnt; ++t) {  // uniform trip count: the whole warp shuffles together
            const int sorted_idx = batch_end - 1 - t;
            bool valid = inside && sorted_idx <= last;
            S dx = S(0), dy = S(0), alpha = S(0), e = S(0), w = S(0);
            bool clamped = false;
            const S ca = s_con[3 * t + 0], cb = s_con[3 * t + 1], cc = s_con[3 * t + 2];
            const S op = s_xyo[3 * t + 2];
            if (valid) {
                dx = px - s_xyo[3 * t + 0];
                dy = py - s_xyo[3 * t + 1];
                const S sigma = detail::gaussian_sigma(ca, cb, cc, dx, dy);
                e = detail::exp_(-sigma);
                const S vis = op * e;
                clamped = vis > alpha_max;
                alpha = clamped ? alpha_max : vis;
                valid = (sigma >= S(0)) && (alpha >= alpha_min);
            }
            S v_mx = S(0), v_my = S(0), v_ca = S(0), v_cb = S(0), v_cc = S(0), v_op = S(0);
            S v_col[CREG];
#pragma unroll
            for (int k = 0; k < CREG; ++k) v_col[k] = S(0);
            if (valid) {
                const S ra = S(1) / (S(1) - alpha);
                const S T_i = T * ra;
                w = alpha * T_i;
                S v_alpha = v_alpha_out * T_final * ra;
                if constexpr (CDIM > 0) {
#pragma unroll
                    for (int k = 0; k < CDIM; ++k) {
                        const S ck = s_col[t * CDIM + k];
                        v_alpha += v_out[k] * (ck * T_i - behind[k] * ra);
                        behind[k] += ck * w;
                        v_col[k] = w * v_out[k];
                    }
                } else {
                    const S* col = a.colors + int64_t(s_id[t]) * D;
                    for (int k = 0; k < D; ++k) {
                        const S ck = col[k];
                        const S bk = scratch_px[k];
                        v_alpha += v_render_px[k] * (ck * T_i - bk * ra);
                        scratch_px[k] = bk + ck * w;
                    }
                }
                T = T_i;
                if (!clamped) {
                    v_op = v_alpha * e;
                    const S v_sigma = -v_alpha * alpha;
                    v_ca = S(0.5) * dx * dx * v_sigma;
                    v_cb = dx * dy * v_sigma;
                    v_cc = S(0.5) * dy * dy * v_sigma;
                    v_mx = -v_sigma * (ca * dx + cb * dy);
                    v_my = -v_sigma * (cb * dx + cc * dy);
                }
            }
            if (!__any_sync(detail::kFullMask, valid)) continue;
            const int32_t g = s_id[t];
            v_mx = detail::warp_sum(v_mx);
            v_my = detail::warp_sum(v_my);
            v_ca = detail::warp_sum(v_ca);
            v_cb = detail::warp_sum(v_cb);
            v_cc = detail::warp_sum(v_cc);
            v_op = detail::warp_sum(v_op);
            if (lane == 0) {
                atomicAdd(a.v_means2d + 2 * int64_t(g) + 0, v_mx);
                atomicAdd(a.v_means2d + 2 * int64_t(g) + 1, v_my);
                atomicAdd(a.v_conics + 3 * int64_t(g) + 0, v_ca);
                atomicAdd(a.v_conics + 3 * int64_t(g) + 1, v_cb);
                atomicAdd(a.v_conics + 3 * int64_t(g) + 2, v_cc);
                atomicAdd(a.v_opacities + g, v_op);
            }
            if constexpr (CDIM > 0) {
#pragma unroll
                for (int k = 0; k < CDIM; ++k) {
                    const S s = detail::warp_sum(v_col[k]);
                    if (lane == 0) atomicAdd(a.v_colors + int64_t(g) * CDIM + k, s);
                }
            } else {
                for (int k = 0; k < D; ++k) {
                    const S s = detail::warp_sum(valid ? w * v_render_px[k] : S(0));
                    if (lane == 0) atomicAdd(a.v_colors + int64_t(g) * D + k, s);
                }
            }
        }
    }
}

}  // namespace kernels
}  // namespace studio_cuda
