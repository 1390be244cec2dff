"""Our IRNet pieces against outputs of the public IRNet code (jiwoon-ahn/irn @ a2ece00).

The cases live in the team's shared folder (``../shared/oracles/irnet`` next to the repository root);
INDEX.md there documents every array. Tolerances follow INDEX.md (rtol 1e-4, atol 1e-5) or are exact.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SHARED

from src.models.irn import infer_edge_displacement, merge_flip_edge, pad_to_crop
from src.ops.losses import affinity_from_edge, irn_loss_maps, irn_loss_terms, pair_displacement
from src.ops.optim import ParamGroup, build_sgd, poly_scheduler
from src.ops.path_index import PathIndex, affinity_labels

ORACLES = SHARED / "oracles" / "irnet"
if not ORACLES.is_dir():
    pytest.skip(f"{ORACLES} not found: reference cases need the team's shared folder (../shared or $WSSS_SHARED_DIR)",
                allow_module_level=True)

RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(autouse=True)
def no_tf32():
    """Reference numbers are float32 without TF32 (spec): switch it off for every case here."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def load(name: str) -> dict[str, np.ndarray]:
    with np.load(ORACLES / name) as data:
        return {k: data[k] for k in data.files}


def close(ours: torch.Tensor, ref: np.ndarray) -> None:
    torch.testing.assert_close(ours.detach().cpu(), torch.from_numpy(np.asarray(ref)), rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------- a: PathIndex


@pytest.mark.parametrize("case", ["a_pathindex_r5_16x16.npz", "a_pathindex_r5_12x20.npz",
                                  "a_pathindex_r10_12x20.npz", "a_pathindex_r10_24x24.npz"])
def test_pathindex_matches_reference(case: str) -> None:
    ref = load(case)
    pi = PathIndex(int(ref["radius"]), tuple(int(s) for s in ref["default_size"]))
    assert pi.radius_floor == int(ref["radius_floor"])
    assert pi.n_offsets == int(ref["n_offsets"])
    np.testing.assert_array_equal(pi.search_dst, ref["search_dst"])
    np.testing.assert_array_equal(pi.src_indices, ref["src_indices"])
    np.testing.assert_array_equal(pi.dst_indices, ref["dst_indices"])
    assert [len(g[0]) for g in pi.search_paths] == ref["path_lengths"].tolist()
    assert [len(g) for g in pi.search_paths] == ref["group_sizes"].tolist()
    for g in range(len(ref["path_lengths"])):
        np.testing.assert_array_equal(pi.search_paths[g], ref[f"search_paths_g{g:02d}"])
        np.testing.assert_array_equal(pi.path_indices[g], ref[f"path_indices_g{g:02d}"])
    assert len(pi.search_paths) == len(ref["path_lengths"])


def test_pathindex_radius10_on_16x16_is_rejected() -> None:
    # INDEX.md: impossible in the reference (cropped width 16 - 18 < 0); we say so instead of misindexing.
    with pytest.raises(ValueError, match="at least 10 x 19"):
        PathIndex(10, (16, 16))


# ------------------------------------------------------------------------------- d: IRN loss terms


def test_irn_loss_terms_match_reference() -> None:
    ref = load("d_irn_loss_r10_24x24.npz")
    pi = PathIndex(10, (24, 24))
    edge_logits, dp = torch.from_numpy(ref["edge_logits"]), torch.from_numpy(ref["dp"])
    bg_pos, fg_pos, neg = (torch.from_numpy(ref[k]) for k in ("bg_pos_label", "fg_pos_label", "neg_label"))

    # The label tensors the reference loader produced from label_maps: ours must give the same.
    ours = affinity_labels(torch.from_numpy(ref["label_maps"]), pi)
    for mine, theirs in zip(ours, (bg_pos, fg_pos, neg)):
        assert torch.equal(mine, theirs)
    assert (bg_pos.sum(), fg_pos.sum(), neg.sum()) == (6245, 2925, 8721)

    close(affinity_from_edge(torch.sigmoid(edge_logits), pi), ref["aff"])
    close(pair_displacement(dp, pi), ref["pair_disp"])
    np.testing.assert_array_equal(pi.search_dst.T[None, :, :, None].astype(np.float32), ref["disp_target"])

    maps = irn_loss_maps(edge_logits, dp, pi)
    for key in ("pos_aff", "neg_aff", "dp_fg", "dp_bg"):
        close(maps[key], ref[f"{key}_loss_map"])

    terms = irn_loss_terms(edge_logits, dp, bg_pos, fg_pos, neg, pi)
    names = {"bg_pos_aff": "bg_pos_aff_loss", "fg_pos_aff": "fg_pos_aff_loss", "pos_aff": "pos_aff_loss",
             "neg_aff": "neg_aff_loss", "dp_fg": "dp_fg_loss", "dp_bg": "dp_bg_loss", "total": "total_loss"}
    assert set(terms) == set(names)
    for key, ref_key in names.items():
        close(terms[key], ref[ref_key])


# ------------------------------------------------------------------------------ e: affinity labels


def test_affinity_labels_loader_r10() -> None:
    ref = load("e_aff_labels_loader_r10.npz")
    crop = int(ref["crop_size"])
    pi = PathIndex(10, (crop // 4, crop // 4))
    np.testing.assert_array_equal(pi.src_indices, ref["src_indices"])
    np.testing.assert_array_equal(pi.dst_indices, ref["dst_indices"])

    # top-left crop of the 88 x 80 label into a 96 canvas filled with 255 (the loader's label padding)
    label = ref["label"]
    canvas = np.full((crop, crop), 255, dtype=np.uint8)
    canvas[: label.shape[0], : label.shape[1]] = label
    np.testing.assert_array_equal(canvas, ref["out_label"])
    # the loader's PIL-nearest x0.25 picks pixels 4i + 2 (spec stage 3)
    reduced = canvas[2::4, 2::4]
    np.testing.assert_array_equal(reduced, ref["reduced_label"])

    bg_pos, fg_pos, neg = affinity_labels(torch.from_numpy(reduced)[None], pi)
    for mine, key in zip((bg_pos, fg_pos, neg), ("aff_bg_pos_label", "aff_fg_pos_label", "aff_neg_label")):
        assert mine.dtype == torch.float32
        np.testing.assert_array_equal(mine[0].numpy(), ref[key])
    assert bg_pos.sum() > 0 and fg_pos.sum() > 0 and neg.sum() > 0


def test_affinity_labels_direct_r5() -> None:
    ref = load("e_aff_labels_direct_r5_12x20.npz")
    pi = PathIndex(5, (12, 20))
    np.testing.assert_array_equal(pi.dst_indices, ref["dst_indices"])
    # a batch of two copies: the result must not mix images
    labels = torch.from_numpy(ref["segm_map"])[None].repeat(2, 1, 1)
    bg_pos, fg_pos, neg = affinity_labels(labels, pi)
    for mine, key in zip((bg_pos, fg_pos, neg), ("bg_pos_label", "fg_pos_label", "neg_label")):
        assert mine.shape == (2, 34, 96)
        for b in range(2):
            np.testing.assert_array_equal(mine[b].numpy(), ref[key])


# ------------------------------------------------------------------------------ g: poly optimiser


@pytest.mark.parametrize("case", ["g1", "g2", "g3"])
def test_poly_sgd_reproduces_reference_optimizer(case: str) -> None:
    ref = {k[len(case) + 1:]: v for k, v in load("g_poly_optimizer.npz").items() if k.startswith(case + "_")}
    init, grad = torch.from_numpy(ref["init"]), torch.from_numpy(ref["grad"])
    base_lr = float(ref["lr"][0, 0])
    # The reference's effective momentum is its weight-decay argument (quirk). With per-group weight
    # decay (g1, g2: the train_irn structure) it is also the decay; without (g3) there is no decay.
    momentum = float(ref["group_momentum"][0])
    weight_decay = float(ref["group_weight_decay"][0])
    if case == "g3":
        params = [torch.nn.Parameter(init.clone())]
        groups = [ParamGroup(params, lr_mult=1.0)]
    else:
        # p0 (lr 0.1) holds the first 3 values, p1 (lr 1.0) the last 2: visible in the first step.
        params = [torch.nn.Parameter(init[:3].clone()), torch.nn.Parameter(init[3:].clone())]
        groups = [ParamGroup([params[0]], lr_mult=1.0), ParamGroup([params[1]], lr_mult=10.0)]
    opt = build_sgd(groups, lr=base_lr, momentum=momentum, weight_decay=weight_decay)
    sched = poly_scheduler(opt, max_steps=int(ref["max_step"]), power=float(ref["poly_power"]))
    np.testing.assert_allclose([g["momentum"] for g in opt.param_groups], ref["group_momentum"])
    np.testing.assert_allclose([g["weight_decay"] for g in opt.param_groups], ref["group_weight_decay"])

    grads = torch.split(grad, [p.numel() for p in params])
    for step in range(len(ref["lr"])):
        np.testing.assert_allclose([g["lr"] for g in opt.param_groups], ref["lr"][step], rtol=1e-12)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        sched.step()
        close(torch.cat([p.detach() for p in params]), ref["params"][step])
        close(torch.cat([opt.state[p]["momentum_buffer"] for p in params]), ref["momentum_buffer"][step])


# ---------------------------------------------------------------- i: EdgeDisplacement post-processing


def test_edge_displacement_postprocessing() -> None:
    ref = load("i_edge_displacement_postproc.npz")
    crop, stride = int(ref["crop_size"]), int(ref["stride"])
    _, _, height, width = (int(s) for s in ref["input_shape"])
    edge_out, dp_out = torch.from_numpy(ref["net_edge_out"]), torch.from_numpy(ref["net_dp_out"])

    edge, dp = merge_flip_edge(edge_out, dp_out, (height, width), stride)
    close(edge, ref["edge"])
    close(dp, ref["dp"])

    images = torch.randn(2, 3, height, width)
    padded = pad_to_crop(images, crop)
    assert tuple(padded.shape) == tuple(ref["padded_input_shape"])
    assert torch.equal(padded[..., :height, :width], images)
    assert padded[..., height:, :].abs().sum() == 0 and padded[..., width:].abs().sum() == 0

    class StubIRN(torch.nn.Module):
        """Returns the reference network outputs, and records what it was fed."""

        output_stride = stride

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            self.seen = x
            return edge_out, dp_out

    stub = StubIRN()
    edge2, dp2 = infer_edge_displacement(stub, images[0], crop)
    assert tuple(stub.seen.shape) == tuple(ref["padded_input_shape"])
    assert torch.equal(stub.seen[1, :, :height, :width], images[0].flip(-1))
    close(edge2, ref["edge"])
    close(dp2, ref["dp"])
