"""The daemon's configuration: one schema table (``schema.py``) drives keys, types, defaults,
validation and the example file; see ``schema.py`` for the package map and how to add a key."""
