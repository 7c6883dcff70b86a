"""Paper recipes (LightningCLI YAML), shipped as package data ``lebm_zoo.recipes``; see ``lebm-zoo recipes``."""
