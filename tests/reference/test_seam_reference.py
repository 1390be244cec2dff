"""Our ResNet-38d, SEAM and AffinityNet pieces against outputs of the public SEAM code
(YudeWang/SEAM @ 3212261).

The cases live in the team's shared folder (``../shared/oracles/seam`` next to the repository root);
INDEX.md there documents every array. Tolerances follow INDEX.md: rtol 1e-4 / atol 1e-5 for single
layers, losses and normalisations, rtol 1e-3 / atol 1e-4 for the ResNet-38 outputs.
"""

from __future__ import annotations

import gc
import hashlib
import json
import zlib

import numpy as np
import pytest
import torch
from conftest import SHARED

from src.models.resnet38d import ResNet38d, load_state_strict
from src.models.seam import SEAM
from src.ops.losses import affinity_loss, max_norm
from src.ops.optim import ParamGroup, build_sgd, poly_scheduler
from src.ops.pairs import affinity_labels_in_radius, half_plane_offsets

ORACLES = SHARED / "oracles" / "seam"
if not ORACLES.is_dir():
    pytest.skip(f"{ORACLES} not found: reference cases need the team's shared folder (../shared or $WSSS_SHARED_DIR)",
                allow_module_level=True)

RTOL, ATOL = 1e-4, 1e-5
NET_RTOL, NET_ATOL = 1e-3, 1e-4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions gain nothing from threads, and on a shared CPU the thread hand-offs dominate."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(autouse=True)
def no_tf32():
    """Reference numbers are float32 without TF32: switch it off for every case here."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def load(name: str) -> dict[str, np.ndarray]:
    with np.load(ORACLES / name) as data:
        return {k: data[k] for k in data.files}


def close(ours: torch.Tensor, ref: np.ndarray, rtol: float = RTOL, atol: float = ATOL) -> None:
    torch.testing.assert_close(ours.detach().cpu(), torch.from_numpy(np.asarray(ref)), rtol=rtol, atol=atol)


# ------------------------------------------------------------------------- a: ResNet-38d forward


def det_uniform(seed: int, name: str, shape: tuple[int, ...], lo: float, hi: float) -> np.ndarray:
    """INDEX.md's generator of inputs and weights."""
    return np.random.RandomState([seed, zlib.crc32(name.encode())]).uniform(lo, hi, shape).astype(np.float32)


def weight_range(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """INDEX.md: conv weights +-sqrt(3 / fan_in); BN weight and running_var U(0.8, 1.2); BN bias and
    running_mean U(-0.1, 0.1)."""
    if len(shape) == 4:
        bound = float(np.sqrt(3.0 / (shape[1] * shape[2] * shape[3])))
        return -bound, bound
    if name.endswith(".weight") or name.endswith(".running_var"):
        return 0.8, 1.2
    if name.endswith(".bias") or name.endswith(".running_mean"):
        return -0.1, 0.1
    raise AssertionError(f"no generation rule for {name}")


def regenerate_weights(ref: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The 401 MB reference state dict, entry by entry in the order of weight_names, each checked against
    its sha256 (and float64 sum) before use."""
    shapes = json.loads(str(ref["meta_json"]))["weight_shapes"]
    state = {}
    for name, sha, total in zip(ref["weight_names"], ref["weight_sha256"], ref["weight_sums"]):
        name = str(name)
        shape = tuple(shapes[name])
        w = det_uniform(38, name, shape, *weight_range(name, shape))
        assert hashlib.sha256(w.astype("<f4").tobytes()).hexdigest() == sha, f"regenerated {name} differs"
        assert np.isclose(w.sum(dtype=np.float64), total, rtol=1e-9, atol=1e-9), name
        state[name] = torch.from_numpy(w)
    return state


def test_resnet38d_forward_matches_reference() -> None:
    ref = load("a_resnet38d_forward.npz")
    state = regenerate_weights(ref)
    meta = json.loads(str(ref["meta_json"]))
    assert sum(v.numel() for v in state.values()) == meta["weights_total_params"]
    model = ResNet38d(norm="frozen")
    load_state_strict(model, state, source="regenerated reference weights")  # strict: proves the key names
    del state
    model.eval()
    try:
        x = torch.from_numpy(ref["input"])
        mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
        normalised = ((ref["image_uint8"] / 255.0 - mean) / std).astype(np.float32).transpose(2, 0, 1)
        np.testing.assert_allclose(normalised[None], ref["input"], rtol=1e-6, atol=1e-6)
        with torch.no_grad():
            out = model.forward_features(x, return_blocks=True)
            conv6 = model(x)
        for key in ("conv3", "conv4", "conv5", "conv6"):
            close(out[key], ref[f"out_{key}"], NET_RTOL, NET_ATOL)
        torch.testing.assert_close(conv6, out["conv6"], rtol=0, atol=0)

        names = [str(n) for n in ref["block_names"]]
        assert names[-1] == "bn7+relu (conv6)"
        out[names[-1]] = out["conv6"]
        for i, name in enumerate(names):
            y = out[name]
            assert list(y.shape) == ref["block_out_shapes"][i].tolist(), name
            assert x.shape[-1] // y.shape[-1] == ref["block_out_stride"][i], name
            y64 = y.double()
            sums = torch.stack([y64.sum(), y64.abs().sum(), (y64 ** 2).sum()]).numpy()
            np.testing.assert_allclose(sums, ref["block_checksums"][i], rtol=NET_RTOL, atol=NET_ATOL,
                                       err_msg=name)
            close(y.flatten()[:8], ref["block_first8"][i], NET_RTOL, NET_ATOL)
            if f"block_out_{name}" in ref:
                close(y, ref[f"block_out_{name}"], NET_RTOL, NET_ATOL)

        # dilations of the 3x3 convs: (branch2a, branch2b1) for basic blocks, (branch2b1, 0) for bottlenecks
        for i, name in enumerate(names[1:-1], start=1):
            block = getattr(model, name)
            if hasattr(block, "conv_branch2b2"):
                got = [block.conv_branch2b1.dilation[0], 0]
            else:
                got = [block.conv_branch2a.dilation[0], block.conv_branch2b1.dilation[0]]
            assert got == ref["block_dilations"][i].tolist(), name
        expected = meta["output_checksum_conv6"]  # not its sha256: bits differ across BLAS builds
        conv6_64 = out["conv6"].double()
        assert np.isclose(conv6_64.sum().item(), expected["sum"], rtol=NET_RTOL)
        assert np.isclose(conv6_64.abs().sum().item(), expected["abs_sum"], rtol=NET_RTOL)
    finally:
        del model
        gc.collect()


# ----------------------------------------------------------------- b2: PCM with a resized CAM


def test_pcm_resizes_a_smaller_cam_as_reference() -> None:
    """b2's f and f9 weight live in b1_pcm.npz, which the shared folder does not hold, so cam_rv itself can
    not be recomputed. Checked instead: (1) the PCM's internal resize, by making the affinities the
    identity (one-hot features per position): then cam_rv * (1 + 1e-5) is the resized CAM, which must equal
    the reference's ``cam_flat``; (2) the reference cam_rv is a column-normalised non-negative mix of
    ``cam_flat`` (bounds per image and class), the property our PCM has by construction."""
    ref = load("b2_pcm_resize.npz")
    cam = torch.from_numpy(ref["cam"])
    net = SEAM(ResNet38d(width=1 / 16), num_classes=20)
    n, (h, w) = cam.shape[0], ref["cam_rv"].shape[-2:]
    f = torch.zeros(n, net.f9.in_channels, h, w)
    f.view(n, -1, h * w)[:, : h * w] = torch.eye(h * w)
    with torch.no_grad():
        net.f9.weight.zero_()
        net.f9.weight[:, :, 0, 0] = torch.eye(net.f9.out_channels, net.f9.in_channels)
        cam_rv = net.pcm(cam, f)
    assert cam_rv.shape == ref["cam_rv"].shape
    close(cam_rv.reshape(n, 21, -1) * (1 + 1e-5), ref["cam_flat"])

    flat, rv = ref["cam_flat"], ref["cam_rv"].reshape(n, 21, -1)
    assert np.all(rv <= flat.max(-1, keepdims=True) + ATOL)
    assert np.all(rv >= flat.min(-1, keepdims=True) * (1 - 1e-4) - ATOL)


# ------------------------------------------------------------------------------ c2: max_norm


def test_max_norm_torch_branch_matches_reference() -> None:
    ref = load("c2_max_norm.npz")
    close(max_norm(torch.from_numpy(ref["t4_in"])), ref["t4_out"])
    close(max_norm(torch.from_numpy(ref["t3_in"])), ref["t3_out"])
    # the oracle's special channels: all negative -> 0 everywhere, constant -> 0 everywhere
    assert np.all(ref["t4_out"][0, 1] == 0) and np.all(ref["t4_out"][1, 2] == 0)


def test_max_norm_numpy_branch_is_not_ours() -> None:
    """The reference's numpy branch (divides by max + e instead of max - min + e, leaves -(min + e)/(max + e)
    at the minima, mutates its argument) only feeds TensorBoard pictures (``generate_vis(norm=True)``;
    training calls it with norm=False), so it is not part of our code. On the oracle's inputs every channel
    holds a negative value (min 0 after ReLU), where the two branches agree except at the minima: there the
    numpy branch is slightly negative and ours is 0. Ours never mutates its input."""
    ref = load("c2_max_norm.npz")
    for key in ("np3", "np4"):
        x = torch.from_numpy(ref[f"{key}_in"].copy())
        ours = max_norm(x).numpy()
        np.testing.assert_array_equal(x.numpy(), ref[f"{key}_in"])
        np.testing.assert_allclose(ours, np.maximum(ref[f"{key}_out"], 0), rtol=RTOL, atol=ATOL)
        assert (ref[f"{key}_out"] < 0).any() and (ours >= 0).all()
        assert not np.array_equal(ref[f"{key}_in_after_call"], ref[f"{key}_in"])  # the reference mutated it


# ---------------------------------------------------------------------- g: AffinityNet loss


def test_affinity_labels_and_loss_match_reference() -> None:
    ref = load("g_affinity_loss.npz")
    assert [list(o) for o in half_plane_offsets(5)] == ref["search_dist"].tolist()
    bg_pos, fg_pos, neg = affinity_labels_in_radius(torch.from_numpy(ref["label_maps"]), radius=5)
    np.testing.assert_array_equal(bg_pos.numpy(), ref["bg_pos"])
    np.testing.assert_array_equal(fg_pos.numpy(), ref["fg_pos"])
    np.testing.assert_array_equal(neg.numpy(), ref["neg"])
    # also per image from numpy, as a data loader calls it
    np.testing.assert_array_equal(affinity_labels_in_radius(ref["label_maps"][1], radius=5)[2].numpy(), ref["neg"][1])

    aff = torch.from_numpy(ref["aff"]).requires_grad_(True)
    out = affinity_loss(aff, bg_pos, fg_pos, neg)
    for key in ("bg_count", "fg_count", "neg_count", "bg_loss", "fg_loss", "neg_loss", "loss"):
        close(out[key], ref[key])
    out["loss"].backward()
    close(aff.grad, ref["grad_aff"])


# ------------------------------------------------------------------- h: poly SGD (PolyOptimizer)


def run_poly(ref: dict[str, np.ndarray], momentum: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    meta = json.loads(str(ref["meta_json"]))
    params = [torch.nn.Parameter(torch.from_numpy(ref[f"p{i}_init"]).clone()) for i in range(4)]
    groups = [ParamGroup([p], lr_mult=m, weight_decay=None if wd > 0 else 0.0)
              for p, m, wd in zip(params, meta["group_lr_mult"], meta["group_weight_decay"])]
    opt = build_sgd(groups, lr=meta["lr"], momentum=momentum, weight_decay=meta["wt_dec"])
    sched = poly_scheduler(opt, max_steps=meta["max_step"], power=0.9)
    lrs, traj, bufs = [], [], []
    for _ in range(meta["steps"]):
        opt.zero_grad()
        for i, p in enumerate(params):
            p.grad = torch.from_numpy(ref[f"p{i}_grad"]).clone()
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
        traj.append(torch.cat([p.detach().flatten() for p in params]).numpy().copy())
        bufs.append(torch.cat([opt.state[p]["momentum_buffer"].flatten() for p in params]).numpy().copy())
    return np.array(lrs), np.stack(traj), np.stack(bufs)


def test_poly_sgd_reproduces_reference_effective_momentum() -> None:
    """The reference passes wt_dec where SGD's momentum goes: momentum 5e-4 (INDEX.md finding)."""
    ref = load("h_poly_optimizer.npz")
    lrs, traj, bufs = run_poly(ref, momentum=5e-4)
    np.testing.assert_allclose(lrs, ref["lr_per_step"], rtol=1e-12, atol=0)
    np.testing.assert_allclose(traj, ref["param_traj"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(bufs, ref["momentum_buffer_traj"], rtol=RTOL, atol=ATOL)


def test_poly_sgd_momentum_09_reproduces_counterfactual() -> None:
    ref = load("h_poly_optimizer.npz")
    _, traj, _ = run_poly(ref, momentum=0.9)
    np.testing.assert_allclose(traj, ref["counterfactual_traj_momentum09"], rtol=RTOL, atol=ATOL)
    assert not np.allclose(traj, ref["param_traj"], rtol=RTOL, atol=ATOL)
