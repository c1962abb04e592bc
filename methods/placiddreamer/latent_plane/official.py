"""Official PlacidDreamer Latent-Plane checkpoints (``coarse_*.pt`` / ``fine_*.pt``) -> our planes.

The official modules name their layers differently and hold the shared attention twice; this module maps
their state dicts onto :class:`~.networks.CoarsePlane` / :class:`~.networks.FinePlane`.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .networks import CoarsePlane, FinePlane, LatentPlane


def official_key_map(kind: str) -> dict[str, str]:
    """Official ``coarse_*.pt`` / ``fine_*.pt`` key prefix -> our prefix (``kind`` "coarse" or "fine").
    The official shared attention appears twice (``transformer.0`` and ``transformer.1``, the same
    tensors), and both map to our single ``attn``."""
    if kind == "coarse":
        return {"latent_feature_ln.": "feature_proj.", "time_feature_ln.": "time_proj.",
                "sigma_embeddings": "sigma_token", "sigma_query_ln.": "sigma_query.",
                "transformer_layer_norm.": "norm.", "transformer.0.": "attn.", "transformer.1.": "attn.",
                "sigma_net.": "sigma_head."}
    if kind == "fine":
        return {"transformer_layer_norm.": "norm.", "transformer.0.": "attn.", "transformer.1.": "attn."}
    raise ValueError(f"kind must be 'coarse' or 'fine', got {kind!r}")


def _convert_official(state_dict: Mapping[str, Tensor], kind: str) -> dict[str, Tensor]:
    table = official_key_map(kind)
    out: dict[str, Tensor] = {}
    for key, val in state_dict.items():
        k = key.removeprefix("module.")
        for src, dst in table.items():
            if k == src or (src.endswith(".") and k.startswith(src)):
                new = dst + k[len(src):]
                if new in out:
                    if out[new].shape != val.shape or not torch.equal(out[new], val.to(out[new])):
                        raise ValueError(f"official {kind} checkpoint: {key} differs from its shared twin; "
                                         "the two attention layers must share weights")
                else:
                    out[new] = val
                break
        else:
            out[k] = val  # unknown key: left for load_state_dict(strict=...) to report
    return out


def load_official_state_dict(module: nn.Module, state_dict, strict: bool = True):
    """Load official PlacidDreamer weights into our modules.

    * ``module`` a :class:`CoarsePlane` with ``state_dict`` from ``coarse_21500.pt``, or
    * a :class:`FinePlane` with ``fine_8100.pt``, or
    * a :class:`LatentPlane` with ``{"coarse": ..., "fine": ...}`` or a ``(coarse, fine)`` pair.

    The official modules must be built with their shapes: ``CoarsePlane(640, 1280)``,
    ``FinePlane(640)`` (our defaults). A "module." prefix (DataParallel) is stripped. Returns
    ``load_state_dict``'s result (or a dict of them for a ``LatentPlane``).
    """
    if isinstance(module, LatentPlane):
        if isinstance(state_dict, Mapping) and "coarse" in state_dict:
            c, f = state_dict["coarse"], state_dict.get("fine")
        else:
            c, f = state_dict
        res = {"coarse": load_official_state_dict(module.coarse, c, strict)}
        if f is not None:
            if module.fine is None:
                raise ValueError("a fine state dict was given but the LatentPlane has no fine plane")
            res["fine"] = load_official_state_dict(module.fine, f, strict)
        return res
    if isinstance(module, CoarsePlane):
        kind = "coarse"
    elif isinstance(module, FinePlane):
        kind = "fine"
    else:
        raise TypeError(f"expected CoarsePlane, FinePlane or LatentPlane, got {type(module).__name__}")
    return module.load_state_dict(_convert_official(state_dict, kind), strict=strict)
