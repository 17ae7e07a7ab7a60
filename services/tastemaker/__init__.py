"""Tastemaker: a recommender service that understands text.

Importing this package loads no model and starts nothing; see `tastemaker.app` for the Serve
application and `tastemaker.cli` for the command line.
"""

__version__ = "0.1.0"
