"""Official checkpoints in and out (arvision-import, arvision-export): `base` holds what every family shares (reading
files as data, strict name maps), `runs` turns files into run folders and back, and one module per family says how
its files lay out their tensors."""
