"""Test-only ComfyUI nodes, linked into the test server's custom_nodes by tests/comfy/test_encoders_server.py.

ComfyUI's CLIPLoader and CLIPVisionLoader pick an architecture from the layer count and width of the file (umT5 only
at 24 layers x 4096 with a fixed umt5_config_xxl.json; CLIP vision only at >= 23 layers of ViT-L/H/G), so they
cannot load tiny models. These two loaders build the very objects those loaders build (``comfy.sd.CLIP`` with
``comfy.text_encoders.wan``'s umT5 model and tokenizer, as the ``type wan`` branch of ``load_text_encoder_state_dicts``
does; ``comfy.clip_vision.ClipVisionModel``) with the sizes from the file's ``comfy_config`` metadata (written by
tools/make_tiny_models.py), so everything after the loader (tokenizer, umT5 / ViT forward, CLIPTextEncode,
``encode_image`` preprocessing) is ComfyUI's own code. A third node saves socket values to safetensors so the test
can compare them with the pack's headless core.
"""
import json
import os

import folder_paths
import torch
from safetensors.torch import save_file

import comfy.clip_vision
import comfy.sd
import comfy.text_encoders.wan
import comfy.utils

CONFIG_KEY = "comfy_config"


def _load_with_config(path: str) -> tuple[dict, dict]:
    sd, metadata = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
    if not metadata or CONFIG_KEY not in metadata:
        raise ValueError(f"{os.path.basename(path)} carries no {CONFIG_KEY!r} metadata (write it with "
                         "tools/make_tiny_models.py make_comfy_layout_models)")
    return sd, json.loads(metadata[CONFIG_KEY])


def _check_loaded(missing, unexpected, allowed: set, name: str) -> None:
    if missing or set(unexpected) - allowed:
        extra = sorted(set(unexpected) - allowed)
        raise ValueError(f"{name}: missing keys {list(missing)[:5]}, unexpected {extra[:5]}")


class _Target:
    """The ``clip_target`` object comfy.sd.CLIP reads (``clip``, ``tokenizer``, ``params``)."""

    def __init__(self, clip, tokenizer):
        self.clip, self.tokenizer, self.params = clip, tokenizer, {}


class InfiniteTalkTestTinyWanCLIPLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_name": (folder_paths.get_filename_list("text_encoders"),)}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, clip_name):
        path = folder_paths.get_full_path_or_raise("text_encoders", clip_name)
        sd, config = _load_with_config(path)
        target = _Target(comfy.text_encoders.wan.te(**comfy.sd.t5xxl_detect([sd])),
                         comfy.text_encoders.wan.WanT5Tokenizer)
        clip = comfy.sd.CLIP(target, embedding_directory=folder_paths.get_folder_paths("embeddings"),
                             tokenizer_data={"spiece_model": sd.get("spiece_model")},
                             parameters=comfy.utils.calculate_parameters(sd),
                             model_options={"umt5xxl_model_config": config})
        missing, unexpected = clip.load_sd(sd)
        _check_loaded(missing, unexpected, {"spiece_model"}, clip_name)
        return (clip,)


class InfiniteTalkTestTinyCLIPVisionLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_name": (folder_paths.get_filename_list("clip_vision"),)}}

    RETURN_TYPES = ("CLIP_VISION",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, clip_name):
        path = folder_paths.get_full_path_or_raise("clip_vision", clip_name)
        sd, config = _load_with_config(path)
        config_path = os.path.join(folder_paths.get_temp_directory(), f"{clip_name}.config.json")
        os.makedirs(os.path.dirname(config_path), exist_ok=True)
        with open(config_path, "w", encoding="utf-8") as handle:
            json.dump(config, handle)
        clip_vision = comfy.clip_vision.ClipVisionModel(config_path)
        missing, unexpected = clip_vision.load_sd(sd)
        _check_loaded(missing, unexpected, set(), clip_name)
        return (clip_vision,)


class InfiniteTalkTestSaveTensors:
    """Saves the tensors of the connected sockets as ``<output>/<filename_prefix>.safetensors``: text embeds as
    ``prompt_embeds.i`` / ``negative_prompt_embeds.i``, CLIP embeds as ``clip_embeds``, images as ``images``."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"filename_prefix": ("STRING", {"default": "tensors"})},
                "optional": {"text_embeds": ("WANVIDEOTEXTEMBEDS",), "clip_embeds": ("WANVIDIMAGE_CLIPEMBEDS",),
                             "images": ("IMAGE",)}}

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def save(self, filename_prefix, text_embeds=None, clip_embeds=None, images=None):
        tensors = {}
        for key in ("prompt_embeds", "negative_prompt_embeds"):
            for i, value in enumerate((text_embeds or {}).get(key) or []):
                tensors[f"{key}.{i}"] = value
        if clip_embeds is not None:
            tensors["clip_embeds"] = clip_embeds["clip_embeds"]
        if images is not None:
            tensors["images"] = images
        path = os.path.join(folder_paths.get_output_directory(), f"{filename_prefix}.safetensors")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, path)
        return {}


NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in (InfiniteTalkTestTinyWanCLIPLoader,
                                                      InfiniteTalkTestTinyCLIPVisionLoader,
                                                      InfiniteTalkTestSaveTensors)}
