"""The bottom layer: errors, atomic files, names, params.yaml. Imports nothing of cellcontrast."""
