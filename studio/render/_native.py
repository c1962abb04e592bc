"""Native C++/OpenMP tile rasterizer (``cuda_ext/cpu``). OWNED BY HELPER: being written now.

Contract (same for ``_cuda``):
    available() -> bool                 builds/loads the extension on first call, never raises
    load_error() -> str | None
    rasterize_to_pixels(means2d [C,N,2], conics [C,N,3], colors [C,N,D], opacities [C,N],
                        radii [C,N,2] int32, depths [C,N], width, height, backgrounds [C,D] | None,
                        *, tile_size=16) -> (render [C,H,W,D], alphas [C,H,W,1], extra: dict)
    differentiable w.r.t. means2d, conics, colors, opacities, backgrounds; blend rules in _common.
"""


def available() -> bool:
    return False


def load_error():
    return "not built yet"
