"""Colour matching: sRGB <-> CIELAB against known values, identity on the reference itself, the moments (or the
histogram) of the reference after each transfer, the compound methods, blending, chunking, bad names."""
from __future__ import annotations

import pytest
import torch

from infinitetalk.multitalk.colormatch import (METHODS, ColorMatch, lab_to_srgb, linear_transfer, match_colors,
                                               mkl_matrix, mvgd_matrix, srgb_to_lab, transfer, _Reference)

# sRGB -> L*a*b* (D65, 2°) computed by hand from the sRGB transfer curve, the sRGB->XYZ matrix and the CIE formulas
# (the same constants as scikit-image's rgb2lab).
KNOWN_LAB = [
    ((1.0, 0.0, 0.0), (53.2408, 80.0925, 67.2032)),
    ((0.0, 1.0, 0.0), (87.7347, -86.1827, 83.1793)),
    ((0.0, 0.0, 1.0), (32.2970, 79.1875, -107.8602)),
    ((1.0, 1.0, 1.0), (100.0, 0.0, 0.0)),
    ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
    ((0.5, 0.5, 0.5), (53.3890, 0.0, 0.0)),
]


def _pixels(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).T[:, :, None]


def _frames(seed: int, count: int = 3, size=(12, 20)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    base = torch.rand(count, 3, *size, generator=gen)
    tint = torch.rand(count, 3, 1, 1, generator=gen) * 0.4
    return (base * 0.5 + tint).clamp(0, 1)


def test_srgb_to_lab_matches_hand_computed_values_and_round_trips():
    rgb = _pixels([c for c, _ in KNOWN_LAB])
    lab = srgb_to_lab(rgb)[..., 0].T
    assert torch.allclose(lab, torch.tensor([v for _, v in KNOWN_LAB], dtype=torch.float64), atol=0.01)
    frames = _frames(0).double()
    assert torch.allclose(lab_to_srgb(srgb_to_lab(frames)), frames, atol=1e-10)


def test_lab_against_scikit_image_when_installed():
    color = pytest.importorskip("skimage.color")
    frames = _frames(1).double()
    ours = srgb_to_lab(frames).permute(0, 2, 3, 1).numpy()
    theirs = color.rgb2lab(frames.permute(0, 2, 3, 1).numpy())
    assert abs(ours - theirs).max() < 1e-6
    back = color.lab2rgb(ours[0] + [[[0.0, 30.0, -20.0]]])
    ours_back = lab_to_srgb(torch.from_numpy(ours[0] + [[[0.0, 30.0, -20.0]]]).permute(2, 0, 1)).permute(1, 2, 0)
    assert abs(ours_back.numpy() - back).max() < 1e-6


@pytest.mark.parametrize("method", METHODS)
def test_matching_the_reference_to_itself_changes_nothing(method):
    reference = _frames(2, count=1)[0]
    frames = (reference[None].repeat(2, 1, 1, 1)) * 2 - 1
    out = match_colors(frames.clone(), reference * 2 - 1, ColorMatch(method))
    assert torch.allclose(out, frames, atol=1e-5)


def test_lab_transfer_gives_the_reference_lab_moments():
    src, reference = _frames(3), _frames(4, count=1)[0] * 0.6 + 0.2
    out = transfer(src, reference, "lab")
    mean, std = (lambda x: (x.mean((-2, -1)), x.std((-2, -1), correction=0)))(srgb_to_lab(out))
    ref_lab = srgb_to_lab(reference)
    assert torch.allclose(mean, ref_lab.mean((-2, -1)).expand_as(mean), atol=0.2)
    assert torch.allclose(std, ref_lab.std((-2, -1), correction=0).expand_as(std), atol=0.2)
    assert torch.equal(out, transfer(src, reference, "reinhard"))
    assert not torch.allclose(out, src, atol=0.05)


@pytest.mark.parametrize("method", ["mkl", "mvgd"])
def test_linear_transfers_give_the_reference_mean_and_covariance(method):
    src, reference = _frames(5), _frames(6, count=1)[0]
    out = linear_transfer(src, _Reference(reference), method).double()
    flat = out.flatten(-2)
    centred = flat - flat.mean(-1, keepdim=True)
    cov = centred @ centred.transpose(-1, -2) / flat.shape[-1]
    ref_flat = reference.flatten(-2).double()
    ref_centred = ref_flat - ref_flat.mean(-1, keepdim=True)
    ref_cov = ref_centred @ ref_centred.T / ref_flat.shape[-1]
    assert torch.allclose(flat.mean(-1), ref_flat.mean(-1).expand(3, 3), atol=1e-5)
    assert torch.allclose(cov, ref_cov.expand_as(cov), atol=1e-5)


def test_mkl_is_the_symmetric_optimal_map_and_mvgd_is_not():
    gen = torch.Generator().manual_seed(7)
    a, b = torch.randn(3, 3, generator=gen, dtype=torch.float64), torch.randn(3, 3, generator=gen, dtype=torch.float64)
    cov_s, cov_r = a @ a.T + 0.1 * torch.eye(3, dtype=torch.float64), b @ b.T + 0.1 * torch.eye(3, dtype=torch.float64)
    mkl, mvgd = mkl_matrix(cov_s, cov_r), mvgd_matrix(cov_s, cov_r)
    for matrix in (mkl, mvgd):
        assert torch.allclose(matrix @ cov_s @ matrix.T, cov_r, atol=1e-9)
    assert torch.allclose(mkl, mkl.T, atol=1e-10) and torch.linalg.eigvalsh(mkl).min() > 0
    assert not torch.allclose(mvgd, mvgd.T, atol=1e-3)


@pytest.mark.parametrize("method", ["hm", "hm-mkl-hm", "hm-mvgd-hm"])
def test_histogram_matching_gives_the_reference_values(method):
    src, reference = _frames(8, count=2), _frames(9, count=1)[0]
    out = transfer(src, reference, method)
    ref_sorted = reference.flatten(-2).sort(-1).values
    for frame in out:
        assert torch.allclose(frame.flatten(-2).sort(-1).values, ref_sorted, atol=1e-6)
    if method == "hm":
        ranks_in, ranks_out = src[0, 0].flatten().argsort().argsort(), out[0, 0].flatten().argsort().argsort()
        assert torch.equal(ranks_in, ranks_out)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_in_range_and_chunking_does_not_matter(method):
    frames, reference = _frames(10, count=5) * 2 - 1, _frames(11, count=1)[0] * 2 - 1
    whole = match_colors(frames.clone(), reference, ColorMatch(method, chunk_frames=16))
    chunked = match_colors(frames.clone(), reference, ColorMatch(method, chunk_frames=2))
    assert whole.shape == frames.shape and whole.min() >= -1 and whole.max() <= 1
    assert torch.allclose(whole, chunked, atol=1e-6)
    assert not torch.allclose(whole, frames, atol=1e-3)


def test_strength_blends_and_disabled_is_a_no_op():
    frames, reference = _frames(12) * 2 - 1, _frames(13, count=1)[0] * 2 - 1
    full = match_colors(frames.clone(), reference, ColorMatch("lab", strength=1.0))
    half = match_colors(frames.clone(), reference, ColorMatch("lab", strength=0.5))
    assert torch.allclose(half, (frames + full) / 2, atol=1e-5)
    same = frames.clone()
    assert match_colors(same, reference, ColorMatch("disabled")) is same and torch.equal(same, frames)


def test_bad_names_and_strengths_raise():
    with pytest.raises(ValueError, match="unknown colormatch method 'lab2'"):
        ColorMatch("lab2")
    with pytest.raises(ValueError, match="unknown colormatch method"):
        transfer(_frames(0), _frames(1, count=1)[0], "disabled")
    with pytest.raises(ValueError, match="strength"):
        ColorMatch("mkl", strength=1.5)
    with pytest.raises(ValueError, match=r"frames \[F, 3, H, W\]"):
        match_colors(torch.zeros(2, 4, 8, 8), torch.zeros(3, 8, 8), ColorMatch("hm"))
