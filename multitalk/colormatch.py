"""Colour matching of decoded window frames to the window's reference frame, in torch (runs where the frames are).

Long InfiniteTalk videos drift in colour because every window starts from the previous window's decoded frames.
Upstream corrects this per window, before the motion frames are taken (workflow-spec §5.4 step 11, model-spec §4.6),
by matching every frame to the reference frame. Methods (names as in upstream's ``colormatch`` list, plus ``lab``):

* ``lab`` (the official InfiniteTalk default) and ``reinhard`` (Reinhard et al. 2001, "Color Transfer between
  Images"): in CIELAB, every channel of the frame gets the reference's mean and standard deviation:
  ``L' = (L - mean_f) · std_r / std_f + mean_r``; back to sRGB, clipped. The two names compute the same transfer.
* ``mkl``: Monge-Kantorovich linear transfer (Pitié & Kokaram 2007) of the RGB distribution,
  ``x' = T (x - mu_f) + mu_r`` with ``T = S_f^-1/2 (S_f^1/2 S_r S_f^1/2)^1/2 S_f^-1/2`` (S = RGB covariance); the
  optimal-transport map between the two Gaussians.
* ``mvgd``: multivariate Gaussian distribution transfer, ``T = S_r^1/2 S_f^-1/2`` (whiten with the frame's
  covariance, colour with the reference's): mean and covariance match, not necessarily the least-motion map.
* ``hm``: per-channel histogram matching: every value goes to the reference value at the same empirical quantile
  (``q = #{v <= x} / n``, linear interpolation between the reference's quantiles, as ``np.interp``).
* ``hm-mvgd-hm`` / ``hm-mkl-hm``: the three transfers one after the other, each against the reference.

Frames are float [F, 3, H, W] in [-1, 1] (the decoder's range); the transfers work on [0, 1] sRGB values, the result
is clipped to the range and blended ``(1 - strength) · frame + strength · matched``. sRGB <-> CIELAB follows
scikit-image's ``rgb2lab`` / ``lab2rgb`` (sRGB primaries, D65 2° white, CIE 1976 L*a*b*).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

DISABLED = "disabled"
METHODS = ("lab", "mkl", "hm", "reinhard", "mvgd", "hm-mvgd-hm", "hm-mkl-hm")

# sRGB (linear) -> XYZ, scikit-image's ``xyz_from_rgb``; D65 white of the 2° observer.
XYZ_FROM_RGB = ((0.412453, 0.357580, 0.180423),
                (0.212671, 0.715160, 0.072169),
                (0.019334, 0.119193, 0.950227))
D65_WHITE = (0.95047, 1.0, 1.08883)
SRGB_LINEAR_KNEE = 0.04045
SRGB_ENCODED_KNEE = 0.0031308
LAB_EPSILON = 0.008856
LAB_KAPPA = 7.787
LAB_OFFSET = 16.0 / 116.0
LAB_INVERSE_KNEE = 0.2068966
STD_FLOOR = 1e-6
EIGEN_FLOOR = 1e-10


@dataclass(frozen=True)
class ColorMatch:
    """Colour matching of each window: ``method`` (``disabled`` or one of :data:`METHODS`), ``strength`` of the
    blend in [0, 1], ``chunk_frames`` frames transferred at a time (bounds the working memory)."""

    method: str = DISABLED
    strength: float = 1.0
    chunk_frames: int = 16

    def __post_init__(self) -> None:
        if self.method != DISABLED and self.method not in METHODS:
            raise ValueError(f"unknown colormatch method {self.method!r}; choose {DISABLED} or one of "
                             f"{', '.join(METHODS)}")
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"colormatch strength must be within [0, 1], got {self.strength}")
        if self.chunk_frames < 1:
            raise ValueError(f"colormatch chunk_frames must be at least 1, got {self.chunk_frames}")

    @property
    def enabled(self) -> bool:
        return self.method != DISABLED and self.strength > 0


def _channel_matrix(rows, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(rows, dtype=like.dtype, device=like.device)


def _apply_matrix(matrix: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """matrix [..., 3, 3] (or [3, 3]) times the channel vectors of pixels [..., 3, H, W]."""
    return torch.einsum("...ij,...jhw->...ihw", matrix, pixels)


def _white(like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(D65_WHITE, dtype=like.dtype, device=like.device)[:, None, None]


def srgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB [..., 3, H, W] in [0, 1] -> CIELAB [..., 3, H, W] (L in [0, 100]), as scikit-image's ``rgb2lab``."""
    linear = torch.where(rgb > SRGB_LINEAR_KNEE, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = _apply_matrix(_channel_matrix(XYZ_FROM_RGB, rgb), linear) / _white(rgb)
    f = torch.where(xyz > LAB_EPSILON, xyz.clamp_min(LAB_EPSILON) ** (1.0 / 3.0), LAB_KAPPA * xyz + LAB_OFFSET)
    fx, fy, fz = f.unbind(-3)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=-3)


def lab_to_srgb(lab: torch.Tensor) -> torch.Tensor:
    """CIELAB [..., 3, H, W] -> sRGB [..., 3, H, W] clipped to [0, 1], as scikit-image's ``lab2rgb`` (negative Z
    clipped to 0 first)."""
    lightness, a, b = lab.unbind(-3)
    fy = (lightness + 16.0) / 116.0
    f = torch.stack([a / 500.0 + fy, fy, (fy - b / 200.0).clamp_min(0.0)], dim=-3)
    xyz = torch.where(f > LAB_INVERSE_KNEE, f ** 3, (f - LAB_OFFSET) / LAB_KAPPA) * _white(lab)
    rgb_from_xyz = torch.linalg.inv(torch.tensor(XYZ_FROM_RGB, dtype=torch.float64)).to(lab.dtype)
    linear = _apply_matrix(rgb_from_xyz.to(lab.device), xyz)
    encoded = torch.where(linear > SRGB_ENCODED_KNEE, 1.055 * linear.clamp_min(SRGB_ENCODED_KNEE) ** (1 / 2.4) - 0.055,
                          12.92 * linear)
    return encoded.clamp(0.0, 1.0)


def _mean_std(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and population std of [..., 3, H, W], shaped [..., 3, 1, 1]."""
    std, mean = torch.std_mean(x, dim=(-2, -1), correction=0, keepdim=True)
    return mean, std


def _mean_cov(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB mean [..., 3] and population covariance [..., 3, 3] (float64) of [..., 3, H, W]."""
    flat = x.flatten(-2).double()
    mean = flat.mean(-1)
    centred = flat - mean[..., None]
    return mean, centred @ centred.transpose(-1, -2) / flat.shape[-1]


def _sqrt_pair(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric square root and inverse square root of PSD matrices [..., 3, 3] (eigenvalues floored)."""
    values, vectors = torch.linalg.eigh(cov)
    values = values.clamp_min(EIGEN_FLOOR)
    root = (vectors * values.sqrt()[..., None, :]) @ vectors.transpose(-1, -2)
    inverse = (vectors * values.rsqrt()[..., None, :]) @ vectors.transpose(-1, -2)
    return root, inverse


def mkl_matrix(cov_src: torch.Tensor, cov_ref: torch.Tensor) -> torch.Tensor:
    """Monge-Kantorovich map ``S_s^-1/2 (S_s^1/2 S_r S_s^1/2)^1/2 S_s^-1/2`` for covariances [..., 3, 3]."""
    src_root, src_inverse = _sqrt_pair(cov_src)
    middle_root, _ = _sqrt_pair(src_root @ cov_ref @ src_root)
    return src_inverse @ middle_root @ src_inverse


def mvgd_matrix(cov_src: torch.Tensor, cov_ref: torch.Tensor) -> torch.Tensor:
    """Gaussian whitening/colouring map ``S_r^1/2 S_s^-1/2`` for covariances [..., 3, 3]."""
    _, src_inverse = _sqrt_pair(cov_src)
    ref_root, _ = _sqrt_pair(cov_ref)
    return ref_root @ src_inverse


class _Reference:
    """Statistics of the reference frame [3, H, W] in [0, 1], computed once per window and on first use."""

    def __init__(self, image: torch.Tensor):
        self.image = image
        self._lab: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._gauss: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._quantiles: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def lab_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._lab is None:
            self._lab = _mean_std(srgb_to_lab(self.image))
        return self._lab

    def gaussian(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._gauss is None:
            self._gauss = _mean_cov(self.image)
        return self._gauss

    def quantiles(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted values [3, M] and their empirical CDF ``#{v <= value} / M`` [3, M]."""
        if self._quantiles is None:
            values = self.image.flatten(-2).sort(dim=-1).values
            cdf = torch.searchsorted(values, values, right=True).to(values.dtype) / values.shape[-1]
            self._quantiles = (values, cdf)
        return self._quantiles


def lab_transfer(src: torch.Tensor, ref: _Reference) -> torch.Tensor:
    """Lab mean/std transfer of frames [F, 3, H, W] in [0, 1] to the reference; sRGB result clipped to [0, 1]."""
    lab = srgb_to_lab(src)
    mean, std = _mean_std(lab)
    ref_mean, ref_std = ref.lab_stats()
    return lab_to_srgb((lab - mean) * (ref_std / std.clamp_min(STD_FLOOR)) + ref_mean)


def linear_transfer(src: torch.Tensor, ref: _Reference, method: str) -> torch.Tensor:
    """``mkl`` or ``mvgd`` transfer of frames [F, 3, H, W] (unclipped; matrices in float64)."""
    mean, cov = _mean_cov(src)
    ref_mean, ref_cov = ref.gaussian()
    matrix = (mkl_matrix if method == "mkl" else mvgd_matrix)(cov, ref_cov.expand_as(cov))
    offset = ref_mean - (matrix @ mean[..., None])[..., 0]
    return _apply_matrix(matrix.to(src.dtype), src) + offset.to(src.dtype)[..., None, None]


def interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Row-wise ``np.interp``: x [R, N], xp [R, M] non-decreasing (equal xp have equal fp), fp [R, M] -> [R, N];
    values outside [xp[0], xp[-1]] take the end values."""
    last = xp.shape[-1] - 1
    if last == 0:
        return fp.expand_as(x).clone()
    upper = torch.searchsorted(xp, x).clamp(1, last)
    x0, x1 = xp.gather(-1, upper - 1), xp.gather(-1, upper)
    y0, y1 = fp.gather(-1, upper - 1), fp.gather(-1, upper)
    span = x1 - x0
    weight = torch.where(span > 0, (x - x0) / torch.where(span > 0, span, torch.ones_like(span)), 1.0)
    out = y0 + weight.clamp(0, 1) * (y1 - y0)
    out = torch.where(x <= xp[..., :1], fp[..., :1], out)
    return torch.where(x >= xp[..., -1:], fp[..., -1:], out)


def histogram_transfer(src: torch.Tensor, ref: _Reference) -> torch.Tensor:
    """Per-channel histogram matching of frames [F, 3, H, W] to the reference (frame by frame)."""
    ref_values, ref_cdf = ref.quantiles()
    out = torch.empty_like(src)
    for index, frame in enumerate(src):
        ordered, order = frame.reshape(3, -1).sort(dim=-1)
        cdf = torch.searchsorted(ordered, ordered, right=True).to(ordered.dtype) / ordered.shape[-1]
        matched = torch.empty_like(ordered).scatter_(-1, order, interp(cdf, ref_cdf, ref_values))
        out[index] = matched.reshape(frame.shape)
    return out


def transfer(src: torch.Tensor, reference: torch.Tensor, method: str) -> torch.Tensor:
    """One method's transfer of frames [F, 3, H, W] in [0, 1] to ``reference`` [3, H', W'] in [0, 1] (float32);
    result clipped to [0, 1]."""
    if method not in METHODS:
        raise ValueError(f"unknown colormatch method {method!r}; choose one of {', '.join(METHODS)}")
    return _transfer(src, _Reference(reference), method)


def _transfer(src: torch.Tensor, ref: _Reference, method: str) -> torch.Tensor:
    if method in ("lab", "reinhard"):
        return lab_transfer(src, ref)
    out = src
    for stage in method.split("-"):
        out = histogram_transfer(out, ref) if stage == "hm" else linear_transfer(out, ref, stage)
    return out.clamp(0.0, 1.0)


def match_colors(frames: torch.Tensor, reference: torch.Tensor, settings: ColorMatch) -> torch.Tensor:
    """Match frames [F, 3, H, W] in [-1, 1] to ``reference`` [3, H', W'] in [-1, 1] **in place** (``chunk_frames``
    frames at a time, on the frames' device and dtype) and return ``frames``. Disabled settings return it as is."""
    if not settings.enabled:
        return frames
    if frames.dim() != 4 or frames.shape[1] != 3 or reference.shape[0] != 3:
        raise ValueError(f"colour matching needs frames [F, 3, H, W] and a reference [3, H, W], got "
                         f"{tuple(frames.shape)} and {tuple(reference.shape)}")
    ref = _Reference(((reference.to(device=frames.device, dtype=torch.float32) + 1) / 2).clamp(0, 1))
    for start in range(0, frames.shape[0], settings.chunk_frames):
        chunk = frames[start:start + settings.chunk_frames]
        src = ((chunk.float() + 1) / 2).clamp(0, 1)
        matched = _transfer(src, ref, settings.method)
        blended = torch.lerp(src, matched, settings.strength)
        chunk.copy_(blended * 2 - 1)
    return frames
