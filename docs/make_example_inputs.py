"""Make the example reference pictures in example_inputs/ from scikit-image's bundled sample
photos (licenses in example_inputs/LICENSE.md): crop, shrink, and draw each object's mask from
the hand-placed polygons and ellipses below (coordinates in the shrunk picture's pixels).

The two objects that the workflows give two views of (cat, cup) are cropped so the object sits
in the middle, and their second view is the mirrored picture; their masks are drawn symmetric
about the vertical centre line, so one mask fits both views.

    .venv/bin/python -m pip download scikit-image --no-deps -d /tmp/skimg
    (cd /tmp/skimg && unzip -q scikit_image-*.whl 'skimage/data/*')
    .venv/bin/python -m docs.make_example_inputs /tmp/skimg/skimage/data
"""
import os
import sys

from PIL import Image, ImageDraw, ImageOps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDER = os.path.join(ROOT, "example_inputs")

JPEG_QUALITY = 90
# name: (source file, crop box in the source (left, top, right, bottom), size, mirrored view,
#        mask shapes: ("ellipse", box) or ("polygon", points))
PICTURES = {
    "chelsea": ("chelsea.png", (0, 0, 450, 300), (240, 160), True,
                [("ellipse", (18, -10, 222, 168))]),
    "coffee": ("coffee.png", (27, 0, 527, 400), (240, 192), True,
               [("ellipse", (20, 14, 220, 186))]),
    "astronaut": ("astronaut.png", (0, 0, 512, 512), (224, 224), False,
                  [("ellipse", (64, 4, 134, 74)),
                   ("polygon", [(80, 64), (116, 64), (150, 100), (158, 132), (124, 150),
                                (120, 224), (8, 224), (12, 150), (26, 108), (50, 94)])]),
    "rocket": ("rocket.jpg", (170, 0, 470, 427), (168, 240), False,
               [("polygon", [(80, 95), (84, 88), (90, 88), (94, 95), (94, 222), (80, 222)])]),
}


def mask_of(size, shapes):
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    for kind, geometry in shapes:
        getattr(draw, kind)(geometry, fill=255)
    return mask


def main(source_folder):
    os.makedirs(FOLDER, exist_ok=True)
    for name, (source, box, size, mirrored, shapes) in PICTURES.items():
        picture = Image.open(os.path.join(source_folder, source)).convert("RGB")
        picture = picture.crop(box).resize(size, Image.LANCZOS)
        # Photos as JPEG (a few KB each, a PNG is ten times larger); masks as lossless PNG.
        picture.save(os.path.join(FOLDER, f"{name}.jpg"), quality=JPEG_QUALITY)
        if mirrored:
            ImageOps.mirror(picture).save(os.path.join(FOLDER, f"{name}_mirrored.jpg"),
                                          quality=JPEG_QUALITY)
        mask_of(size, shapes).save(os.path.join(FOLDER, f"{name}_mask.png"), optimize=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
