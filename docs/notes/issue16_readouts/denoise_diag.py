import sys, json, torch
sys.path.insert(0,"scripts")
from pathlib import Path
import train_shapeworld_video_unet as T
from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer
from studio.world.video_metrics import evaluate_videos
from studio.world.clips import sample_clips
from studio.train.tiny_teacher import save_grid
torch.set_num_threads(1)
def desat(v, thr=0.15):
    c = v.amax(-3, keepdim=True) - v.amin(-3, keepdim=True)
    return torch.where(c < thr, v.mean(-3, keepdim=True).expand_as(v), v)
def bgnoise(v):  # std of the non-object pixels' deviation from a 3x3 local mean, per channel
    import torch.nn.functional as F
    x=v.flatten(0,1); m=F.avg_pool2d(x,3,1,1); c=(x.amax(1)-x.amin(1))
    return float((x-m)[:, :, 1:-1,1:-1].permute(1,0,2,3)[:, (c[:,1:-1,1:-1]<0.15)].std())
def sc(v,ps):
    m=evaluate_videos(v,ps); return {k:round(m[k],3) for k in ("shape_accuracy","color_accuracy")}
ps=[p for p in T.prompt_set("static") for _ in range(2)]
f=Path(sys.argv[1]); steps=int(sys.argv[2])
net=UNet2DConditionModel.from_pretrained(str(f/"unet")).eval()
te=CLIPTextModel.from_pretrained(str(f/"text_encoder")); tok=CLIPTokenizer.from_pretrained(str(f/"tokenizer"))
out={"model":str(f),"steps":steps}
gt=sample_clips(len(ps),seed=5,prompts=ps,size=16)["video"][:,:1].expand(-1,8,-1,-1,-1).contiguous()
g=torch.Generator().manual_seed(1); gtn=(gt+0.03*torch.randn(gt[:,:1].shape,generator=g)).clamp(0,1).expand(-1,8,-1,-1,-1).contiguous()
out["gt_frame"]=sc(gt,ps); out["gt+noise0.03"]=sc(gtn,ps); out["gt+noise0.03 desat"]=sc(desat(gtn),ps)
out["gt bg-noise"]=round(bgnoise(gt),4); out["gt+noise bg-noise"]=round(bgnoise(gtn),4)
for cfg in (1.0,4.0):
    x=T.sample(net,lambda t:T.encode_text(te,tok,t),ps,(3,16,16),steps,cfg,0,video=False)
    v=x[:,None].expand(-1,8,-1,-1,-1).contiguous()
    out[f"model cfg{cfg}"]=sc(v,ps); out[f"model cfg{cfg} desat"]=sc(desat(v),ps); out[f"model cfg{cfg} bg-noise"]=round(bgnoise(v),4)
    if cfg==4.0: save_grid(torch.cat([x[::2][:21],gt[::2,0][:21]]),Path("/tmp/i16/diag.png"),ncol=7,scale=4)
print(json.dumps(out))
with open("/tmp/i16/readouts.jsonl","a") as fh: fh.write(json.dumps({"tag":"metric_noise_diag","stage":"image","step":1000,"readout":out})+"\n")
