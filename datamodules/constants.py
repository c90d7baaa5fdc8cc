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

# ImageNet normalisation on the 0-1 scale (timm backbones, MiT).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Sam.pixel_mean / Sam.pixel_std (segment_anything/build_sam.py), on the 0-255 scale.
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
