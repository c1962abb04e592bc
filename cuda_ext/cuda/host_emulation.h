// CPU emulation of the rasterizer kernels, for tests on machines without a GPU. Not part of the
// extension: tests/test_cuda_compile.py compiles it with a plain C++ compiler (g++) and runs
// the *same kernel source* (binning_kernels.cuh, raster_fwd_kernels.cuh, raster_bwd_kernels.cuh)
// with one cooperative fiber (POSIX ucontext) per CUDA thread, so that block barriers, warp
// shuffles/votes and shared memory behave as on a GPU (a divergent __syncthreads or warp op can
// never complete and is reported as a deadlock).
// Blocks run one after another; CUB's scan and radix sort are replaced by std::partial_sum and
// std::stable_sort on the same keys; atomics are plain read-modify-writes (one OS thread), so the
// order of floating-point accumulation can differ from a GPU's. Needs the CUDA toolkit headers only
// for the runtime types. Linux/glibc (ucontext).
#pragma once

#define STUDIO_CUDA_HOST_EMULATION 1

#include <math.h>
#include <ucontext.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "emulation_io.h"

#include "raster.h"  // cuda_runtime_api.h: types (dim3, cudaError_t) and host_defines.h

// Replace the CUDA decorations with host meanings. Blocks run one at a time, so `static` storage
// is exactly "one copy per block" for __shared__ variables.
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define STUDIO_DYNAMIC_SMEM(name) unsigned char* name = ::studio_cuda_emu::block_smem()

namespace studio_cuda_emu {

// Cooperative fibers (ucontext) on one OS thread: a thread of the emulated block runs until it
// reaches a barrier, then yields to the scheduler, which resumes the others round-robin.
struct Fiber {
    ucontext_t ctx;
    std::vector<char> stack;
    uint3 tidx;
    int tid = 0;
    bool done = false;
};

struct Barrier {
    int n = 0, arrived = 0;
    uint64_t gen = 0;
    long long acc = 0, result = 0;
};

struct Block {
    Barrier bar;
    std::vector<Barrier> warp_bars;
    std::vector<std::array<std::array<double, 32>, 2>> warp_vals;  // double-buffered shuffle slots
    std::vector<unsigned char> smem;
    std::vector<Fiber> fibers;
    std::function<void()> body;
};

inline Block* g_block = nullptr;
inline Fiber* g_fiber = nullptr;
inline ucontext_t g_sched;
inline uint64_t g_progress = 0;

inline unsigned char* block_smem() { return g_block->smem.data(); }

inline void yield() { swapcontext(&g_fiber->ctx, &g_sched); }

// All b.n participants call arrive(v); each gets the sum of this round's v's.
inline long long arrive(Barrier& b, long long v) {
    ++g_progress;
    b.acc += v;
    if (++b.arrived == b.n) {
        b.result = b.acc;
        b.acc = 0;
        b.arrived = 0;
        ++b.gen;
        return b.result;
    }
    const uint64_t g = b.gen;
    while (b.gen == g) yield();
    return b.result;  // the next round cannot complete before this fiber arrives again
}

// Per-fiber count of warp shuffles, selecting the buffer of the double-buffered slots.
inline std::vector<uint64_t> g_shfl_count;

}  // namespace studio_cuda_emu

inline uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, sizeof(u));
    return u;
}

inline void __syncthreads() { studio_cuda_emu::arrive(studio_cuda_emu::g_block->bar, 0); }
inline int __syncthreads_count(int pred) {
    return int(studio_cuda_emu::arrive(studio_cuda_emu::g_block->bar, pred ? 1 : 0));
}

inline studio_cuda_emu::Barrier& emu_warp_barrier() {
    return studio_cuda_emu::g_block->warp_bars[studio_cuda_emu::g_fiber->tid / 32];
}

inline int __any_sync(unsigned mask, int pred) {
    if (mask != 0xffffffffu) std::abort();  // the kernels only use full-warp votes
    return studio_cuda_emu::arrive(emu_warp_barrier(), pred ? 1 : 0) > 0;
}

template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned off) {
    if (mask != 0xffffffffu) std::abort();
    using namespace studio_cuda_emu;
    const int tid = g_fiber->tid, lane = tid % 32;
    // All lanes execute the same sequence of shuffles, so the parity of this fiber's count selects a
    // buffer nobody reads any more (its last readers have all passed the previous shuffle's barrier).
    auto& vals = g_block->warp_vals[tid / 32][g_shfl_count[tid]++ & 1];
    vals[lane] = double(v);  // exact for float and double
    arrive(emu_warp_barrier(), 0);
    return (lane + int(off) < 32) ? T(vals[lane + off]) : v;
}

// One OS thread: plain read-modify-write is atomic with respect to the fibers.
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
inline int atomicMax(int* p, int v) {
    const int old = *p;
    if (v > old) *p = v;
    return old;
}

#include "binning_kernels.cuh"
#include "raster_bwd_kernels.cuh"
#include "raster_fwd_kernels.cuh"

namespace studio_cuda_emu {

inline void fiber_entry() {
    g_block->body();
    g_fiber->done = true;
    ++g_progress;
    swapcontext(&g_fiber->ctx, &g_sched);
}

// Runs grid blocks of (tx, ty) threads one block at a time, one fiber per CUDA thread.
template <typename F>
void launch_blocks(int64_t grid, int tx, int ty, size_t smem_bytes, F&& body) {
    const int nthreads = tx * ty;
    for (int64_t b = 0; b < grid; ++b) {
        Block blk;
        blk.bar.n = nthreads;
        const int nwarps = (nthreads + 31) / 32;
        blk.warp_bars.resize(nwarps);
        for (int w = 0; w < nwarps; ++w) blk.warp_bars[w].n = std::min(32, nthreads - 32 * w);
        blk.warp_vals.resize(nwarps);
        blk.smem.assign(smem_bytes + 16, 0xFF);  // garbage (NaN pattern) to expose uninitialised reads
        blk.body = body;
        blk.fibers.resize(nthreads);
        g_shfl_count.assign(nthreads, 0);
        g_block = &blk;
        blockIdx = uint3{unsigned(b), 0u, 0u};
        blockDim = dim3(unsigned(tx), unsigned(ty), 1u);
        gridDim = dim3(unsigned(grid), 1u, 1u);
        for (int t = 0; t < nthreads; ++t) {
            Fiber& f = blk.fibers[t];
            f.tid = t;
            f.tidx = uint3{unsigned(t % tx), unsigned(t / tx), 0u};
            f.stack.resize(256 * 1024);
            getcontext(&f.ctx);
            f.ctx.uc_stack.ss_sp = f.stack.data();
            f.ctx.uc_stack.ss_size = f.stack.size();
            f.ctx.uc_link = nullptr;
            makecontext(&f.ctx, fiber_entry, 0);
        }
        int remaining = nthreads;
        while (remaining > 0) {
            const uint64_t before = g_progress;
            for (Fiber& f : blk.fibers) {
                if (f.done) continue;
                g_fiber = &f;
                threadIdx = f.tidx;
                swapcontext(&g_sched, &f.ctx);
                if (f.done) --remaining;
            }
            if (remaining > 0 && g_progress == before) {
                std::fprintf(stderr, "emulation deadlock in block %lld: a barrier can never complete "
                                     "(divergent __syncthreads or warp-level op?)\n", (long long)b);
                std::abort();
            }
        }
        g_block = nullptr;
        g_fiber = nullptr;
    }
}

// Barrier-free kernels: every (block, thread) in turn on the calling thread.
template <typename F>
void launch_serial(int64_t n, int block, F&& body) {
    const int64_t grid = (n + block - 1) / block;
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

// dir/meta.txt: "C N D W H tile_size has_bg has_v_alphas bytes_per_float"; inputs means2d conics colors
// opacities radii(int32) depths [backgrounds] v_render [v_alphas] as raw .bin; writes render alphas
// final_T last_idx tile_ranges gauss_ids v_means2d v_conics v_colors v_opacities .bin and prints n_isects.
template <typename S>
int run(const std::string& dir, int C, int N, int D, int W, int H, int ts, bool has_bg, bool has_va) {
    using namespace studio_cuda;
    const int64_t CN = int64_t(C) * N, P = int64_t(C) * H * W;
    auto means2d = read_file<S>(dir + "/means2d.bin", CN * 2);
    auto conics = read_file<S>(dir + "/conics.bin", CN * 3);
    auto colors = read_file<S>(dir + "/colors.bin", CN * D);
    auto opacities = read_file<S>(dir + "/opacities.bin", CN);
    auto radii = read_file<int32_t>(dir + "/radii.bin", CN * 2);
    auto depths = read_file<S>(dir + "/depths.bin", CN);
    auto bg = has_bg ? read_file<S>(dir + "/backgrounds.bin", int64_t(C) * D) : std::vector<S>();
    auto v_render = read_file<S>(dir + "/v_render.bin", P * D);
    auto v_alphas = has_va ? read_file<S>(dir + "/v_alphas.bin", P) : std::vector<S>();

    if (!tile_size_supported(ts)) return 3;
    const int tiles_x = (W + ts - 1) / ts, tiles_y = (H + ts - 1) / ts;
    const int64_t n_tiles = int64_t(C) * tiles_x * tiles_y;

    // ---- binning (kernels as on the GPU, CUB steps by std algorithms) ----
    std::vector<int64_t> counts(CN), offsets(CN);
    launch_serial(CN, 256, [&] {
        kernels::tile_counts_kernel<S>(means2d.data(), radii.data(), CN, tiles_x, tiles_y, ts, counts.data());
    });
    std::partial_sum(counts.begin(), counts.end(), offsets.begin());
    const int64_t n_isects = CN > 0 ? offsets[CN - 1] : 0;
    std::vector<uint64_t> keys(n_isects), keys_sorted(n_isects);
    std::vector<int32_t> ids(n_isects), ids_sorted(n_isects);
    launch_serial(CN, 256, [&] {
        kernels::emit_kernel<S>(means2d.data(), radii.data(), depths.data(), offsets.data(), C, N, tiles_x, tiles_y,
                                ts, keys.data(), ids.data());
    });
    const int end_bit = sort_end_bit(n_tiles);
    const uint64_t mask = end_bit >= 64 ? ~uint64_t(0) : ((uint64_t(1) << end_bit) - 1);
    std::vector<int64_t> perm(n_isects);
    std::iota(perm.begin(), perm.end(), 0);
    std::stable_sort(perm.begin(), perm.end(),
                     [&](int64_t x, int64_t y) { return (keys[x] & mask) < (keys[y] & mask); });
    for (int64_t k = 0; k < n_isects; ++k) {
        keys_sorted[k] = keys[perm[k]];
        ids_sorted[k] = ids[perm[k]];
    }
    std::vector<int32_t> ranges(2 * n_tiles, 0);
    launch_serial(n_isects, 256, [&] { kernels::tile_ranges_kernel(keys_sorted.data(), n_isects, ranges.data()); });

    // ---- forward ----
    std::vector<S> render(P * D), alphas(P), final_T(P);
    std::vector<int32_t> last_idx(P);
    RasterFwdArgs<S> fa;
    fa.means2d = means2d.data();
    fa.conics = conics.data();
    fa.colors = colors.data();
    fa.opacities = opacities.data();
    fa.backgrounds = has_bg ? bg.data() : nullptr;
    fa.tile_ranges = ranges.data();
    fa.gauss_ids = ids_sorted.data();
    fa.C = C, fa.N = N, fa.D = D, fa.width = W, fa.height = H, fa.tile_size = ts;
    fa.tiles_x = tiles_x, fa.tiles_y = tiles_y;
    fa.render = render.data(), fa.alphas = alphas.data(), fa.final_T = final_T.data();
    fa.last_idx = last_idx.data();
    dispatch_channels(D, [&](auto cdim) {
        constexpr int CD = decltype(cdim)::value;
        launch_blocks(n_tiles, ts, ts, blend_smem_bytes<S, CD>(ts), [&] { kernels::rasterize_fwd_kernel<S, CD>(fa); });
        return 0;
    });

    // ---- backward ----
    std::vector<S> v_means2d(CN * 2, S(0)), v_conics(CN * 3, S(0)), v_colors(CN * D, S(0)), v_opac(CN, S(0));
    std::vector<S> scratch(channels_specialised(D) ? 0 : P * D);
    RasterBwdArgs<S> ba;
    ba.means2d = means2d.data();
    ba.conics = conics.data();
    ba.colors = colors.data();
    ba.opacities = opacities.data();
    ba.backgrounds = has_bg ? bg.data() : nullptr;
    ba.tile_ranges = ranges.data();
    ba.gauss_ids = ids_sorted.data();
    ba.final_T = final_T.data();
    ba.last_idx = last_idx.data();
    ba.v_render = v_render.data();
    ba.v_alphas = has_va ? v_alphas.data() : nullptr;
    ba.C = C, ba.N = N, ba.D = D, ba.width = W, ba.height = H, ba.tile_size = ts;
    ba.tiles_x = tiles_x, ba.tiles_y = tiles_y;
    ba.scratch = scratch.empty() ? nullptr : scratch.data();
    ba.v_means2d = v_means2d.data(), ba.v_conics = v_conics.data(), ba.v_colors = v_colors.data();
    ba.v_opacities = v_opac.data();
    dispatch_channels(D, [&](auto cdim) {
        constexpr int CD = decltype(cdim)::value;
        launch_blocks(n_tiles, ts, ts, blend_smem_bytes<S, CD>(ts), [&] { kernels::rasterize_bwd_kernel<S, CD>(ba); });
        return 0;
    });

    write_file(dir + "/render.bin", render);
    write_file(dir + "/alphas.bin", alphas);
    write_file(dir + "/final_T.bin", final_T);
    write_file(dir + "/last_idx.bin", last_idx);
    write_file(dir + "/tile_ranges.bin", ranges);
    write_file(dir + "/gauss_ids.bin", ids_sorted);
    write_file(dir + "/v_means2d.bin", v_means2d);
    write_file(dir + "/v_conics.bin", v_conics);
    write_file(dir + "/v_colors.bin", v_colors);
    write_file(dir + "/v_opacities.bin", v_opac);
    std::printf("n_isects %lld\n", (long long)n_isects);
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
    int C, N, D, W, H, ts, has_bg, has_va, bytes;
    const int got = std::fscanf(f, "%d %d %d %d %d %d %d %d %d", &C, &N, &D, &W, &H, &ts, &has_bg, &has_va, &bytes);
    std::fclose(f);
    if (got != 9) return 2;
    if (bytes == 8) return run<double>(dir, C, N, D, W, H, ts, has_bg != 0, has_va != 0);
    return run<float>(dir, C, N, D, W, H, ts, has_bg != 0, has_va != 0);
}

}  // namespace studio_cuda_emu
