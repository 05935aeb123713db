"""Image-generation metrics: FID and KID through torch-fidelity with the registry's FID Inception."""

from .fid import (
    FEATURE_EXTRACTOR_NAME,
    FIDInceptionV3,
    InceptionFeatures,
    UInt8ImageDataset,
    compute_fid_kid,
    fid_inception_path,
    inception_features,
    inception_input,
)

__all__ = [
    "FEATURE_EXTRACTOR_NAME",
    "FIDInceptionV3",
    "InceptionFeatures",
    "UInt8ImageDataset",
    "compute_fid_kid",
    "fid_inception_path",
    "inception_features",
    "inception_input",
]
