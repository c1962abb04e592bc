"""Issue 16: L2 distances between the text contexts (CLIP last hidden state, 16 x 64) of prompts that differ in one
word, for a model folder: python docs/notes/issue16_readouts/text_distances.py MODEL_DIR"""
import torch, sys
from transformers import CLIPTextModel, CLIPTokenizer
src = sys.argv[1]
te = CLIPTextModel.from_pretrained(src + "/text_encoder").eval(); tok = CLIPTokenizer.from_pretrained(src + "/tokenizer")
P = ["a red ball moving left", "a red ball moving right", "a red ball moving up", "a red ball moving down", "a red cube moving left", "a blue ball moving left", ""]
ids = tok(P, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
with torch.no_grad(): h = te(ids)[0]
print("per-prompt norm", h.flatten(1).norm(dim=1))
for i in range(len(P)):
    print(f"{P[i]:28s}", " ".join(f"{(h[i]-h[j]).norm().item():6.2f}" for j in range(len(P))))
