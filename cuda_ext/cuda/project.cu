// Projection + SH launchers (forward and backward, project_kernels.cuh). CUDA runtime only (no torch headers):
// `nvcc -c project.cu` compiles it.
#include <cstdint>

#include <cuda_runtime.h>

#include "project_args.h"
#include "project_kernels.cuh"

namespace studio_cuda {
namespace {

constexpr int kThreads = 256;

template <typename S>
cudaError_t forward_impl(const ProjectArgs<S>& a, cudaStream_t stream) {
    const int64_t n = int64_t(a.C) * a.N;
    if (n <= 0) return cudaSuccess;
    kernels::project_fwd_kernel<S><<<unsigned((n + kThreads - 1) / kThreads), kThreads, 0, stream>>>(a);
    return cudaGetLastError();
}

template <typename S>
cudaError_t backward_impl(const ProjectArgs<S>& a, S* v_viewmats, cudaStream_t stream) {
    const int64_t n = int64_t(a.C) * a.N;
    if (a.C <= 0) return cudaSuccess;
    if (n > 0) {
        kernels::project_bwd_kernel<S><<<unsigned((n + kThreads - 1) / kThreads), kThreads, 0, stream>>>(a);
        const cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess) return e;
    }
    kernels::cam_reduce_kernel<S><<<unsigned(a.C * 12), kernels::kCamReduceThreads, 0, stream>>>(a.cam_partial, a.C,
                                                                                                  a.N, v_viewmats);
    return cudaGetLastError();
}

}  // namespace
}  // namespace studio_cuda

// Qualified definitions: a signature that drifts from project_args.h is a compile error, not a new overload.
cudaError_t studio_cuda::project_forward(const ProjectArgs<float>& a, cudaStream_t stream) {
    return forward_impl(a, stream);
}
cudaError_t studio_cuda::project_forward(const ProjectArgs<double>& a, cudaStream_t stream) {
    return forward_impl(a, stream);
}
cudaError_t studio_cuda::project_backward(const ProjectArgs<float>& a, float* v_viewmats, cudaStream_t stream) {
    return backward_impl(a, v_viewmats, stream);
}
cudaError_t studio_cuda::project_backward(const ProjectArgs<double>& a, double* v_viewmats, cudaStream_t stream) {
    return backward_impl(a, v_viewmats, stream);
}
