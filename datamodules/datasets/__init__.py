"""Dataset registry (temporary: procedural datasets only)."""
from datamodules.synthetic import SyntheticShapes, SyntheticStreets

DATASETS = {
    "synth_streets": lambda root, split, **options: SyntheticStreets(split=split, **options),
    "synth_shapes": lambda root, split, **options: SyntheticShapes(split=split, **options),
}


def build_dataset(name, root, split, **options):
    return DATASETS[name](root, split, **options)
