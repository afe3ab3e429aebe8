"""The thesis's experiments as reports.

- ``base``    the experiment names, the ``Experiment`` result (tables, figures, notes, info), row grouping;
- ``runs``    the runs over ``core.protocol``: backbones, separability, points, threshold, transfer;
- ``figures`` the plotly figures, drawn from the tables' rows;
- ``report``  CSV tables, figures (HTML, PNG), README.md + run.json per experiment and the folder's index.
"""
