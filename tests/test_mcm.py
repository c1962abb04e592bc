"""MCM method wiring (methods/mcm.py) on a tiny Wan of the real classes: reductions, stop-grads through the
one loop, the quality-improvement mode, the DINOv2 backbone by path, and the CLI."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from methods import run
from methods.mcm import MCMConfig, MCMMethod, MCMStage, pooled_text
from methods.video_lcm import ConsistencyStage, VideoLCMConfig
from studio.students.video_lora import VideoLoRAStudent
from studio.teachers.registry import load_video_teacher
from studio.runs.video_distill import VideoData, resolve_prompts

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    from tiny_video_models import make_tiny_wan

    return make_tiny_wan(tmp_path_factory.mktemp("wan") / "wan", pixel=True)


def _parts(path, seed=0):
    teacher = load_video_teacher(str(path))
    student = VideoLoRAStudent(teacher, rank=4, seed=seed)
    with torch.no_grad():  # a non-trivial student
        for p in student.trainable_parameters():
            p.add_(0.02 * torch.randn_like(p))
    data = VideoData("shapeworld", teacher, resolve_prompts("static"), seed=seed)
    return teacher, student, data


def test_mcm_reduces_to_video_lcm(tiny_wan):
    """Spec 2.8 (6) at method level: motion raw, no discriminator, p_mix = 0 is the video-LCM loss exactly, and
    (3) the zero-initialised learned head gives the same loss at step 0."""
    kw = dict(teacher=str(tiny_wan), batch_size=2, seed=3)
    teacher, student, data = _parts(tiny_wan)
    lcm = ConsistencyStage(VideoLCMConfig(**kw), teacher, student, data).train_step(0, 0.0).loss
    for motion in ("raw", "learn"):
        stage = MCMStage(MCMConfig(**kw, motion=motion, disc=False, mix_p=0.0), teacher, student, data)
        out = stage.train_step(0, 0.0)
        assert set(out.loss) == {"generator"}
        torch.testing.assert_close(out.loss["generator"], lcm, rtol=1e-5, atol=1e-7)


def test_mcm_step_losses_reach_only_their_own_parameters(tiny_wan):
    """Spec 2.8 (7): the D loss gives no gradient to the LoRA or the motion head (it sees sg(y)); the G loss does
    depend on D's weights (L_adv = -D(G)), and the one loop sends each loss only into its own optimizer's
    parameters (``backward(inputs=...)``, tested in test_train_accelerate), so D gets no G-step gradient."""
    teacher, student, data = _parts(tiny_wan)
    stage = MCMStage(MCMConfig(teacher=str(tiny_wan), batch_size=2, mix_p=1.0), teacher, student, data)
    out = stage.train_step(0, 0.0)
    assert set(out.loss) == {"generator", "discriminator"} and out.logs["mixed"] == 1.0
    d_params = stage.disc.trainable_parameters()
    g_params = student.trainable_parameters() + list(stage.motion.phi.parameters())
    gg = torch.autograd.grad(out.loss["discriminator"], g_params, allow_unused=True, retain_graph=True)
    assert all(g is None or float(g.abs().sum()) == 0 for g in gg)
    assert any(g is not None and float(g.abs().sum()) > 0
               for g in torch.autograd.grad(out.loss["generator"], g_params, allow_unused=True, retain_graph=True))
    assert any(g is not None and float(g.abs().sum()) > 0
               for g in torch.autograd.grad(out.loss["discriminator"], d_params, allow_unused=True))


def test_mcm_trains_lora_head_and_discriminator_in_the_loop(tiny_wan, tmp_path):
    cfg = MCMConfig(teacher=str(tiny_wan), steps=3, batch_size=2, eval_prompts=0, data="shapeworld-lq",
                    real_images="hq", checkpoint_every=10)
    m = run(cfg, MCMMethod(), tmp_path, progress=False)
    hist = json.loads((tmp_path / "history.json").read_text())
    assert len(hist) == 3 and {"l_cd", "l_adv", "l_d", "gp"} <= set(hist[-1])
    assert Path(m["student"], "student.json").is_file()
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "checkpoints" / "last.safetensors"))
    assert any("motion_head" in k for k in state) and any("disc" in k for k in state)


def test_pooled_text_ignores_padding():
    from studio.teachers.base import TextCond

    e = torch.zeros(1, 5, 3)
    e[0, :2] = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    cond = TextCond(e, torch.zeros_like(e), ["x"], [""])
    torch.testing.assert_close(pooled_text(cond), torch.tensor([[2.0, 2.0, 2.0]]))


def test_mcm_cli_with_a_dinov2_backbone_by_path(tiny_wan, tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    from studio.cli import main

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=12, num_attention_heads=2, intermediate_size=64,
                             patch_size=14, image_size=224)).save_pretrained(str(tmp_path / "dino"))
    out = tmp_path / "run"
    main(["video", "distill", "--method", "mcm", "--teacher", str(tiny_wan), "--steps", "1", "--batch-size", "1",
          "--backbone", f"dinov2:{tmp_path / 'dino'}", "--eval-prompts", "1", "--eval-steps", "1", "--out", str(out)])
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "mcm" and "student_1_motion_accuracy" in m["headline"]
    with pytest.raises(SystemExit) as e:
        main(["video", "distill", "--method", "mcm", "--teacher", str(tiny_wan), "--real-images", "web",
              "--out", str(out)])
    assert e.value.code == 2
