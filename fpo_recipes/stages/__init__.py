"""Pipeline stages. :mod:`.registry` declares them in order (sft → pairs → sae → precompute → train →
evaluate) with what each depends on; :mod:`.run` plans and runs whatever is registered;
:mod:`.markers` holds their done markers. Each stage module takes a Recipe and returns paths;
import the one you need (they pull in torch/transformers lazily)."""
