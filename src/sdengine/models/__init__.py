"""Networks: the U-Net, the VAE and the text encoders, each one readable file with a config and presets."""
