"""InfiniteTalk / MultiTalk: audio adapter, wav2vec2 audio features and the long-video window loop.

Imports ``wanvideo``, ``attention`` and ``fp8_optimization``; never ComfyUI.
"""
