"""The networks the methods train, one file per family as in configs/network/: DeepLabV2, SegFormer (MiT +
DAFormer head), SAM and its LoRA branches, and the small heads methods add. The papers' math lives in
``lightning_modules/components``."""
