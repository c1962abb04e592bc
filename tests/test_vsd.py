"""VSD (ProlificDreamer): the LoRA variational score, the VSD gradient and the `vsd` method end to end,
on tiny real-class SD pipelines saved and loaded by path (tests/tiny_models.py)."""
import math
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from methods.registry import get_method  # noqa: E402
from methods.vsd import VSDConfig, VSDMethod  # noqa: E402
from studio.cameras import orbit_cameras  # noqa: E402
from studio.distill.vsd import check_lora_base, vsd  # noqa: E402
from studio.errors import UserError  # noqa: E402
from studio.students.lora_score import LoRAScore, c2w_from_cameras  # noqa: E402
from studio.teachers.registry import load_teacher  # noqa: E402
from studio.teachers.schedule import NoiseSchedule  # noqa: E402
from methods import run  # noqa: E402
from studio.train.gaussian_stage import GaussianStageConfig  # noqa: E402
from tiny_models import make_tiny_sd  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny UNets run fastest single-threaded; intra-op threads only contend on a shared, loaded CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vsd_models")
    eps_path = make_tiny_sd(root / "tiny-eps", sample_size=16)
    v_path = make_tiny_sd(root / "tiny-v", prediction_type="v_prediction", sample_size=16, seed=1)
    return SimpleNamespace(eps_path=eps_path, v_path=v_path, eps=load_teacher(str(eps_path)),
                           v=load_teacher(str(v_path)))


def _cams(n=2):
    return orbit_cameras(torch.linspace(0, 30, n), torch.linspace(-90, 120, n), 3.2, 40.0, 32, 32)


def _perturb(lora: LoRAScore, seed=0, std=0.3):
    """Make the LoRA (B matrices and camera embedding) non-zero so it differs from its base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def _unet_out(unet, x, t, emb, labels=None):
    return unet(x, t, encoder_hidden_states=emb, class_labels=labels, return_dict=False)[0]


# --------------------------------------------------------------------------------------- LoRAScore
def test_lora_score_equals_base_at_init_and_trains_only_lora_and_camera(models):
    teacher = models.eps
    lora = LoRAScore(teacher, rank=4)
    x = torch.randn(3, 4, 16, 16)
    t = torch.tensor([10, 400, 990])
    y = teacher.encode_prompt(["a red cube"]).embeds
    ref = teacher.predict(x, t, teacher.encode_prompt(["a red cube"]))
    c2w = c2w_from_cameras(_cams(3))
    assert c2w.shape == (3, 16) and torch.allclose(c2w.reshape(-1, 4, 4)[:, 3], torch.tensor([0., 0, 0, 1]))
    for cam in (None, c2w, torch.randn(3, 16) * 5):
        with torch.no_grad():
            assert torch.allclose(lora.predict_eps(x, t, y, cam), ref, atol=1e-6, rtol=0)
    # only the LoRA matrices (A and B of q, k, v, out of every attention) and the camera embedding train
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable == set(lora.trainable_names) == set(lora.state_dict())
    assert all(".lora_A.vsd_lora." in n or ".lora_B.vsd_lora." in n or ".class_embedding." in n for n in trainable)
    for proj in ("to_q", "to_k", "to_v", "to_out.0"):
        assert any(f".{proj}.lora_B." in n for n in trainable)
    assert {n for n in trainable if "class_embedding" in n} == {
        f"unet.class_embedding.linear_{i}.{w}" for i in (1, 2) for w in ("weight", "bias")}
    assert lora.unet.class_embedding.linear_1.in_features == 16
    assert lora.unet.class_embedding.linear_2.out_features == lora.unet.time_embedding.linear_2.out_features
    assert sum(p.numel() for p in lora.trainable_parameters()) < 0.2 * sum(p.numel() for p in teacher.unet.parameters())
    # the teacher itself is untouched: frozen, no adapters, no class embedding
    assert all(not p.requires_grad for p in teacher.parameters())
    assert teacher.unet.class_embedding is None and not getattr(teacher.unet, "peft_config", None)
    # the camera reaches the output once the embedding is trained; B != 0 changes the output
    _perturb(lora)
    with torch.no_grad():
        a, b = lora.predict_eps(x, t, y, c2w), lora.predict_eps(x, t, y, None)
    assert (a - b).abs().max() > 1e-4 and (a - ref).abs().max() > 1e-4


def test_state_dict_round_trip(models):
    lora = LoRAScore(models.eps, rank=4)
    _perturb(lora, seed=3)
    state = {k: v.clone() for k, v in lora.state_dict().items()}
    fresh = LoRAScore(models.eps, rank=4, seed=7)
    x, t, y, c = torch.randn(2, 4, 16, 16), torch.tensor([50, 600]), torch.randn(1, 77, 32), torch.randn(2, 16)
    with torch.no_grad():
        assert (fresh.predict_eps(x, t, y, c) - lora.predict_eps(x, t, y, c)).abs().max() > 1e-4
        fresh.load_state_dict(state)
        assert torch.equal(fresh.predict_eps(x, t, y, c), lora.predict_eps(x, t, y, c))
    with pytest.raises(RuntimeError, match="shape"):
        LoRAScore(models.eps, rank=2).load_state_dict(state)  # another rank
    with pytest.raises(RuntimeError, match="missing keys"):
        LoRAScore(models.eps, rank=4, camera_condition=False).load_state_dict(state)  # no camera embedding


def test_lora_loss_decreases_on_fixed_latents_and_is_isolated(models):
    teacher = models.eps
    lora = LoRAScore(teacher, rank=4)
    opt = lora.make_optimizer(lr=1e-2)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 4, 16, 16, generator=g)
    t, noise = torch.tensor([100, 300, 600, 900]), torch.randn(z.shape, generator=g)
    y, c = teacher.encode_prompt(["a red cube"]).embeds, c2w_from_cameras(_cams(4))
    losses = []
    for _ in range(8):
        loss = lora.lora_loss(z, y, c, torch.Generator().manual_seed(1), t=t, noise=noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.95 * losses[0], losses
    # the target is the base's parameterisation (epsilon here) at a fresh noise level
    assert lora.schedule.prediction_type == "epsilon"
    assert all(p.grad is None for p in teacher.parameters())
    # t drawn over the full range [0, T-1]
    seen = []
    lora.unet.register_forward_pre_hook(lambda m, args, kw: seen.append(args[1].clone()), with_kwargs=True)
    with torch.no_grad():
        for s in range(6):
            lora.lora_loss(torch.zeros(32, 4, 8, 8), y, None, torch.Generator().manual_seed(s))
    ts = torch.cat(seen)
    assert ts.min() < 60 and ts.max() > 940


def test_camera_dropout_probability(models):
    lora = LoRAScore(models.eps, rank=2)
    assert lora.camera_dropout == 0.1
    cam = torch.ones(20000, 16)
    dropped = (lora.drop_camera(cam, torch.Generator().manual_seed(0)) == 0).all(1).float().mean()
    assert 0.09 < float(dropped) < 0.11
    # lora_loss feeds dropped cameras to the camera embedding
    seen = []
    lora.unet.class_embedding.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    y = models.eps.encode_prompt(["a red cube"]).embeds
    with torch.no_grad():
        for s in range(8):
            lora.lora_loss(torch.zeros(40, 4, 8, 8), y, torch.ones(40, 16), torch.Generator().manual_seed(s))
    labels = torch.cat(seen)
    frac = float((labels == 0).all(1).float().mean())
    assert labels.shape == (320, 16) and 0.04 < frac < 0.18 and bool(((labels == 0) | (labels == 1)).all())


def test_v_prediction_base_converts_to_epsilon(models):
    teacher = models.v
    assert teacher.schedule.prediction_type == "v_prediction"
    lora = LoRAScore(teacher)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([30, 800])
    cond = teacher.encode_prompt(["a blue ball"])
    with torch.no_grad():
        eps_lora = lora.predict_eps(x, t, cond.embeds, c2w_from_cameras(_cams()))
        eps_teacher = teacher.predict(x, t, cond, output="epsilon")
        v = _unet_out(teacher.unet, x, t, cond.embeds.expand(2, -1, -1))
    assert torch.allclose(eps_lora, eps_teacher, atol=1e-6)
    abar = teacher.schedule.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    assert torch.allclose(eps_lora, (1 - abar).sqrt() * x + abar.sqrt() * v, atol=1e-5)  # eps = sigma z_t + alpha v
    assert (eps_lora - v).abs().max() > 1e-2
    # the conversion recovers the true noise on synthetic data, and the LoRA regresses v
    z0, eps = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    z_t = lora.schedule.add_noise(z0, eps, t)
    v_true = abar.sqrt() * eps - (1 - abar).sqrt() * z0
    assert torch.allclose(lora.schedule.convert(v_true, z_t, t, "v_prediction", "epsilon"), eps, atol=1e-5)
    assert torch.allclose(lora.schedule.target(z0, eps, t), v_true, atol=1e-6)


# --------------------------------------------------------------------------------------- VSD gradient
def test_vsd_gradient_matches_hand_computation(models):
    teacher, base = models.eps, models.v  # v-prediction LoRA base next to an eps teacher (ProlificDreamer)
    check_lora_base(teacher, base)
    lora = LoRAScore(base)
    _perturb(lora, seed=1)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=g).requires_grad_(True)
    noise = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([200, 700])
    cond = teacher.encode_prompt(["a red cube, front view", "a red cube, back view"])
    y = base.encode_prompt(["a red cube"])  # view-independent prompt for the LoRA
    c2w = c2w_from_cameras(_cams())
    out = vsd(teacher, lora, latents, cond, t, guidance_scale=7.5, camera_c2w=c2w, noise=noise, lora_cond=y)
    with torch.no_grad():
        abar = teacher.schedule.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
        z_t = abar.sqrt() * latents + (1 - abar).sqrt() * noise
        e_c = _unet_out(teacher.unet, z_t, t, cond.embeds)
        e_u = _unet_out(teacher.unet, z_t, t, cond.negative_embeds)
        eps_cfg = e_u + 7.5 * (e_c - e_u)
        v = _unet_out(lora.unet, z_t, t, y.embeds.expand(2, -1, -1), c2w)
        eps_lora = (1 - abar).sqrt() * z_t + abar.sqrt() * v
        G = (1 - abar) * (eps_cfg - eps_lora)  # no -eps term
    assert G.abs().max() > 1e-3
    # the hand computation runs the same float32 UNets in other batches (summation orders): 256 ulps of the
    # outputs' magnitude, times |w| + |1 - w| for CFG; G adds both and scales by 1 - abar <= 1
    f32 = 256 * torch.finfo(torch.float32).eps
    tol_cfg = (2 * 7.5 - 1) * f32 * float(torch.maximum(e_c.abs(), e_u.abs()).max())
    tol_lora = f32 * float(eps_lora.abs().max())
    assert torch.allclose(out.grad, G, rtol=0, atol=tol_cfg + tol_lora)
    assert torch.allclose(out.pred, eps_cfg, rtol=0, atol=tol_cfg)
    assert torch.allclose(out.lora_pred, eps_lora, rtol=0, atol=tol_lora)
    out.loss.backward()
    assert torch.allclose(latents.grad, out.grad, atol=1e-6)  # d loss / d z = G exactly (inject_gradient)
    # the VSD loss trains neither network
    assert all(p.grad is None for p in teacher.parameters()) and all(p.grad is None for p in lora.parameters())


def test_vsd_sign_with_analytic_denoisers():
    """Point-mass denoisers: teacher at mu_y, "LoRA" at the current particle z: descent moves z to mu_y."""
    sched = NoiseSchedule.ddpm_scaled_linear()
    mu_y = torch.full((1, 3, 4, 4), 0.5)

    def point_mass(mu):
        def eps(x_t, t):
            a, s = sched.alpha(t, x_t), sched.sigma(t, x_t)
            return (x_t - a * mu) / s
        return eps

    z = torch.full((1, 3, 4, 4), -0.5)

    class Teacher:
        schedule = sched

        def predict(self, x_t, t, cond, guidance_scale=1.0, output="epsilon", camera=None):
            return point_mass(mu_y)(x_t, t)

    class Lora:
        def __init__(self, mu):
            self.mu = mu

        def predict_eps(self, x_t, t, embeds, camera_c2w=None, guidance_scale=1.0):
            return point_mass(self.mu)(x_t, t)

    cond = SimpleNamespace(embeds=torch.zeros(1, 1, 1))
    t = torch.tensor([500])
    zz = z.clone().requires_grad_(True)
    out = vsd(Teacher(), Lora(z.clone()), zz, cond, t, guidance_scale=1.0)
    out.loss.backward()
    stepped = z - 0.1 * zz.grad
    assert ((stepped - mu_y).abs() < (z - mu_y).abs()).all()
    a, s = sched.alpha(t), sched.sigma(t)
    assert torch.allclose(out.grad, (s * s) * a / s * (z - mu_y), atol=1e-5)  # w = 1 - abar = sigma^2
    # fixed point: a LoRA that already matches the teacher gives G = 0
    assert vsd(Teacher(), Lora(mu_y), z.clone().requires_grad_(True), cond, t).grad.abs().max() < 1e-5


def test_lora_base_checks():
    def fake(channels, res, latent, sched=None, unet=True):
        return SimpleNamespace(unet=object() if unet else None, schedule=sched or NoiseSchedule.ddpm_scaled_linear(),
                               latent_channels=channels, native_resolution=res, is_latent=latent, name="m")

    check_lora_base(fake(4, 512, True), fake(4, 768, True))  # SD 2.1-base teacher, SD 2.1 LoRA base: fine
    with pytest.raises(UserError, match="32x32"):
        check_lora_base(fake(3, 64, False), fake(3, 32, False), hint="use --lora-base")
    with pytest.raises(UserError, match="teacher's space"):
        check_lora_base(fake(4, 64, True), fake(3, 64, False))
    with pytest.raises(UserError, match="noise schedule"):
        check_lora_base(fake(4, 64, True), fake(4, 64, True, NoiseSchedule.ddpm_linear()))
    with pytest.raises(UserError, match="not a diffusers UNet"):
        check_lora_base(fake(4, 64, True), fake(4, 64, True, unet=False))


# --------------------------------------------------------------------------------------- the method
def test_method_registered_with_defaults():
    cls = get_method("vsd")
    assert cls is VSDMethod and cls.kind == "3d" and "2305.16213" in cls.paper
    m = cls()
    assert m.default_guidance("sd21-base") == 7.5 and m.default_guidance("/some/folder") == 7.5
    assert m.default_guidance("shapeworld-unet") == 4.0
    cfg = VSDConfig(prompt="a red cube")
    assert (cfg.lora_rank, cfg.lora_lr, cfg.lora_base, cfg.lora_steps_per_step, cfg.camera_condition) == \
        (4, 1e-4, None, 1, True)


def test_unet_less_teacher_needs_a_matching_lora_base(models):
    exact_like = SimpleNamespace(name="shapeworld-exact", latent_channels=3, native_resolution=64, is_latent=False,
                                 schedule=NoiseSchedule.ddpm_scaled_linear())
    with pytest.raises(UserError, match="--lora-base"):  # shapeworld-unet is 32x32 (or missing): a clear message
        VSDMethod().stages(VSDConfig(prompt="a red cube", teacher="shapeworld-exact"), exact_like, {})
    with pytest.raises(UserError, match="--lora-base"):
        VSDMethod().stages(VSDConfig(prompt="a red cube", teacher="my-teacher"), exact_like, {})
    with pytest.raises(UserError, match="teacher's space"):  # a latent SD base for a pixel teacher
        VSDMethod().stages(VSDConfig(prompt="a red cube", teacher="shapeworld-exact", lora_base=str(models.eps_path)),
                           exact_like, {})


def _cfg(path, steps, **kw):
    stage = GaussianStageConfig(batch_size=2, init_points=300, densify=False)
    return VSDConfig(prompt="a red cube", teacher=str(path), steps=steps, resolution=32, stage=stage,
                     turntable_frames=2, turntable_size=32, **kw)


def test_generate_end_to_end_and_resume_keeps_lora_state(models, tmp_path):
    from studio.train.checkpoint import load_checkpoint

    m = run(_cfg(models.eps_path, 3), "vsd", tmp_path / "a", progress=False)
    d = tmp_path / "a" / "a-red-cube"
    for f in ("model.ply", "model.splat", "turntable.mp4", "preview.png", "config.yaml", "metrics.json"):
        assert (d / f).stat().st_size > 0, f
    assert m["method"] == "vsd" and math.isfinite(m["final_loss"])
    hist = json.loads((d / "history.json").read_text())
    assert len(hist) == 3 and all("lora_loss" in r for r in hist)
    assert "guidance_scale: 7.5" in (d / "config.yaml").read_text()
    state = load_checkpoint(d / "checkpoints" / "last.safetensors")
    lora_state = state["stages"]["vsd"]["extra"]["lora"]
    assert set(lora_state) == set(LoRAScore(models.eps).trainable_names)
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in lora_state.items())  # the LoRA trained
    assert "lora" in state["optimizers"]["vsd"]

    # interrupted after 2 of 3 steps, then resumed: the same final LoRA and student as the straight run
    def stop_at_2(rec):
        return rec["step"] < 2

    from studio.train.loop import TrainingCancelled
    with pytest.raises(TrainingCancelled):
        run(_cfg(models.eps_path, 3), "vsd", tmp_path / "b", progress=False, callbacks=[stop_at_2])
    run(_cfg(models.eps_path, 3), "vsd", tmp_path / "b", progress=False, resume=True)
    resumed = load_checkpoint(tmp_path / "b" / "a-red-cube" / "checkpoints" / "last.safetensors")
    for k, v in lora_state.items():
        assert torch.allclose(resumed["stages"]["vsd"]["extra"]["lora"][k], v, atol=1e-6), k
    assert torch.allclose(resumed["stages"]["vsd"]["params"]["means"], state["stages"]["vsd"]["params"]["means"],
                          atol=1e-6)


def test_stage_trains_student_and_lora_with_one_backward(models):
    cfg = _cfg(models.eps_path, 2, lora_steps_per_step=2)
    (stage,) = VSDMethod().stages(cfg, models.eps, dict(steps=2, resolution=32, guidance_scale=7.5))
    lora, opt = stage.extra_modules["lora"], stage.extra_optimizers["lora"]
    assert isinstance(lora, LoRAScore) and set(stage.optimizers()) >= {"lora", "means"}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in lora.trainable_parameters()}
    assert opt.defaults["lr"] == 1e-4 and opt.defaults["betas"] == (0.9, 0.99)
    before = {k: v.clone() for k, v in lora.state_dict().items()}
    out = stage.train_step(0, 0.0)
    # lora_steps_per_step = 2: one extra LoRA update inside the step, the last one through the shared loss
    assert any(not torch.equal(before[k], v) for k, v in lora.state_dict().items())
    assert all(p.grad is None for p in lora.trainable_parameters()) and "lora_loss" in out.logs
    out.loss.backward()
    assert stage.model.params["means"].grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.trainable_parameters())
    assert all(p.grad is None for p in models.eps.parameters())
