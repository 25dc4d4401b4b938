"""jaxsft: supervised fine-tuning of Qwen2/2.5, Qwen3, Llama 3, Mistral and Gemma in JAX/Flax, a port of verl's FSDP SFT trainer."""

__version__ = "0.1.0"
