"""The click canvas (streamlit-drawable-canvas 0.13 in point mode): Fabric circles <-> image points.

Coordinates: the canvas is drawn at display size (width, height) with a background PNG of exactly that size
("stretch" fit, scale 1), so canvas px -> image px is a plain rescale by the slice's (X, Y) / display size.
A point-mode click at canvas (cx, cy) becomes a Fabric circle with ``originX='left', originY='center'``,
``left = cx - (radius + strokeWidth / 2)`` and ``top = cy``.

The canvas keeps its own drawing between reruns; the app keeps the points per slice in session state and
passes a snapshot, frozen when the canvas key is first used, as ``initial_drawing`` (feeding every result
back would lose fast clicks). ``read_objects`` reads the widget's value from session state *before* the
canvas is drawn, so the heatmap drawn behind it already includes the click that caused the rerun.
"""

from __future__ import annotations

from typing import Any, Sequence

import streamlit as st

from ui import state

POINT_RADIUS = 4  # display px
STROKE_WIDTH = 2
COLORS = {1: "#00dc00", -1: "#ff2828"}  # positive / negative


def to_image_xy(obj: dict, display: tuple[int, int], slice_shape: tuple[int, int]) -> tuple[int, int]:
    """Image (x, y) in original pixels of one Fabric circle drawn in point mode, clipped into the slice."""
    width, height = display
    n_y, n_x = slice_shape
    radius = float(obj.get("radius", POINT_RADIUS)) * float(obj.get("scaleX", 1) or 1)
    stroke = float(obj.get("strokeWidth", STROKE_WIDTH) or 0)
    left, top = float(obj.get("left", 0)), float(obj.get("top", 0))
    origin_x, origin_y = obj.get("originX", "left"), obj.get("originY", "center")
    cx = left + radius + stroke / 2 if origin_x == "left" else left
    cy = top if origin_y == "center" else top + radius + stroke / 2
    x = int(cx * n_x / width)
    y = int(cy * n_y / height)
    return min(max(x, 0), n_x - 1), min(max(y, 0), n_y - 1)


def to_object(x: int, y: int, label: int, display: tuple[int, int], slice_shape: tuple[int, int]) -> dict:
    """The Fabric circle that shows image point (x, y) with its label's colour (the point tool's format)."""
    width, height = display
    n_y, n_x = slice_shape
    cx = (x + 0.5) * width / n_x
    cy = (y + 0.5) * height / n_y
    color = COLORS[1 if label > 0 else -1]
    return {
        "type": "Circle", "originX": "left", "originY": "center",
        "left": cx - (POINT_RADIUS + STROKE_WIDTH / 2), "top": cy,
        "radius": POINT_RADIUS, "strokeWidth": STROKE_WIDTH, "stroke": color, "fill": color,
        "selectable": False, "evented": False,
    }


def snapshot(points: Sequence[Sequence[int]], display: tuple[int, int], slice_shape: tuple[int, int]) -> dict:
    """``initial_drawing`` for a slice's points [[x, y, label], ...]."""
    return {"objects": [to_object(int(p[0]), int(p[1]), int(p[2]), display, slice_shape) for p in points]}


def read_objects(key: str) -> list[dict] | None:
    """The circles the canvas ``key`` reported (None before it was first drawn)."""
    value = st.session_state.get(key)
    if not isinstance(value, dict):
        return None
    drawing = value.get("drawing") or {}
    raw = drawing.get("raw") if isinstance(drawing, dict) else None
    if not isinstance(raw, dict):
        return None
    return [obj for obj in raw.get("objects", []) if str(obj.get("type", "")).lower() == "circle"]


def sync_points(
    stored: list[list[int]],
    objects: list[dict] | None,
    label: int,
    display: tuple[int, int],
    slice_shape: tuple[int, int],
) -> tuple[list[list[int]], int]:
    """Merge what the canvas shows into a slice's stored points [[x, y, label], ...].

    Circles beyond the stored ones are new clicks and get ``label`` (the radio's value now: the stroke
    colour lags a run behind); fewer circles than stored points means the canvas's own undo/delete was used,
    so the list is cut; positions follow the canvas (its edit tool can move points).
    Returns (new list, number of points added).
    """
    if objects is None:
        return stored, 0
    merged = []
    for index, obj in enumerate(objects):
        x, y = to_image_xy(obj, display, slice_shape)
        merged.append([x, y, stored[index][2] if index < len(stored) else int(label)])
    return merged, max(0, len(objects) - len(stored))


def prepare(sid: str, z: int, display: tuple[int, int], slice_shape: tuple[int, int]) -> tuple[str, int, dict]:
    """Take in the clicks the canvas of slice z sent, before anything is drawn; (canvas key, label, initial drawing).

    The key holds the label (``segment.label``): a radio change gives a fresh canvas drawing in the new colour (an
    existing one would lag a click behind); the clicks of the canvas shown before the change are merged too.
    A canvas being mounted starts from the points as they are now; a mounted one keeps its first snapshot.
    """
    label = 1 if state.get("segment.label", "positive") == "positive" else -1
    stem = f"segment.canvas.{sid}.{z}.{display[0]}.{state.get('segment.generation')}"
    key = f"{stem}.{label}"
    last = state.get("segment.canvas_last")
    sources = [(last[0], last[1])] if last and last[0] != key and last[0].startswith(stem + ".") else []
    for source, source_label in sources + [(key, label)]:
        stored = state.slice_points(sid, z)
        merged, _ = sync_points(stored, read_objects(source), source_label, display, slice_shape)
        if merged != stored:
            state.set_slice_points(sid, z, merged)
    state.put("segment.canvas_last", (key, label))
    snapshots = state.get("segment.snapshots")
    if key not in snapshots or read_objects(key) is None:
        snapshots[key] = snapshot(state.slice_points(sid, z), display, slice_shape)
        while len(snapshots) > 64:
            snapshots.pop(next(iter(snapshots)))
    return key, label, snapshots[key]


def draw(key: str, background_png: bytes, initial: dict, display: tuple[int, int], label: int) -> Any:
    """Draw the point canvas (imported here: the component registers itself only inside a Streamlit run)."""
    from streamlit_drawable_canvas import st_canvas

    color = COLORS[1 if label > 0 else -1]
    return st_canvas(
        drawing_mode="point",
        background_image=background_png,
        initial_drawing=initial,
        width=display[0],
        height=display[1],
        stroke_width=STROKE_WIDTH,
        stroke_color=color,
        fill_color=color,
        point_display_radius=POINT_RADIUS,
        update_streamlit=True,
        key=key,
    )


def click_value(points_xy: Sequence[tuple[int, int]], display: tuple[int, int], slice_shape: tuple[int, int],
                existing: Sequence[Sequence[int]] = ()) -> dict:
    """A canvas widget value as the browser would send it after clicking ``points_xy`` (tests inject this).

    existing : the slice's points already on the canvas ([[x, y, label], ...]), kept in front.
    """
    objects = [to_object(int(p[0]), int(p[1]), int(p[2]), display, slice_shape) for p in existing]
    objects += [to_object(int(x), int(y), 1, display, slice_shape) for x, y in points_xy]
    return {"drawing": {"raw": {"objects": objects}, "data": None}, "backgroundFit": None}
