"""Issue 16: the Bayes value of the direction word. For "a red ball moving left / right" (16 px, 8 frames), the
posterior mean of the clip given the noisy clip at noise s, estimated by self-normalised importance weights over a
bank of 3000 clips per direction, knowing the direction (right bank) or not (both banks); x0 MSE against the true
clips, 64 test clips. ESS = median effective sample size (below ~50 the estimate is bank-limited: s <= 0.8).
The velocity loss (v = (x_s - x0) / s) gap is the x0 gap / s^2."""
import torch, math
from studio.world.clips import render_clips, sample_clip_specs
torch.set_num_threads(1)
F, R, M = 8, 16, 3000
L, Rr = "a red ball moving left", "a red ball moving right"
bank = {d: (render_clips(sample_clip_specs(d, M, 1000 + i, F), F, R)["video"] * 2 - 1).flatten(1).double() for i, d in enumerate((L, Rr))}
test_p = [L, Rr] * 32
x0 = (render_clips(sample_clip_specs(test_p, 64, 5, F), F, R)["video"] * 2 - 1).flatten(1).double()
eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
for s in (0.7, 0.8, 0.85, 0.9, 0.95, 0.98):
    xs = (1 - s) * x0 + s * eps
    def post(B):
        # log N(xs; (1-s) b, s^2 I)
        ll = -((xs[:, None] - (1 - s) * B[None]) ** 2).sum(-1) / (2 * s * s)
        return ll
    llL, llR = post(bank[L]), post(bank[Rr])
    def mean(ll, B):
        w = torch.softmax(ll, dim=1); return w @ B
    cond = torch.stack([mean(llL[i:i+1], bank[L])[0] if p == L else mean(llR[i:i+1], bank[Rr])[0] for i, p in enumerate(test_p)])
    both = torch.cat([bank[L], bank[Rr]]); llB = torch.cat([llL, llR], 1)
    unc = mean(llB, both)
    ess = (1 / (torch.softmax(llL, 1) ** 2).sum(1)).median().item()
    e_c = ((cond - x0) ** 2).mean().item(); e_u = ((unc - x0) ** 2).mean().item()
    print(f"s={s}: x0-MSE knowing direction {e_c:.5f}, not knowing {e_u:.5f}, gap {e_u - e_c:.5f} ({(e_u-e_c)/e_u*100:.1f}%), velocity-loss gap {(e_u - e_c) / s**2:.5f}, ESS {ess:.0f}")
