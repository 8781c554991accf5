"""ArcFace identity embeddings through onnxruntime (insightface / Arc2Face ``arcface.onnx``).

Input convention, as insightface's ``ArcFaceONNX.get_feat`` feeds these models: the 112x112 aligned crop
(five-point similarity to the ArcFace template), **RGB** channel order (insightface reads BGR with OpenCV and
swaps to RGB with ``blobFromImages(..., swapRB=True)``), pixels mapped to ``(x - 127.5) / 127.5``, NCHW
float32. Output [N, 512], which we L2-normalise (as Arc2Face does before conditioning).
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["ArcFaceONNX", "arcface_preprocess", "l2_normalize"]


def arcface_preprocess(crops: np.ndarray) -> np.ndarray:
    """uint8 RGB crops [N, 112, 112, 3] -> float32 NCHW blob in [-1, 1]."""
    crops = np.asarray(crops)
    if crops.ndim != 4 or crops.shape[1:] != (112, 112, 3):
        raise ValueError(f"ArcFace crops must be [N, 112, 112, 3] RGB, got {crops.shape}")
    x = (crops.astype(np.float32) - 127.5) / 127.5
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


class ArcFaceONNX:
    """An ArcFace ONNX model with input [N, 3, 112, 112] float32 and output [N, 512].

    The signature is checked when the file is opened (a fixed batch size other than 1 is rejected; a
    fixed batch of 1 is run image by image).
    """

    def __init__(self, path: str | os.PathLike, *, threads: int = 0):
        import onnxruntime as ort

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ArcFace ONNX model not found: {path}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ValueError(f"cannot open ArcFace ONNX model {path}: {e}") from e
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1:
            raise ValueError(f"{path}: ArcFace model must have one input, has {[i.name for i in inputs]}")
        shape = list(inputs[0].shape)
        if len(shape) != 4 or shape[1:] != [3, 112, 112]:
            raise ValueError(f"{path}: ArcFace input {inputs[0].name!r} has shape {shape}, expected [N, 3, 112, 112]")
        if inputs[0].type != "tensor(float)":
            raise ValueError(f"{path}: ArcFace input must be float32, is {inputs[0].type}")
        out_shape = list(outputs[0].shape)
        if len(out_shape) != 2 or out_shape[1] != 512:
            raise ValueError(f"{path}: ArcFace output {outputs[0].name!r} has shape {out_shape}, expected [N, 512]")
        batch = shape[0]
        if isinstance(batch, int) and batch not in (1,):
            raise ValueError(f"{path}: ArcFace input has a fixed batch size {batch}; expected a dynamic or 1")
        self.fixed_batch_one = batch == 1
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        self.path = path

    def raw(self, crops: np.ndarray) -> np.ndarray:
        """Unnormalised embeddings [N, 512] of uint8 RGB crops [N, 112, 112, 3]."""
        blob = arcface_preprocess(crops)
        if self.fixed_batch_one:
            out = np.concatenate([self.session.run([self.output_name], {self.input_name: blob[i:i + 1]})[0]
                                  for i in range(len(blob))]) if len(blob) else np.zeros((0, 512), np.float32)
        else:
            out = self.session.run([self.output_name], {self.input_name: blob})[0]
        out = np.asarray(out, np.float32)
        if out.shape != (len(blob), 512):
            raise ValueError(f"{self.path}: ArcFace output has shape {out.shape}, expected {(len(blob), 512)}")
        return out

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        """L2-normalised embeddings [N, 512]."""
        return l2_normalize(self.raw(crops))
