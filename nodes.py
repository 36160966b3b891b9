"""ComfyUI nodes: thin adapters from widgets and sockets to the pack's core.

Class names, input names, widget order, defaults and return types equal those of the WanVideoWrapper pack so existing
workflow files load unchanged. Each node turns its inputs into core arguments, makes one core call and wraps the
result. No tensor math lives here apart from named socket-format conversions.
"""
from __future__ import annotations

import folder_paths

CATEGORY = "WanVideoWrapper"


def _tip(text: str, **config) -> dict:
    return {"tooltip": text, **config}


class WanVideoBlockSwap:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "blocks_to_swap": ("INT", _tip("Transformer blocks kept in host RAM and streamed to the GPU for "
                                               "their forward pass.", default=20, min=0, max=48, step=1)),
                "offload_img_emb": ("BOOLEAN", _tip("Keep the CLIP image embedder in host RAM.", default=False)),
                "offload_txt_emb": ("BOOLEAN", _tip("Keep the text embedder in host RAM.", default=False)),
            },
            "optional": {
                "use_non_blocking": ("BOOLEAN", _tip("Asynchronous copies (always on with pinned memory).",
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
                "offload_txt_emb": ("BOOLEAN", _tip("Keep the text embedder in host RAM.", default=False)),
                "offload_img_emb": ("BOOLEAN", _tip("Keep the CLIP image embedder in host RAM.", default=False)),
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


NODE_CLASS_MAPPINGS = {
    "WanVideoBlockSwap": WanVideoBlockSwap,
    "WanVideoEnhancedBlockSwap": WanVideoEnhancedBlockSwap,
    "WanVideoTorchCompileSettings": WanVideoTorchCompileSettings,
    "WanVideoLoraSelect": WanVideoLoraSelect,
    "WanVideoLoraSelectMulti": WanVideoLoraSelectMulti,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "WanVideoBlockSwap": "WanVideo Block Swap",
    "WanVideoEnhancedBlockSwap": "WanVideo Enhanced BlockSwap",
    "WanVideoTorchCompileSettings": "WanVideo Torch Compile Settings",
    "WanVideoLoraSelect": "WanVideo Lora Select",
    "WanVideoLoraSelectMulti": "WanVideo Lora Select Multi",
}
