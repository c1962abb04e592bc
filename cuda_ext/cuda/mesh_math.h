// Per-pixel triangle math of the mesh rasterizer, shared by every backend that compiles C++:
// the native CPU kernel (cuda_ext/cpu/mesh_raster.cpp), the CUDA kernels (mesh_raster_kernels.cuh)
// and their host emulation (mesh_emulation.h). The dense torch twin (studio/render/_mesh_torch.py)
// evaluates the *same expressions in the same order*, so with floating-point contraction disabled
// (-ffp-contract=off for g++, --fmad=false for nvcc) the backends agree bit for bit.
//
// Screen-space vertex k of a triangle is (x_k, y_k, z_k): pixel coordinates (OpenCV / gsplat: pixel
// (row i, column j) has its centre at (j + 0.5, i + 0.5)) and view-space depth z_k > 0.
//
//   e_0 = (x1 - px)(y2 - py) - (x2 - px)(y1 - py)         (e_1, e_2: indices shifted cyclically)
//   A   = (x1 - x0)(y2 - y0) - (x2 - x0)(y1 - y0)          (twice the signed screen area)
//   inside  <=>  A > 0 and all e_k >= 0,  or  A < 0 and all e_k <= 0     (both orientations drawn)
//   l_k = e_k / A                                           (screen-space barycentrics)
//   q_k = l_k / z_k,  s = q_0 + q_1 + q_2
//   depth = 1 / s,  b_k = q_k / s                           (perspective-correct barycentrics)
//
// 1/z is affine in screen space, hence depth = 1/s is the exact view-space depth of the surface
// point under the pixel centre and b_k its exact object-space barycentrics.
//
// Backward (given dL/db_k = gb_k and dL/ddepth = gd), derived by hand and tested against autograd:
//   gq_k = depth (gb_k - sum_i gb_i b_i - gd depth)
//   dL/dz_k = -gq_k q_k / z_k,    gl_k = gq_k / z_k
//   c_k = (gl_k - sum_i gl_i l_i) / A                      (the A-dependence folded in: A = sum e_k)
//   with dx_k = x_k - px, dy_k = y_k - py (indices mod 3):
//   dL/dx_k = c_{k+2} dy_{k+1} - c_{k+1} dy_{k+2},   dL/dy_k = c_{k+1} dx_{k+2} - c_{k+2} dx_{k+1}
#pragma once

#if defined(__CUDACC__) && !defined(STUDIO_CUDA_HOST_EMULATION)
#define STUDIO_MESH_HD __host__ __device__ __forceinline__
#else
#define STUDIO_MESH_HD inline
#endif

namespace studio_mesh {

// Evaluates triangle (v0, v1, v2) (each x, y, z) at pixel centre (px, py). Returns false when the
// pixel is outside, the triangle is degenerate, or the depth is not below far; otherwise writes the
// perspective-correct barycentrics and the view-space depth.
template <typename T>
STUDIO_MESH_HD bool eval_pixel(const T* v0, const T* v1, const T* v2, T px, T py, T far_plane, T* bary, T* depth) {
    const T x0 = v0[0], y0 = v0[1], z0 = v0[2];
    const T x1 = v1[0], y1 = v1[1], z1 = v1[2];
    const T x2 = v2[0], y2 = v2[1], z2 = v2[2];
    const T e0 = (x1 - px) * (y2 - py) - (x2 - px) * (y1 - py);
    const T e1 = (x2 - px) * (y0 - py) - (x0 - px) * (y2 - py);
    const T e2 = (x0 - px) * (y1 - py) - (x1 - px) * (y0 - py);
    const T area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0);
    bool inside;
    if (area > T(0)) {
        inside = e0 >= T(0) && e1 >= T(0) && e2 >= T(0);
    } else if (area < T(0)) {
        inside = e0 <= T(0) && e1 <= T(0) && e2 <= T(0);
    } else {
        inside = false;
    }
    if (!inside) return false;
    const T q0 = (e0 / area) / z0;
    const T q1 = (e1 / area) / z1;
    const T q2 = (e2 / area) / z2;
    const T s = q0 + q1 + q2;
    const T d = T(1) / s;
    if (!(d < far_plane)) return false;
    bary[0] = q0 / s;
    bary[1] = q1 / s;
    bary[2] = q2 / s;
    *depth = d;
    return true;
}

// Gradient of (bary, depth) at pixel (px, py) of a covering triangle w.r.t. its screen vertices:
// g_v[k*3 + {0,1,2}] = dL/d(x_k, y_k, z_k) (overwritten, not accumulated).
template <typename T>
STUDIO_MESH_HD void backward_pixel(const T* v0, const T* v1, const T* v2, T px, T py, const T* gb, T gd, T* g_v) {
    const T* v[3] = {v0, v1, v2};
    const T x0 = v0[0], y0 = v0[1];
    const T x1 = v1[0], y1 = v1[1];
    const T x2 = v2[0], y2 = v2[1];
    const T e[3] = {(x1 - px) * (y2 - py) - (x2 - px) * (y1 - py), (x2 - px) * (y0 - py) - (x0 - px) * (y2 - py),
                    (x0 - px) * (y1 - py) - (x1 - px) * (y0 - py)};
    const T area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0);
    T l[3], q[3];
    for (int k = 0; k < 3; ++k) {
        l[k] = e[k] / area;
        q[k] = l[k] / v[k][2];
    }
    const T s = q[0] + q[1] + q[2];
    const T d = T(1) / s;
    T gbb = T(0);
    for (int k = 0; k < 3; ++k) gbb += gb[k] * (q[k] / s);
    T gl[3];
    T gll = T(0);
    for (int k = 0; k < 3; ++k) {
        const T gq = d * (gb[k] - gbb - gd * d);
        g_v[k * 3 + 2] = -gq * q[k] / v[k][2];
        gl[k] = gq / v[k][2];
        gll += gl[k] * l[k];
    }
    T c[3], dx[3], dy[3];
    for (int k = 0; k < 3; ++k) {
        c[k] = (gl[k] - gll) / area;
        dx[k] = v[k][0] - px;
        dy[k] = v[k][1] - py;
    }
    for (int k = 0; k < 3; ++k) {
        const int k1 = (k + 1) % 3, k2 = (k + 2) % 3;
        g_v[k * 3 + 0] = c[k2] * dy[k1] - c[k1] * dy[k2];
        g_v[k * 3 + 1] = c[k1] * dx[k2] - c[k2] * dx[k1];
    }
}

// Inclusive pixel range [lo, hi] (clamped to [0, n-1]) whose centres can lie in [a, b]; one extra
// pixel on each side keeps the range conservative under rounding (eval_pixel decides exactly).
// Returns false when it is empty or the bounds are not finite.
template <typename T>
STUDIO_MESH_HD bool pixel_range(T a, T b, int n, int* lo, int* hi) {
    const double da = double(a), db = double(b);
    if (!(da == da) || !(db == db)) return false;  // NaN
    if (db < -2.0 || da > double(n) + 2.0) return false;  // also rejects +-inf on the wrong side
    double l = da - 1.5, h = db + 0.5;  // centre j + 0.5 in [a, b] <=> j in [a - 0.5, b - 0.5], +-1
    if (l < 0.0) l = 0.0;
    if (h > double(n - 1)) h = double(n - 1);
    if (l > h) return false;
    *lo = int(l);  // l >= 0: truncation == floor
    *hi = int(h);
    return true;
}

// Pixel bounding box of a triangle in camera space, or false when the triangle is culled: a vertex
// at z <= near (no clipping: faces that cross the near plane are dropped whole), a non-finite
// coordinate, or a box that misses the image.
template <typename T>
STUDIO_MESH_HD bool face_rect(const T* v0, const T* v1, const T* v2, T near_plane, int width, int height, int* rect) {
    if (!(v0[2] > near_plane) || !(v1[2] > near_plane) || !(v2[2] > near_plane)) return false;
    T xmin = v0[0], xmax = v0[0], ymin = v0[1], ymax = v0[1];
    const T* o[2] = {v1, v2};
    for (int k = 0; k < 2; ++k) {
        xmin = o[k][0] < xmin ? o[k][0] : xmin;
        xmax = o[k][0] > xmax ? o[k][0] : xmax;
        ymin = o[k][1] < ymin ? o[k][1] : ymin;
        ymax = o[k][1] > ymax ? o[k][1] : ymax;
    }
    if (!pixel_range(xmin, xmax, width, &rect[0], &rect[1])) return false;
    if (!pixel_range(ymin, ymax, height, &rect[2], &rect[3])) return false;
    return true;
}

}  // namespace studio_mesh
