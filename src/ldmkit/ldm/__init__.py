"""The model layer that training and inference both stand on.

- `build`: a latent diffusion model's parts assembled from an `LDMConfig`, and the CompVis state-dict layout;
- `conditioned_unet`: the UNet with its conditioner in front, the network samplers and the objective call;
- `concat`: the spatial inputs concatenated to the latent (low-res images, masked-image latents);
- `checkpoint`: safetensors files with JSON metadata, nested states, key reports;
- `files`: the files a finished run leaves (`ldm.safetensors`, `autoencoder.safetensors`).

It imports models, config, latent and data helpers, never `training/`, the pipeline or the front ends.
"""
