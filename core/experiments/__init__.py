"""The thesis's experiments as reports: runs, figures, report pages."""
