"""Small models trained on scikit-learn's bundled 8x8 digits, for demos and end-to-end tests.

``python -m sample_models.build`` retrains them reproducibly (needs scikit-learn); the checkpoints
and calibration data it writes are shipped beside this file.
"""
