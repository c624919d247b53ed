"""difftune: fine-tune diffusion models (Kandinsky 5.0 Image/Video, SDXL) with LoRA or full training."""

__version__ = "0.1.0"
