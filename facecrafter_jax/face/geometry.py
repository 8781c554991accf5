"""Head-pose geometry: (yaw, pitch, roll) <-> rotation matrices, one convention for the whole project.

A rotation is ``R = Rz(roll) @ Ry(yaw) @ Rx(pitch)`` in MediaPipe's camera frame (x to the image right, y up,
z towards the viewer), angles in degrees. Signs: yaw > 0 = face turned towards the image right (the subject's
left), pitch > 0 = face tilted down, roll > 0 = head rotated counter-clockwise as seen in the image.
Mirroring an image negates yaw and roll and keeps pitch. MediaPipe's canonical face model is not exactly
"frontal" for a person looking into the camera: a frontal photo gives a pitch of about +10..15 deg.
"""

from __future__ import annotations

import numpy as np

__all__ = ["rotation_from_pose", "head_pose_from_matrix"]


def rotation_from_pose(pose) -> np.ndarray:
    """Rotation matrices ``Rz(roll) @ Ry(yaw) @ Rx(pitch)`` (float64) from (yaw, pitch, roll) in degrees.

    ``pose`` ``[3]`` gives ``[3, 3]``; ``[N, 3]`` gives ``[N, 3, 3]``.
    """
    p = np.asarray(pose, np.float64)
    if p.shape[-1:] != (3,) or p.ndim not in (1, 2):
        raise ValueError(f"pose must be [3] or [N, 3] (yaw, pitch, roll degrees), got shape {p.shape}")
    r = np.deg2rad(p.reshape(-1, 3))
    y, x, z = r[:, 0], r[:, 1], r[:, 2]
    cy, sy, cx, sx, cz, sz = np.cos(y), np.sin(y), np.cos(x), np.sin(x), np.cos(z), np.sin(z)
    one, zero = np.ones_like(y), np.zeros_like(y)
    rx = np.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], -1).reshape(-1, 3, 3)
    ry = np.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1).reshape(-1, 3, 3)
    rz = np.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], -1).reshape(-1, 3, 3)
    out = rz @ ry @ rx
    return out[0] if p.ndim == 1 else out


def head_pose_from_matrix(matrix: np.ndarray) -> np.ndarray:
    """(yaw, pitch, roll) in degrees, float32, from a 4x4 facial transformation matrix (or a 3x3 rotation).

    The inverse of :func:`rotation_from_pose`. The rotation block is first projected onto the nearest
    rotation (SVD), so a matrix carrying a uniform scale gives the same angles. At |yaw| = 90 deg (gimbal
    lock) roll is set to 0.
    """
    m = np.asarray(matrix, np.float64)
    if m.shape not in ((4, 4), (3, 3)):
        raise ValueError(f"expected a 4x4 transformation matrix or a 3x3 rotation, got shape {m.shape}")
    u, _, vt = np.linalg.svd(m[:3, :3])
    r = u @ vt
    if np.linalg.det(r) < 0:
        raise ValueError("facial transformation matrix contains a reflection")
    sy = -r[2, 0]
    yaw = np.arcsin(np.clip(sy, -1.0, 1.0))
    if abs(sy) < 1 - 1e-9:
        pitch = np.arctan2(r[2, 1], r[2, 2])
        roll = np.arctan2(r[1, 0], r[0, 0])
    else:
        roll = 0.0
        pitch = np.arctan2(-r[1, 2], r[1, 1])  # R[1] = (0, cos p, -sin p) for yaw = +-90 and roll = 0
    return np.rad2deg(np.array([yaw, pitch, roll])).astype(np.float32)
