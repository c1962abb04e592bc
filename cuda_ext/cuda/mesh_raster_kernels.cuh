// CUDA kernels of the mesh rasterizer (layout and visibility rule in mesh_raster.h; per-pixel math in
// mesh_math.h). Barrier-free, one thread per item with grid-stride loops, so mesh_emulation.h can run
// the same source on the CPU for tests.
#pragma once

#include <cstdint>

#include "mesh_math.h"
#include "mesh_raster.h"

namespace studio_mesh_cuda {
namespace kernels {

__device__ __forceinline__ unsigned long long depth_key(float d) {
    return static_cast<unsigned long long>(__float_as_uint(d));
}
__device__ __forceinline__ unsigned long long depth_key(double d) {
    return static_cast<unsigned long long>(__double_as_longlong(d));
}

__device__ __forceinline__ int64_t global_index() {
    return int64_t(blockIdx.x) * int64_t(blockDim.x) + int64_t(threadIdx.x);
}
__device__ __forceinline__ int64_t global_stride() { return int64_t(gridDim.x) * int64_t(blockDim.x); }

template <typename T>
__global__ void setup_kernel(MeshRasterArgs<T> a) {
    const int64_t n = int64_t(a.C) * a.F;
    for (int64_t i = global_index(); i < n; i += global_stride()) {
        const int64_t c = i / a.F, f = i % a.F;
        const T* v = a.verts_screen + c * a.V * 3;
        const int32_t* fc = a.faces + f * 3;
        int32_t* r = a.rects + i * 4;
        int rect[4];
        const bool ok = studio_mesh::face_rect<T>(v + int64_t(fc[0]) * 3, v + int64_t(fc[1]) * 3,
                                                  v + int64_t(fc[2]) * 3, a.near_plane, a.width, a.height, rect);
        for (int k = 0; k < 4; ++k) r[k] = ok ? rect[k] : 0;
        a.counts[i] = ok ? int64_t(rect[1] - rect[0] + 1) * int64_t(rect[3] - rect[2] + 1) : 0;
    }
}

// Pair p -> (box index i, pixel x, pixel y); offsets is the inclusive scan of the counts.
template <typename T>
__device__ __forceinline__ void locate_pair(const MeshRasterArgs<T>& a, int64_t p, int64_t* i, int* x, int* y) {
    int64_t lo = 0, hi = int64_t(a.C) * a.F - 1;  // first i with offsets[i] > p
    while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (a.offsets[mid] > p) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    const int64_t start = lo > 0 ? a.offsets[lo - 1] : 0;
    const int32_t* r = a.rects + lo * 4;
    const int64_t w = int64_t(r[1] - r[0] + 1);
    const int64_t local = p - start;
    *i = lo;
    *x = r[0] + int(local % w);
    *y = r[2] + int(local / w);
}

template <typename T>
__device__ __forceinline__ bool eval_pair(const MeshRasterArgs<T>& a, int64_t i, int x, int y, T* bary, T* depth) {
    const int64_t c = i / a.F, f = i % a.F;
    const T* v = a.verts_screen + c * a.V * 3;
    const int32_t* fc = a.faces + f * 3;
    return studio_mesh::eval_pixel<T>(v + int64_t(fc[0]) * 3, v + int64_t(fc[1]) * 3, v + int64_t(fc[2]) * 3,
                                      T(x) + T(0.5), T(y) + T(0.5), a.far_plane, bary, depth);
}

template <typename T>
__global__ void depth_pass_kernel(MeshRasterArgs<T> a) {
    for (int64_t p = global_index(); p < a.n_pairs; p += global_stride()) {
        int64_t i;
        int x, y;
        locate_pair(a, p, &i, &x, &y);
        T b[3], d;
        if (!eval_pair(a, i, x, y, b, &d)) continue;
        const int64_t o = ((i / a.F) * a.height + y) * a.width + x;
        atomicMin(a.zbuf + o, depth_key(d));
    }
}

template <typename T>
__global__ void id_pass_kernel(MeshRasterArgs<T> a) {
    for (int64_t p = global_index(); p < a.n_pairs; p += global_stride()) {
        int64_t i;
        int x, y;
        locate_pair(a, p, &i, &x, &y);
        T b[3], d;
        if (!eval_pair(a, i, x, y, b, &d)) continue;
        const int64_t o = ((i / a.F) * a.height + y) * a.width + x;
        if (depth_key(d) == a.zbuf[o]) atomicMin(a.ibuf + o, int(i % a.F));
    }
}

template <typename T>
__global__ void resolve_kernel(MeshRasterArgs<T> a) {
    const int64_t P = int64_t(a.height) * a.width, n = int64_t(a.C) * P;
    for (int64_t o = global_index(); o < n; o += global_stride()) {
        const int32_t f = a.ibuf[o];
        T b[3] = {T(0), T(0), T(0)};
        T d = T(0);
        bool hit = false;
        if (f != 0x7fffffff) {
            const int64_t c = o / P, p = o % P;
            hit = eval_pair(a, c * a.F + f, int(p % a.width), int(p / a.width), b, &d);
        }
        a.face_id[o] = hit ? f : -1;
        for (int k = 0; k < 3; ++k) a.bary[o * 3 + k] = hit ? b[k] : T(0);
        a.depth[o] = hit ? d : T(0);
    }
}

template <typename T>
__global__ void backward_kernel(MeshBackwardArgs<T> a) {
    const int64_t P = int64_t(a.height) * a.width, n = int64_t(a.C) * P;
    for (int64_t o = global_index(); o < n; o += global_stride()) {
        const int32_t f = a.face_id[o];
        if (f < 0) continue;
        const int64_t c = o / P, p = o % P;
        const T* v = a.verts_screen + c * a.V * 3;
        const int32_t* fc = a.faces + int64_t(f) * 3;
        T g[9];
        studio_mesh::backward_pixel<T>(v + int64_t(fc[0]) * 3, v + int64_t(fc[1]) * 3, v + int64_t(fc[2]) * 3,
                                       T(p % a.width) + T(0.5), T(p / a.width) + T(0.5), a.g_bary + o * 3,
                                       a.g_depth[o], g);
        T* gv = a.g_verts + c * a.V * 3;
        for (int k = 0; k < 3; ++k)
            for (int j = 0; j < 3; ++j) atomicAdd(gv + int64_t(fc[k]) * 3 + j, g[k * 3 + j]);
    }
}

}  // namespace kernels
}  // namespace studio_mesh_cuda
