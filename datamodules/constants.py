"""Constants shared by the data and the model layers; this module imports nothing, so anything may import it."""

# Label value of pixels that carry no class (void, unlabelled, pseudo-label rejected).
IGNORE_INDEX = 255

# The 19 Cityscapes train ids, in order (cityscapesScripts helpers/labels.py); every semantic task predicts them.
CITYSCAPES_CLASSES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)

# The colour of each train id, in CITYSCAPES_CLASSES order (cityscapesScripts helpers/labels.py); the prediction
# panels draw ignore (255) black.
CITYSCAPES_PALETTE = (
    (128, 64, 128),
    (244, 35, 232),
    (70, 70, 70),
    (102, 102, 156),
    (190, 153, 153),
    (153, 153, 153),
    (250, 170, 30),
    (220, 220, 0),
    (107, 142, 35),
    (152, 251, 152),
    (70, 130, 180),
    (220, 20, 60),
    (255, 0, 0),
    (0, 0, 142),
    (0, 0, 70),
    (0, 60, 100),
    (0, 80, 100),
    (0, 0, 230),
    (119, 11, 32),
)

# ImageNet normalisation on the 0-1 scale (timm backbones, MiT).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Sam.pixel_mean / Sam.pixel_std (segment_anything/build_sam.py), on the 0-255 scale.
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
