"""Small helpers every stage may use: typed configuration, sizes, line charts, the torchvision shim."""
