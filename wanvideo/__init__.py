"""Wan2.1 video models and pipeline parts: transformer, VAE, text and vision encoders, schedulers, sampling loop.

Imports only torch, the pack's kernel modules (``attention``, ``fp8_optimization``) and field libraries; never ComfyUI.
"""
