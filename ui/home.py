"""The home page's actions: open a sample (demo, path inside the data root, upload), set channels and truth."""

from __future__ import annotations

from pathlib import Path

from core.features.backbones import BACKBONES
from core.config import PipelineConfig, parse_option_assignments
from core.demo import ensure_demo
from core.errors import ProtoscopeError, StackError
from core.features.embedding import check_slice_size
from core.io import Stack
from core.io.channels import channel_label, default_image_channel, guess_truth_channel
from core.thresholds import ThresholdSpec
from ui import resources, settings, state
from ui.state import Sample, Truth

SOURCES = ("Synthetic demo", "File in the data root", "Upload a small file")
MODES = {
    "best": "best (recommended): pixel classifier on filter features, calibrated threshold",
    "thesis": "thesis: reproduces the thesis (patch cosine, top 10 %)",
}
TRUTH_KINDS = ("None", "A channel of this stack", "A mask file")
WEIGHT_KINDS = {"hub": "Hugging Face hub (cached)", "path": "Local weights (folder or .pth)", "random": "Random (timing only)"}


def open_sample(path: str | Path, origin: str, name: str | None = None) -> Sample:
    """Open a stack (checks it is readable and large enough), make it the session's sample and pick default
    channels by name (core.io.channels): the image channel, and a ground-truth channel when one is named so."""
    path = Path(path).resolve()
    stack = resources.open_cached_stack(path)
    check_slice_size(stack.shape, f"'{stack.name}'")  # a 1 x 1 image fails here, not minutes later
    sample = Sample(str(path), origin, name or path.name)
    state.put("home.sample", sample)
    channel = 0 if origin == "demo" else default_image_channel(stack)
    state.set_bound("home.channel", channel)
    truth_channel = guess_truth_channel(stack.channel_names, image_channel=channel)
    truth = Truth(channel=truth_channel) if truth_channel is not None else None
    state.put("home.truth", truth)
    state.set_bound("home.truth_kind", TRUTH_KINDS[1] if truth is not None else TRUTH_KINDS[0])
    state.set_bound("home.truth_channel", truth_channel if truth is not None else default_truth_channel(stack, channel))
    return sample


def channel_labeller(stack: Stack):
    """format_func of a channel picker: 1 -> '1 · Vessels'."""
    return lambda c: channel_label(stack, c)


def default_truth_channel(stack: Stack, image_channel: int) -> int:
    """Where the ground-truth channel picker starts: the channel named like a truth, else the first other one."""
    found = guess_truth_channel(stack.channel_names, image_channel=image_channel)
    if found is not None:
        return found
    return next((c for c in range(stack.shape[1]) if c != image_channel), 0)


def truth_setting(stack: Stack) -> Truth | None:
    """The ground truth the stored settings describe (kind, channel, image channel); None when there is none or
    it would be the image channel itself. A mask file stays as it was chosen (its button sets it)."""
    kind = state.get("home.truth_kind", TRUTH_KINDS[0])
    if kind == TRUTH_KINDS[1]:
        image = stack.resolve_channel(state.get("home.channel", 0))
        channel = state.get("home.truth_channel")
        if channel is None or not 0 <= int(channel) < stack.shape[1] or int(channel) == image:
            return None
        return Truth(channel=int(channel))
    if kind == TRUTH_KINDS[2]:
        truth = state.get("home.truth")
        return truth if truth is not None and truth.path is not None else None
    return None


def on_channel_setting_change(key: str) -> None:
    """on_change of the image channel, truth kind and truth channel pickers: store the value and update the
    ground truth at once, before this run draws the sidebar (which shows it)."""
    state.store(key)
    sample = state.get("home.sample")
    if sample is None:
        return
    try:
        state.put("home.truth", truth_setting(resources.open_cached_stack(sample.path)))
    except ProtoscopeError:
        state.put("home.truth", None)


def open_demo() -> Sample:
    try:
        path = ensure_demo(settings.demo_dir())
    except OSError as error:
        raise StackError(f"cannot write the demo stack into {settings.demo_dir()}: {error.strerror}; "
                         "run `python -m core demo --ensure` or set PROTOSCOPE_DEMO_DIR to a writable folder") from None
    return open_sample(path, "demo", path.name)


def open_path(text: str) -> Sample:
    path = settings.resolve_in_root(text)
    if path.is_dir() or path.suffix.lower() in settings.SUPPORTED_SUFFIXES:
        return open_sample(path, "path")
    raise StackError(f"'{path.name}' is not a stack Protoscope can open; supported: "
                     f"{', '.join(settings.SUPPORTED_SUFFIXES)} files or a folder of images")


def open_upload(name: str, data: bytes) -> Sample:
    return open_sample(resources.save_upload(name, data), "upload", name)


def truth_from_channel(stack: Stack, image_channel: int, truth_channel: int) -> Truth:
    """Truth as a channel; ProtoscopeError when it is the image channel itself."""
    channel = stack.resolve_channel(truth_channel)
    if channel == stack.resolve_channel(image_channel):
        raise ProtoscopeError(f"the ground-truth channel {channel} is the image channel; choose another channel, "
                              "a mask file, or no ground truth")
    return Truth(channel=channel)


def truth_from_file(stack: Stack, path: Path) -> Truth:
    """Truth as a mask stack file; StackError unless it opens and has the stack's Z, Y, X."""
    mask_stack = resources.open_cached_stack(path)
    resources.check_truth_file(mask_stack, stack)
    return Truth(path=str(Path(path).resolve()))


def backbone_options() -> list[str]:
    return list(BACKBONES)


def backbone_title(name: str) -> str:
    spec = BACKBONES[name]
    if spec.family == "filterbank":
        return f"{spec.title} — {spec.embed_dim} features, no weights"
    return f"{spec.title} — dim {spec.embed_dim}, {spec.n_params / 1e6:.0f} M parameters"


def describe_stack(stack: Stack) -> str:
    z, c, y, x = stack.shape
    voxel = stack.voxel_size
    size = f"{voxel.x:g} x {voxel.y:g} x {voxel.z:g} µm" if voxel is not None else "unknown (areas in pixels only)"
    return (f"{stack.format} · {z} slices x {c} channel(s) x {y} x {x} px · {stack.dtype.name} · voxel {size}"
            + (f" · {stack.n_timepoints} time points (t=0 used)" if stack.n_timepoints > 1 else ""))


def picked_folder(folder: Path, root: Path, pick: str) -> str:
    """The folder (relative to the data root, '' for the root) the browser enters for ``pick``: '..' or 'name/'."""
    target = folder.parent if pick == ".." else folder / pick.rstrip("/")
    relative = str(target.relative_to(root))
    return "" if relative == "." else relative


def session_options(mode: str, controls: dict[str, object], more: str) -> dict[str, object]:
    """The advanced options to keep in the session (``home.options``) from the Open sample page's controls.

    controls : the value of each option's own control; '(mode default)' choices and blank text mean the mode's
        value. more : 'name=value' lines of any other option. Only what differs from the mode's defaults is kept
        (as None otherwise), so the mode's own tuned values stay in charge. Raises ThresholdError / OptionError
        for a bad value, ProtoscopeError for an option given twice.
    """
    base = PipelineConfig.for_mode(mode)
    options: dict[str, object] = {}
    for name, value in controls.items():
        if isinstance(value, str):
            value = value.strip()
            value = None if not value or value.startswith("(") else value
        options[name] = value
    if options.get("threshold"):
        ThresholdSpec.parse(str(options["threshold"]))  # ThresholdError says how to write it
    extra = parse_option_assignments([line for line in more.splitlines() if line.strip()])
    owned = sorted(set(extra) & set(options))
    if owned:
        raise ProtoscopeError(f"set {', '.join(owned)} with {'its' if len(owned) == 1 else 'their'} own control "
                              "above, not in 'More options'")
    options.update(extra)
    if options.get("negative_weight") == base.negative_weight:
        options["negative_weight"] = None
    if options.get("scoring") == base.scoring.value:
        options["scoring"] = None
    base.with_options(**{k: v for k, v in options.items() if v not in (None, "")})
    return options


def reset_mode_options(mode: str) -> None:
    """Start the advanced options λ and scoring from ``mode``'s own values (its tuned defaults stay in charge)."""
    base = PipelineConfig.for_mode(mode)
    state.put("home.options_mode", mode)
    state.set_bound("home.opt_lambda", base.negative_weight)
    state.set_bound("home.opt_scoring", base.scoring.value)
    options = dict(state.get("home.options"))
    options.update(negative_weight=None, scoring=None)
    state.put("home.options", options)


def on_mode_change(widget_key: str | None = None) -> None:
    """on_change of the mode radios (Open sample page; the sidebar's passes its widget key)."""
    state.store("home.mode", widget_key)
    reset_mode_options(state.get("home.mode"))
