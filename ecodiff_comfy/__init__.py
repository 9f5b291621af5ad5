"""ComfyUI host side of the pack: the only code that touches ComfyUI's internals (imported lazily),
one concern per module, and the shipped data files.

- ``folders``: the pack's model folders and the shipped calibration prompts;
- ``weights``: a MODEL's denoiser module and the weights it really computes with;
- ``sampling``: calibration trajectories inside ComfyUI's sampling machinery (one x0 denoiser per prompt);
- ``learning`` (+ ``preflight``, the memory check before it): learning a sparsity mask;
- ``soft_gates``: the same-size preview; ``pruned_models``: the physically smaller MODEL;
- ``pruned_files``: saving and loading pruned models; ``lora_on_pruned``, ``attention_patches``:
  what ComfyUI's LoRA loaders and attention patches need on a pruned model;
- ``recover``: LoRA Recover; ``progress``: progress bar, interrupts, UI messages;
- ``demo_model``, ``images``: the shipped digits model and the nodes' pictures.
"""
