"""Sparse random walk of IRNet against the dense reference formulation and hand computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from src.ops.losses import affinity_from_edge
from src.ops.pairs import half_plane_offsets
from src.ops.path_index import PathIndex
from src.ops.random_walk import (
    dense_affinity,
    edge_to_pair_affinity,
    propagate_cams,
    random_walk,
    random_walk_dense,
)


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# rtol 1e-4 as asked; atol only for values that are ~0 after the walk (relative error is meaningless there).
RTOL, ATOL = 1e-4, 1e-6


def random_edge(batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # cubed uniforms: mostly low boundary scores with a few strong ones, like a real boundary map
    return torch.rand(batch, height, width, generator=gen) ** 3


@pytest.mark.parametrize("batch,channels,height,width,radius,beta,exp_times", [
    (2, 3, 9, 13, 5, 10, 3),
    (3, 2, 7, 6, 3, 8, 4),
    (2, 2, 6, 11, 4, 10, 4),
    (2, 4, 12, 10, 5, 8, 3),
])
def test_sparse_walk_equals_dense(batch, channels, height, width, radius, beta, exp_times) -> None:
    offsets = half_plane_offsets(radius)
    gen = torch.Generator().manual_seed(height * 100 + width)
    x = torch.rand(batch, channels, height, width, generator=gen)
    aff = edge_to_pair_affinity(random_edge(batch, height, width, seed=radius), radius)
    sparse = random_walk(x, aff, offsets, beta, 2 ** exp_times)
    dense = random_walk_dense(x, aff, offsets, beta, exp_times)
    assert sparse.shape == (batch, channels, height, width)
    torch.testing.assert_close(sparse, dense, rtol=RTOL, atol=ATOL)
    # not trivially equal to the input: the walk did move mass
    assert (sparse - x).abs().max() > 1e-2


def test_sparse_walk_equals_dense_on_arbitrary_affinities() -> None:
    # affinities not produced by edge_to_pair_affinity (random values; out-of-image entries are ignored)
    offsets = half_plane_offsets(3)
    gen = torch.Generator().manual_seed(7)
    aff = torch.rand(2, len(offsets), 5, 8, generator=gen)
    x = torch.rand(2, 3, 5, 8, generator=gen)
    torch.testing.assert_close(random_walk(x, aff, offsets, 8, 16), random_walk_dense(x, aff, offsets, 8, 4),
                               rtol=RTOL, atol=ATOL)


def test_one_row_walk_by_hand() -> None:
    # 1 x 3 image, radius 2: only offset (0, 1) has partners; a(0,1) = 0.5, a(1,2) = 1.0, beta 2.
    offsets = half_plane_offsets(2)
    assert offsets[0] == (0, 1)
    aff = torch.zeros(1, len(offsets), 1, 3)
    aff[0, 0, 0] = torch.tensor([0.5, 1.0, 0.7])  # the last entry's partner is outside: must be ignored
    x = torch.tensor([1.0, 0.0, 0.0]).view(1, 1, 1, 3)
    # A^beta = [[1, .25, 0], [.25, 1, 1], [0, 1, 1]], column sums d = (1.25, 2.25, 2)
    step1 = [1 / 1.25, 0.25 / 2.25, 0.0]
    step2 = [(step1[0] + 0.25 * step1[1]) / 1.25,
             (0.25 * step1[0] + step1[1] + step1[2]) / 2.25,
             (step1[1] + step1[2]) / 2]
    torch.testing.assert_close(random_walk(x, aff, offsets, 2, 1).flatten(), torch.tensor(step1))
    torch.testing.assert_close(random_walk(x, aff, offsets, 2, 2).flatten(), torch.tensor(step2))
    torch.testing.assert_close(random_walk_dense(x, aff, offsets, 2, 1).flatten(), torch.tensor(step2))


def test_propagate_cams_by_hand() -> None:
    # edge (0.1, 0.2, 0.6): a01 = 1 - max(0.1, 0.2) = 0.8, a12 = 1 - max(0.2, 0.6) = 0.4, beta 1, one step.
    edge = torch.tensor([[[0.1, 0.2, 0.6]]])
    aff = edge_to_pair_affinity(edge, radius=2)
    expected_aff = torch.zeros(1, 4, 1, 3)
    expected_aff[0, 0, 0] = torch.tensor([0.8, 0.4, 0.0])
    torch.testing.assert_close(aff, expected_aff)
    cams = torch.ones(1, 1, 1, 3)
    x0 = [0.9, 0.8, 0.4]  # CAMs x (1 - edge)
    d = [1.8, 2.2, 1.4]
    expected = [(x0[0] + 0.8 * x0[1]) / d[0], (0.8 * x0[0] + x0[1] + 0.4 * x0[2]) / d[1],
                (0.4 * x0[1] + x0[2]) / d[2]]
    for dense in (False, True):
        out = propagate_cams(cams, edge, radius=2, beta=1, exp_times=0, dense=dense)
        torch.testing.assert_close(out.flatten(), torch.tensor(expected))


def test_constant_map_is_a_fixed_point() -> None:
    # Columns of T sum to 1, so a uniform map stays uniform, border pixels included.
    offsets = half_plane_offsets(5)
    aff = edge_to_pair_affinity(random_edge(2, 10, 7, seed=3), 5)
    ones = torch.ones(2, 3, 10, 7)
    torch.testing.assert_close(random_walk(ones, aff, offsets, 10, 20), ones)
    trans = dense_affinity(aff, offsets).pow(10)
    trans = trans / trans.sum(dim=1, keepdim=True)
    torch.testing.assert_close(trans.sum(dim=1), torch.ones(2, 70))
    # A is symmetric with self-loops 1
    dense = dense_affinity(aff, offsets)
    assert torch.equal(dense, dense.transpose(1, 2))
    assert torch.equal(torch.diagonal(dense, dim1=1, dim2=2), torch.ones(2, 70))


def test_boundary_wall_blocks_propagation() -> None:
    height, width, wall = 8, 12, 5
    cams = torch.zeros(1, 2, height, width)
    cams[0, 0, 3, 1] = 1.0  # class 0 left of the wall
    cams[0, 1, 4, 9] = 1.0  # class 1 right of it
    edge = torch.zeros(1, height, width)
    open_walk = propagate_cams(cams, edge, radius=5, beta=10, exp_times=4)
    assert open_walk[0, 0, :, wall + 1:].min() > 0 and open_walk[0, 1, :, :wall].min() > 0
    edge[0, :, wall] = 1.0
    walled = propagate_cams(cams, edge, radius=5, beta=10, exp_times=4)
    assert torch.all(walled[0, 0, :, wall:] == 0) and torch.all(walled[0, 1, :, :wall + 1] == 0)
    assert walled[0, 0, :, :wall].min() > 0 and walled[0, 1, :, wall + 1:].min() > 0


def reference_dense_affinity(edge: torch.Tensor, radius: int) -> torch.Tensor:
    """The reference propagate_to_edge construction: PathIndex on a grid padded by ``radius`` (pad value 1),
    sparse pair affinities scattered into a dense padded matrix with self-loops, then cropped."""
    height, width = edge.shape
    pad_h, pad_w = height + radius, width + 2 * radius
    pi = PathIndex(radius, (pad_h, pad_w))
    padded = F.pad(edge, (radius, radius, 0, radius), value=1.0)
    aff = affinity_from_edge(padded[None, None], pi)[0]
    n = pad_h * pad_w
    src = torch.from_numpy(pi.src_indices).repeat(pi.n_offsets)
    dst = torch.from_numpy(pi.dst_indices).reshape(-1)
    dense = torch.eye(n)
    dense[src, dst] = aff.reshape(-1)
    dense[dst, src] = aff.reshape(-1)
    dense = dense.view(pad_h, pad_w, pad_h, pad_w)[:-radius, radius:-radius, :-radius, radius:-radius]
    return dense.reshape(height * width, height * width)


@pytest.mark.parametrize("radius,height,width", [(5, 9, 11), (3, 6, 8)])
def test_edge_to_pair_affinity_matches_reference_construction(radius, height, width) -> None:
    edge = random_edge(1, height, width, seed=11)
    ours = dense_affinity(edge_to_pair_affinity(edge, radius), half_plane_offsets(radius))[0]
    ref = reference_dense_affinity(edge[0], radius)
    assert torch.equal(ours, ref)
    assert (ref > 0).sum() > height * width  # real pairs, not only self-loops


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_walk_on_cuda_matches_cpu() -> None:
    edge = random_edge(2, 20, 24, seed=5)
    cams = torch.rand(2, 3, 20, 24, generator=torch.Generator().manual_seed(1))
    cpu = propagate_cams(cams, edge, exp_times=6)
    gpu = propagate_cams(cams.cuda(), edge.cuda(), exp_times=6)
    dense_gpu = propagate_cams(cams.cuda(), edge.cuda(), exp_times=6, dense=True)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(dense_gpu.cpu(), cpu, rtol=RTOL, atol=ATOL)
