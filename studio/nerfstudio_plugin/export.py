"""The standard 3DGS PLY (the same file ``studio generate`` writes) from a nerfstudio checkpoint of a
``studio-*`` method. Needs torch only, not nerfstudio: the checkpoint is read with
``torch.load(weights_only=True)``.

    python -m studio.nerfstudio_plugin.export outputs/.../nerfstudio_models/step-000000399.ckpt model.ply
    python -m studio.nerfstudio_plugin.export outputs/.../config.yml model.ply   # the newest checkpoint
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from ..errors import UserError
from ..students.gaussians import GaussianModel

#: the key under which the studio pipeline keeps its state in nerfstudio's ``pipeline`` state dict
STATE_KEY = "studio"


def find_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` itself when it is a ``.ckpt`` file; for a run folder or its ``config.yml`` the newest
    ``nerfstudio_models/step-*.ckpt``."""
    p = Path(path)
    if p.is_file() and p.suffix == ".ckpt":
        return p
    folder = p.parent if p.is_file() or p.suffix in (".yml", ".yaml") else p
    ckpts = sorted((folder / "nerfstudio_models").glob("step-*.ckpt"))
    if not ckpts:
        raise UserError(f"no nerfstudio checkpoint found at '{path}': give a step-*.ckpt file, a run folder "
                        "or its config.yml (ns-train writes them under <run>/nerfstudio_models/)")
    return ckpts[-1]


def load_gaussians(path: str | os.PathLike) -> GaussianModel:
    """The Gaussian student of a ``studio-*`` nerfstudio checkpoint (the final stage's)."""
    ckpt = find_checkpoint(path)
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input
        raise UserError(f"cannot read the nerfstudio checkpoint '{ckpt}' ({type(e).__name__}: {e}); "
                        "give a step-*.ckpt written by ns-train with a studio-* method") from None
    studio = state.get("pipeline", {}).get(STATE_KEY) if isinstance(state, dict) else None
    if not studio or "stage" not in studio:
        raise UserError(f"'{ckpt}' is not a checkpoint of a studio-* nerfstudio method (no '{STATE_KEY}' state "
                        "in its pipeline); export other methods with ns-export")
    st = studio["stage"]
    return GaussianModel(st["params"], st["sh_degree"], active_sh_degree=st["active_sh_degree"])


def export_ply(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write ``out`` (standard 3DGS PLY, Inria layout) from a ``studio-*`` nerfstudio checkpoint."""
    return load_gaussians(checkpoint).save_ply(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m studio.nerfstudio_plugin.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="step-*.ckpt, a run folder or its config.yml")
    ap.add_argument("out", help="output .ply (or .splat)")
    a = ap.parse_args(argv)
    try:
        model = load_gaussians(a.checkpoint)
        path = model.save_splat(a.out) if str(a.out).endswith(".splat") else model.save_ply(a.out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({model.num_gaussians} Gaussians)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
