"""Axolotl plugins shipped by fpo-recipes."""
