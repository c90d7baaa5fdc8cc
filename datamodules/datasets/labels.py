"""Label tables: Cityscapes labelIds and SYNTHIA ids -> the 19 Cityscapes train ids.

Sources: cityscapesScripts ``helpers/labels.py`` (labelId -> trainId), SYNTHIA-RAND-CITYSCAPES
class list as used by the UDA literature (docs/datasets.md#the-19-cityscapes-train-ids). The class names are
``datamodules.constants.CITYSCAPES_CLASSES``.
"""

CITYSCAPES_LABELID_TO_TRAINID = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    31: 16,
    32: 17,
    33: 18,
}

SYNTHIA_ID_TO_TRAINID = {
    3: 0,
    4: 1,
    2: 2,
    21: 3,
    5: 4,
    7: 5,
    15: 6,
    9: 7,
    6: 8,
    1: 10,
    10: 11,
    17: 12,
    8: 13,
    19: 15,
    12: 17,
    11: 18,
}

ALL_19 = tuple(range(19))
# SYNTHIA has no terrain, truck, train; the 13-class protocol also drops wall, fence, pole.
SYNTHIA_16 = tuple(c for c in ALL_19 if c not in (9, 14, 16))
SYNTHIA_13 = tuple(c for c in SYNTHIA_16 if c not in (3, 4, 5))
# NTHU cross-city (Chen et al., ICCV 2017) annotates 13 classes, exactly the 13 of SYNTHIA's 13-class protocol:
# road, sidewalk, building, traffic light, traffic sign, vegetation, sky, person, rider, car, bus, motorcycle,
# bicycle. Its label PNGs hold Cityscapes labelIds; the other Cityscapes classes are ignore in that protocol.
CROSS_CITY_13 = SYNTHIA_13
CROSS_CITY_LABELID_TO_TRAINID = {
    label_id: train_id for label_id, train_id in CITYSCAPES_LABELID_TO_TRAINID.items() if train_id in CROSS_CITY_13
}
