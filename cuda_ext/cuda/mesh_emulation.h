// CPU emulation of the CUDA mesh-rasterizer kernels, for tests on machines without a GPU. Not part of
// the extension: tests/test_mesh_cuda_compile.py compiles it with g++ (-ffp-contract=off) and runs
// the *same kernel source* (mesh_raster_kernels.cuh) thread by thread on one OS thread. The kernels
// have no barriers or warp operations, so a serial loop over (block, thread) is a faithful schedule;
// grids are deliberately small so the grid-stride loops run several rounds. The count scan (torch's
// cumsum in mesh_binding.cpp) is std::partial_sum; atomics are plain read-modify-writes.
// Needs the CUDA toolkit headers only for the runtime types (dim3, cudaError_t).
#pragma once

#define STUDIO_CUDA_HOST_EMULATION 1

#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include "emulation_io.h"

#include "mesh_raster.h"  // cuda_runtime_api.h: dim3, uint3, cudaError_t

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

inline uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, sizeof(u));
    return u;
}
inline long long __double_as_longlong(double d) {
    long long u;
    std::memcpy(&u, &d, sizeof(u));
    return u;
}
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
    const unsigned long long old = *p;
    if (v < old) *p = v;
    return old;
}
inline int atomicMin(int* p, int v) {
    const int old = *p;
    if (v < old) *p = v;
    return old;
}
inline float atomicAdd(float* p, float v) {
    const float old = *p;
    *p = old + v;
    return old;
}
inline double atomicAdd(double* p, double v) {
    const double old = *p;
    *p = old + v;
    return old;
}

#include "mesh_raster_kernels.cuh"

namespace studio_mesh_emu {

// Runs `body` for every thread of a grid of at most `max_blocks` blocks of `block` threads.
template <typename F>
void launch(int64_t n, int block, int64_t max_blocks, F&& body) {
    int64_t grid = (n + block - 1) / block;
    if (grid > max_blocks) grid = max_blocks;
    if (grid < 1) grid = 1;
    for (int64_t b = 0; b < grid; ++b) {
        for (int x = 0; x < block; ++x) {
            threadIdx = uint3{unsigned(x), 0u, 0u};
            blockIdx = uint3{unsigned(b), 0u, 0u};
            blockDim = dim3(unsigned(block), 1u, 1u);
            gridDim = dim3(unsigned(grid), 1u, 1u);
            body();
        }
    }
}

using studio_emu_io::read_file;
using studio_emu_io::write_file;

// dir/meta.txt: "C V F W H near far bytes_per_float"; inputs verts_screen faces(int32) g_bary g_depth as
// raw .bin; writes face_id(int32) bary depth g_verts .bin and prints the number of (face, pixel) pairs.
template <typename T>
int run(const std::string& dir, int C, int64_t V, int64_t F, int W, int H, double near_plane, double far_plane) {
    using namespace studio_mesh_cuda;
    const int64_t P = int64_t(C) * H * W, n_boxes = int64_t(C) * F;
    auto vs = read_file<T>(dir + "/verts_screen.bin", static_cast<size_t>(C * V * 3));
    auto faces = read_file<int32_t>(dir + "/faces.bin", static_cast<size_t>(F * 3));
    auto g_bary = read_file<T>(dir + "/g_bary.bin", static_cast<size_t>(P * 3));
    auto g_depth = read_file<T>(dir + "/g_depth.bin", static_cast<size_t>(P));

    std::vector<int32_t> rects(static_cast<size_t>(n_boxes) * 4), ibuf(static_cast<size_t>(P), INT_MAX), fid(static_cast<size_t>(P));
    std::vector<int64_t> counts(static_cast<size_t>(n_boxes)), offsets(static_cast<size_t>(n_boxes));
    std::vector<unsigned long long> zbuf(static_cast<size_t>(P), ~0ull);
    std::vector<T> bary(static_cast<size_t>(P) * 3), depth(static_cast<size_t>(P)), g_verts(static_cast<size_t>(C * V * 3), T(0));

    MeshRasterArgs<T> a;
    a.verts_screen = vs.data();
    a.faces = faces.data();
    a.C = C, a.V = V, a.F = F, a.width = W, a.height = H;
    a.near_plane = T(near_plane), a.far_plane = T(far_plane);
    a.rects = rects.data(), a.counts = counts.data();
    launch(n_boxes, 64, 3, [&] { kernels::setup_kernel<T>(a); });
    std::partial_sum(counts.begin(), counts.end(), offsets.begin());
    a.offsets = offsets.data();
    a.n_pairs = n_boxes > 0 ? offsets.back() : 0;
    a.zbuf = zbuf.data(), a.ibuf = ibuf.data();
    a.face_id = fid.data(), a.bary = bary.data(), a.depth = depth.data();
    if (a.n_pairs > 0) {
        launch(a.n_pairs, 128, 5, [&] { kernels::depth_pass_kernel<T>(a); });
        launch(a.n_pairs, 128, 5, [&] { kernels::id_pass_kernel<T>(a); });
    }
    launch(P, 128, 7, [&] { kernels::resolve_kernel<T>(a); });

    MeshBackwardArgs<T> b;
    b.verts_screen = vs.data();
    b.faces = faces.data();
    b.face_id = fid.data();
    b.g_bary = g_bary.data();
    b.g_depth = g_depth.data();
    b.C = C, b.V = V, b.width = W, b.height = H;
    b.g_verts = g_verts.data();
    launch(P, 128, 7, [&] { kernels::backward_kernel<T>(b); });

    write_file(dir + "/face_id.bin", fid);
    write_file(dir + "/bary.bin", bary);
    write_file(dir + "/depth.bin", depth);
    write_file(dir + "/g_verts.bin", g_verts);
    std::printf("n_pairs %lld\n", (long long)a.n_pairs);
    return 0;
}

inline int cli_main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s DIR (with DIR/meta.txt and the input .bin files)\n", argv[0]);
        return 2;
    }
    const std::string dir = argv[1];
    FILE* f = std::fopen((dir + "/meta.txt").c_str(), "r");
    if (!f) return 2;
    int C, W, H, bytes;
    long long V, F;
    double near_plane, far_plane;
    const int got = std::fscanf(f, "%d %lld %lld %d %d %lf %lf %d", &C, &V, &F, &W, &H, &near_plane, &far_plane, &bytes);
    std::fclose(f);
    if (got != 8) return 2;
    if (bytes == 8) return run<double>(dir, C, V, F, W, H, near_plane, far_plane);
    return run<float>(dir, C, V, F, W, H, near_plane, far_plane);
}

}  // namespace studio_mesh_emu
