"""The loader-speed script writes each dataset in its official layout at its real size and times both paths."""

from experiments.loader_speed import measure


def test_measures_every_dataset_and_stream_on_real_sized_files():
    rows = measure(frames=1, repeats=1)
    assert [(row["dataset"], row["stream"]) for row in rows] == [
        ("gta5", "labelled"),
        ("gta5", "unlabelled"),
        ("cityscapes", "labelled"),
        ("cityscapes", "unlabelled"),
        ("synthia", "labelled"),
        ("synthia", "unlabelled"),
        ("kvasir", "instances"),
    ]
    assert all(row["raw"] > 0 and row["loader"] > 0 for row in rows)
