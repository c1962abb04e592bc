"""Is shapeworld-unet's 'right object' (nearest render, pixel L2) colour alone? Compare with a silhouette-only
nearest render (binary foreground masks, colour removed) and a colour-only classifier."""
import sys, json, torch
sys.path.insert(0, "scripts")
torch.set_num_threads(1)
from train_shapeworld_unet import render_dataset
from studio.teachers.shapeworld_unet import make_shapeworld_unet, ddim_sample, foreground_mean
from studio.world.objects import list_objects
objs = list_objects()
images, labels, az, el = render_dataset(40, seed=7)
t = make_shapeworld_unet(device="cpu")
prompts, idx = [], []
for i, o in enumerate(objs):
    for v in ("front view", "side view"):
        prompts.append(f"{o.prompt}, {v}"); idx.append(i)
idx = torch.tensor(idx)
s = ddim_sample(t, prompts, steps=30, guidance_scale=4.0, seed=3, prior_mean=1.0)
def mask(x):
    return ((x - 1.0).abs().amax(1) > 0.12).float()
nn_pix = labels[torch.cdist(s.flatten(1), images.flatten(1)).argmin(1)]
nn_sil = labels[torch.cdist(mask(s).flatten(1), mask(images).flatten(1)).argmin(1)]
ref_col = torch.stack([foreground_mean(images[labels == i], background="white").mean(0) for i in range(len(objs))])
col_pred = torch.cdist(foreground_mean(s, background="white"), ref_col).argmin(1)
# renders themselves: silhouette-NN leave-one-out accuracy (the silhouette read-out's own ceiling)
d = torch.cdist(mask(images).flatten(1), mask(images).flatten(1)); d.fill_diagonal_(1e9)
loo = float((labels[d.argmin(1)] == labels).float().mean())
out = {"samples": len(prompts), "pixel_nn_acc": float((nn_pix == idx).float().mean()),
       "silhouette_nn_acc": float((nn_sil == idx).float().mean()),
       "colour_only_acc": float((col_pred == idx).float().mean()),
       "silhouette_nn_ceiling_on_renders_loo": loo, "chance": 1 / len(objs),
       "per_object_silhouette": {o.name: float((nn_sil[idx == i] == i).float().mean()) for i, o in enumerate(objs)}}
print(json.dumps(out))
