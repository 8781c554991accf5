"""docs/quickstart.md, run as written on stand-ins with the real hub folder and file names.

The stand-in layout (built here, random tiny models): ``models/arc2face/`` (diffusers UNet, safetensors),
``models/encoder/`` (CLIPTextModel as ``config.json`` + ``pytorch_model.bin`` with the old ``text_model.`` keys),
``models/arcface.onnx`` (exported from a tiny torch model with ArcFace's signature), ``sd15/vae/`` (an
SD1.5-style VAE: 4 levels, factor 8) and ``sd15/scheduler/``, the real MediaPipe ``face_landmarker.task``, a
random ``emonet_8.pth`` in the official layout, and photos from scikit-image (``me.jpg``, ``pose.jpg``,
``photos/``). Every block of the quickstart marked ``<!-- quickstart-test -->`` is extracted from the doc and
run in that folder as a subprocess; the only changes are the extra flags in ``EXTRA`` (fewer steps, 64 px, two
training steps) and ``python``/``facecrafter-convert`` resolved to this interpreter. The commands are driven
only through their command lines.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from facecrafter_jax.convert.cli import main as convert_main
from tiny_models import tiny_clip, tiny_unet, tiny_vae

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(REPO, "docs", "quickstart.md")
MARKER = "<!-- quickstart-test -->"

# Test-only additions per command (the doc's commands are full-size).
EXTRA = {
    "python sample.py": ["--steps", "2", "--num-images", "2"],
    "python -m data_prep": ["--resolution", "64", "--workers", "0", "--no-progress"],
    "python train.py": ["steps=2", "data.global_batch_size=2", "data.worker_count=0", "data.read_threads=1",
                        "model.dtype=float32", "checkpoint.every=2", "sample.every=0", "optim.warmup_steps=1",
                        "logging.every=1"],
}
PY_REPLACE = {"num_inference_steps=25": "num_inference_steps=2"}


def doc_blocks():
    """[(language, text)] of the blocks marked for this test, in document order."""
    text = open(DOC).read()
    blocks = []
    for m in re.finditer(re.escape(MARKER) + r"\s*```(\w+)\n(.*?)```", text, re.S):
        blocks.append((m.group(1), m.group(2)))
    return blocks


def bash_commands(text):
    """Shell lines of a bash block (backslash continuations joined, comments dropped)."""
    out, cur = [], ""
    for line in text.splitlines():
        line = line.rstrip()
        if not cur and (not line or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        out.append((cur + line).strip())
        cur = ""
    return out


def resolve(command):
    """argv for one documented command: our interpreter, the repository's scripts, plus the EXTRA flags."""
    argv = shlex.split(command)
    if argv[0] == "facecrafter-convert":
        head, rest = [sys.executable, "-m", "facecrafter_jax.convert.cli"], argv[1:]
    elif argv[:2] in (["python", "sample.py"], ["python", "train.py"]):
        head, rest = [sys.executable, os.path.join(REPO, argv[1])], argv[2:]
    elif argv[:3] == ["python", "-m", "data_prep"]:
        head, rest = [sys.executable, "-m", "data_prep"], argv[3:]
    else:
        raise AssertionError(f"quickstart command of an unknown kind: {command}")
    extra = [v for k, v in EXTRA.items() if command.startswith(k)]
    return head + rest + (extra[0] if extra else [])


def build_standins(root, shared_models):
    from diffusers import AutoencoderKL

    from facecrafter_jax import schedulers as S
    from emonet_reference import random_checkpoint
    from test_data_prep import TinyArcFace

    torch.manual_seed(0)
    models = root / "models"
    # Arc2Face's UNet: cross-attention 512 wide (the encoder's width); 8 x 8 latents = 64 px with the VAE below.
    tiny_unet(0, cross_attention_dim=512, sample_size=8).save_pretrained(models / "arc2face")
    assert (models / "arc2face" / "diffusion_pytorch_model.safetensors").is_file()
    # Arc2Face's encoder: a transformers CLIPTextModel saved the old way (pickle, text_model.-prefixed keys).
    clip = tiny_clip(1, hidden_size=512, intermediate_size=128, num_attention_heads=4)
    (models / "encoder").mkdir(parents=True)
    clip.config.save_pretrained(models / "encoder")
    state = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in clip.state_dict().items()}
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    torch.save(state, models / "encoder" / "pytorch_model.bin")
    torch.onnx.export(TinyArcFace().eval(), (torch.zeros(2, 3, 112, 112),), str(models / "arcface.onnx"),
                      input_names=["input.1"], output_names=["683"], dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    # SD1.5-style VAE (4 levels: factor 8) and the scheduler config.
    vae = tiny_vae(2, block_out_channels=(16, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                   up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64)
    assert isinstance(vae, AutoencoderKL)
    vae.save_pretrained(root / "sd15" / "vae")
    (root / "sd15" / "scheduler").mkdir(parents=True)
    (root / "sd15" / "scheduler" / "scheduler_config.json").write_text(json.dumps(S.SD15_SCHEDULER_CONFIG))
    shutil.copy(shared_models / "face_landmarker.task", root / "face_landmarker.task")
    random_checkpoint(root / "emonet_8.pth", seed=5)
    # Photos: the identity, a pose source, and a small training folder.
    astronaut = skimage.data.astronaut()
    Image.fromarray(astronaut).save(root / "me.jpg", quality=95)
    Image.fromarray(np.ascontiguousarray(astronaut[:, ::-1])).save(root / "pose.jpg", quality=95)
    photos = root / "photos"
    (photos / "lfw").mkdir(parents=True)
    Image.fromarray(astronaut).save(photos / "astronaut.png")
    Image.fromarray(np.ascontiguousarray(astronaut[:, ::-1])).save(photos / "astronaut_mirror.jpg", quality=95)
    lfw = skimage.data.lfw_subset()
    for i in range(1):
        face = Image.fromarray((lfw[i] * 255).astype(np.uint8)).resize((200, 200), Image.Resampling.BICUBIC)
        face.convert("RGB").save(photos / "lfw" / f"lfw_{i}.png")
    os.symlink(os.path.join(REPO, "configs"), root / "configs")  # `--config configs/...` as from the repository root


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory, shared_models):
    root = tmp_path_factory.mktemp("quickstart")
    build_standins(root, shared_models)
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu",
           "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "TQDM_DISABLE": "1"}
    ran = []
    t_start = time.perf_counter()
    for lang, text in doc_blocks():
        if lang == "bash":
            for command in bash_commands(text):
                argv = resolve(command)
                t0 = time.perf_counter()
                r = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=900)
                assert r.returncode == 0, f"{command}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-5000:]}"
                print(f"[quickstart] {time.perf_counter() - t0:6.1f}s  {command[:70]}")
                ran.append(command)
        elif lang == "python":
            for a, b in PY_REPLACE.items():
                assert a in text, a
                text = text.replace(a, b)
            (root / "quickstart_snippet.py").write_text(text)
            r = subprocess.run([sys.executable, "quickstart_snippet.py"], cwd=root, env=env, capture_output=True,
                               text=True, timeout=900)
            assert r.returncode == 0, f"python block\n--- stderr\n{r.stderr[-5000:]}"
            print(f"[quickstart] python block done at {time.perf_counter() - t_start:6.1f}s")
            ran.append("python block")
        else:
            raise AssertionError(f"unexpected block language {lang!r} in {DOC}")
    return root, ran


def test_doc_blocks_are_the_documented_path():
    commands = [c for lang, t in doc_blocks() if lang == "bash" for c in bash_commands(t)]
    kinds = [" ".join(shlex.split(c)[:2]) for c in commands]
    assert kinds == ["facecrafter-convert from-arc2face", "python sample.py", "python -m", "python train.py",
                     "facecrafter-convert from-run", "python sample.py", "facecrafter-convert to-diffusers"]
    assert [lang for lang, _ in doc_blocks()].count("python") == 1
    readme = open(os.path.join(REPO, "README.md")).read()
    assert "docs/quickstart.md" in readme


def test_quickstart_runs_end_to_end(quickstart):
    from safetensors.numpy import load_file

    root, ran = quickstart
    assert len(ran) == 8
    manifest = json.loads((root / "checkpoints/arc2face-flax/facecrafter.json").read_text())
    assert manifest["components"] == ["unet", "text_encoder", "vae"]
    for out in ("out/arc2face", "out/stage_a"):
        assert sorted(p.name for p in (root / out).glob("0*.png")) == ["0000.png", "0001.png"], out
        assert (root / out / "samples.json").is_file()
    identity = np.load(root / "out/stage_a/identity.npy")
    np.testing.assert_array_equal(identity, np.load(root / "out/arc2face/identity.npy"))  # same me.jpg
    assert identity.shape == (512,) and abs(np.linalg.norm(identity) - 1) < 1e-5
    lines = [json.loads(x) for x in (root / "data/my_faces/manifest.jsonl").read_text().splitlines()]
    assert sum(x["status"] == "ok" for x in lines) >= 2
    fc = json.loads((root / "checkpoints/stage_a/facecrafter.json").read_text())
    assert "adapters" in fc["components"]
    assert np.load(root / "out/stage_a/landmarks.npy").shape == (478, 3)
    samples = json.loads((root / "out/stage_a/samples.json").read_text())
    assert samples["controls"]["landmarks"]["source"] == "image"
    state = load_file(str(root / "export/stage_a/ip_adapters/facecrafter_landmark.safetensors"))
    assert "image_proj.norm.weight" in state and "ip_adapter.1.to_k_ip.weight" in state
    for i in range(2):
        image = np.asarray(Image.open(root / f"out/diffusers_{i}.png"))
        assert image.shape == (64, 64, 3)


def test_from_arc2face_checks_the_layout(quickstart, tmp_path, capsys):
    root, _ = quickstart
    models = tmp_path / "models"
    shutil.copytree(root / "models", models)
    sd15 = str(root / "sd15")

    def fails(match, sd15=sd15):
        assert convert_main(["from-arc2face", str(models), "--sd15", sd15, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and re.search(match, err), err

    (models / "arcface.onnx").write_text("not a model")
    fails(r"arcface\.onnx: cannot be opened as an ONNX model")
    (models / "arcface.onnx").unlink()
    fails(r"arcface\.onnx: not found")
    shutil.copy(root / "models/arcface.onnx", models / "arcface.onnx")
    (models / "encoder/pytorch_model.bin").rename(models / "encoder/weights.pt")
    fails(r"encoder: no weights \(pytorch_model\.bin or model\.safetensors\)")
    shutil.rmtree(models / "encoder")
    fails(r"models/encoder: not found")
    shutil.copytree(root / "models/encoder", models / "encoder")
    cfg = json.loads((models / "arc2face/config.json").read_text())
    (models / "arc2face/config.json").write_text(json.dumps({**cfg, "cross_attention_dim": 768}))
    fails(r"cross_attention_dim 768 differs from the encoder's hidden_size 512")
    (models / "arc2face/config.json").write_text(json.dumps(cfg))
    fails(r"elsewhere/vae: not found; expected SD1\.5's VAE", sd15=str(tmp_path / "elsewhere"))
    assert not (tmp_path / "o").exists()  # nothing written on any error
