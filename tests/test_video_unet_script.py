"""``scripts/train_shapeworld_video_unet.py`` (issue 16's two-stage AnimateDiff route) end to end at a toy size:
the image stage writes a folder, the motion stage inflates it into a ``UNetMotionModel`` that starts as the image
model frame by frame, and the saved folder loads back through the AnimateDiff teacher path as a rectified-flow
pixel-space video teacher that samples clips."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from studio.teachers import load_teacher
from studio.teachers.diffusers_video import AnimateDiffTeacher, ModelScopeTeacher
from studio.teachers.sampling import flow_euler_sample

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return _load("train_shapeworld_video_unet")


TOY = ["--res", "16", "--frames", "4", "--width", "16", "--batch", "2", "--steps", "2", "--warmup", "1",
       "--eval-prompts", "1", "--eval-cfg", "2", "--eval-steps", "2", "--prompts", "one"]


def test_inflated_model_starts_as_the_image_model(script):
    torch.manual_seed(0)
    unet2d = script.build_unet2d(16, 16, seed=0).eval()
    motion = script.inflate(unet2d, frames=4, seed=0).eval()
    x = torch.randn(2, 3, 4, 16, 16)
    ctx = torch.randn(2, 5, 64)
    t = torch.tensor([300.0, 700.0])
    with torch.no_grad():
        out = motion(x, t, encoder_hidden_states=ctx.repeat_interleave(4, 0), return_dict=False)[0]
        frames = x.permute(0, 2, 1, 3, 4).reshape(8, 3, 16, 16)
        ref = unet2d(frames, t.repeat_interleave(4), encoder_hidden_states=ctx.repeat_interleave(4, 0),
                     return_dict=False)[0].reshape(2, 4, 3, 16, 16).permute(0, 2, 1, 3, 4)
    # zeroed motion-module outputs: the temporal branch adds exactly zero, so only float32 reordering differs
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    # and the motion modules do act once their outputs are not zero
    for name, mod in motion.named_modules():
        if "motion_modules" in name and name.endswith("proj_out"):
            torch.nn.init.normal_(mod.weight, std=0.1)
    with torch.no_grad():
        out2 = motion(x, t, encoder_hidden_states=ctx.repeat_interleave(4, 0), return_dict=False)[0]
    assert (out2 - ref).abs().max() > 1e-3


def test_two_stages_save_a_loadable_animatediff_teacher(script, tmp_path):
    log = tmp_path / "readouts.jsonl"
    img = tmp_path / "img"
    assert script.main(["--stage", "image", "--out", str(img), "--log", str(log), *TOY]) == 0
    assert json.loads((img / "unet" / "config.json").read_text())["_class_name"] == "UNet2DConditionModel"
    mot = tmp_path / "mot"
    assert script.main(["--stage", "motion", "--init-from", str(img), "--out", str(mot), "--log", str(log),
                        "--spatial-lr-scale", "0", *TOY]) == 0
    info = json.loads((mot / "training.json").read_text())
    assert [r["stage"] for r in info["rounds"]] == ["image", "motion"]
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["image", "motion"] and "motion_accuracy" in rows[1]["readout"]["2.0"]
    teacher = load_teacher(str(mot))
    assert isinstance(teacher, AnimateDiffTeacher) and teacher.schedule.is_flow
    assert (teacher.num_frames, teacher.native_resolution, teacher.latent_channels) == (4, 16, 3)
    videos = flow_euler_sample(teacher, ["a red ball moving left"], steps=2, guidance_scale=2.0, seed=0)
    assert videos.shape == (1, 4, 3, 16, 16) and torch.isfinite(videos).all()


def test_motion_stage_gives_the_text_path_its_own_rate(script):
    """The motion modules read no text; the cross-attention + text encoder (the only way the motion words reach
    them) get ``--xattn-lr-scale``, the other spatial layers ``--spatial-lr-scale``; scale 0 freezes a group."""
    from transformers import CLIPTextConfig, CLIPTextModel

    text = CLIPTextModel(CLIPTextConfig(vocab_size=20, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=8))
    motion = script.inflate(script.build_unet2d(16, 16, seed=0), frames=4, seed=0)
    groups, motion_p = script.param_groups(motion, text, "motion", 0.0, 1.0)
    names = {id(p): n for n, p in motion.named_parameters()}
    by_scale = {g["scale"]: g["params"] for g in groups}
    assert set(by_scale) == {1.0} and len(groups) == 2          # motion modules, then cross-attention + text
    assert all("motion_modules" in names[id(p)] for p in groups[0]["params"]) and groups[0]["params"] == motion_p
    xattn = [names[id(p)] for p in groups[1]["params"] if id(p) in names]
    assert xattn and all(".attn2." in n for n in xattn)
    assert all(p.requires_grad for p in text.parameters())
    frozen = [n for n, p in motion.named_parameters() if not p.requires_grad]
    assert frozen and not any(".attn2." in n or "motion_modules" in n for n in frozen)
    # default: the text path follows --spatial-lr-scale (AnimateDiff's recipe at 0: both frozen)
    motion2 = script.inflate(script.build_unet2d(16, 16, seed=0), frames=4, seed=0)
    groups2, _ = script.param_groups(motion2, text, "motion", 0.0)
    assert len(groups2) == 1 and not any(p.requires_grad for p in text.parameters())
    # image stage: everything in one group at scale 1
    text.requires_grad_(True)
    groups3, m3 = script.param_groups(script.build_unet2d(16, 16, seed=0), text, "image", 0.0, 0.0)
    assert len(groups3) == 1 and groups3[0]["scale"] == 1.0 and m3 == []


def test_shipped_video_unet_loads_by_name_and_samples():
    """``shapeworld-video-unet`` (assets/, trained by this script) loads through the registry as an AnimateDiff
    flow teacher at its clip size and samples finite clips; its training record names both stages."""
    teacher = load_teacher("shapeworld-video-unet")
    assert isinstance(teacher, AnimateDiffTeacher) and teacher.schedule.is_flow
    assert (teacher.num_frames, teacher.native_resolution, teacher.latent_channels) == (8, 16, 3)
    info = json.loads((ROOT / "assets" / "shapeworld-video-unet" / "training.json").read_text())
    assert [r["stage"] for r in info["rounds"]][:2] == ["image", "motion"]
    videos = flow_euler_sample(teacher, ["a red ball moving left"], steps=2, guidance_scale=2.0, seed=0)
    assert videos.shape == (1, 8, 3, 16, 16) and torch.isfinite(videos).all()


def test_modelscope_inflation_starts_as_the_spatial_model(script):
    """``--arch modelscope``: the spatial weights of an AnimateDiff-class model map by name onto a
    ``UNet3DConditionModel`` whose temporal layers start at zero output, so it equals the spatial model applied
    frame by frame; the temporal convolutions act once non-zero, and they are order-aware (reversing the frames
    of the input does not just reverse the output)."""
    unet2d = script.build_unet2d(16, 32, seed=0).eval()  # attention blocks of 64 channels, 8 heads
    for p in unet2d.parameters():  # non-trivial spatial weights (fresh diffusers UNets zero some outputs)
        p.data.add_(0.05 * torch.randn_like(p))
    motion = script.inflate(unet2d, frames=4, seed=0)
    net = script.inflate_3d(motion, seed=1).eval()
    assert type(net).__name__ == "UNet3DConditionModel" and not script.folds_frames(net)
    x = torch.randn(2, 3, 4, 16, 16)
    ctx = torch.randn(2, 5, 64)
    t = torch.tensor([300.0, 700.0])
    with torch.no_grad():
        out = net(x, t, encoder_hidden_states=ctx, return_dict=False)[0]
        frames = x.permute(0, 2, 1, 3, 4).reshape(8, 3, 16, 16)
        ref = unet2d(frames, t.repeat_interleave(4), encoder_hidden_states=ctx.repeat_interleave(4, 0),
                     return_dict=False)[0].reshape(2, 4, 3, 16, 16).permute(0, 2, 1, 3, 4)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    from diffusers import UNet2DConditionModel

    uneven = UNet2DConditionModel(  # attention blocks of 32 and 48 channels: no one head size keeps 8 heads in both
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32, 48),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
        attention_head_dim=8, norm_num_groups=16, use_linear_projection=True)
    with pytest.raises(ValueError, match="heads"):
        script.inflate_3d(uneven, seed=1)
    for name, mod in net.named_modules():
        if "temp_convs" in name and name.endswith("conv4.3"):
            torch.nn.init.normal_(mod.weight, std=0.1)
    with torch.no_grad():
        out2 = net(x, t, encoder_hidden_states=ctx, return_dict=False)[0]
        rev = net(x.flip(2), t, encoder_hidden_states=ctx, return_dict=False)[0].flip(2)
    assert (out2 - ref).abs().max() > 1e-3
    assert (rev - out2).abs().max() > 1e-3
    groups, temporal = script.param_groups(net, torch.nn.Linear(1, 1), "motion", 0.1, 1.0)
    names = {id(p): n for n, p in net.named_parameters()}
    assert temporal and all(any(k in names[id(p)] for k in script.TEMPORAL) for p in temporal)
    assert {n.split(".")[0] for n in (names[id(p)] for p in temporal)} >= {"transformer_in", "down_blocks"}


def test_modelscope_motion_stage_saves_a_loadable_modelscope_teacher(script, tmp_path):
    img = tmp_path / "img"
    assert script.main(["--stage", "image", "--out", str(img), *TOY]) == 0
    mot = tmp_path / "mot"
    assert script.main(["--stage", "motion", "--arch", "modelscope", "--init-from", str(img), "--out", str(mot),
                        *TOY]) == 0
    index = json.loads((mot / "model_index.json").read_text())
    assert index["_class_name"] == "TextToVideoSDPipeline" and index["unet"][1] == "UNet3DConditionModel"
    teacher = load_teacher(str(mot))
    assert isinstance(teacher, ModelScopeTeacher) and teacher.schedule.is_flow
    assert (teacher.num_frames, teacher.native_resolution, teacher.latent_channels) == (4, 16, 3)
    videos = flow_euler_sample(teacher, ["a red ball moving left"], steps=2, guidance_scale=2.0, seed=0)
    assert videos.shape == (1, 4, 3, 16, 16) and torch.isfinite(videos).all()
    # and it continues as the same class
    mot2 = tmp_path / "mot2"
    assert script.main(["--stage", "motion", "--arch", "modelscope", "--init-from", str(mot), "--out", str(mot2),
                        *TOY]) == 0
    assert json.loads((mot2 / "training.json").read_text())["rounds"][-1]["stage"] == "motion"


def test_svd_class_probe_inflation_and_direction_gap(script):
    """``--arch svd``: the spatial weights land under SVD's names (resnets -> ``spatial_res_block``), the
    temporal parts start at zero output and SVD's added time ids are zeroed and frozen; ``denoise`` runs the three
    classes on ``[B,C,F,H,W]``; ``direction_gap`` swaps only the direction word and reports one gap per level."""
    motion = script.inflate(script.build_unet2d(16, 32, seed=0), frames=4, seed=0)
    svd = script.inflate_svd(motion, frames=4, seed=0)
    sd_m, sd_s = motion.state_dict(), svd.state_dict()
    k = "down_blocks.1.resnets.0.conv1.weight"
    assert torch.equal(sd_m[k], sd_s[k.replace("resnets.0.", "resnets.0.spatial_res_block.")])
    assert torch.equal(sd_m["down_blocks.1.attentions.0.proj_in.weight"], sd_s["down_blocks.1.attentions.0.proj_in.weight"])
    assert not any(p.requires_grad for p in svd.add_embedding.parameters())
    assert float(svd.add_embedding.linear_2.weight.abs().sum()) == 0.0
    for name, mod in svd.named_modules():
        if name.endswith("temporal_res_block.conv2") or name.endswith("time_pos_embed.linear_2"):
            assert float(mod.weight.abs().sum()) == 0.0
    x, ctx, t = torch.randn(2, 3, 4, 16, 16), torch.randn(2, 5, 64), torch.tensor([300.0, 700.0])
    with torch.no_grad():
        for net in (motion, svd, script.inflate_3d(motion, seed=0)):
            assert script.denoise(net.eval(), x, t, ctx).shape == x.shape
    assert script.swap_direction("a red ball moving left") == "a red ball moving right"
    assert script.swap_direction("a blue cube moving up, camera panning left") == "a blue cube moving down, camera panning left"
    assert script.swap_direction("a red ball bouncing") == "a red ball bouncing"
    text = torch.nn.Embedding(1000, 64)
    text_fn = lambda ps: text(torch.tensor([[hash(w) % 1000 for w in p.split()[:5]] for p in ps]))  # noqa: E731
    gap = script.direction_gap(motion.eval(), text_fn, ["a red ball moving left", "a red ball bouncing"], 4, 16, n=4)
    assert set(gap) == {"0.85", "0.9"} and all(isinstance(v, float) for v in gap.values())
    assert script.direction_gap(motion, text_fn, ["a red ball bouncing"], 4, 16, n=4) == {}
