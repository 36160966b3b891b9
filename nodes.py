"""ComfyUI nodes: thin adapters from widgets and sockets to the pack's core.

Class names, input names, widget order, defaults and return types equal those of the WanVideoWrapper pack so existing
workflow files load unchanged. Each node turns its inputs into core arguments, makes one core call and wraps the
result. No tensor math lives here apart from named socket-format conversions.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import comfy.latent_formats
import comfy.model_management
import comfy.model_patcher
import folder_paths
import latent_preview
import torch

from .attention import ATTENTION_MODES, operand_checks, register_external
from .blockswap import BlockSwapper, SwapPlan, block_nbytes, estimate_activation_bytes, plan_block_swap
from .fp8_optimization import QUANT_MODES
from .quant_runtime import LinearRuntime, linear_runtime, matmul_precision
from .multitalk import pipeline
from .multitalk.audio_input import AudioPrepOptions
from .multitalk.embeds import EmbedOptions, embed_audio, silent_embeds
from .multitalk.frame_sink import MemorySink, PngSink
from .multitalk.loop import InfiniteTalkLoop, LoopCallbacks, SamplerSettings
from .multitalk.wav2vec import download_wav2vec, has_weights, load_wav2vec
from .wanvideo.clip_vision import CLIPLoadOptions, CLIPVisionTower, load_clip_vision
from .wanvideo.lora import apply_lora_entries
from .wanvideo.schedulers import SCHEDULER_NAMES
from .wanvideo.text_cache import EncoderIdentity, TextEmbedCache
from .wanvideo.text_encoder import T5LoadOptions, encode_text_embeds, load_text_encoder
from .wanvideo.vae import load_vae, pad_to_causal_length
from .wanvideo.vae_tiling import TileSpec

CATEGORY = "WanVideoWrapper"
DEVICES = ["main_device", "offload_device"]
WAV2VEC_REPOS = ["TencentGameMate/chinese-wav2vec2-base", "facebook/wav2vec2-base-960h"]

if "wav2vec2" not in folder_paths.folder_names_and_paths:
    folder_paths.add_model_folder_path("wav2vec2", os.path.join(folder_paths.models_dir, "wav2vec2"))
if "unet_gguf" not in folder_paths.folder_names_and_paths:
    folder_paths.folder_names_and_paths["unet_gguf"] = (folder_paths.get_folder_paths("diffusion_models"), {".gguf"})


def _register_comfy_attention() -> None:
    """attention_mode "comfy": ComfyUI's own optimized attention, handed to the core (which never imports ComfyUI)."""
    from comfy.ldm.modules.attention import optimized_attention

    register_external("comfy", optimized_attention)


_register_comfy_attention()


def _tip(text: str, **config) -> dict:
    return {"tooltip": text, **config}


def _model_management():
    return comfy.model_management


def _device(choice: str = "main_device") -> torch.device:
    mm = _model_management()
    return mm.get_torch_device() if choice == "main_device" else mm.unet_offload_device()


def _diffusion_model_files() -> list[str]:
    return folder_paths.get_filename_list("unet_gguf") + folder_paths.get_filename_list("diffusion_models")


def _diffusion_model_path(name: str) -> Path:
    for folder in ("diffusion_models", "unet_gguf", "unet"):
        if folder in folder_paths.folder_names_and_paths:
            path = folder_paths.get_full_path(folder, name)
            if path:
                return Path(path)
    raise FileNotFoundError(f"model file {name!r} not found in models/diffusion_models")


def _progress(total: int):
    import comfy.utils

    return comfy.utils.ProgressBar(total)


class WanVideoBlockSwap:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "blocks_to_swap": ("INT", _tip("Transformer blocks kept in host RAM and streamed to the GPU for "
                                               "their forward pass.", default=20, min=0, max=48, step=1)),
                "offload_img_emb": ("BOOLEAN", _tip(
                    "Keep the CLIP image projection in host RAM and stream it to the GPU for each call.",
                    default=False)),
                "offload_txt_emb": ("BOOLEAN", _tip(
                    "Keep the text embedder in host RAM and stream it to the GPU for each call.", default=False)),
            },
            "optional": {
                "use_non_blocking": ("BOOLEAN", _tip("Copy blocks on separate streams so copies overlap compute.",
                                                     default=False)),
                "vace_blocks_to_swap": ("INT", _tip("VACE blocks to swap (no VACE in InfiniteTalk).",
                                                    default=0, min=0, max=15, step=1)),
                "prefetch_blocks": ("INT", _tip("How many swapped blocks are copied ahead of use.",
                                                default=0, min=0, max=40, step=1)),
                "block_swap_debug": ("BOOLEAN", _tip("Log per-step transfer and wait times.", default=False)),
            },
        }

    RETURN_TYPES = ("BLOCKSWAPARGS",)
    RETURN_NAMES = ("block_swap_args",)
    FUNCTION = "setargs"
    CATEGORY = CATEGORY
    DESCRIPTION = "Block swap settings: stream the last transformer blocks from host RAM to run in little VRAM."

    def setargs(self, **kwargs):
        return (kwargs,)


class WanVideoEnhancedBlockSwap:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {},
            "optional": {
                "blocks_to_swap": ("INT", _tip("Blocks streamed from host RAM; with auto_hardware_tuning this is "
                                               "chosen from free VRAM.", default=0, min=0, max=40, step=1)),
                "enable_cuda_optimization": ("BOOLEAN", _tip("Use dedicated copy streams and events.",
                                                             default=True)),
                "enable_dram_optimization": ("BOOLEAN", _tip("Keep host copies in one pinned arena.", default=True)),
                "auto_hardware_tuning": ("BOOLEAN", _tip("Choose swapped blocks and prefetch depth from free VRAM "
                                                         "and the run's activation size.", default=True)),
                "vram_threshold_percent": ("FLOAT", _tip("Share of VRAM the weights may use when tuning.",
                                                         default=50.0, min=30.0, max=90.0, step=5.0)),
                "num_cuda_streams": ("INT", _tip("Copy streams used for prefetching.", default=8, min=1, max=16,
                                                 step=1)),
                "bandwidth_target": ("FLOAT", _tip("Share of the host link the prefetcher may use.", default=0.8,
                                                   min=0.1, max=1.0, step=0.1)),
                "offload_txt_emb": ("BOOLEAN", _tip(
                    "Keep the text embedder in host RAM and stream it to the GPU for each call.", default=False)),
                "offload_img_emb": ("BOOLEAN", _tip(
                    "Keep the CLIP image projection in host RAM and stream it to the GPU for each call.",
                    default=False)),
                "vace_blocks_to_swap": ("INT", _tip("VACE blocks to swap (no VACE in InfiniteTalk).", default=0,
                                                    min=0, max=15, step=1)),
                "debug_mode": ("BOOLEAN", _tip("Log per-step transfer and wait times.", default=False)),
            },
        }

    RETURN_TYPES = ("BLOCKSWAPARGS",)
    RETURN_NAMES = ("enhanced_block_swap_args",)
    FUNCTION = "setargs"
    CATEGORY = "WanVideoWrapper/Enhanced"
    DESCRIPTION = "Block swap with automatic tuning from free VRAM, pinned host memory and several copy streams."

    def setargs(self, blocks_to_swap=0, enable_cuda_optimization=True, enable_dram_optimization=True,
                auto_hardware_tuning=True, vram_threshold_percent=50.0, num_cuda_streams=8, bandwidth_target=0.8,
                offload_txt_emb=False, offload_img_emb=False, vace_blocks_to_swap=0, debug_mode=False):
        return ({
            "blocks_to_swap": blocks_to_swap, "enable_cuda_optimization": enable_cuda_optimization,
            "enable_dram_optimization": enable_dram_optimization, "auto_hardware_tuning": auto_hardware_tuning,
            "vram_threshold_percent": vram_threshold_percent, "num_cuda_streams": num_cuda_streams,
            "bandwidth_target": bandwidth_target, "offload_txt_emb": offload_txt_emb,
            "offload_img_emb": offload_img_emb, "vace_blocks_to_swap": vace_blocks_to_swap,
            "block_swap_debug": debug_mode,
        },)


class WanVideoTorchCompileSettings:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "backend": (["inductor", "cudagraphs"], _tip("torch.compile back-end.", default="inductor")),
                "fullgraph": ("BOOLEAN", _tip("Compile each region as one graph.", default=False)),
                "mode": (["default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead"],
                         _tip("torch.compile mode.", default="default")),
                "dynamic": ("BOOLEAN", _tip("Compile for dynamic shapes.", default=False)),
                "dynamo_cache_size_limit": ("INT", _tip("torch._dynamo cache size limit.", default=64, min=0,
                                                        max=1024, step=1)),
                "compile_transformer_blocks_only": ("BOOLEAN", _tip("Compile only the transformer blocks.",
                                                                    default=True)),
            },
            "optional": {
                "dynamo_recompile_limit": ("INT", _tip("torch._dynamo recompile limit.", default=128, min=0,
                                                       max=1024, step=1)),
                "force_parameter_static_shapes": ("BOOLEAN", _tip("Treat parameter shapes as static.",
                                                                  default=False)),
                "allow_unmerged_lora_compile": ("BOOLEAN", _tip("Allow compiling with unmerged LoRAs.",
                                                                default=False)),
            },
        }

    RETURN_TYPES = ("WANCOMPILEARGS",)
    RETURN_NAMES = ("torch_compile_args",)
    FUNCTION = "set_args"
    CATEGORY = CATEGORY
    DESCRIPTION = "torch.compile settings for the transformer and the VAE decoder."

    def set_args(self, backend, fullgraph, mode, dynamic, dynamo_cache_size_limit, compile_transformer_blocks_only,
                 dynamo_recompile_limit=128, force_parameter_static_shapes=True, allow_unmerged_lora_compile=False):
        return ({
            "backend": backend, "fullgraph": fullgraph, "mode": mode, "dynamic": dynamic,
            "dynamo_cache_size_limit": dynamo_cache_size_limit, "dynamo_recompile_limit": dynamo_recompile_limit,
            "compile_transformer_blocks_only": compile_transformer_blocks_only,
            "force_parameter_static_shapes": force_parameter_static_shapes,
            "allow_unmerged_lora_compile": allow_unmerged_lora_compile,
        },)


def _lora_entry(name: str, strength: float, blocks, low_mem_load: bool, merge_loras: bool) -> dict:
    path = folder_paths.get_full_path_or_raise("loras", name)
    stem = name.rsplit("/", 1)[-1].rsplit("\\", 1)[-1].rsplit(".", 1)[0]
    return {"path": path, "strength": round(strength, 4), "name": stem,
            "blocks": (blocks or {}).get("selected_blocks", {}), "layer_filter": (blocks or {}).get("layer_filter", ""),
            "low_mem_load": low_mem_load if merge_loras else False, "merge_loras": merge_loras}


class WanVideoLoraSelect:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora": (folder_paths.get_filename_list("loras"), _tip("LoRA file from models/loras.")),
                "strength": ("FLOAT", _tip("LoRA strength; 0 skips it.", default=1.0, min=-1000.0, max=1000.0,
                                           step=0.0001)),
            },
            "optional": {
                "prev_lora": ("WANVIDLORA", _tip("LoRAs selected before this one.", default=None)),
                "blocks": ("SELECTEDBLOCKS", _tip("Restrict the LoRA to selected blocks.")),
                "low_mem_load": ("BOOLEAN", _tip("Load the LoRA tensor by tensor when merging.", default=False)),
                "merge_loras": ("BOOLEAN", _tip("Merge into the weights (faster) instead of applying per step.",
                                                default=True)),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("WANVIDLORA",)
    RETURN_NAMES = ("lora",)
    FUNCTION = "getlorapath"
    CATEGORY = CATEGORY
    DESCRIPTION = "Select a LoRA for the WanVideo model loader."

    def getlorapath(self, lora, strength, prev_lora=None, blocks=None, low_mem_load=False, merge_loras=True,
                    unique_id=None):
        loras = list(prev_lora or [])
        if strength != 0.0:
            loras.append(_lora_entry(lora, strength, blocks, low_mem_load, merge_loras))
        return (loras,)


class WanVideoLoraSelectMulti:
    @classmethod
    def INPUT_TYPES(cls):
        names = ["none"] + folder_paths.get_filename_list("loras")
        required = {}
        for i in range(5):
            required[f"lora_{i}"] = (names, _tip(f"LoRA file {i} from models/loras.", default="none"))
            required[f"strength_{i}"] = ("FLOAT", _tip(f"Strength of LoRA {i}; 0 skips it.", default=1.0,
                                                       min=-10.0, max=10.0, step=0.0001))
        return {
            "required": required,
            "optional": {
                "prev_lora": ("WANVIDLORA", _tip("LoRAs selected before these.", default=None)),
                "blocks": ("SELECTEDBLOCKS", _tip("Restrict the LoRAs to selected blocks.")),
                "low_mem_load": ("BOOLEAN", _tip("Load the LoRAs tensor by tensor when merging.", default=False)),
                "merge_loras": ("BOOLEAN", _tip("Merge into the weights instead of applying per step.",
                                                default=True)),
            },
        }

    RETURN_TYPES = ("WANVIDLORA",)
    RETURN_NAMES = ("lora",)
    FUNCTION = "getlorapath"
    CATEGORY = CATEGORY
    DESCRIPTION = "Select up to five LoRAs for the WanVideo model loader."

    def getlorapath(self, prev_lora=None, blocks=None, low_mem_load=False, merge_loras=True, **slots):
        loras = list(prev_lora or [])
        for i in range(5):
            name, strength = slots[f"lora_{i}"], slots[f"strength_{i}"]
            if name != "none" and strength != 0.0:
                loras.append(_lora_entry(name, strength, blocks, low_mem_load, merge_loras))
        return (loras or None,)


class MultiTalkModelLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": (_diffusion_model_files(), _tip(
            "InfiniteTalk (or MultiTalk) adapter file from models/diffusion_models."))}}

    RETURN_TYPES = ("MULTITALKMODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "loadmodel"
    CATEGORY = CATEGORY
    DESCRIPTION = "Select the InfiniteTalk / MultiTalk audio adapter; WanVideo Model Loader merges it."

    def loadmodel(self, model, base_precision=None):
        path = _diffusion_model_path(model)
        kind = "InfiniteTalk" if "infinite" in path.name.lower() else "MultiTalk"
        return ({"model_path": str(path), "model_type": kind},)


class WanVideoModelLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (_diffusion_model_files(), _tip("Wan2.1 I2V 14B transformer from models/diffusion_models.")),
                "base_precision": (["fp32", "bf16", "fp16", "fp16_fast"], _tip(
                    "Precision of the non-quantized weights and of the computation.", default="bf16")),
                "quantization": (list(QUANT_MODES), _tip("Weight quantization of the transformer's linear layers.",
                                                         default="disabled")),
                "load_device": (DEVICES, _tip("Where the weights wait between runs.", default="offload_device")),
            },
            "optional": {
                "attention_mode": (list(ATTENTION_MODES), _tip("Attention kernel; unavailable ones fall back to "
                                                               "the fastest available and say so.", default="sdpa")),
                "compile_args": ("WANCOMPILEARGS", _tip("torch.compile settings.")),
                "block_swap_args": ("BLOCKSWAPARGS", _tip("Block swap settings.")),
                "lora": ("WANVIDLORA", _tip("LoRAs to apply.", default=None)),
                "vram_management_args": ("VRAM_MANAGEMENTARGS", _tip("Not used by InfiniteTalk.", default=None)),
                "extra_model": ("VACEPATH", _tip("Not used by InfiniteTalk.", default=None)),
                "fantasytalking_model": ("FANTASYTALKINGMODEL", _tip("Not used by InfiniteTalk.", default=None)),
                "multitalk_model": ("MULTITALKMODEL", _tip("The InfiniteTalk adapter.", default=None)),
                "fantasyportrait_model": ("FANTASYPORTRAITMODEL", _tip("Not used by InfiniteTalk.", default=None)),
                "rms_norm_function": (["default", "pytorch"], _tip(
                    "q/k RMSNorm: default = the official formula; pytorch = torch's fused rms_norm kernel (less "
                    "memory, slightly different numerics).", default="default")),
            },
        }

    RETURN_TYPES = ("WANVIDEOMODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "loadmodel"
    CATEGORY = CATEGORY
    DESCRIPTION = "Load the Wan2.1 transformer with the InfiniteTalk adapter merged in."

    def loadmodel(self, model, base_precision, quantization, load_device, attention_mode="sdpa", compile_args=None,
                  block_swap_args=None, lora=None, vram_management_args=None, extra_model=None,
                  fantasytalking_model=None, multitalk_model=None, fantasyportrait_model=None,
                  rms_norm_function="default", vace_model=None):
        unsupported = {"vram_management_args": vram_management_args,
                       "extra_model": extra_model or vace_model, "fantasytalking_model": fantasytalking_model,
                       "fantasyportrait_model": fantasyportrait_model}
        connected = [name for name, value in unsupported.items() if value]
        if connected:
            raise ValueError(f"WanVideoModelLoader: {', '.join(connected)} not supported by this pack yet; "
                             "disconnect them")
        adapter = Path(multitalk_model["model_path"]) if multitalk_model else None
        request = pipeline.ModelRequest(base_path=_diffusion_model_path(model), adapter_path=adapter,
                                        base_precision=base_precision, quantization=quantization,
                                        attention_mode=attention_mode, rms_norm_function=rms_norm_function)
        transformer = pipeline.load_transformer(request, _device("main_device"))
        loras = apply_lora_entries(transformer, lora)
        model_type = multitalk_model["model_type"] if multitalk_model else "InfiniteTalk"
        handle = pipeline.TransformerHandle(transformer, request, model_type, block_swap_args, compile_args, loras)
        return (WanVideoPatcher.wrap(handle, _device(load_device)),)


class WanVideoSetBlockSwap:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("WANVIDEOMODEL", _tip("The transformer."))},
                "optional": {"block_swap_args": ("BLOCKSWAPARGS", _tip("Block swap settings to apply."))}}

    RETURN_TYPES = ("WANVIDEOMODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "loadmodel"
    CATEGORY = CATEGORY
    DESCRIPTION = "Set or replace the block swap settings of a loaded transformer."

    def loadmodel(self, model, block_swap_args=None):
        return (model if block_swap_args is None else model.with_block_swap(block_swap_args),)


class WanVideoVAELoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"model_name": (folder_paths.get_filename_list("vae"), _tip("Wan2.1 VAE from models/vae."))},
            "optional": {
                "precision": (["fp16", "fp32", "bf16"], _tip("VAE precision.", default="bf16")),
                "compile_args": ("WANCOMPILEARGS", _tip("torch.compile settings.")),
                "use_cpu_cache": ("BOOLEAN", _tip("Keep the causal cache in host RAM.", default=False)),
                "verbose": ("BOOLEAN", _tip("Log VAE memory use.", default=False)),
            },
        }

    RETURN_TYPES = ("WANVAE",)
    RETURN_NAMES = ("vae",)
    FUNCTION = "loadmodel"
    CATEGORY = CATEGORY
    DESCRIPTION = "Load the Wan2.1 video VAE."

    def loadmodel(self, model_name, precision="bf16", compile_args=None, use_cpu_cache=False, verbose=False):
        return (_managed_vae(load_vae(folder_paths.get_full_path_or_raise("vae", model_name), precision)),)


class LoadWanVideoT5TextEncoder:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_name": (folder_paths.get_filename_list("text_encoders"), _tip(
                    "umT5-XXL encoder from models/text_encoders.")),
                "precision": (["fp32", "bf16"], _tip("Encoder precision.", default="bf16")),
            },
            "optional": {
                "load_device": (DEVICES, _tip("Where the encoder waits between runs.", default="offload_device")),
                "quantization": (["disabled", "fp8_e4m3fn"], _tip("Store the weights in fp8.", default="disabled")),
            },
        }

    RETURN_TYPES = ("WANTEXTENCODER",)
    RETURN_NAMES = ("wan_t5_model",)
    FUNCTION = "loadmodel"
    CATEGORY = CATEGORY
    DESCRIPTION = "Load the umT5-XXL text encoder and its tokenizer."

    def loadmodel(self, model_name, precision, load_device="offload_device", quantization="disabled"):
        path = folder_paths.get_full_path_or_raise("text_encoders", model_name)
        options = T5LoadOptions(precision=precision, quantization=quantization, device=str(_device(load_device)))
        encoder = _ManagedTextEncoder(load_text_encoder(path, options), _device(load_device))
        return ({"model": encoder, "dtype": precision, "name": model_name, "path": path},)


def _text_cache() -> TextEmbedCache:
    return TextEmbedCache(Path(folder_paths.get_user_directory()) / "infinitetalk_text_embeds")


def _encode_prompts(positive: str, negative: str, encoder, path: str, use_disk_cache: bool, variant: str) -> dict:
    cache = _text_cache() if use_disk_cache else None
    identity = EncoderIdentity.from_file(path, variant) if use_disk_cache else None
    embeds = encode_text_embeds(positive, negative, encoder, cache, identity)
    return {"prompt_embeds": [e.float().cpu() for e in embeds.prompt_embeds],
            "negative_prompt_embeds": [e.float().cpu() for e in embeds.negative_prompt_embeds], "echoshot": False}


class WanVideoTextEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "positive_prompt": ("STRING", _tip("Prompt; '|' separates per-window prompts, (text:1.2) weights.",
                                                   default="", multiline=True)),
                "negative_prompt": ("STRING", _tip("Negative prompt.", default="", multiline=True)),
            },
            "optional": {
                "t5": ("WANTEXTENCODER", _tip("Text encoder (not needed for cached prompts).")),
                "force_offload": ("BOOLEAN", _tip("Move the encoder back to the offload device after use.",
                                                  default=True)),
                "model_to_offload": ("WANVIDEOMODEL", _tip("Unused; kept for workflow compatibility.")),
                "use_disk_cache": ("BOOLEAN", _tip("Reuse embeddings saved on disk for the same prompt and encoder.",
                                                   default=False)),
                "device": (["gpu", "cpu"], _tip("Where the encoder runs.", default="gpu")),
            },
        }

    RETURN_TYPES = ("WANVIDEOTEXTEMBEDS",)
    RETURN_NAMES = ("text_embeds",)
    FUNCTION = "process"
    CATEGORY = CATEGORY
    DESCRIPTION = "Encode the prompts with umT5."

    def process(self, positive_prompt, negative_prompt, t5=None, force_offload=True, model_to_offload=None,
                use_disk_cache=False, device="gpu"):
        if t5 is None and not use_disk_cache:
            raise ValueError("WanVideoTextEncode: connect a T5 text encoder or enable use_disk_cache")
        encoder = t5["model"] if t5 else None
        return (_encode_prompts(positive_prompt, negative_prompt, encoder, t5["path"] if t5 else "",
                                use_disk_cache and t5 is not None, t5["dtype"] if t5 else ""),)


class WanVideoTextEncodeCached:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_name": (folder_paths.get_filename_list("text_encoders"), _tip(
                    "umT5-XXL encoder from models/text_encoders; loaded only for prompts not in the cache.")),
                "precision": (["fp32", "bf16"], _tip("Encoder precision.", default="bf16")),
                "positive_prompt": ("STRING", _tip("Prompt; '|' separates per-window prompts, (text:1.2) weights.",
                                                   default="", multiline=True)),
                "negative_prompt": ("STRING", _tip("Negative prompt.", default="", multiline=True)),
                "quantization": (["disabled", "fp8_e4m3fn"], _tip("Store the weights in fp8.", default="disabled")),
                "use_disk_cache": ("BOOLEAN", _tip("Reuse embeddings saved on disk.", default=True)),
                "device": (["gpu", "cpu"], _tip("Where the encoder runs.", default="gpu")),
            },
            "optional": {"extender_args": ("WANVIDEOPROMPTEXTENDER_ARGS", _tip("Prompt extender (not supported)."))},
        }

    RETURN_TYPES = ("WANVIDEOTEXTEMBEDS", "WANVIDEOTEXTEMBEDS", "STRING")
    RETURN_NAMES = ("text_embeds", "negative_text_embeds", "positive_prompt")
    FUNCTION = "process"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Encode the prompts, loading umT5 only when the embeddings are not cached (through ComfyUI's "
                   "model management, which frees room for it on the GPU), then free it.")

    def process(self, model_name, precision, positive_prompt, negative_prompt, quantization, use_disk_cache, device,
                extender_args=None):
        if extender_args is not None:
            raise ValueError("WanVideoTextEncodeCached: the prompt extender is not supported; disconnect it")
        path = folder_paths.get_full_path_or_raise("text_encoders", model_name)
        options = T5LoadOptions(precision=precision, quantization=quantization, device="cpu")

        def encode(prompts):
            encoder = load_text_encoder(path, options)
            if device != "gpu":
                return encoder(prompts)
            managed = _ManagedTextEncoder(encoder, torch.device("cpu"))  # ComfyUI frees room, then loads it
            try:
                return managed(prompts)
            finally:
                _unload(managed.patcher)

        embeds = _encode_prompts(positive_prompt, negative_prompt, encode, path, use_disk_cache,
                                 f"{precision}-{quantization}")
        return (embeds, {"prompt_embeds": embeds["negative_prompt_embeds"]}, positive_prompt)


def _conditioning_embeds(cond, name: str) -> torch.Tensor:
    """CONDITIONING from CLIPTextEncode -> umT5 embeddings [L, dim] float32 on the CPU, as the pack's encoder gives
    them: the first entry's first row without the zero rows ComfyUI's umT5 pads every prompt with to 512 tokens
    (it zeroes masked positions); at least one row is kept."""
    if not cond or not torch.is_tensor(cond[0][0]) or cond[0][0].dim() != 3:
        raise ValueError(f"WanVideoTextEmbedBridge: {name} must be CONDITIONING from CLIPTextEncode with a umT5 text "
                         "encoder (CLIPLoader type wan)")
    embeds = cond[0][0][0].float().cpu()
    rows = embeds.abs().amax(dim=-1).nonzero()
    return embeds[: int(rows[-1]) + 1 if len(rows) else 1]


class WanVideoTextEmbedBridge:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"positive": ("CONDITIONING", _tip("umT5 conditioning from CLIPTextEncode (type wan)."))},
                "optional": {"negative": ("CONDITIONING", _tip("Negative conditioning."))}}

    RETURN_TYPES = ("WANVIDEOTEXTEMBEDS",)
    RETURN_NAMES = ("text_embeds",)
    FUNCTION = "process"
    CATEGORY = CATEGORY
    DESCRIPTION = "Use ComfyUI's own umT5 text encoding (CLIPLoader type wan + CLIPTextEncode) with these nodes."

    def process(self, positive, negative=None):
        prompt = _conditioning_embeds(positive, "positive")
        negative_embeds = _conditioning_embeds(negative, "negative") if negative else torch.zeros_like(prompt[:1])
        return ({"prompt_embeds": [prompt], "negative_prompt_embeds": [negative_embeds], "echoshot": False},)


class LoadWanVideoClipTextEncoder:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_name": (folder_paths.get_filename_list("clip_vision")
                               + folder_paths.get_filename_list("text_encoders"), _tip(
                                   "Wan CLIP vision model (open-clip XLM-R ViT-H/14 or clip_vision_h).")),
                "precision": (["fp16", "fp32", "bf16"], _tip("CLIP precision.", default="fp16")),
            },
            "optional": {"load_device": (DEVICES, _tip("Where the model waits.", default="offload_device"))},
        }

    RETURN_TYPES = ("CLIP_VISION",)
    RETURN_NAMES = ("wan_clip_vision",)
    FUNCTION = "loadmodel"
    CATEGORY = CATEGORY
    DESCRIPTION = "Load the Wan CLIP vision encoder from models/clip_vision."

    def loadmodel(self, model_name, precision, load_device="offload_device"):
        path = folder_paths.get_full_path("clip_vision", model_name) or \
            folder_paths.get_full_path_or_raise("text_encoders", model_name)
        return (load_clip_vision(path, CLIPLoadOptions(precision=precision, device=str(_device(load_device)))),)


def _clip_tokens(clip_vision, image: torch.Tensor, crop: str) -> torch.Tensor:
    """IMAGE [B, H, W, 3] in [0, 1] -> CLIP tokens [B, 257, 1280] float32 (this pack's tower or ComfyUI's model)."""
    if isinstance(clip_vision, CLIPVisionTower):
        pixels = image[..., :3].permute(0, 3, 1, 2)
        if crop == "center":
            side = min(pixels.shape[-2:])
            top, left = (pixels.shape[-2] - side) // 2, (pixels.shape[-1] - side) // 2
            pixels = pixels[..., top:top + side, left:left + side]
        device = next(clip_vision.parameters()).device
        return clip_vision.encode(pixels.to(device) * 2 - 1).float().cpu()
    if hasattr(clip_vision, "encode_image"):
        return clip_vision.encode_image(image, crop=crop == "center").penultimate_hidden_states.float().cpu()
    raise TypeError("WanVideoClipVisionEncode: clip_vision must come from a CLIP vision loader")


@contextmanager
def _clip_on_main_device(clip_vision, force_offload: bool):
    """This pack's CLIP tower is loaded through ComfyUI's model management to encode on the main device and, with
    ``force_offload``, unloaded afterwards. ComfyUI's own CLIP vision model is placed by ComfyUI (``encode_image``
    loads it)."""
    if not isinstance(clip_vision, CLIPVisionTower):
        yield
        return
    patcher = _managed(clip_vision, _device("offload_device")).patcher
    comfy.model_management.load_models_gpu([patcher])
    try:
        yield
    finally:
        if force_offload:
            _unload(patcher)


class WanVideoClipVisionEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip_vision": ("CLIP_VISION", _tip("CLIP vision model (ComfyUI's or this pack's loader).")),
                "image_1": ("IMAGE", _tip("Reference image.")),
                "strength_1": ("FLOAT", _tip("Weight of image 1.", default=1.0, min=0.0, max=10.0, step=0.001)),
                "strength_2": ("FLOAT", _tip("Weight of image 2.", default=1.0, min=0.0, max=10.0, step=0.001)),
                "crop": (["center", "disabled"], _tip("Centre-crop to a square before resizing.", default="center")),
                "combine_embeds": (["average", "sum", "concat", "batch"], _tip("How two images are combined.",
                                                                                default="average")),
                "force_offload": ("BOOLEAN", _tip("Offload the model after encoding.", default=True)),
            },
            "optional": {
                "image_2": ("IMAGE", _tip("Second image.")),
                "negative_image": ("IMAGE", _tip("Negative image.")),
                "tiles": ("INT", _tip("Tiled encoding (not supported; keep 0).", default=0, min=0, max=16, step=2)),
                "ratio": ("FLOAT", _tip("Tile blend ratio.", default=0.5, min=0.0, max=1.0, step=0.01)),
            },
        }

    RETURN_TYPES = ("WANVIDIMAGE_CLIPEMBEDS",)
    RETURN_NAMES = ("image_embeds",)
    FUNCTION = "process"
    CATEGORY = CATEGORY
    DESCRIPTION = "CLIP vision tokens of the reference image for the I2V cross-attention."

    def process(self, clip_vision, image_1, strength_1, strength_2, crop, combine_embeds, force_offload,
                image_2=None, negative_image=None, tiles=0, ratio=1.0):
        if tiles:
            raise ValueError("WanVideoClipVisionEncode: tiled CLIP encoding is not supported; set tiles to 0")
        with _clip_on_main_device(clip_vision, force_offload):
            tokens = [_clip_tokens(clip_vision, image_1, crop) * strength_1]
            if image_2 is not None:
                tokens.append(_clip_tokens(clip_vision, image_2, crop) * strength_2)
            negative = None if negative_image is None else _clip_tokens(clip_vision, negative_image, crop)
        stacked = torch.cat(tokens)
        combined = {"average": lambda t: t.mean(0, keepdim=True), "sum": lambda t: t.sum(0, keepdim=True),
                    "concat": lambda t: t.reshape(1, -1, t.shape[-1]), "batch": lambda t: t}[combine_embeds](stacked)
        return ({"clip_embeds": combined, "negative_clip_embeds": negative},)


def _tiling(enabled: bool, tile_x: int, tile_y: int, stride_x: int, stride_y: int):
    return TileSpec(tile_x, tile_y, stride_x, stride_y) if enabled else None


class WanVideoDecode:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": ("WANVAE", _tip("Wan2.1 VAE.")),
                "samples": ("LATENT", _tip("Latents, or the InfiniteTalk sampler's finished video.")),
                "enable_vae_tiling": ("BOOLEAN", _tip("Decode in overlapping tiles (less VRAM).", default=False)),
                "tile_x": ("INT", _tip("Tile width in pixels.", default=272, min=40, max=2048, step=8)),
                "tile_y": ("INT", _tip("Tile height in pixels.", default=272, min=40, max=2048, step=8)),
                "tile_stride_x": ("INT", _tip("Horizontal tile stride.", default=144, min=32, max=2040, step=8)),
                "tile_stride_y": ("INT", _tip("Vertical tile stride.", default=128, min=32, max=2040, step=8)),
            },
            "optional": {"normalization": (["default", "minmax", "none"], _tip(
                "Output mapping: clamp, min-max rescale, or raw.", default="default", advanced=True))},
        }

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    FUNCTION = "decode"
    CATEGORY = CATEGORY
    DESCRIPTION = "Decode latents to frames (InfiniteTalk output is already decoded and passes through)."

    @classmethod
    def VALIDATE_INPUTS(cls, tile_x, tile_y, tile_stride_x, tile_stride_y):
        if tile_x <= tile_stride_x or tile_y <= tile_stride_y:
            return "tile_x and tile_y must be larger than tile_stride_x and tile_stride_y"
        return True

    def decode(self, vae, samples, enable_vae_tiling, tile_x, tile_y, tile_stride_x, tile_stride_y,
               normalization="default"):
        if "video" in samples:
            return ((samples["video"].clamp(-1, 1) + 1) / 2,)
        comfy.model_management.load_models_gpu([_managed_vae(vae).patcher])
        latents = samples["samples"].to(vae.device)
        video = vae.decode(latents, _tiling(enable_vae_tiling, tile_x, tile_y, tile_stride_x, tile_stride_y),
                           clamp=normalization == "default")[0]
        if normalization == "minmax":
            video = (video - video.min()) / (video.max() - video.min()).clamp_min(1e-8) * 2 - 1
        return (((video.permute(1, 2, 3, 0) + 1) / 2).clamp(0, 1).cpu(),)


class WanVideoEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": ("WANVAE", _tip("Wan2.1 VAE.")),
                "image": ("IMAGE", _tip("Frames to encode (1 + 4k frames; sizes divisible by 16).")),
                "enable_vae_tiling": ("BOOLEAN", _tip("Encode in overlapping tiles (less VRAM).", default=False)),
                "tile_x": ("INT", _tip("Tile width in pixels.", default=272, min=64, max=2048, step=1)),
                "tile_y": ("INT", _tip("Tile height in pixels.", default=272, min=64, max=2048, step=1)),
                "tile_stride_x": ("INT", _tip("Horizontal tile stride.", default=144, min=32, max=2048, step=32)),
                "tile_stride_y": ("INT", _tip("Vertical tile stride.", default=128, min=32, max=2048, step=32)),
            },
            "optional": {
                "noise_aug_strength": ("FLOAT", _tip("Noise added before encoding.", default=0.0, min=0.0, max=10.0,
                                                     step=0.001)),
                "latent_strength": ("FLOAT", _tip("Scale of the latents.", default=1.0, min=0.0, max=10.0,
                                                  step=0.001)),
                "mask": ("MASK", _tip("Mask stored with the latents.")),
            },
        }

    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("samples",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = "Encode frames to Wan2.1 latents (a frame count that is not 1 + 4k is padded with the last frame)."

    def encode(self, vae, image, enable_vae_tiling, tile_x, tile_y, tile_stride_x, tile_stride_y,
               noise_aug_strength=0.0, latent_strength=1.0, mask=None):
        comfy.model_management.load_models_gpu([_managed_vae(vae).patcher])
        video = pad_to_causal_length(image[..., :3].permute(3, 0, 1, 2)[None].to(vae.device) * 2 - 1)
        if noise_aug_strength > 0:
            video = video + noise_aug_strength * torch.randn_like(video)
        latents = vae.encode(video, _tiling(enable_vae_tiling, tile_x, tile_y, tile_stride_x, tile_stride_y))
        return ({"samples": (latents * latent_strength).cpu(), "noise_mask": mask},)


def _wav2vec_result(path: Path, base_precision: str, load_device: str, model_type: str) -> dict:
    """The WAV2VECMODEL socket; the model is placed on ``load_device``, where the embeds node runs it."""
    encoder = load_wav2vec(path, base_precision, model_type=model_type)
    device = _device(load_device)
    encoder.model.to(device)
    return {"feature_extractor": None, "model": encoder, "dtype": encoder.dtype, "model_type": model_type,
            "device": device}


def _wav2vec_folders(repo: str) -> list[Path]:
    """Where ``repo`` may live: <folder>/<repo> for each registered "transformers" model folder, then ComfyUI's
    models/transformers/<repo>; the first is where a download goes."""
    roots = folder_paths.get_folder_paths("transformers") if "transformers" in folder_paths.folder_names_and_paths \
        else []
    folders = [Path(root) / repo for root in [*roots, os.path.join(folder_paths.models_dir, "transformers")]]
    return list(dict.fromkeys(folders))


class DownloadAndLoadWav2VecModel:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (WAV2VEC_REPOS, _tip("Hugging Face repository: models/transformers/<repo>, downloaded "
                                              "there when missing.")),
                "base_precision": (["fp32", "bf16", "fp16"], _tip("Model precision.", default="fp16")),
                "load_device": (DEVICES, _tip("Where the model runs.", default="main_device")),
            },
        }

    RETURN_TYPES = ("WAV2VECMODEL",)
    RETURN_NAMES = ("wav2vec_model",)
    FUNCTION = "loadmodel"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Load a wav2vec2 model from models/transformers/<repository>; when it is not there, download its "
                   "config and weights from Hugging Face into that folder.")

    def loadmodel(self, model, base_precision, load_device):
        folders = _wav2vec_folders(model)
        found = next((f for f in folders if has_weights(f)), None)
        if found is None:
            try:
                found = download_wav2vec(model, folders[0])
            except RuntimeError as err:
                raise RuntimeError(f"(Down)load Wav2Vec Model: {err}; or put a single wav2vec2 .safetensors file in "
                                   "models/wav2vec2 and use the Wav2vec2 Model Loader node") from err
        return (_wav2vec_result(found, base_precision, load_device, model),)


class Wav2VecModelLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (folder_paths.get_filename_list("wav2vec2"), _tip("wav2vec2 file from models/wav2vec2.")),
                "base_precision": (["fp32", "bf16", "fp16"], _tip("Model precision.", default="fp16")),
                "load_device": (DEVICES, _tip("Where the model runs.", default="main_device")),
            },
        }

    RETURN_TYPES = ("WAV2VECMODEL",)
    RETURN_NAMES = ("wav2vec_model",)
    FUNCTION = "loadmodel"
    CATEGORY = CATEGORY
    DESCRIPTION = "Load chinese-wav2vec2-base from a single safetensors file in models/wav2vec2."

    def loadmodel(self, model, base_precision, load_device):
        path = Path(folder_paths.get_full_path_or_raise("wav2vec2", model))
        return (_wav2vec_result(path, base_precision, load_device, "tencent"),)


class MultiTalkWav2VecEmbeds:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "wav2vec_model": ("WAV2VECMODEL", _tip("chinese-wav2vec2-base.")),
                "audio_1": ("AUDIO", _tip("Speech of speaker 1.")),
                "normalize_loudness": ("BOOLEAN", _tip("Normalise to -23 LUFS.", default=True)),
                "num_frames": ("INT", _tip("Maximum video frames; shorter audio gives fewer.", default=81, min=1,
                                           max=10000, step=1)),
                "fps": ("FLOAT", _tip("Video frame rate.", default=25.0, min=1.0, max=60.0, step=0.1)),
                "audio_scale": ("FLOAT", _tip("Strength of the audio conditioning.", default=1.0, min=0.0,
                                              max=100.0, step=0.01)),
                "audio_cfg_scale": ("FLOAT", _tip("Audio guidance; not 1 adds a pass without audio.", default=1.0,
                                                  min=0.0, max=100.0, step=0.01)),
                "multi_audio_type": (["para", "add"], _tip("Speakers talk at once (para) or in turn (add).",
                                                           default="para")),
            },
            "optional": {
                "audio_2": ("AUDIO", _tip("Speech of speaker 2.")),
                "audio_3": ("AUDIO", _tip("Speech of speaker 3.")),
                "audio_4": ("AUDIO", _tip("Speech of speaker 4.")),
                "ref_target_masks": ("MASK", _tip("Per-speaker masks (speaker 1, speaker 2, optional background).")),
                "add_noise_floor": ("BOOLEAN", _tip("Add -45 dB noise so silence gives stable features.",
                                                    default=False)),
                "smooth_transients": ("BOOLEAN", _tip("3 kHz low-pass against clicks.", default=False)),
            },
        }

    RETURN_TYPES = ("MULTITALK_EMBEDS", "AUDIO", "INT")
    RETURN_NAMES = ("multitalk_embeds", "audio", "num_frames")
    FUNCTION = "process"
    CATEGORY = CATEGORY
    DESCRIPTION = "wav2vec2 features per video frame for each speaker."

    def process(self, wav2vec_model, audio_1, normalize_loudness, num_frames, fps, audio_scale, audio_cfg_scale,
                multi_audio_type, audio_2=None, audio_3=None, audio_4=None, ref_target_masks=None,
                add_noise_floor=False, smooth_transients=False):
        prep = AudioPrepOptions(num_frames=num_frames, fps=fps, normalize_loudness=normalize_loudness,
                                add_noise_floor=add_noise_floor, smooth_transients=smooth_transients)
        options = EmbedOptions(prep=prep, audio_scale=audio_scale, audio_cfg_scale=audio_cfg_scale,
                               multi_audio_type=multi_audio_type)
        encoder = wav2vec_model["model"]
        if wav2vec_model.get("device") == _device("main_device"):
            comfy.model_management.load_models_gpu([_managed(encoder.model, _device("offload_device")).patcher])
        result = embed_audio(encoder, [audio_1, audio_2, audio_3, audio_4], options, ref_target_masks)
        return (result.embeds.to_dict(), result.audio, result.num_frames)


class MultiTalkSilentEmbeds:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"num_frames": ("INT", _tip("Video frames of silence.", default=81, min=1, max=10000,
                                                    step=1))},
            "optional": {"wav2vec_model": ("WAV2VECMODEL", _tip(
                "The wav2vec2 model that encodes the speech; the silence features are computed with it."))},
        }

    RETURN_TYPES = ("MULTITALK_EMBEDS",)
    RETURN_NAMES = ("multitalk_embeds",)
    FUNCTION = "process"
    CATEGORY = CATEGORY
    DESCRIPTION = "Audio features of silence: a clip where nobody talks."

    def process(self, num_frames, wav2vec_model=None):
        if wav2vec_model is None:
            raise ValueError("MultiTalk Silent Embeds: connect a wav2vec2 model loader; this pack computes the "
                             "silence features with the same model that encodes speech")
        return (silent_embeds(wav2vec_model["model"], num_frames).to_dict(),)


class WanVideoImageToVideoMultiTalk:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": ("WANVAE", _tip("Wan2.1 VAE.")),
                "width": ("INT", _tip("Video width (divisible by 16).", default=832, min=64, max=2048, step=8)),
                "height": ("INT", _tip("Video height (divisible by 16).", default=480, min=64, max=29048, step=8)),
                "frame_window_size": ("INT", _tip("Frames per window (rounded down to 4k+1).", default=81, min=1,
                                                  max=10000, step=4)),
                "motion_frame": ("INT", _tip("Frames each window overlaps the previous one.", default=25, min=1,
                                             max=10000, step=1)),
                "force_offload": ("BOOLEAN", _tip("Offload the transformer before VAE work in each window.",
                                                  default=False)),
                "colormatch": (list(pipeline.COLORMATCH_MODES), _tip("Colour matching between windows.",
                                                                     default="disabled")),
            },
            "optional": {
                "start_image": ("IMAGE", _tip("Reference image (several: one per window).")),
                "tiled_vae": ("BOOLEAN", _tip("Tiled VAE encode/decode.", default=False)),
                "clip_embeds": ("WANVIDIMAGE_CLIPEMBEDS", _tip("CLIP tokens of the reference image.")),
                "mode": (list(pipeline.LOOP_MODES), _tip(
                    "Loop variant. infinitetalk: every window is conditioned on its reference image, the previous "
                    "window's last motion_frame frames are pasted clean. multitalk: later windows are conditioned on "
                    "the previous window's last motion_frame frames (re-noised each step), colour match to the first "
                    "start image. auto: infinitetalk or multitalk after the loaded adapter's type.", default="auto")),
                "output_path": ("STRING", _tip(
                    "If set, frames are written as PNG into <output_path>/<YYYYmmdd_HHMMSS>_<mode>_output/ instead of "
                    "kept in RAM, with a checkpoint after every window. Queue the same run again with the same "
                    "output_path to resume after a crash or cancel: the newest run folder there whose run.json "
                    "fingerprint (models, prompts, audio, images, sizes, sampler settings, seed) matches continues "
                    "after its last finished window; any change starts a fresh folder (the log says what differed).",
                    default="")),
            },
        }

    RETURN_TYPES = ("WANVIDIMAGE_EMBEDS", "STRING")
    RETURN_NAMES = ("image_embeds", "output_path")
    FUNCTION = "process"
    CATEGORY = CATEGORY
    DESCRIPTION = "Set up windowed long-video InfiniteTalk sampling; windows overlap by motion_frame frames."

    def process(self, vae, width, height, frame_window_size, motion_frame, force_offload, colormatch,
                start_image=None, tiled_vae=False, clip_embeds=None, mode="auto", output_path=""):
        clip = clip_embeds["clip_embeds"] if clip_embeds else None
        embeds = pipeline.image_to_video_embeds(width, height, frame_window_size, motion_frame, start_image,
                                                clip_context=clip, colormatch=colormatch, mode=mode,
                                                output_path=output_path, force_offload=force_offload,
                                                tiled_vae=tiled_vae)
        return (embeds.to_dict(vae), output_path)


SAMPLER_UNSUPPORTED = ("feta_args", "context_options", "cache_args", "flowedit_args", "slg_args",
                       "loop_args", "experimental_args", "sigmas", "unianimate_poses", "fantasytalking_embeds",
                       "uni3c_embeds", "freeinit_args", "teacache_args")


class WanVideoSampler:
    @classmethod
    def INPUT_TYPES(cls):
        socket = {name: (kind, _tip("Not used by InfiniteTalk in this version.")) for name, kind in (
            ("feta_args", "FETAARGS"), ("context_options", "WANVIDCONTEXT"), ("cache_args", "CACHEARGS"),
            ("flowedit_args", "FLOWEDITARGS"))}
        return {
            "required": {
                "model": ("WANVIDEOMODEL", _tip("The transformer.")),
                "image_embeds": ("WANVIDIMAGE_EMBEDS", _tip("From WanVideo Long I2V Multi/InfiniteTalk.")),
                "steps": ("INT", _tip("Sampling steps per window.", default=30, min=1)),
                "cfg": ("FLOAT", _tip("Text guidance scale (1 = off, one pass fewer).", default=6.0, min=0.0,
                                      max=30.0, step=0.01)),
                "shift": ("FLOAT", _tip("Flow-matching timestep shift.", default=5.0, min=0.0, max=1000.0,
                                        step=0.01)),
                "seed": ("INT", _tip("Noise seed.", default=0, min=0, max=0xffffffffffffffff)),
                "force_offload": ("BOOLEAN", _tip("Move the transformer off the GPU when done.", default=True)),
                "scheduler": (list(SCHEDULER_NAMES), _tip("Sampler / timestep schedule.", default="unipc")),
                "riflex_freq_index": ("INT", _tip("RIFLEx frequency index (0 = off).", default=0, min=0, max=1000,
                                                  step=1)),
            },
            "optional": {
                "text_embeds": ("WANVIDEOTEXTEMBEDS", _tip("Prompt embeddings.")),
                "samples": ("LATENT", _tip("Source latents for video-to-video (from WanVideo Encode).")),
                "denoise_strength": ("FLOAT", _tip("Share of the schedule to run.", default=1.0, min=0.0, max=1.0,
                                                   step=0.01)),
                **socket,
                "batched_cfg": ("BOOLEAN", _tip("Run the guidance passes as one batch.", default=False)),
                "slg_args": ("SLGARGS", _tip("Not used by InfiniteTalk in this version.")),
                "rope_function": (["default", "comfy", "comfy_chunked"], _tip(
                    "RoPE implementation (all compute the same result here).", default="comfy")),
                "loop_args": ("LOOPARGS", _tip("Not used by InfiniteTalk in this version.")),
                "experimental_args": ("EXPERIMENTALARGS", _tip("Not used by InfiniteTalk in this version.")),
                "sigmas": ("SIGMAS", _tip("Custom sigmas (not supported with InfiniteTalk yet).")),
                "unianimate_poses": ("UNIANIMATE_POSE", _tip("Not used by InfiniteTalk.")),
                "fantasytalking_embeds": ("FANTASYTALKING_EMBEDS", _tip("Not used by InfiniteTalk.")),
                "uni3c_embeds": ("UNI3C_EMBEDS", _tip("Not used by InfiniteTalk.")),
                "multitalk_embeds": ("MULTITALK_EMBEDS", _tip("Audio features from the wav2vec2 embeds node.")),
                "freeinit_args": ("FREEINITARGS", _tip("Not used by InfiniteTalk.")),
                "start_step": ("INT", _tip("First step to run.", default=0, min=0, max=10000, step=1)),
                "end_step": ("INT", _tip("Step to stop at (-1 = end).", default=-1, min=-1, max=10000, step=1)),
                "add_noise_to_samples": ("BOOLEAN", _tip("Noise source latents to the first step (v2v).",
                                                         default=False)),
                "force_contiguous_tensors": ("BOOLEAN", _tip(
                    "Debug: verify every attention operand's layout and alignment at run time and log the first "
                    "layer whose input needed a layout copy. Off: the layers already guarantee the layouts.",
                    default=False)),
                "use_tf32": ("BOOLEAN", _tip("Allow TF32 for float32 matmuls and convolutions during sampling.",
                                             default=False)),
                "use_cublas_gemm": ("BOOLEAN", _tip(
                    "No generated Triton kernels: quantized layers run only cuBLAS/cuBLASLt GEMMs, and activation "
                    "quantization, weight dequantization and the blocks' norm/modulation/RoPE steps run as plain "
                    "torch ops (slower; for debugging or when Triton misbehaves).", default=False)),
                "fuse_qkv_projections": ("BOOLEAN", _tip(
                    "Run the q/k/v projections (and the cross-attention k/v pairs) as one GEMM each over their "
                    "weights joined per call (the fp8 GEMM modes quantize the shared input once either way). Same "
                    "results within rounding; layers with unmerged LoRAs run separately.", default=False)),
            },
        }

    RETURN_TYPES = ("LATENT", "LATENT")
    RETURN_NAMES = ("samples", "denoised_samples")
    FUNCTION = "process"
    CATEGORY = CATEGORY
    DESCRIPTION = "Sample the InfiniteTalk long video window by window; returns the decoded frames."

    def process(self, model, image_embeds, steps, cfg, shift, seed, force_offload, scheduler, riflex_freq_index,
                text_embeds=None, multitalk_embeds=None, denoise_strength=1.0, batched_cfg=False, start_step=0,
                end_step=-1, **options):
        connected = [name for name in SAMPLER_UNSUPPORTED if options.get(name) is not None]
        if connected or riflex_freq_index:
            raise ValueError(f"WanVideoSampler: {', '.join(connected) or 'riflex_freq_index'} not supported with "
                             "InfiniteTalk in this version; disconnect it / set it to 0")
        if not image_embeds.get("multitalk_sampling") or multitalk_embeds is None or text_embeds is None:
            raise ValueError("WanVideoSampler: this pack samples InfiniteTalk videos: connect image_embeds from "
                             "WanVideo Long I2V Multi/InfiniteTalk, multitalk_embeds and text_embeds")
        inputs = pipeline.loop_inputs(image_embeds, text_embeds, multitalk_embeds, samples=options.get("samples"),
                                      model_type=model.model_type)
        settings = SamplerSettings(scheduler=scheduler, steps=steps, shift=shift, seed=seed, start_step=start_step,
                                   end_step=end_step, cfg=pipeline.scale_list(cfg, steps),
                                   audio_cfg=float(multitalk_embeds.get("audio_cfg_scale", 1.0)),
                                   batched_cfg=batched_cfg, denoise_strength=denoise_strength,
                                   add_noise_to_samples=bool(options.get("add_noise_to_samples", False)))
        checks = bool(options.get("force_contiguous_tensors", False))
        runtime = LinearRuntime(cublas_only=bool(options.get("use_cublas_gemm", False)), report_layouts=checks,
                                fuse_qkv=bool(options.get("fuse_qkv_projections", False)))
        with matmul_precision(tf32=bool(options.get("use_tf32", False)),
                              fp16_accumulation=model.request.base_precision == "fp16_fast"), \
                linear_runtime(runtime), operand_checks(checks):
            return _run_loop(model, image_embeds, inputs, settings, force_offload)


class WanVideoModel(torch.nn.Module):
    """The module ComfyUI manages for a WANVIDEOMODEL (upstream layout): ``diffusion_model`` is the transformer.
    While it is loaded, ``swapper`` is its attached BlockSwapper (None: the transformer is on the device whole),
    ``embed_swapper`` the one streaming the text / CLIP-image embedders from host memory (``offload_txt_emb`` /
    ``offload_img_emb``) and ``placed_for`` the placement key (block swap args, activation bytes) it was placed for."""

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.diffusion_model = transformer
        self.swapper = None
        self.embed_swapper = None
        self.placed_for = None


class _PackPatcher(comfy.model_patcher.ModelPatcher):
    """A ModelPatcher for this pack's modules. ComfyUI's own loader moves a model module by module and leaves what
    does not fit on the offload device, which only works for comfy.ops layers; here ``_place`` puts the model on the
    device (whole, unless a subclass streams part of it) and the bytes it put there are the loaded size. Asked to
    free memory, ComfyUI unloads it whole (``partially_unload`` frees nothing)."""

    def current_loaded_device(self):
        return self.load_device if self.loaded_size() else self.offload_device

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        """ComfyUI's load: place the model on ``device_to`` (``extra_memory``: bytes ComfyUI lets it add there);
        returns the bytes added."""
        before = self.loaded_size()
        if before and not self._stale():
            return 0
        if before:
            self._release()
        self.model.model_loaded_weight_memory = self._place(device_to, before + extra_memory)
        return self.loaded_size() - before

    def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
        return 0

    def detach(self, unpatch_all=True):
        """ComfyUI's unload: back to the offload device (``unpatch_all`` False, as when a patcher is dropped or
        replaced by its clone: nothing moves)."""
        if unpatch_all and self.loaded_size():
            self._release()
            self.model.model_loaded_weight_memory = 0
        return self.model

    def _stale(self) -> bool:
        return False

    def _place(self, device: torch.device, budget: float) -> int:
        self.model.to(device)
        return self.model_size()

    def _release(self) -> None:
        self.model.to(self.offload_device)


class WanVideoPatcher(_PackPatcher):
    """WANVIDEOMODEL: the transformer under ComfyUI's model management. The sampler loads a per-run clone with
    ``load_models_gpu``, which places the transformer whole, or with its blocks streamed by the block swapper when
    ``block_swap_args`` are set (planned within ComfyUI's budget and what is free); it stays loaded after the run
    until ComfyUI needs the memory (``free_memory``, ``unload_all_models``, POST /free), which takes it back to the
    offload device. ``handle`` holds the transformer and its run options; ``activation_bytes`` is what the run keeps
    free for activations."""

    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        super().__init__(model, load_device, offload_device, size, weight_inplace_update)
        self.handle = None
        self.activation_bytes = 0

    @classmethod
    def wrap(cls, handle: pipeline.TransformerHandle, offload_device: torch.device) -> "WanVideoPatcher":
        patcher = cls(WanVideoModel(handle.model), _device("main_device"), offload_device)
        patcher.handle = handle
        return patcher

    def clone(self) -> "WanVideoPatcher":
        copy = super().clone()
        copy.handle, copy.activation_bytes = self.handle, self.activation_bytes
        return copy

    def with_block_swap(self, args) -> "WanVideoPatcher":
        copy = self.clone()
        copy.handle = self.handle.with_block_swap(args)
        return copy

    def for_run(self, activation_bytes: int) -> "WanVideoPatcher":
        copy = self.clone()
        copy.activation_bytes = activation_bytes
        return copy

    @property
    def model_type(self) -> str:
        return self.handle.model_type

    @property
    def request(self) -> pipeline.ModelRequest:
        return self.handle.request

    @property
    def loras(self):
        return self.handle.loras

    def _placement_key(self):
        args = self.handle.block_swap_args
        return (dict(args), self.activation_bytes) if args else None

    def _stale(self) -> bool:
        return self.model.placed_for != self._placement_key()

    def _place(self, device: torch.device, budget: float) -> int:
        transformer, args = self.model.diffusion_model, self.handle.block_swap_args
        self.model.placed_for = self._placement_key()
        if not args:
            return super()._place(device, budget)
        streamed = _streamed_embedders(transformer, args)
        others = [child for name, child in transformer.named_children()
                  if name != "blocks" and all(child is not m for m in streamed)]
        for child in others:
            child.to(device)
        resident = sum(comfy.model_management.module_size(child) for child in others)
        if streamed:
            embedders = torch.nn.ModuleList(streamed)
            self.model.embed_swapper = BlockSwapper.attach(embedders, SwapPlan(
                swapped=tuple(range(len(streamed))), num_blocks=len(streamed), prefetch=0, overlap=False), device)
            resident += self.model.embed_swapper.slot_bytes
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else \
            comfy.model_management.get_free_memory(device)
        free = max(0, int(min(free, budget - resident + self.activation_bytes)))
        plan = plan_block_swap(args, [block_nbytes(b) for b in transformer.blocks], free, self.activation_bytes)
        if not plan.swapped:
            transformer.blocks.to(device)
            return resident + comfy.model_management.module_size(transformer.blocks)
        self.model.swapper = BlockSwapper.attach(transformer.blocks, plan, device)
        return resident + plan.weight_vram_bytes

    def _release(self) -> None:
        swappers = [s for s in (self.model.swapper, self.model.embed_swapper) if s is not None]
        self.model.swapper = self.model.embed_swapper = self.model.placed_for = None
        if not swappers:
            super()._release()
            return
        for swapper in swappers:
            swapper.detach()
        self.model.diffusion_model.to(self.offload_device)


def _streamed_embedders(transformer: torch.nn.Module, args) -> list[torch.nn.Module]:
    """The embedders block-swap ``args`` keep in host memory, streamed to the device for each call: the text
    embedder (``offload_txt_emb``) and the CLIP-image projection (``offload_img_emb``)."""
    chosen = (("text_embedding", "offload_txt_emb"), ("img_emb", "offload_img_emb"))
    return [getattr(transformer, name) for name, key in chosen if args.get(key) and hasattr(transformer, name)]


class _ManagedTextEncoder:
    """WANTEXTENCODER["model"]: the umT5 encoder under ComfyUI's model management. Calling it (prompts -> list of
    [L_i, dim] embeddings) first loads it through ComfyUI, which frees room for it; ComfyUI unloads it to the offload
    device when another model needs the memory."""

    def __init__(self, encoder, offload_device: torch.device):
        self.encoder = encoder
        self.patcher = _PackPatcher(encoder.model, _device("main_device"), offload_device)

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.dtype

    def __call__(self, prompts):
        comfy.model_management.load_models_gpu([self.patcher])
        return self.encoder(prompts)


def _managed(module: torch.nn.Module, offload_device: torch.device) -> torch.nn.Module:
    """``module`` with a ModelPatcher as ``module.patcher`` (made once, like ComfyUI's own VAE holds its patcher), so
    ComfyUI loads it to the main device and unloads it to ``offload_device`` like its own models."""
    if not isinstance(getattr(module, "patcher", None), _PackPatcher):
        module.patcher = _PackPatcher(module, _device("main_device"), offload_device)
    return module


def _managed_vae(vae):
    """The VAE under ComfyUI's model management (offloaded to ComfyUI's VAE offload device)."""
    return _managed(vae, comfy.model_management.vae_offload_device())


def _unload(patcher: _PackPatcher) -> None:
    """Take one of this pack's models out of ComfyUI's loaded list and back to its offload device."""
    loaded = comfy.model_management.current_loaded_models
    entry = next((i for i, m in enumerate(loaded) if m.model is patcher), None)
    if entry is None:
        patcher.detach()
    else:
        loaded.pop(entry).model_unload()
    comfy.model_management.soft_empty_cache()


@contextmanager
def _placed(patcher: WanVideoPatcher, vae, tokens: int, passes: int, force_offload: bool):
    """The transformer and the VAE on the device for one run, through ComfyUI's model management: it unloads other
    models until the weights and the activations of ``tokens`` x ``passes`` fit (or as far as it can), then places
    both (the transformer whole or block-swapped). They stay loaded afterwards, and ComfyUI unloads them when
    another model needs the memory; the swapper lets go of its ring slots, and with ``force_offload`` both are
    unloaded right away so other nodes get the VRAM."""
    config = patcher.handle.model.config
    run = patcher.for_run(estimate_activation_bytes(tokens, config.dim, config.ffn_dim, batch=passes))
    vae_patcher = _managed_vae(vae).patcher
    comfy.model_management.load_models_gpu([run, vae_patcher], memory_required=run.activation_bytes)
    try:
        yield run.model.diffusion_model
    finally:
        if run.model.swapper is not None:
            run.model.swapper.release()
        if force_offload:
            _unload(run)
            _unload(vae_patcher)


def _previewer():
    """ComfyUI's latent previewer for Wan 2.1 latents (None unless the server was started with a preview method)."""
    return latent_preview.get_previewer(_device("main_device"), comfy.latent_formats.Wan21())


def _preview_hook(bar, previewer):
    """The loop's ``on_preview``: the step's x0 [16, T_lat, h, w] -> a preview of its last latent frame (the one
    furthest from the reference), sent with the progress bar's value as ComfyUI's preview image."""
    if previewer is None:
        return None

    def on_preview(window: int, step: int, x0: torch.Tensor) -> None:
        bar.update_absolute(bar.current, bar.total, previewer.decode_latent_to_preview_image("JPEG", x0[None, :, -1:]))

    return on_preview


def _run_loop(patcher: WanVideoPatcher, image_embeds: dict, inputs, settings: SamplerSettings, force_offload: bool):
    mm = _model_management()
    device = mm.get_torch_device()
    vae = image_embeds["vae"]
    output_path = image_embeds.get("output_path") or ""
    sink = PngSink(Path(output_path)) if output_path else MemorySink()
    bar = _progress(1)

    def on_step(window, step, steps, windows):
        bar.update_absolute(window * steps + step + 1, windows * steps)

    callbacks = LoopCallbacks(on_step=on_step, interrupted=mm.processing_interrupted,
                              on_preview=_preview_hook(bar, _previewer()),
                              before_model=patcher.loras.set_step if patcher.loras else None)
    _, lat_t, lat_h, lat_w = image_embeds["target_shape"]
    passes = 3 if settings.batched_cfg else 1
    with _placed(patcher, vae, lat_t * (lat_h // 2) * (lat_w // 2), passes, force_offload) as transformer:
        InfiniteTalkLoop(transformer, vae, settings, device).run(inputs, sink, callbacks)
    frames = sink.result()
    video = torch.zeros(1, 64, 64, 3) if frames is None else frames * 2 - 1
    result = {"video": video, "output_path": output_path}
    return (result, result)


class WanVideoPassImagesFromSamples:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT", _tip("The InfiniteTalk sampler's output."))}}

    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("images", "output_path")
    FUNCTION = "decode"
    CATEGORY = CATEGORY
    DESCRIPTION = "The frames the InfiniteTalk sampler already decoded, as an IMAGE batch."

    def decode(self, samples):
        if "video" not in samples:
            raise ValueError("WanVideo Pass Images From Samples: these samples hold no decoded video; connect the "
                             "InfiniteTalk sampler's output, or use WanVideo Decode for latents")
        return ((samples["video"].clamp(-1, 1) + 1) / 2, samples.get("output_path", ""))



NODE_CLASS_MAPPINGS = {
    "WanVideoModelLoader": WanVideoModelLoader,
    "MultiTalkModelLoader": MultiTalkModelLoader,
    "WanVideoSetBlockSwap": WanVideoSetBlockSwap,
    "WanVideoVAELoader": WanVideoVAELoader,
    "LoadWanVideoT5TextEncoder": LoadWanVideoT5TextEncoder,
    "WanVideoTextEncode": WanVideoTextEncode,
    "WanVideoTextEncodeCached": WanVideoTextEncodeCached,
    "WanVideoTextEmbedBridge": WanVideoTextEmbedBridge,
    "LoadWanVideoClipTextEncoder": LoadWanVideoClipTextEncoder,
    "WanVideoClipVisionEncode": WanVideoClipVisionEncode,
    "WanVideoDecode": WanVideoDecode,
    "WanVideoEncode": WanVideoEncode,
    "DownloadAndLoadWav2VecModel": DownloadAndLoadWav2VecModel,
    "Wav2VecModelLoader": Wav2VecModelLoader,
    "MultiTalkWav2VecEmbeds": MultiTalkWav2VecEmbeds,
    "MultiTalkSilentEmbeds": MultiTalkSilentEmbeds,
    "WanVideoImageToVideoMultiTalk": WanVideoImageToVideoMultiTalk,
    "WanVideoSampler": WanVideoSampler,
    "WanVideoPassImagesFromSamples": WanVideoPassImagesFromSamples,
    "WanVideoBlockSwap": WanVideoBlockSwap,
    "WanVideoEnhancedBlockSwap": WanVideoEnhancedBlockSwap,
    "WanVideoTorchCompileSettings": WanVideoTorchCompileSettings,
    "WanVideoLoraSelect": WanVideoLoraSelect,
    "WanVideoLoraSelectMulti": WanVideoLoraSelectMulti,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "WanVideoModelLoader": "WanVideo Model Loader",
    "MultiTalkModelLoader": "Multi/InfiniteTalk Model Loader",
    "WanVideoSetBlockSwap": "WanVideo Set BlockSwap",
    "WanVideoVAELoader": "WanVideo VAE Loader",
    "LoadWanVideoT5TextEncoder": "WanVideo T5 Text Encoder Loader",
    "WanVideoTextEncode": "WanVideo TextEncode",
    "WanVideoTextEncodeCached": "WanVideo TextEncode Cached",
    "WanVideoTextEmbedBridge": "WanVideo TextEmbed Bridge",
    "LoadWanVideoClipTextEncoder": "WanVideo CLIP Vision Loader",
    "WanVideoClipVisionEncode": "WanVideo ClipVision Encode",
    "WanVideoDecode": "WanVideo Decode",
    "WanVideoEncode": "WanVideo Encode",
    "DownloadAndLoadWav2VecModel": "(Down)load Wav2Vec Model",
    "Wav2VecModelLoader": "Wav2vec2 Model Loader",
    "MultiTalkWav2VecEmbeds": "Multi/InfiniteTalk Wav2vec2 Embeds",
    "MultiTalkSilentEmbeds": "MultiTalk Silent Embeds",
    "WanVideoImageToVideoMultiTalk": "WanVideo Long I2V Multi/InfiniteTalk",
    "WanVideoSampler": "WanVideo Sampler",
    "WanVideoPassImagesFromSamples": "WanVideo Pass Images From Samples",
    "WanVideoBlockSwap": "WanVideo Block Swap",
    "WanVideoEnhancedBlockSwap": "WanVideo Enhanced BlockSwap",
    "WanVideoTorchCompileSettings": "WanVideo Torch Compile Settings",
    "WanVideoLoraSelect": "WanVideo Lora Select",
    "WanVideoLoraSelectMulti": "WanVideo Lora Select Multi",
}
