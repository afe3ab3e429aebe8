"""Protoscope core: stack I/O, feature backbones, prototypes, thresholds, metrics.

Everything here is plain Python over numpy arrays and dataclasses, with no Streamlit import,
so that the app, the CLI (``python -m core``) and user scripts share the same functions.
"""

__version__ = "0.1.0"
