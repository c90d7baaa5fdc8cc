"""The data layer: datasets in their official layouts, the two datamodules, and the constants and errors every
layer shares. ``datamodules.build.build_datamodule`` turns a run's config into a datamodule."""
