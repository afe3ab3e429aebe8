"""U-Net refinement of prototype heatmaps (thesis §3.7; docs/refine.md).

model    the shallow U-Net, its settings (RefineConfig), its inputs (RefineSample) and a trained Refiner
train    combo loss, threshold choice, ``train_unet`` with early stopping and epoch reports
loo      leave one stack out (the thesis's Table 4.3 protocol)
files    the model file: ``save_refiner`` / ``load_refiner`` / ``read_refiner_metadata`` (safetensors + JSON)
samples  RefineSamples from stacks through a prototype (one ScoreWindow per stack and prototype)
apply    ``refine_stack``: a trained refiner over the slices of a stack (the CLI's and the app's one loop)
"""
