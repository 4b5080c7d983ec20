"""Everything between image files and tensors: I/O, degradations, datasets, benchmarks.

Submodules: :mod:`~irformer.data.io` (read/validate/write),
:mod:`~irformer.data.degradations` (MATLAB bicubic, noise, JPEG),
:mod:`~irformer.data.datasets` (training/validation datasets) and
:mod:`~irformer.data.benchmarks` (named test sets under a data root).
"""

from irformer.data.degradations import (
    add_gaussian_noise,
    jpeg_compress,
    matlab_imresize,
    mod_crop,
)
from irformer.data.io import (
    ImageReadError,
    OutputExistsError,
    image_to_tensor,
    list_images,
    quantize,
    read_image,
    tensor_to_image,
    write_image,
)

__all__ = [
    "ImageReadError",
    "OutputExistsError",
    "add_gaussian_noise",
    "image_to_tensor",
    "jpeg_compress",
    "list_images",
    "matlab_imresize",
    "mod_crop",
    "quantize",
    "read_image",
    "tensor_to_image",
    "write_image",
]
