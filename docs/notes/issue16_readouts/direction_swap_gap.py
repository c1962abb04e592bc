"""Does a model use the direction word? Flow loss with the right caption vs the direction-swapped caption
(left<->right, up<->down) on the same clips and noise, per noise level; the exact teacher gives the ideal gap."""
import sys, torch, json
from studio.teachers import load_teacher
from studio.teachers.shapeworld_video import make_shapeworld_video_exact
from studio.teachers.sampling import _as_cond, _t_tensor
from studio.world.clips import render_clips, sample_clip_specs
torch.set_num_threads(1)
SW = {"left": "right", "right": "left", "up": "down", "down": "up"}
base = ["a red ball moving left", "a red ball moving right", "a red ball moving up", "a red ball moving down"]
if len(sys.argv) > 2 and sys.argv[2] == "static":
    from studio.world.clips import video_prompts
    base = [p for p in video_prompts(cameras=["static"]) if p.split()[-1] in SW or p.split()[-2] in SW]
def swap(p):
    w = p.split(); return " ".join(SW.get(x, x) for x in w)
N = 64
prompts = [base[i % len(base)] for i in range(N)]
swapped = [swap(p) for p in prompts]
models = {}
for spec in sys.argv[1].split(","):
    models[spec] = load_teacher(spec)
m0 = next(iter(models.values()))
F, R = m0.num_frames, m0.native_resolution
models["exact"] = make_shapeworld_video_exact(num_frames=F, resolution=R)
clips = render_clips(sample_clip_specs(prompts, N, 99, F), F, R)["video"]  # [B,F,3,H,W]
gen = torch.Generator().manual_seed(7)
eps = torch.randn(N, 3, F, R, R, generator=gen)
out = {}
for name, m in models.items():
    x0 = m.encode(clips) if name != "exact" else m.encode(clips)
    cr, cs = _as_cond(m, prompts, None), _as_cond(m, swapped, None)
    row = {}
    for s in (0.3, 0.6, 0.8, 0.9, 0.95, 0.98):
        t = s * 1000 - 1
        xs = (1 - s) * x0 + s * eps.to(x0.dtype)
        tgt = eps.to(x0.dtype) - x0
        with torch.no_grad():
            lr = [(m.predict(xs, _t_tensor(t, N, xs.device), c, guidance_scale=1.0, output="flow").float() - tgt).square().mean().item() for c in (cr, cs)]
        row[s] = {"right_caption": round(lr[0], 5), "swapped": round(lr[1], 5), "gap": round(lr[1] - lr[0], 5)}
    out[name] = row
    print(name, json.dumps(row), flush=True)
