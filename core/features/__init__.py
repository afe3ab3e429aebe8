"""Patch and pixel features: the backbone registry (``registry``: names and facts, no torch), loading the
backbones (``backbones``: DINOv2 ViTs, ``filterbank``), slice embedding with its in-memory memo
(``embedding``) and the on-disk cache (``embedding_cache``)."""
