// Backward blend launcher. CUDA runtime only (no torch headers): `nvcc -c raster_bwd.cu` compiles it.
#include <cstdint>

#include <cuda_runtime.h>

#include "raster.h"
#include "raster_bwd_kernels.cuh"

namespace studio_cuda {
namespace {

template <typename S, int CDIM>
cudaError_t launch_bwd(const RasterBwdArgs<S>& a, cudaStream_t stream) {
    const int BS = a.tile_size * a.tile_size;
    const size_t smem = blend_smem_bytes<S, CDIM>(a.tile_size);
    auto kernel = kernels::rasterize_bwd_kernel<S, CDIM>;
    if (smem > 48 * 1024) {
        cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
        if (err != cudaSuccess) return err;
    }
    cudaFuncAttributes attr;
    cudaError_t err = cudaFuncGetAttributes(&attr, kernel);
    if (err != cudaSuccess) return err;
    if (attr.maxThreadsPerBlock < BS) return cudaErrorLaunchOutOfResources;  // e.g. 32x32 tiles
    const int64_t n_blocks = int64_t(a.C) * a.tiles_x * a.tiles_y;
    kernel<<<dim3(unsigned(n_blocks)), dim3(a.tile_size, a.tile_size), smem, stream>>>(a);
    return cudaGetLastError();
}

template <typename S>
cudaError_t backward_impl(const RasterBwdArgs<S>& a, cudaStream_t stream) {
    if (!tile_size_supported(a.tile_size) || a.D <= 0) return cudaErrorInvalidValue;
    if (!channels_specialised(a.D) && a.scratch == nullptr) return cudaErrorInvalidValue;
    if (int64_t(a.C) * a.tiles_x * a.tiles_y <= 0) return cudaSuccess;
    return dispatch_channels(a.D, [&](auto cdim) { return launch_bwd<S, decltype(cdim)::value>(a, stream); });
}

}  // namespace
}  // namespace studio_cuda

// Qualified definitions: a signature that drifts from raster.h is a compile error, not a new overload.
cudaError_t studio_cuda::rasterize_backward(const RasterBwdArgs<float>& args, cudaStream_t stream) {
    return backward_impl(args, stream);
}

cudaError_t studio_cuda::rasterize_backward(const RasterBwdArgs<double>& args, cudaStream_t stream) {
    return backward_impl(args, stream);
}
