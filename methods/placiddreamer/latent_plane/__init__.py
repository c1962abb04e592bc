"""PlacidDreamer's Latent-Plane: a 3D-aware plug-in for an 8-view multi-view diffusion UNet.

Spec: ``specs/placiddreamer_dreampolish.md`` sections 2.2, 2.3, 2.6 (properties 10, 11) and 2.7. The
official inference code is ``HansenHuang0823/PlacidDreamer`` ``Latent_Plane/latent_plane_inference_new.py``.
These modules were written from reading that file (its module structure, state-dict names and shapes) and
the spec; no code was copied.

One module per job:

* :mod:`.ring`: the fixed ring of 8 cameras around the cube ``[-0.5, 0.5]^3``, its rays, samples,
  projections, positional encodings and volume-rendering weights (the conventions live there).
* :mod:`.networks`: :class:`~.networks.CoarsePlane` (density), :class:`~.networks.FinePlane`
  (features), :class:`~.networks.LatentPlane` with its forward hook on a diffusers UNet up-block, and the
  ShapeWorld host features (:class:`~.networks.ShapeWorldFeatures`).
* :mod:`.gaussian_init`: the PlacidDreamer initialisation: density grid -> marching-cubes mesh ->
  surface points -> Gaussians, from 8 ring views (:func:`~.gaussian_init.init_from_ring_views`).
* :mod:`.official`: conversion of the official ``coarse_*.pt`` / ``fine_*.pt`` state dicts.
* :mod:`.weights`: a trained plane on disk: :class:`~.weights.LatentPlaneConfig`, save, and load (our
  safetensors folders, e.g. the shipped ``assets/latent-plane``, or a folder of official checkpoints).
* :mod:`.shapeworld_rings`: ShapeWorld objects rendered on the ring (the training and evaluation data of
  ``scripts/train_latent_plane.py``) and the initialisation of a ShapeWorld object from its renders.

Reconstructed parts (not in the official release)
-------------------------------------------------
The official training code is not public (spec 2.3 and 2.7). Our losses, the ShapeWorld host features
(:class:`~.networks.ShapeWorldFeatures`), the novel-view feature rendering of
:meth:`~.networks.FinePlane.render_rays` and the branch selection of the UNet hook are our
reconstruction. The training script is ``scripts/train_latent_plane.py``, and its weights are in
``assets/latent-plane`` (:func:`~.weights.load_latent_plane`).
"""
