"""The one decoder, its config, the family registry, and model construction/loading."""
