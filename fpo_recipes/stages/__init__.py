"""Pipeline stages (precompute → train → evaluate). Each takes a Recipe and returns paths;
import the stage module you need (they pull in torch/transformers lazily)."""
