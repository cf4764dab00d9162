"""Models: backbones (ResNets, the small CNN, ViTs, timm), heads, and checkpoint layouts (ours and the
official ISD, MoCo, DINO and AdaSim files)."""
