import sys, torch
sys.path.insert(0, "scripts")
from pathlib import Path
from diffusers import UNetMotionModel
from transformers import CLIPTextModel, CLIPTokenizer
from train_shapeworld_video_unet import sample, encode_text, prompt_set
from studio.world.video_metrics import classify_videos, analyze_videos
torch.set_num_threads(1)
d = Path(sys.argv[1]); cfg = float(sys.argv[2]) if len(sys.argv) > 2 else 2.0
net = UNetMotionModel.from_pretrained(str(d / "unet")).eval()
te = CLIPTextModel.from_pretrained(str(d / "text_encoder")); tok = CLIPTokenizer.from_pretrained(str(d / "tokenizer"))
P = prompt_set("static")
x = sample(net, lambda t: encode_text(te, tok, t), P, (3, 8, 16, 16), 20, cfg, 1234, video=True)
clips = x.permute(0, 2, 1, 3, 4).contiguous()
cl = classify_videos(clips); a = analyze_videos(clips)
for p, c, cen in zip(P, cl, a["centroid"]):
    print(f"{p:40s} -> {c}  cx {[round(float(v),1) for v in cen[:,0]]} cy {[round(float(v),1) for v in cen[:,1]]}")
