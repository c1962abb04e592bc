import torch, json
from studio.world.clips import video_prompts, sample_clips, gaussian_blur
from studio.world.video_metrics import evaluate_videos
torch.set_num_threads(1)
ps=[p for p in video_prompts(cameras=["static"]) for _ in range(2)]
out={}
for size in (16,32):
    v=sample_clips(len(ps),seed=99,prompts=ps,size=size)["video"]
    g=torch.Generator().manual_seed(0)
    for name,x in {"clean":v, "noise0.03":(v+0.03*torch.randn(v.shape,generator=g)).clamp(0,1),
                   "noise0.06":(v+0.06*torch.randn(v.shape,generator=g)).clamp(0,1),
                   "blur0.5px":gaussian_blur(v,0.5*size/16), "blur1px":gaussian_blur(v,1.0*size/16)}.items():
        m=evaluate_videos(x,ps)
        out[f"{size}px {name}"]={k:round(m[k],3) for k in ("shape_accuracy","color_accuracy","motion_accuracy","object_accuracy")}
        print(f"{size}px {name}", out[f"{size}px {name}"], flush=True)
