"""jaxsft: supervised fine-tuning of Qwen2 / Qwen2.5 in JAX/Flax, a port of verl's FSDP SFT trainer."""

__version__ = "0.1.0"
