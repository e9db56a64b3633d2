"""The corpus catalog, catalog.json. This directory is installed as the package charlm.corpora
(see pyproject.toml) so that an installed charlm reads it with importlib.resources."""
