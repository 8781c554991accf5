"""Five-point face alignment: Umeyama similarity transforms, the ArcFace and FFHQ-style templates, warping.

Coordinate convention (used by every face crop of the project): *continuous pixel coordinates*, origin at the
top-left corner of the top-left pixel, so the centre of pixel (i, j) is (j + 0.5, i + 0.5) and an image of
width W spans x in [0, W]. MediaPipe's normalised landmarks times (W, H) are in this convention, and so is
PIL's affine warp. OpenCV / insightface use pixel-centre coordinates (centre of pixel (i, j) is (j, i)):
their templates are shifted by +0.5 px here, so our crops equal insightface's ``norm_crop`` crops.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = [
    "ARCFACE_TEMPLATE_112", "ARCFACE_SIZE", "arcface_template", "ffhq_template", "umeyama", "transform_points",
    "warp_affine", "similarity_scale",
]

ARCFACE_SIZE = 112
# insightface's ``arcface_dst`` (pixel-centre coordinates, 112x112): image-left eye centre, image-right eye
# centre, nose tip, image-left mouth corner, image-right mouth corner. For an unmirrored frontal photo
# "image-left" is the subject's right.
ARCFACE_TEMPLATE_112 = np.array([
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041],
], dtype=np.float64)


def arcface_template() -> np.ndarray:
    """The ArcFace 112x112 template in continuous coordinates (insightface's points + 0.5 px)."""
    return ARCFACE_TEMPLATE_112 + 0.5


def ffhq_template(resolution: int) -> np.ndarray:
    """The five template points of our FFHQ-style crop of side ``resolution`` (continuous coordinates).

    Derived from the ArcFace template with the FFHQ cropping rule (Karras et al. 2019,
    ``ffhq-dataset/download_ffhq.py``): with e = eye midpoint, m = mouth-corner midpoint,
    the crop centre is ``e + 0.1 (m - e)`` and the crop side is ``2 max(2 |eye_r - eye_l|, 1.8 |m - e|)``.
    For the ArcFace template this is a square of 146.4 ArcFace pixels: in crop units the eye centres lie at
    (0.380, 0.473) and (0.620, 0.472) (0.24 apart), the nose tip at (0.501, 0.610) and the mouth corners at
    (0.402, 0.751) and (0.601, 0.749) (exact values: ``ffhq_template(1)``).
    """
    t = arcface_template()
    eye_l, eye_r, _, mouth_l, mouth_r = t
    e, m = (eye_l + eye_r) / 2, (mouth_l + mouth_r) / 2
    centre = e + 0.1 * (m - e)
    side = 2.0 * max(2.0 * np.linalg.norm(eye_r - eye_l), 1.8 * np.linalg.norm(m - e))
    return ((t - centre) / side + 0.5) * float(resolution)


def umeyama(src: np.ndarray, dst: np.ndarray, estimate_scale: bool = True) -> np.ndarray:
    """Least-squares similarity transform (Umeyama 1991) mapping ``src`` points onto ``dst``.

    ``src``, ``dst``: [N, D] corresponding points. Returns the (D+1)x(D+1) homogeneous matrix ``T`` with
    ``dst ~ T @ [src, 1]``: rotation (no reflection), uniform scale (1 if ``estimate_scale`` is False) and
    translation minimising the summed squared error.
    """
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[0] < 2:
        raise ValueError(f"umeyama needs two [N, D] point sets of the same shape with N >= 2, got {src.shape} and {dst.shape}")
    n, d = src.shape
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s_c, d_c = src - mu_s, dst - mu_d
    cov = d_c.T @ s_c / n
    u, sig, vt = np.linalg.svd(cov)
    sign = np.ones(d)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # avoid a reflection
        sign[-1] = -1.0
    rot = u @ np.diag(sign) @ vt
    var_s = (s_c ** 2).sum() / n
    if var_s <= 0:
        raise ValueError("umeyama: source points are all identical")
    scale = float((sig * sign).sum() / var_s) if estimate_scale else 1.0
    out = np.eye(d + 1)
    out[:d, :d] = scale * rot
    out[:d, d] = mu_d - scale * rot @ mu_s
    return out


def similarity_scale(matrix: np.ndarray) -> float:
    """Uniform scale factor of a 2-D similarity matrix (3x3 or 2x3)."""
    m = np.asarray(matrix, np.float64)
    return float(np.sqrt(abs(np.linalg.det(m[:2, :2]))))


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 3x3 (or 2x3) affine matrix to [N, 2] points."""
    m = np.asarray(matrix, np.float64)
    p = np.asarray(points, np.float64)
    return p @ m[:2, :2].T + m[:2, 2]


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: int, *, fill: int = 0, antialias: bool = True) -> np.ndarray:
    """Warp ``image`` (uint8 HxWx3) with the source->crop affine ``matrix`` into a ``size`` x ``size`` crop.

    Bilinear interpolation (PIL), constant ``fill`` outside the source. With ``antialias`` (default), when
    the crop is more than 2x smaller than the source region the source is first reduced with an integer
    box filter and the matrix adjusted, so small crops of large photos do not alias. The ArcFace crop uses
    ``antialias=False`` to match insightface's plain bilinear ``cv2.warpAffine``.
    """
    m = np.asarray(matrix, np.float64)[:2]
    img = Image.fromarray(np.ascontiguousarray(image))
    scale = similarity_scale(np.vstack([m, [0, 0, 1]]))
    factor = int(np.floor(1.0 / scale)) if (antialias and scale < 0.5) else 1
    if factor > 1:
        img = img.reduce(factor)
        # reduce() maps source [0, W] onto [0, ceil(W / factor)] with scale 1/factor (continuous coordinates)
        m = m @ np.array([[factor, 0, 0], [0, factor, 0], [0, 0, 1]], np.float64)
    inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2]
    out = img.transform((size, size), Image.Transform.AFFINE, data=tuple(inv.reshape(-1)),
                        resample=Image.Resampling.BILINEAR, fillcolor=(fill,) * 3)
    return np.asarray(out, dtype=np.uint8)
