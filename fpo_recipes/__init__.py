"""fpo-recipes: feature-level constrained preference optimization recipes."""
__version__ = "0.1.0"
