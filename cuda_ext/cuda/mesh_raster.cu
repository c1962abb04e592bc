// Launchers of the CUDA mesh rasterizer (interface and layout: mesh_raster.h).
#include "mesh_raster.h"
#include "mesh_raster_kernels.cuh"

namespace studio_mesh_cuda {
namespace {

constexpr int kBlock = 256;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // grid-stride loops cover the rest

inline unsigned blocks_for(int64_t n) {
    int64_t b = (n + kBlock - 1) / kBlock;
    if (b > kMaxBlocks) b = kMaxBlocks;
    return unsigned(b < 1 ? 1 : b);
}

template <typename T>
cudaError_t setup_impl(const MeshRasterArgs<T>& a, cudaStream_t s) {
    const int64_t n = int64_t(a.C) * a.F;
    if (n == 0) return cudaSuccess;
    kernels::setup_kernel<T><<<blocks_for(n), kBlock, 0, s>>>(a);
    return cudaGetLastError();
}

template <typename T>
cudaError_t depth_impl(const MeshRasterArgs<T>& a, cudaStream_t s) {
    if (a.n_pairs == 0) return cudaSuccess;
    kernels::depth_pass_kernel<T><<<blocks_for(a.n_pairs), kBlock, 0, s>>>(a);
    return cudaGetLastError();
}

template <typename T>
cudaError_t id_impl(const MeshRasterArgs<T>& a, cudaStream_t s) {
    if (a.n_pairs == 0) return cudaSuccess;
    kernels::id_pass_kernel<T><<<blocks_for(a.n_pairs), kBlock, 0, s>>>(a);
    return cudaGetLastError();
}

template <typename T>
cudaError_t resolve_impl(const MeshRasterArgs<T>& a, cudaStream_t s) {
    const int64_t n = int64_t(a.C) * a.height * a.width;
    if (n == 0) return cudaSuccess;
    kernels::resolve_kernel<T><<<blocks_for(n), kBlock, 0, s>>>(a);
    return cudaGetLastError();
}

template <typename T>
cudaError_t backward_impl(const MeshBackwardArgs<T>& a, cudaStream_t s) {
    const int64_t n = int64_t(a.C) * a.height * a.width;
    if (n == 0) return cudaSuccess;
    kernels::backward_kernel<T><<<blocks_for(n), kBlock, 0, s>>>(a);
    return cudaGetLastError();
}

}  // namespace

cudaError_t mesh_setup(const MeshRasterArgs<float>& a, cudaStream_t s) { return setup_impl(a, s); }
cudaError_t mesh_setup(const MeshRasterArgs<double>& a, cudaStream_t s) { return setup_impl(a, s); }
cudaError_t mesh_depth_pass(const MeshRasterArgs<float>& a, cudaStream_t s) { return depth_impl(a, s); }
cudaError_t mesh_depth_pass(const MeshRasterArgs<double>& a, cudaStream_t s) { return depth_impl(a, s); }
cudaError_t mesh_id_pass(const MeshRasterArgs<float>& a, cudaStream_t s) { return id_impl(a, s); }
cudaError_t mesh_id_pass(const MeshRasterArgs<double>& a, cudaStream_t s) { return id_impl(a, s); }
cudaError_t mesh_resolve(const MeshRasterArgs<float>& a, cudaStream_t s) { return resolve_impl(a, s); }
cudaError_t mesh_resolve(const MeshRasterArgs<double>& a, cudaStream_t s) { return resolve_impl(a, s); }
cudaError_t mesh_backward(const MeshBackwardArgs<float>& a, cudaStream_t s) { return backward_impl(a, s); }
cudaError_t mesh_backward(const MeshBackwardArgs<double>& a, cudaStream_t s) { return backward_impl(a, s); }

}  // namespace studio_mesh_cuda
