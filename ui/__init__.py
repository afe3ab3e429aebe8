"""Helpers of the Streamlit app (``app.py`` + ``pages/``): state, cached resources, rendering, page logic.

The pages only read widgets, call these helpers and draw. Numerics live in ``core``; what is here is glue
(session state, caching, PNG rendering, file outputs). Modules that need a running Streamlit import it;
``ui.settings`` and ``ui.render`` do not.
"""
