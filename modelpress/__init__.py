"""modelpress: a self-hosted service that compresses transformer models.

The command line is :mod:`modelpress.cli` (``modelpress up`` runs everything embedded).
"""

__version__ = "0.1.0"
