"""Patch and pixel features: the backbone registry (DINOv2 ViTs, filter bank), slice embedding, its cache."""
