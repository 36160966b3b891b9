"""Reproduce a parity fixture with this pack's implementation: ``python tools/parity.py FIXTURE --out OUT.safetensors``.

A fixture (model-spec.md §6, fixtures.md) holds ``state_dict.*`` weights, ``inputs.*``, the official ``outputs.*`` and
a JSON ``harness`` metadata entry whose ``component`` names what it tests (``vae``, ``t5``, ``clip``, ``wav2vec``,
``sampler``; the transformer fixtures have none and are recognised by their ``state_dict.patch_embedding.weight``).
The tool writes the weights to a temporary file in the real checkpoint layout, loads it with the loader the nodes use,
runs the component in float32 on the CPU (one thread by default, as the reference did) from the fixture's inputs, and
writes every output under the fixture's ``outputs.*`` name without the ``outputs.`` prefix. All sizes come from the
file. It prints the max absolute and relative error of every output (and of the transformer's intermediates) against
the fixture, with the tolerance documented for it; ``--check`` makes the exit status 1 when one is exceeded.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional

import packimport
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

packimport.register()

from infinitetalk.multitalk.guidance import (PASS_COND, PASS_DROP_AUDIO, PASS_DROP_TEXT, PASS_UNCOND,  # noqa: E402
                                             APGConfig, GuidanceConfig, make_guided_denoiser)
from infinitetalk.multitalk.model import load_infinitetalk  # noqa: E402
from infinitetalk.multitalk.wav2vec import load_wav2vec, wav2vec_features  # noqa: E402
from infinitetalk.wanvideo.checkpoint import LoadOptions, load_model, open_state_dict  # noqa: E402
from infinitetalk.wanvideo.clip_vision import CLIPLoadOptions, load_clip_vision  # noqa: E402
from infinitetalk.wanvideo.model import WanModel, pad_context  # noqa: E402
from infinitetalk.wanvideo.sampling import SampleCallbacks, sample  # noqa: E402
from infinitetalk.wanvideo.schedulers import make_scheduler  # noqa: E402
from infinitetalk.wanvideo.text_encoder import build_umt5, prepare_t5_state_dict, read_state_dict  # noqa: E402
from infinitetalk.wanvideo.vae import load_vae  # noqa: E402

TRANSFORMER_TOP = ("patch_embedding", "time_embedding", "time_projection", "text_embedding", "img_emb", "audio_proj",
                   "head")
TRANSFORMER_BLOCK = ("", ".self_attn", ".cross_attn", ".audio_cross_attn", ".ffn")
GRID_KEY = re.compile(r"^(timesteps|sigmas)\.steps(\d+)_shift(\d+(?:\.\d+)?)$")
PASS_NAMES = {"cond": PASS_COND, "drop_text": PASS_DROP_TEXT, "uncond": PASS_UNCOND, "drop_audio": PASS_DROP_AUDIO}
# max |difference| allowed per output: fixtures.md ("Reproduce" of each section) and issue 3 for the transformer
TOLERANCES = {"transformer": 2e-5, "vae.latent_mu": 1e-5, "vae": 5e-5, "t5": 1e-5, "clip": 1e-5, "wav2vec": 1e-5,
              "sampler.exact": 0.0, "sampler.solver_x": 1e-5}


def tensor_group(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Tensors under ``prefix.`` with the prefix removed (e.g. a fixture's ``state_dict.*`` weights)."""
    head = prefix + "."
    return {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}


@dataclass(frozen=True)
class Fixture:
    """One parity file: its tensors grouped by prefix, the ``harness`` JSON and the component kind."""

    path: Path
    tensors: dict[str, torch.Tensor]
    harness: dict
    component: str

    def group(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors under ``prefix.`` with the prefix removed."""
        return tensor_group(self.tensors, prefix)

    @property
    def config(self) -> dict:
        return self.harness.get("config", {})


def read_fixture(path: Path) -> Fixture:
    """Load a fixture; the kind comes from ``harness.component`` (transformer when absent and the state dict has
    ``patch_embedding.weight``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"fixture not found: {path}")
    with safe_open(str(path), "pt") as handle:
        harness = json.loads((handle.metadata() or {}).get("harness", "{}"))
    tensors = load_file(str(path))
    component = harness.get("component")
    if component is None and "state_dict.patch_embedding.weight" in tensors:
        component = "transformer"
    if component not in RUNNERS:
        raise ValueError(f"{path}: unknown fixture component {component!r}; known: {', '.join(RUNNERS)}")
    return Fixture(path, tensors, harness, component)


def _write_weights(fx: Fixture, folder: Path, name: str) -> Path:
    path = folder / name
    save_file({k: v.contiguous() for k, v in fx.group("state_dict").items()}, str(path))
    return path


# ------------------------------------------------------------------------------------------------- components

def run_transformer(fx: Fixture, folder: Path) -> tuple[dict, dict]:
    """Wan2.1 I2V DiT (+ InfiniteTalk adapter when present) from ``inputs.{x,t,context,clip_fea,y,audio,
    ref_target_masks}``; outputs ``noise_pred`` [1, C, T, H, W], intermediates as in model-spec §6.3."""
    path = _write_weights(fx, folder, "transformer.safetensors")
    i, cfg = fx.group("inputs"), fx.config
    options = LoadOptions(dtype=torch.float32, text_len=int(cfg.get("text_len", 512)), num_heads=cfg.get("num_heads"))
    has_audio = "audio" in i and "state_dict.audio_proj.proj1.weight" in fx.tensors
    model = (load_infinitetalk(path, None, options) if has_audio
             else load_model(WanModel, open_state_dict([path]), options))
    args = dict(x=i["x"][None], t=i["t"], context=pad_context([i["context"]], model.config.text_len),
                clip_fea=i.get("clip_fea"), y=i.get("y"))
    if has_audio:
        args.update(audio=i["audio"][None], ref_target_masks=i.get("ref_target_masks"))
    captured: dict = {}
    names = list(TRANSFORMER_TOP) + [f"blocks.{b}{n}" for b in range(len(model.blocks)) for n in TRANSFORMER_BLOCK]
    handles = [model.get_submodule(n).register_forward_hook(lambda m, a, out, n=n: captured.__setitem__(n, out))
               for n in names if _has_module(model, n)]
    try:
        with torch.inference_mode():
            out = model(**args)
    finally:
        for handle in handles:
            handle.remove()
    inter = {}
    for name, ref in fx.group("intermediates").items():
        value = _intermediate(captured, name)
        if value is not None:
            inter[name] = value.reshape(ref.shape)
    return {"noise_pred": out}, inter


def _has_module(model: torch.nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _intermediate(captured: dict, name: str) -> Optional[torch.Tensor]:
    """A fixture intermediate name -> the captured module output (``.self_attn.0``: output, ``.1``: speaker map)."""
    if name.endswith((".self_attn.0", ".self_attn.1")):
        value = captured.get(name[:-2])
        if value is None:
            return None
        index = int(name[-1])
        return value[index][0] if index == 1 and value[index] is not None else value[index]
    return captured.get(name)


def run_vae(fx: Fixture, folder: Path) -> tuple[dict, dict]:
    """Wan2.1 VAE: ``latent_mu`` = encode(inputs.video) (chunked, normalised), ``decoded`` = decode(latent_mu)."""
    vae = load_vae(_write_weights(fx, folder, "vae.safetensors"), "fp32")
    latent = vae.encode(fx.tensors["inputs.video"][None])
    raw = vae.decode(latent, clamp=False)
    return {"latent_mu": latent[0], "decoded": raw.clamp(-1.0, 1.0)[0]}, {"decoded_raw": raw[0]}


def run_t5(fx: Fixture, folder: Path) -> tuple[dict, dict]:
    """umT5 encoder on ``inputs.ids`` / ``inputs.mask``: ``hidden_states`` (padded) and ``context.N`` (trimmed)."""
    path = _write_weights(fx, folder, "umt5.safetensors")
    model = build_umt5(prepare_t5_state_dict(read_state_dict(path), path.name).state_dict, "fp32")
    ids, mask = fx.tensors["inputs.ids"], fx.tensors["inputs.mask"]
    captured: dict = {}
    handles = [b.register_forward_hook(lambda m, a, out, n=n: captured.__setitem__(f"blocks.{n}", out))
               for n, b in enumerate(model.blocks)]
    try:
        with torch.inference_mode():
            hidden = model(ids, mask)
            context = model.encode(ids, mask)
    finally:
        for handle in handles:
            handle.remove()
    outputs = {"hidden_states": hidden} | {f"context.{n}": c for n, c in enumerate(context)}
    return outputs, captured


def _clip_heads(fx: Fixture) -> Optional[int]:
    cfg = fx.config
    for key in ("vision_heads", "num_heads", "heads"):
        if key in cfg:
            return int(cfg[key])
    return None


def run_clip(fx: Fixture, folder: Path) -> tuple[dict, dict]:
    """CLIP vision tower: ``tokens`` = encode(frame 0 of ``inputs.video`` in [-1, 1]) with its preprocessing."""
    options = CLIPLoadOptions(precision="fp32", num_heads=_clip_heads(fx))
    model = load_clip_vision(_write_weights(fx, folder, "clip_vision.safetensors"), options)
    image = fx.tensors["inputs.video"][:, :, 0]
    with torch.inference_mode():
        tokens = model.encode(image)
        pixels = model.preprocess(image)
    return {"tokens": tokens}, {"pixels": pixels}


def run_wav2vec(fx: Fixture, folder: Path) -> tuple[dict, dict]:
    """wav2vec2 features per video frame of ``inputs.waveform``: ``audio_emb`` (feature extractor as configured)
    and ``audio_emb_normalized`` (do_normalize on)."""
    model_dir = folder / "wav2vec2"
    model_dir.mkdir()
    _write_weights(fx, model_dir, "model.safetensors")
    (model_dir / "config.json").write_text(json.dumps(fx.harness["hf_config"]))
    extractor = fx.harness.get("feature_extractor", {})
    (model_dir / "preprocessor_config.json").write_text(json.dumps(extractor))
    fps = float(fx.config.get("fps", 25.0))
    waveform = fx.tensors["inputs.waveform"]
    outputs = {}
    for name, normalize in (("audio_emb", bool(extractor.get("do_normalize", False))), ("audio_emb_normalized", True)):
        encoder = load_wav2vec(model_dir, "fp32", model_type="tencent", do_normalize=normalize)
        outputs[name] = wav2vec_features(encoder, waveform, fps)
    return outputs, {}


class _RecordedModel:
    """Stands in for the DiT: the fixture's recorded velocity for (step, pass); keeps the latents it was given."""

    def __init__(self, inputs: Mapping[str, torch.Tensor], name: str) -> None:
        prefix = f"{name}.v_"
        self.tables = {PASS_NAMES[k[len(prefix):]]: v for k, v in inputs.items() if k.startswith(prefix)}
        self.seen: list[torch.Tensor] = []
        self.timesteps: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, passes) -> list[torch.Tensor]:
        step = len(self.seen)
        self.seen.append(x.clone())
        self.timesteps.append(timestep.reshape(()))
        return [self.tables[p][step] for p in passes]


def _euler_trajectory(fx: Fixture, traj: Mapping) -> dict[str, torch.Tensor]:
    name, inputs = traj["name"], fx.group("inputs")
    motion = inputs[f"{name}.motion_latent"]
    start = fx.tensors[f"outputs.{name}.x"][0]

    def paste_motion(x: torch.Tensor, ctx) -> torch.Tensor:
        x[:, :motion.shape[1]] = motion
        return x

    apg = APGConfig(momentum=traj["apg_momentum"], norm_threshold=traj["apg_norm_threshold"]) \
        if traj.get("use_apg") else None
    guidance = GuidanceConfig(text_scale=traj["text_guide_scale"], audio_scale=traj["audio_guide_scale"], apg=apg)
    model = _RecordedModel(inputs, name)
    scheduler = make_scheduler("multitalk", int(traj["steps"]), float(traj["shift"]))
    result = sample(make_guided_denoiser(model, guidance), start.clone(), scheduler,
                    SampleCallbacks(latent_hook=paste_motion))
    return {f"{name}.t": torch.stack(model.timesteps), f"{name}.x": torch.stack([*model.seen, result.latent])}


def _solver_trajectory(fx: Fixture, run: Mapping) -> dict[str, torch.Tensor]:
    name, inputs = run["name"], fx.group("inputs")
    scheduler = make_scheduler(run["solver"], int(run["steps"]), float(run["shift"]))
    x = inputs[f"{name}.x_init"]
    states = [x]
    for i in range(int(run["steps"])):
        x = scheduler.step(inputs[f"{name}.model_output"][i], i, x)
        states.append(x)
    return {f"{name}.timesteps": scheduler.timesteps, f"{name}.sigmas": scheduler.sigmas,
            f"{name}.x": torch.stack(states)}


def run_sampler(fx: Fixture, folder: Path) -> tuple[dict, dict]:
    """InfiniteTalk timestep grids (every ``timesteps.stepsN_shiftS`` output), Euler trajectories with 2/3-pass
    guidance and APG from recorded velocities, Wan2.1 UniPC / DPM++ solver trajectories."""
    outputs = {}
    for key in fx.group("outputs"):
        match = GRID_KEY.match(key)
        if match and match.group(1) == "timesteps":
            scheduler = make_scheduler("multitalk", int(match.group(2)), float(match.group(3)))
            name = f"steps{match.group(2)}_shift{match.group(3)}"
            outputs[f"timesteps.{name}"] = torch.cat([scheduler.timesteps, scheduler.timesteps.new_zeros(1)])
            outputs[f"sigmas.{name}"] = scheduler.sigmas
    for traj in fx.config.get("trajectories", ()):
        outputs.update(_euler_trajectory(fx, traj))
    for run in fx.config.get("solvers", ()):
        outputs.update(_solver_trajectory(fx, run))
    return outputs, {}


RUNNERS: dict[str, Callable[[Fixture, Path], tuple[dict, dict]]] = {
    "transformer": run_transformer, "vae": run_vae, "t5": run_t5, "clip": run_clip, "wav2vec": run_wav2vec,
    "sampler": run_sampler}


# ---------------------------------------------------------------------------------------------------- driver

def run_fixture(path: Path, threads: int = 1) -> tuple[Fixture, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Run the fixture's component; returns (fixture, outputs by bare name, intermediates by bare name)."""
    fx = read_fixture(path)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(prefix="parity-") as folder:
            outputs, inter = RUNNERS[fx.component](fx, Path(folder))
    finally:
        torch.set_num_threads(before)
    return fx, {k: v.detach() for k, v in outputs.items()}, {k: v.detach() for k, v in inter.items()}


def tolerance(fx: Fixture, name: str) -> float:
    """Documented max |difference| for output ``name`` of ``fx``: sampler grids and Euler trajectories exact, solver
    latents 1e-5; VAE latents 1e-5, decoded video 5e-5; everything else per component."""
    if fx.component == "sampler":
        solvers = {run["name"] for run in fx.config.get("solvers", ())}
        run, _, leaf = name.rpartition(".")
        return TOLERANCES["sampler.solver_x"] if run in solvers and leaf == "x" else TOLERANCES["sampler.exact"]
    return TOLERANCES.get(f"{fx.component}.{name}", TOLERANCES[fx.component])


def errors(ours: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    """(max abs, max abs / max |reference|) per name present in both; inf for a shape mismatch."""
    out = {}
    for name, ref in reference.items():
        if name not in ours:
            continue
        mine = ours[name]
        if tuple(mine.shape) != tuple(ref.shape):
            out[name] = (float("inf"), float("inf"))
            continue
        diff = (mine.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
        scale = ref.double().abs().max().item() if ref.numel() else 0.0
        out[name] = (diff, diff / scale if scale else diff)
    return out


def report(fx: Fixture, outputs: dict, inter: dict) -> bool:
    """Print errors vs the fixture; True when every output exists and is within its documented tolerance."""
    reference = fx.group("outputs")
    ok = True
    for name in sorted(set(reference) - set(outputs)):
        print(f"MISSING  outputs.{name}")
        ok = False
    for name, (abs_err, rel_err) in sorted(errors(outputs, reference).items()):
        limit = tolerance(fx, name)
        status = "ok" if abs_err <= limit else "OVER"
        ok = ok and status == "ok"
        print(f"{status:5s}  outputs.{name}: max abs {abs_err:.3g}, rel {rel_err:.3g} (tolerance {limit:g})")
    for name, (abs_err, rel_err) in sorted(errors(inter, fx.group("intermediates")).items()):
        print(f"       intermediates.{name}: max abs {abs_err:.3g}, rel {rel_err:.3g}")
    return ok


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("fixture", type=Path, help="parity fixture (.safetensors)")
    parser.add_argument("--out", type=Path, required=True, help="where to write this pack's outputs")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (the references ran with 1)")
    parser.add_argument("--check", action="store_true", help="exit 1 when an output is missing or over tolerance")
    args = parser.parse_args(argv)
    fx, outputs, inter = run_fixture(args.fixture, args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in outputs.items()}, str(args.out),
              metadata={"fixture": str(fx.path), "component": fx.component})
    print(f"{fx.path.name} ({fx.component}): wrote {len(outputs)} outputs to {args.out}")
    ok = report(fx, outputs, inter)
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
