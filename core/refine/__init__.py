"""U-Net refinement of prototype heatmaps (thesis §3.7)."""
