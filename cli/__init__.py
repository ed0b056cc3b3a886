"""The fpo command line."""
