"""Training generators: the loop, paired data, losses, the PatchGAN discriminator and its CLI."""
