// Host-side interface of the CUDA mesh rasterizer (mesh_raster.cu, kernels in mesh_raster_kernels.cuh).
//
// Plain C++ + the CUDA runtime API only (no torch headers): the kernels compile standalone with
// `nvcc -c`, and mesh_binding.cpp (the torch extension "studio_cuda_mesh") only sees these
// declarations. Every launcher enqueues work on `stream` and returns the first CUDA error it saw.
//
// Data layout (contiguous, row-major; one float type T = float or double per call):
//   verts_screen [C,V,3] (x_pix, y_pix, z_view)   faces [F,3] int32
//   rects [C*F,4] int32 (x0, x1, y0, y1 inclusive pixel box)   counts [C*F] int64 (pixels of the box, 0 = culled)
//   offsets [C*F] int64 = inclusive scan of counts; pair p in [offsets[i-1], offsets[i]) is pixel
//   (p - offsets[i-1]) of box i, row-major inside the box
//   zbuf [C*H*W] uint64 (init all ones)   ibuf [C*H*W] int32 (init INT32_MAX)
//   face_id [C,H,W] int32 (-1 background)   bary [C,H,W,3]   depth [C,H,W]
//   g_bary [C,H,W,3]   g_depth [C,H,W]   g_verts [C,V,3] (accumulated with atomicAdd: zero it first)
// Visibility: smallest depth wins, exact ties go to the smallest face index (as the CPU backends):
// pass 1 atomicMin's the depth's bit pattern (monotonic for positive floats) into zbuf, pass 2
// atomicMin's the face index of the pairs whose depth equals zbuf into ibuf.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace studio_mesh_cuda {

template <typename T>
struct MeshRasterArgs {
    const T* verts_screen = nullptr;
    const int32_t* faces = nullptr;
    int C = 0, width = 0, height = 0;
    int64_t V = 0, F = 0;
    T near_plane = T(0.01), far_plane = T(100);
    int32_t* rects = nullptr;
    int64_t* counts = nullptr;
    const int64_t* offsets = nullptr;
    int64_t n_pairs = 0;
    unsigned long long* zbuf = nullptr;
    int32_t* ibuf = nullptr;
    int32_t* face_id = nullptr;
    T* bary = nullptr;
    T* depth = nullptr;
};

template <typename T>
struct MeshBackwardArgs {
    const T* verts_screen = nullptr;
    const int32_t* faces = nullptr;
    const int32_t* face_id = nullptr;
    const T* g_bary = nullptr;
    const T* g_depth = nullptr;
    int C = 0, width = 0, height = 0;
    int64_t V = 0;
    T* g_verts = nullptr;
};

// Per (camera, face): pixel box and pair count (rects, counts).
cudaError_t mesh_setup(const MeshRasterArgs<float>& a, cudaStream_t stream);
cudaError_t mesh_setup(const MeshRasterArgs<double>& a, cudaStream_t stream);
// Pass 1 over the n_pairs (face, pixel) pairs: zbuf = min depth key (needs offsets).
cudaError_t mesh_depth_pass(const MeshRasterArgs<float>& a, cudaStream_t stream);
cudaError_t mesh_depth_pass(const MeshRasterArgs<double>& a, cudaStream_t stream);
// Pass 2: ibuf = smallest face index among the pairs at the zbuf depth.
cudaError_t mesh_id_pass(const MeshRasterArgs<float>& a, cudaStream_t stream);
cudaError_t mesh_id_pass(const MeshRasterArgs<double>& a, cudaStream_t stream);
// Per pixel: face_id, bary and depth from ibuf.
cudaError_t mesh_resolve(const MeshRasterArgs<float>& a, cudaStream_t stream);
cudaError_t mesh_resolve(const MeshRasterArgs<double>& a, cudaStream_t stream);
// Per pixel: analytic gradient of (bary, depth) scattered into g_verts.
cudaError_t mesh_backward(const MeshBackwardArgs<float>& a, cudaStream_t stream);
cudaError_t mesh_backward(const MeshBackwardArgs<double>& a, cudaStream_t stream);

}  // namespace studio_mesh_cuda
