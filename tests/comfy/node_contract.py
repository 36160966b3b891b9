"""The node-interface contract (shared/spec/workflow-spec.md §2, §4), written out independently of nodes.py.

Every node of the spec is registered (``test_every_contract_node_is_registered``). Additions beyond upstream are
appended only: the FP4 quantization and SageAttention 3 choices, the sampler's four extra booleans, the wav2vec2
input of MultiTalkSilentEmbeds (it computes the silence features), and two extra nodes (CLIP loader, text-embeds
bridge).

Each node: display name, category, inputs in declaration order as (section, name, type, config), outputs and their
names. ``type`` is a socket/widget type string or a list of choices; ``config`` holds the keys that must match
(default, min, max, step). Choice lists are extended only by appending.
"""

QUANTIZATION = ["disabled", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e4m3fn_scaled", "fp8_e4m3fn_scaled_fast",
                "fp8_e5m2", "fp8_e5m2_fast", "fp8_e5m2_scaled", "fp8_e5m2_scaled_fast",
                "fp4_experimental", "fp4_scaled", "fp4_scaled_fast"]
ATTENTION = ["sdpa", "flash_attn_2", "flash_attn_3", "sageattn", "sageattn_3", "radial_sage_attention",
             "sageattn_compiled", "sageattn_ultravico", "comfy", "sageattn_3_fp4", "sageattn_3_fp8"]
SCHEDULERS = ["unipc", "unipc/beta", "dpm++", "dpm++/beta", "dpm++_sde", "dpm++_sde/beta", "euler", "euler/beta",
              "longcat_distill_euler", "deis", "lcm", "lcm/beta", "res_multistep", "er_sde", "flowmatch_causvid",
              "flowmatch_distill", "flowmatch_pusa", "multitalk", "sa_ode_stable", "rcm", "vibt_unipc"]
COLORMATCH = ["disabled", "mkl", "hm", "reinhard", "mvgd", "hm-mvgd-hm", "hm-mkl-hm"]
DEVICES = ["main_device", "offload_device"]
MODEL_FILES = "MODEL_FILES"   # a COMBO of model file names; its entries depend on the models folder
BOOL_F = {"default": False}
BOOL_T = {"default": True}


def _int(default, lo, hi, step=1):
    return {"default": default, "min": lo, "max": hi, "step": step}


def _float(default, lo, hi, step):
    return {"default": default, "min": lo, "max": hi, "step": step}


CONTRACT = {
    "WanVideoModelLoader": ("WanVideo Model Loader", "WanVideoWrapper", [
        ("required", "model", MODEL_FILES, {}),
        ("required", "base_precision", ["fp32", "bf16", "fp16", "fp16_fast"], {"default": "bf16"}),
        ("required", "quantization", QUANTIZATION, {"default": "disabled"}),
        ("required", "load_device", DEVICES, {"default": "offload_device"}),
        ("optional", "attention_mode", ATTENTION, {"default": "sdpa"}),
        ("optional", "compile_args", "WANCOMPILEARGS", {}),
        ("optional", "block_swap_args", "BLOCKSWAPARGS", {}),
        ("optional", "lora", "WANVIDLORA", {}),
        ("optional", "vram_management_args", "VRAM_MANAGEMENTARGS", {}),
        ("optional", "extra_model", "VACEPATH", {}),
        ("optional", "fantasytalking_model", "FANTASYTALKINGMODEL", {}),
        ("optional", "multitalk_model", "MULTITALKMODEL", {}),
        ("optional", "fantasyportrait_model", "FANTASYPORTRAITMODEL", {}),
        ("optional", "rms_norm_function", ["default", "pytorch"], {"default": "default"}),
    ], ["WANVIDEOMODEL"], ["model"]),
    "MultiTalkModelLoader": ("Multi/InfiniteTalk Model Loader", "WanVideoWrapper", [
        ("required", "model", MODEL_FILES, {}),
    ], ["MULTITALKMODEL"], ["model"]),
    "WanVideoBlockSwap": ("WanVideo Block Swap", "WanVideoWrapper", [
        ("required", "blocks_to_swap", "INT", _int(20, 0, 48)),
        ("required", "offload_img_emb", "BOOLEAN", BOOL_F),
        ("required", "offload_txt_emb", "BOOLEAN", BOOL_F),
        ("optional", "use_non_blocking", "BOOLEAN", BOOL_F),
        ("optional", "vace_blocks_to_swap", "INT", _int(0, 0, 15)),
        ("optional", "prefetch_blocks", "INT", _int(0, 0, 40)),
        ("optional", "block_swap_debug", "BOOLEAN", BOOL_F),
    ], ["BLOCKSWAPARGS"], ["block_swap_args"]),
    "WanVideoEnhancedBlockSwap": ("WanVideo Enhanced BlockSwap", "WanVideoWrapper/Enhanced", [
        ("optional", "blocks_to_swap", "INT", _int(0, 0, 40)),
        ("optional", "enable_cuda_optimization", "BOOLEAN", BOOL_T),
        ("optional", "enable_dram_optimization", "BOOLEAN", BOOL_T),
        ("optional", "auto_hardware_tuning", "BOOLEAN", BOOL_T),
        ("optional", "vram_threshold_percent", "FLOAT", _float(50.0, 30.0, 90.0, 5.0)),
        ("optional", "num_cuda_streams", "INT", _int(8, 1, 16)),
        ("optional", "bandwidth_target", "FLOAT", _float(0.8, 0.1, 1.0, 0.1)),
        ("optional", "offload_txt_emb", "BOOLEAN", BOOL_F),
        ("optional", "offload_img_emb", "BOOLEAN", BOOL_F),
        ("optional", "vace_blocks_to_swap", "INT", _int(0, 0, 15)),
        ("optional", "debug_mode", "BOOLEAN", BOOL_F),
    ], ["BLOCKSWAPARGS"], ["enhanced_block_swap_args"]),
    "WanVideoSetBlockSwap": ("WanVideo Set BlockSwap", "WanVideoWrapper", [
        ("required", "model", "WANVIDEOMODEL", {}),
        ("optional", "block_swap_args", "BLOCKSWAPARGS", {}),
    ], ["WANVIDEOMODEL"], ["model"]),
    "WanVideoTorchCompileSettings": ("WanVideo Torch Compile Settings", "WanVideoWrapper", [
        ("required", "backend", ["inductor", "cudagraphs"], {"default": "inductor"}),
        ("required", "fullgraph", "BOOLEAN", BOOL_F),
        ("required", "mode", ["default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead"],
         {"default": "default"}),
        ("required", "dynamic", "BOOLEAN", BOOL_F),
        ("required", "dynamo_cache_size_limit", "INT", _int(64, 0, 1024)),
        ("required", "compile_transformer_blocks_only", "BOOLEAN", BOOL_T),
        ("optional", "dynamo_recompile_limit", "INT", _int(128, 0, 1024)),
        ("optional", "force_parameter_static_shapes", "BOOLEAN", BOOL_F),
        ("optional", "allow_unmerged_lora_compile", "BOOLEAN", BOOL_F),
    ], ["WANCOMPILEARGS"], ["torch_compile_args"]),
    "WanVideoLoraSelect": ("WanVideo Lora Select", "WanVideoWrapper", [
        ("required", "lora", MODEL_FILES, {}),
        ("required", "strength", "FLOAT", _float(1.0, -1000.0, 1000.0, 0.0001)),
        ("optional", "prev_lora", "WANVIDLORA", {}),
        ("optional", "blocks", "SELECTEDBLOCKS", {}),
        ("optional", "low_mem_load", "BOOLEAN", BOOL_F),
        ("optional", "merge_loras", "BOOLEAN", BOOL_T),
    ], ["WANVIDLORA"], ["lora"]),
    "WanVideoLoraSelectMulti": ("WanVideo Lora Select Multi", "WanVideoWrapper", [
        *[item for i in range(5) for item in (
            ("required", f"lora_{i}", MODEL_FILES, {"default": "none"}),
            ("required", f"strength_{i}", "FLOAT", _float(1.0, -10.0, 10.0, 0.0001)))],
        ("optional", "prev_lora", "WANVIDLORA", {}),
        ("optional", "blocks", "SELECTEDBLOCKS", {}),
        ("optional", "low_mem_load", "BOOLEAN", BOOL_F),
        ("optional", "merge_loras", "BOOLEAN", BOOL_T),
    ], ["WANVIDLORA"], ["lora"]),
    "WanVideoVAELoader": ("WanVideo VAE Loader", "WanVideoWrapper", [
        ("required", "model_name", MODEL_FILES, {}),
        ("optional", "precision", ["fp16", "fp32", "bf16"], {"default": "bf16"}),
        ("optional", "compile_args", "WANCOMPILEARGS", {}),
        ("optional", "use_cpu_cache", "BOOLEAN", BOOL_F),
        ("optional", "verbose", "BOOLEAN", BOOL_F),
    ], ["WANVAE"], ["vae"]),
    "LoadWanVideoT5TextEncoder": ("WanVideo T5 Text Encoder Loader", "WanVideoWrapper", [
        ("required", "model_name", MODEL_FILES, {}),
        ("required", "precision", ["fp32", "bf16"], {"default": "bf16"}),
        ("optional", "load_device", DEVICES, {"default": "offload_device"}),
        ("optional", "quantization", ["disabled", "fp8_e4m3fn"], {"default": "disabled"}),
    ], ["WANTEXTENCODER"], ["wan_t5_model"]),
    "WanVideoTextEncode": ("WanVideo TextEncode", "WanVideoWrapper", [
        ("required", "positive_prompt", "STRING", {"default": ""}),
        ("required", "negative_prompt", "STRING", {"default": ""}),
        ("optional", "t5", "WANTEXTENCODER", {}),
        ("optional", "force_offload", "BOOLEAN", BOOL_T),
        ("optional", "model_to_offload", "WANVIDEOMODEL", {}),
        ("optional", "use_disk_cache", "BOOLEAN", BOOL_F),
        ("optional", "device", ["gpu", "cpu"], {"default": "gpu"}),
    ], ["WANVIDEOTEXTEMBEDS"], ["text_embeds"]),
    "WanVideoTextEncodeCached": ("WanVideo TextEncode Cached", "WanVideoWrapper", [
        ("required", "model_name", MODEL_FILES, {}),
        ("required", "precision", ["fp32", "bf16"], {"default": "bf16"}),
        ("required", "positive_prompt", "STRING", {"default": ""}),
        ("required", "negative_prompt", "STRING", {"default": ""}),
        ("required", "quantization", ["disabled", "fp8_e4m3fn"], {"default": "disabled"}),
        ("required", "use_disk_cache", "BOOLEAN", BOOL_T),
        ("required", "device", ["gpu", "cpu"], {"default": "gpu"}),
        ("optional", "extender_args", "WANVIDEOPROMPTEXTENDER_ARGS", {}),
    ], ["WANVIDEOTEXTEMBEDS", "WANVIDEOTEXTEMBEDS", "STRING"],
        ["text_embeds", "negative_text_embeds", "positive_prompt"]),
    "WanVideoClipVisionEncode": ("WanVideo ClipVision Encode", "WanVideoWrapper", [
        ("required", "clip_vision", "CLIP_VISION", {}),
        ("required", "image_1", "IMAGE", {}),
        ("required", "strength_1", "FLOAT", _float(1.0, 0.0, 10.0, 0.001)),
        ("required", "strength_2", "FLOAT", _float(1.0, 0.0, 10.0, 0.001)),
        ("required", "crop", ["center", "disabled"], {"default": "center"}),
        ("required", "combine_embeds", ["average", "sum", "concat", "batch"], {"default": "average"}),
        ("required", "force_offload", "BOOLEAN", BOOL_T),
        ("optional", "image_2", "IMAGE", {}),
        ("optional", "negative_image", "IMAGE", {}),
        ("optional", "tiles", "INT", _int(0, 0, 16, 2)),
        ("optional", "ratio", "FLOAT", _float(0.5, 0.0, 1.0, 0.01)),
    ], ["WANVIDIMAGE_CLIPEMBEDS"], ["image_embeds"]),
    "WanVideoDecode": ("WanVideo Decode", "WanVideoWrapper", [
        ("required", "vae", "WANVAE", {}),
        ("required", "samples", "LATENT", {}),
        ("required", "enable_vae_tiling", "BOOLEAN", BOOL_F),
        ("required", "tile_x", "INT", _int(272, 40, 2048, 8)),
        ("required", "tile_y", "INT", _int(272, 40, 2048, 8)),
        ("required", "tile_stride_x", "INT", _int(144, 32, 2040, 8)),
        ("required", "tile_stride_y", "INT", _int(128, 32, 2040, 8)),
        ("optional", "normalization", ["default", "minmax", "none"], {"default": "default"}),
    ], ["IMAGE"], ["images"]),
    "WanVideoEncode": ("WanVideo Encode", "WanVideoWrapper", [
        ("required", "vae", "WANVAE", {}),
        ("required", "image", "IMAGE", {}),
        ("required", "enable_vae_tiling", "BOOLEAN", BOOL_F),
        ("required", "tile_x", "INT", _int(272, 64, 2048, 1)),
        ("required", "tile_y", "INT", _int(272, 64, 2048, 1)),
        ("required", "tile_stride_x", "INT", _int(144, 32, 2048, 32)),
        ("required", "tile_stride_y", "INT", _int(128, 32, 2048, 32)),
        ("optional", "noise_aug_strength", "FLOAT", _float(0.0, 0.0, 10.0, 0.001)),
        ("optional", "latent_strength", "FLOAT", _float(1.0, 0.0, 10.0, 0.001)),
        ("optional", "mask", "MASK", {}),
    ], ["LATENT"], ["samples"]),
    "DownloadAndLoadWav2VecModel": ("(Down)load Wav2Vec Model", "WanVideoWrapper", [
        ("required", "model", ["TencentGameMate/chinese-wav2vec2-base", "facebook/wav2vec2-base-960h"], {}),
        ("required", "base_precision", ["fp32", "bf16", "fp16"], {"default": "fp16"}),
        ("required", "load_device", DEVICES, {"default": "main_device"}),
    ], ["WAV2VECMODEL"], ["wav2vec_model"]),
    "Wav2VecModelLoader": ("Wav2vec2 Model Loader", "WanVideoWrapper", [
        ("required", "model", MODEL_FILES, {}),
        ("required", "base_precision", ["fp32", "bf16", "fp16"], {"default": "fp16"}),
        ("required", "load_device", DEVICES, {"default": "main_device"}),
    ], ["WAV2VECMODEL"], ["wav2vec_model"]),
    "MultiTalkWav2VecEmbeds": ("Multi/InfiniteTalk Wav2vec2 Embeds", "WanVideoWrapper", [
        ("required", "wav2vec_model", "WAV2VECMODEL", {}),
        ("required", "audio_1", "AUDIO", {}),
        ("required", "normalize_loudness", "BOOLEAN", BOOL_T),
        ("required", "num_frames", "INT", _int(81, 1, 10000)),
        ("required", "fps", "FLOAT", _float(25.0, 1.0, 60.0, 0.1)),
        ("required", "audio_scale", "FLOAT", _float(1.0, 0.0, 100.0, 0.01)),
        ("required", "audio_cfg_scale", "FLOAT", _float(1.0, 0.0, 100.0, 0.01)),
        ("required", "multi_audio_type", ["para", "add"], {"default": "para"}),
        ("optional", "audio_2", "AUDIO", {}),
        ("optional", "audio_3", "AUDIO", {}),
        ("optional", "audio_4", "AUDIO", {}),
        ("optional", "ref_target_masks", "MASK", {}),
        ("optional", "add_noise_floor", "BOOLEAN", BOOL_F),
        ("optional", "smooth_transients", "BOOLEAN", BOOL_F),
    ], ["MULTITALK_EMBEDS", "AUDIO", "INT"], ["multitalk_embeds", "audio", "num_frames"]),
    "MultiTalkSilentEmbeds": ("MultiTalk Silent Embeds", "WanVideoWrapper", [
        ("required", "num_frames", "INT", _int(81, 1, 10000)),
        ("optional", "wav2vec_model", "WAV2VECMODEL", {}),
    ], ["MULTITALK_EMBEDS"], ["multitalk_embeds"]),
    "WanVideoImageToVideoMultiTalk": ("WanVideo Long I2V Multi/InfiniteTalk", "WanVideoWrapper", [
        ("required", "vae", "WANVAE", {}),
        ("required", "width", "INT", _int(832, 64, 2048, 8)),
        ("required", "height", "INT", _int(480, 64, 29048, 8)),
        ("required", "frame_window_size", "INT", _int(81, 1, 10000, 4)),
        ("required", "motion_frame", "INT", _int(25, 1, 10000)),
        ("required", "force_offload", "BOOLEAN", BOOL_F),
        ("required", "colormatch", COLORMATCH, {"default": "disabled"}),
        ("optional", "start_image", "IMAGE", {}),
        ("optional", "tiled_vae", "BOOLEAN", BOOL_F),
        ("optional", "clip_embeds", "WANVIDIMAGE_CLIPEMBEDS", {}),
        ("optional", "mode", ["auto", "multitalk", "infinitetalk"], {"default": "auto"}),
        ("optional", "output_path", "STRING", {"default": ""}),
    ], ["WANVIDIMAGE_EMBEDS", "STRING"], ["image_embeds", "output_path"]),
    "WanVideoSampler": ("WanVideo Sampler", "WanVideoWrapper", [
        ("required", "model", "WANVIDEOMODEL", {}),
        ("required", "image_embeds", "WANVIDIMAGE_EMBEDS", {}),
        ("required", "steps", "INT", {"default": 30, "min": 1}),
        ("required", "cfg", "FLOAT", _float(6.0, 0.0, 30.0, 0.01)),
        ("required", "shift", "FLOAT", _float(5.0, 0.0, 1000.0, 0.01)),
        ("required", "seed", "INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff}),
        ("required", "force_offload", "BOOLEAN", BOOL_T),
        ("required", "scheduler", SCHEDULERS, {"default": "unipc"}),
        ("required", "riflex_freq_index", "INT", _int(0, 0, 1000)),
        ("optional", "text_embeds", "WANVIDEOTEXTEMBEDS", {}),
        ("optional", "samples", "LATENT", {}),
        ("optional", "denoise_strength", "FLOAT", _float(1.0, 0.0, 1.0, 0.01)),
        ("optional", "feta_args", "FETAARGS", {}),
        ("optional", "context_options", "WANVIDCONTEXT", {}),
        ("optional", "cache_args", "CACHEARGS", {}),
        ("optional", "flowedit_args", "FLOWEDITARGS", {}),
        ("optional", "batched_cfg", "BOOLEAN", BOOL_F),
        ("optional", "slg_args", "SLGARGS", {}),
        ("optional", "rope_function", ["default", "comfy", "comfy_chunked"], {"default": "comfy"}),
        ("optional", "loop_args", "LOOPARGS", {}),
        ("optional", "experimental_args", "EXPERIMENTALARGS", {}),
        ("optional", "sigmas", "SIGMAS", {}),
        ("optional", "unianimate_poses", "UNIANIMATE_POSE", {}),
        ("optional", "fantasytalking_embeds", "FANTASYTALKING_EMBEDS", {}),
        ("optional", "uni3c_embeds", "UNI3C_EMBEDS", {}),
        ("optional", "multitalk_embeds", "MULTITALK_EMBEDS", {}),
        ("optional", "freeinit_args", "FREEINITARGS", {}),
        ("optional", "start_step", "INT", _int(0, 0, 10000)),
        ("optional", "end_step", "INT", _int(-1, -1, 10000)),
        ("optional", "add_noise_to_samples", "BOOLEAN", BOOL_F),
        ("optional", "force_contiguous_tensors", "BOOLEAN", BOOL_F),
        ("optional", "use_tf32", "BOOLEAN", BOOL_F),
        ("optional", "use_cublas_gemm", "BOOLEAN", BOOL_F),
        ("optional", "fuse_qkv_projections", "BOOLEAN", BOOL_F),
    ], ["LATENT", "LATENT"], ["samples", "denoised_samples"]),
    "LoadWanVideoClipTextEncoder": ("WanVideo CLIP Vision Loader", "WanVideoWrapper", [
        ("required", "model_name", MODEL_FILES, {}),
        ("required", "precision", ["fp16", "fp32", "bf16"], {"default": "fp16"}),
        ("optional", "load_device", DEVICES, {"default": "offload_device"}),
    ], ["CLIP_VISION"], ["wan_clip_vision"]),
    "WanVideoTextEmbedBridge": ("WanVideo TextEmbed Bridge", "WanVideoWrapper", [
        ("required", "positive", "CONDITIONING", {}),
        ("optional", "negative", "CONDITIONING", {}),
    ], ["WANVIDEOTEXTEMBEDS"], ["text_embeds"]),
    "WanVideoPassImagesFromSamples": ("WanVideo Pass Images From Samples", "WanVideoWrapper", [
        ("required", "samples", "LATENT", {}),
    ], ["IMAGE", "STRING"], ["images", "output_path"]),
}
